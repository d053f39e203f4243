"""LoRA linear, defined plainly: y = x W^T + b + s * (drop(x) A^T) B^T."""
from __future__ import annotations

import torch


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, keep_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r].

    ``keep_mask`` (bool, shape of x) applies inverted dropout to the LoRA branch only:
    drop(x) = x * keep_mask / (1 - dropout_p). Returns [..., out] in x's dtype.
    """
    dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((dropped @ lora_A.t()) @ lora_B.t())
