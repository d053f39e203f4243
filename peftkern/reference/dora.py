"""DoRA linear, defined plainly (materializing W + s B A):

    y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b

with the row norm detached from the graph, as the DoRA paper (section 4.3) and PEFT do.
"""
from __future__ import annotations

import torch


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output row: weight [out, in], lora_A [r, in], lora_B [out, r] -> [out]."""
    return torch.linalg.vector_norm(weight + scaling * (lora_B @ lora_A), dim=1)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r], magnitude [out].

    ``keep_mask`` (bool, shape of x) applies inverted dropout to the LoRA branch only:
    drop(x) = x * keep_mask / (1 - dropout_p). Returns [..., out] in x's dtype; gradients reach
    x, lora_A, lora_B, magnitude (and weight, bias if they require grad) but never through the norm.
    """
    norm = dora_weight_norm(weight, lora_A, lora_B, scaling).detach()
    dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    pre = x @ weight.t() + scaling * ((dropped @ lora_A.t()) @ lora_B.t())
    y = (magnitude / norm).to(pre.dtype) * pre
    return y + bias if bias is not None else y
