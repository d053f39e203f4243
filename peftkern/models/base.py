"""The demo's base model: the tiny Llama trained briefly (full weights) on the bundled plain-text
corpus, so it knows the skills but not the chat format. The corpus states facts as sentences
("7 + 8 is 15.", "'kel' reversed is lek."); the chat-format prompts held out from fine-tuning may
ask about facts it stated, as a user asks a pretrained model about what it read.

This module knows the settings, where the trained weights live (``$PEFTKERN_CACHE`` or
``~/.cache/peftkern``, keyed by everything that shapes them) and how to load them; the training
itself is :mod:`peftkern.train.pretrain` (models/ imports nothing above it)."""
from __future__ import annotations

import hashlib
import json
import os

from peftkern.models.tiny import SIZES

# ~3 minutes of one CPU core; enough for the skills in plain-text form (measured on held-out sentences:
# upper ~2/3, reverse and add nearly all right after 1000 steps at these settings).
PRETRAIN = dict(size="demo", questions=30000, steps=800, batch_size=16, seq_len=128, lr=5e-3, warmup=20, seed=0)
CORPUS_VERSION = 2


def cache_root() -> str:
    return os.environ.get("PEFTKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peftkern")


def resolve_settings(settings: dict | None = None) -> dict:
    """:data:`PRETRAIN` with ``settings`` laid over it."""
    return {**PRETRAIN, **(settings or {})}


def _key(settings: dict) -> str:
    blob = json.dumps({"settings": settings, "arch": SIZES[settings["size"]], "corpus": CORPUS_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_path(settings: dict | None = None) -> str:
    """The cache directory of the base trained with these settings (it may not exist yet)."""
    settings = resolve_settings(settings)
    return os.path.join(cache_root(), f"tiny-{settings['size']}-{_key(settings)}")


def is_cached(settings: dict | None = None) -> bool:
    """Whether the base for these settings is already in the cache."""
    return os.path.isfile(os.path.join(cached_path(settings), "config.json"))


def load_cached_tiny(settings: dict | None = None):
    """The cached base (``LlamaForCausalLM``, fp32), or None when it is not cached."""
    from transformers import LlamaForCausalLM

    if not is_cached(settings):
        return None
    return LlamaForCausalLM.from_pretrained(cached_path(settings))


def pretrained_tiny(quiet: bool = False, settings: dict | None = None):
    """The pretrained tiny base (``LlamaForCausalLM``, fp32) from the cache. Building it is training, a
    job of :mod:`peftkern.train.pretrain` (``peftkern pretrain``, and every trainer or ``peftkern demo``
    with ``--model tiny`` builds it on first use); here a base not built yet is a FileNotFoundError
    saying so. ``quiet`` is accepted for the callers that pass it (loading prints nothing)."""
    model = load_cached_tiny(settings)
    if model is None:
        raise FileNotFoundError(f"the embedded tiny base is not built yet (no {cached_path(settings)}): build it "
                                "once with 'peftkern pretrain' (a few minutes on one CPU core); 'peftkern demo' and "
                                "the trainers with --model tiny build it too")
    return model
