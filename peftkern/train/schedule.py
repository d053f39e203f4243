"""Learning-rate schedules with linear warm-up: cosine, linear or constant decay to ``min_ratio``."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer, total: int, warmup: int, kind: str, min_ratio: float = 0.0):
    """A ``LambdaLR`` over :func:`lr_factor` (its state dict holds the step, for resume)."""
    if total <= 0:
        raise ValueError(f"the run has {total} optimizer steps; need at least 1")
    if not 0 <= warmup <= total:
        raise ValueError(f"warmup_steps must be in [0, {total}], got {warmup}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind, min_ratio))
