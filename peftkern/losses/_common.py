"""Shared pieces of the losses: masked means, sequence sums of token log-probs, argument checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true (over ``dim``, or everything); 0 where nothing is."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum(dim) if dim is not None else (values * mask).sum()
    count = mask.sum(dim) if dim is not None else mask.sum()
    return total / count.clamp(min=1.0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """token_logps [B, T], mask [B, T] (bool or 0/1) -> [B]: the sum of the masked token log-probs,
    or their mean per sequence when ``average`` (SimPO, ORPO and IPO use the mean)."""
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must have one shape")
    total = (token_logps * mask.to(token_logps.dtype)).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


def check_same_shape(op: str, **tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{op}: inputs must have one shape, got {listing}")


def check_choice(op: str, name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: unknown {name} {value!r}; choose one of {', '.join(sorted(choices))}")


def check_positive(op: str, name: str, value: float) -> float:
    value = float(value)
    if not value > 0.0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return value


def smoothed_logsigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log s(x) - e log s(-x): the cDPO loss (Mitchell 2023, "A note on DPO with noisy
    preferences"), which is the plain DPO loss at e = 0 (also SimPO's and CPO's)."""
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def smoothed_logsigmoid_grad(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """d/dx of :func:`smoothed_logsigmoid`: -(1 - e) s(-x) + e s(x)."""
    return -(1.0 - label_smoothing) * torch.sigmoid(-logits) + label_smoothing * torch.sigmoid(logits)


def sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    """d s(x) / dx = s(x) s(-x)."""
    return torch.sigmoid(x) * torch.sigmoid(-x)
