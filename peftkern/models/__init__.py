"""The embedded default: a tiny Llama, a byte-level tokenizer with chat tokens, and bundled tasks.
Nothing here downloads anything."""
from peftkern.models.base import pretrained_tiny
from peftkern.models.tiny import build_tiny_model, tiny_config
from peftkern.models.tokenizer import build_byte_tokenizer

__all__ = ["build_byte_tokenizer", "build_tiny_model", "tiny_config", "pretrained_tiny"]
