"""The embedded default: a tiny Llama, a byte-level tokenizer with chat tokens, and bundled tasks.
Nothing here downloads anything, and nothing here imports the trainers (the base model's
pretraining is :mod:`peftkern.train.pretrain`)."""
from peftkern.models.base import cached_path, is_cached, load_cached_tiny
from peftkern.models.tiny import build_tiny_model, tiny_config
from peftkern.models.tokenizer import build_byte_tokenizer

__all__ = ["build_byte_tokenizer", "build_tiny_model", "tiny_config", "cached_path", "is_cached", "load_cached_tiny"]
