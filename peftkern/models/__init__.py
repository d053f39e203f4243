"""The embedded default: a tiny Llama, a byte-level tokenizer with chat tokens, and bundled tasks.
Nothing here downloads anything, and nothing here imports the trainers: :func:`pretrained_tiny` loads
the pretrained base from the cache, or from the weights shipped in the package; building it is :mod:`peftkern.train.pretrain` (``peftkern pretrain``)."""
from peftkern.models.base import base_dir, cached_path, is_cached, load_cached_tiny, pretrained_tiny, shipped_path
from peftkern.models.tiny import build_tiny_model, tiny_config
from peftkern.models.tokenizer import build_byte_tokenizer

__all__ = ["build_byte_tokenizer", "build_tiny_model", "tiny_config", "cached_path", "is_cached", "load_cached_tiny",
           "pretrained_tiny", "base_dir", "shipped_path"]
