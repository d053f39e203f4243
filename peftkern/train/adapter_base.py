"""The base model an adapter names in ``base_model_name_or_path``: a directory PEFT's loaders can
open (model and tokenizer), so each adapter a run writes says which base it needs."""
from __future__ import annotations

import os

from peftkern.models.base import base_dir, cached_path
from peftkern.models.tiny import build_tiny_model
from peftkern.models.tokenizer import build_byte_tokenizer
from peftkern.train.atomic import atomic_dir


def ensure_tokenizer(path: str) -> None:
    """Add the byte tokenizer's files to a cached tiny base written before they were kept there."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        try:
            build_byte_tokenizer().save_pretrained(path)
        except OSError:
            pass  # a read-only cache still serves the weights


def adapter_base(cfg, out_dir: str, write: bool = True) -> str:
    """The absolute directory of the base ``cfg.model`` names: a local model's own directory, the cached
    pretrained tiny base (``tiny``: the cache's or the shipped copy, where the run loaded it from), or (``tiny-micro``) the micro model
    saved to ``out_dir/base_model`` with the tokenizer when ``write`` and not there yet."""
    if cfg.model == "tiny":
        path = base_dir() or cached_path()
        if write:
            ensure_tokenizer(path)
        return path
    if cfg.model == "tiny-micro":
        path = os.path.abspath(os.path.join(out_dir, "base_model"))
        if write and not os.path.isfile(os.path.join(path, "config.json")):  # a resumed run's is the same
            with atomic_dir(path) as tmp:
                build_tiny_model("micro", seed=cfg.seed).save_pretrained(tmp)
                build_byte_tokenizer().save_pretrained(tmp)
        return path
    return os.path.abspath(cfg.model)
