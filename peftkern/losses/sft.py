"""SFT cross-entropy from per-token log-probs."""
from __future__ import annotations

import torch

from peftkern.losses._common import check_choice

REDUCTIONS = ("mean", "sum", "none")


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0,
             token_mean_logps: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None):
    """Cross-entropy from per-token log-probs: token loss -(1-e) log p(target) - e mean_j log p_j
    (label smoothing e as ``torch.nn.functional.cross_entropy``: the target mixed with the uniform
    distribution), 0 where ``mask`` is false.

    token_logps, mask, token_mean_logps [...] (token_mean_logps needed when e > 0).
    ``reduction``: "mean" over unmasked tokens (or over ``num_items_in_batch`` when given, for
    gradient accumulation), "sum", or "none" (per token).
    """
    check_choice("sft_loss", "reduction", reduction, REDUCTIONS)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"sft_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    if label_smoothing and token_mean_logps is None:
        raise ValueError("sft_loss: label_smoothing > 0 needs token_mean_logps (mean over the vocabulary of log p)")
    mask = mask.to(token_logps.dtype)
    per_token = -token_logps
    if label_smoothing:
        per_token = (1.0 - label_smoothing) * per_token - label_smoothing * token_mean_logps
    per_token = per_token * mask
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return total / (count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1))
