"""The demo's base model: the tiny Llama trained (full weights) on the bundled plain-text corpus, so
it knows the answers but not the chat format. The corpus is questions followed by their answers as
plain text ("What is 7 + 8? 15", "Reverse 'cat'. tac"); the chat-format prompts held out from
fine-tuning may ask what it read, as a user asks a pretrained model about what it read.

This module knows the settings, where the trained weights live and how to load them; the training
itself is :mod:`peftkern.train.pretrain` (models/ imports nothing above it). Two homes, looked up in
this order: the cache (``$PEFTKERN_CACHE`` or ``~/.cache/peftkern``, keyed by everything that shapes
the weights; ``peftkern pretrain --fresh`` and ``peftkern demo --fresh-base`` write there), then the
copy shipped inside the package (``peftkern/models/weights/tiny-base``, written by
``scripts/train_tiny_base.py``), used only while its recorded key equals the key of the settings asked
for, so a change to :data:`PRETRAIN` never loads stale weights."""
from __future__ import annotations

import hashlib
import json
import os

from peftkern.models.tiny import SIZES

# 500 steps: 2319 s of wall time measured on a busy 2-core machine (so the package ships the result;
# see scripts/train_tiny_base.py).
PRETRAIN = dict(size="demo", questions=50000, steps=500, batch_size=16, seq_len=128, lr=2e-3, warmup=30, seed=0)
CORPUS_VERSION = 3
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tiny-base")
SHIPPED_RECORD = "peftkern_base.json"  # {"key", "settings", "sha256", ...}: what the shipped weights are


def cache_root() -> str:
    return os.environ.get("PEFTKERN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peftkern")


def resolve_settings(settings: dict | None = None) -> dict:
    """:data:`PRETRAIN` with ``settings`` laid over it."""
    return {**PRETRAIN, **(settings or {})}


def settings_key(settings: dict) -> str:
    """12 hex digits naming the weights ``settings`` (resolved) train: settings, architecture, corpus."""
    blob = json.dumps({"settings": settings, "arch": SIZES[settings["size"]], "corpus": CORPUS_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_path(settings: dict | None = None) -> str:
    """The cache directory of the base trained with these settings (it may not exist yet)."""
    settings = resolve_settings(settings)
    return os.path.join(cache_root(), f"tiny-{settings['size']}-{settings_key(settings)}")


def shipped_path(settings: dict | None = None) -> str | None:
    """The package's own copy of the base (a model + tokenizer directory) when it was trained with these
    settings, else None."""
    try:
        with open(os.path.join(SHIPPED_DIR, SHIPPED_RECORD), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if record.get("key") != settings_key(resolve_settings(settings)):
        return None
    return SHIPPED_DIR if os.path.isfile(os.path.join(SHIPPED_DIR, "model.safetensors")) else None


def base_dir(settings: dict | None = None) -> str | None:
    """Where the base for these settings is: the cache when built there, else the shipped copy, else None."""
    path = cached_path(settings)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    return shipped_path(settings)


def is_cached(settings: dict | None = None) -> bool:
    """Whether the base for these settings can be loaded without training (cache or shipped copy)."""
    return base_dir(settings) is not None


def load_cached_tiny(settings: dict | None = None):
    """The base (``LlamaForCausalLM``, fp32) from the cache or the shipped copy, or None when neither has it."""
    from transformers import LlamaForCausalLM

    path = base_dir(settings)
    return None if path is None else LlamaForCausalLM.from_pretrained(path)


def pretrained_tiny(quiet: bool = False, settings: dict | None = None):
    """The pretrained tiny base (``LlamaForCausalLM``, fp32) from the cache or, with an empty cache, from
    the weights shipped in the package. Building it is training, a job of :mod:`peftkern.train.pretrain`
    (``peftkern pretrain``); here settings that neither home holds are a FileNotFoundError saying so.
    ``quiet`` is accepted for the callers that pass it (loading prints nothing)."""
    model = load_cached_tiny(settings)
    if model is None:
        raise FileNotFoundError(f"the embedded tiny base is not built yet (no {cached_path(settings)}, and the weights "
                                "shipped in the package were trained with other settings): build it once with "
                                "'peftkern pretrain'; 'peftkern demo' and the trainers with --model tiny build it too")
    return model
