"""Many LoRA adapters over one base in one batch, defined plainly: row i runs through adapter
``adapter_index[i]`` alone (-1: the base alone).

    y_i = x_i W^T + b + s_e * (drop(x_i) A_e[:r_e]^T) B_e[:, :r_e]^T,   e = adapter_index[i] >= 0
    y_i = x_i W^T + b                                                   e = -1
"""
from __future__ import annotations

import torch


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scalings, ranks, adapter_index: torch.Tensor,
                      keep_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None, lora_A [E, R, in] and lora_B [E, out, R]
    (adapter e uses its first ``ranks[e]`` ranks; the rest is padding and never read),
    ``scalings``/``ranks``: E numbers, ``adapter_index`` integer of shape x.shape[:-1] with values in
    [-1, E). ``keep_mask`` (bool, shape of x) drops x on the LoRA branches as in
    ``peftkern.reference.lora``. Returns [..., out] in x's dtype."""
    dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    for e, (scaling, rank) in enumerate(zip(scalings, ranks)):
        term = scaling * ((dropped @ lora_A[e, :rank].t()) @ lora_B[e, :, :rank].t())
        y = y + (adapter_index == e).unsqueeze(-1).to(y.dtype) * term
    return y
