"""Optimizers: AdamW with 32-bit or 8-bit blockwise states, optionally paged to host memory."""
from peftkern.optim.adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["PagedAdamW", "AdamW8bit", "PagedAdamW8bit"]
