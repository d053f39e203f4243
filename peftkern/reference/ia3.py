"""(IA)^3 linear, defined plainly: a learned vector scales the output, or the input of a
feed-forward layer.

    output scale (keys, values):   y = (x W^T + b) * l      l: [out]
    input scale (feed-forward):    y = (x * l) W^T + b      l: [in]
"""
from __future__ import annotations

import torch


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
               feedforward: bool = False) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None, scale [in] (feedforward) or [out]."""
    if feedforward:
        y = (x * scale) @ weight.t()
        return y + bias if bias is not None else y
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y * scale
