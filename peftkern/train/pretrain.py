"""Pretraining of the embedded default's base: the tiny Llama trained (full weights) on the bundled
plain-text corpus, then kept in the cache that :mod:`peftkern.models.base` reads. The package ships
the result for the default settings (``scripts/train_tiny_base.py`` writes it with :func:`pretrain`),
so only other settings, or ``fresh=True``, train here.

The cache directory holds the model and the byte tokenizer, so it is a complete base a PEFT adapter
can name in ``base_model_name_or_path``."""
from __future__ import annotations

import tempfile

from peftkern.models import tasks
from peftkern.models.base import base_dir, cached_path, is_cached, load_cached_tiny, resolve_settings
from peftkern.models.tiny import BOS_ID, END_ID, build_tiny_model
from peftkern.models.tokenizer import build_byte_tokenizer
from peftkern.train.adapter_base import ensure_tokenizer
from peftkern.train.atomic import atomic_dir
from peftkern.train.config import TrainConfig
from peftkern.train.data import pack
from peftkern.train.model import LMWithHeads
from peftkern.train.sft import SFTTrainer


def corpus_examples(n_questions: int, seq_len: int, seed: int = 0) -> list[dict]:
    """The plain-text corpus as packed rows of ``seq_len`` tokens (bos sentence end, repeated)."""
    tok = build_byte_tokenizer()
    items = tasks.questions(n_questions, seed + 7, distinct=False)
    docs = []
    for text in tasks.pretraining_text(items):
        ids = [BOS_ID] + tok(text, add_special_tokens=False)["input_ids"] + [END_ID]
        docs.append({"input_ids": ids, "labels": ids})
    return pack(docs, seq_len)


def build_pretrained_tiny(quiet: bool = False, settings: dict | None = None, cache: bool = True,
                          fresh: bool = False):
    """The pretrained tiny base (``LlamaForCausalLM``, fp32): from the cache or the shipped copy, or
    trained now (the default settings: 39 minutes of wall time measured on a busy 2-core machine) and cached. ``fresh``
    trains it again whatever is there (and replaces the cached copy)."""
    settings = resolve_settings(settings)
    if cache and not fresh:
        model = load_cached_tiny(settings)
        if model is not None:
            ensure_tokenizer(base_dir(settings))
            return model
    model = pretrain(settings, quiet)
    if cache:
        with atomic_dir(cached_path(settings)) as tmp:
            model.save_pretrained(tmp)
            build_byte_tokenizer().save_pretrained(tmp)
    return model


def tiny_base_dir(settings: dict | None = None, quiet: bool = False, fresh: bool = False) -> str:
    """The directory of the pretrained tiny base (model + tokenizer): the cache's, else the shipped
    copy; trained into the cache first when neither holds it, or when ``fresh``."""
    if fresh or not is_cached(settings):
        build_pretrained_tiny(quiet=quiet, settings=settings, fresh=fresh)
    path = base_dir(settings)
    ensure_tokenizer(path)
    return path


def pretrain(settings: dict, quiet: bool = False):
    """Train the tiny base of ``settings`` (see :data:`peftkern.models.base.PRETRAIN`) and return it."""
    lm = build_tiny_model(settings["size"], seed=settings["seed"])
    examples = corpus_examples(settings["questions"], settings["seq_len"], settings["seed"])
    with tempfile.TemporaryDirectory(prefix="peftkern-pretrain-") as out:
        cfg = TrainConfig(model="tiny", lora_r=0, lr=settings["lr"], batch_size=settings["batch_size"],
                          max_steps=settings["steps"], warmup_steps=settings["warmup"], schedule="cosine",
                          min_lr_ratio=0.1, out=out, log_every=10, seed=settings["seed"], quiet=quiet,
                          weight_decay=0.0, strategy="none").check()
        trainer = SFTTrainer(cfg, LMWithHeads(lm), build_byte_tokenizer(), examples)
        trainer.kind = "pretrain base"
        trainer.save = lambda step, state: None  # nothing to resume: the cache is the product
        trainer.save_outputs = lambda summary: None
        trainer.train()
    return lm.eval()
