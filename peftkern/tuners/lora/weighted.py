"""Combining adapters into a new one, as PEFT's ``add_weighted_adapter`` does, for one layer.

* linear: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (same ranks only;
  an approximation of sum_i w_i s_i B_i A_i).
* cat: A = concat_i (w_i s_i A_i) over rows, B = concat_i B_i over columns: exactly sum_i w_i s_i B_i A_i.
* svd: the best rank-k factorisation of sum_i w_i s_i B_i A_i: B = U_k diag(S_k), A = Vh_k.
The new adapter's scaling is 1 (r = alpha = the new rank), so these are its A and B as stored.
"""
from __future__ import annotations

import math

import torch
from torch import nn

COMBINATIONS = ("linear", "cat", "svd")


def adapter_rank(config) -> int:
    """The largest rank any layer of this adapter has (PEFT sizes combined adapters by it)."""
    return max([config.r, *config.rank_pattern.values()])


def combined_rank(combination_type: str, ranks: list[int], svd_rank: int | None) -> int:
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; "
                             "use 'cat' or 'svd'")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type == "svd":
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
        return svd_rank or max(ranks)
    raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")


@torch.no_grad()
def combine_layer(layer: nn.Module, adapters: list[str], weights: list[float], combination_type: str,
                  new_rank: int, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                  svd_driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [new_rank, in], B [out, new_rank]) for the combined adapter on ``layer``, in its LoRA dtype."""
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
    if not present:
        raise ValueError(f"none of the adapters {adapters} is on this layer")
    dtype = layer.lora_A[present[0][0]].weight.dtype
    if combination_type == "cat":
        a = torch.zeros(new_rank, layer.in_features, dtype=dtype, device=layer.lora_A[present[0][0]].weight.device)
        b = torch.zeros(layer.out_features, new_rank, dtype=dtype, device=a.device)
        row = 0
        for name, w in present:
            rank = layer.r[name]
            a[row:row + rank] = layer.lora_A[name].weight * (w * layer.scaling[name])
            b[:, row:row + rank] = layer.lora_B[name].weight
            row += rank
        return a, b
    if combination_type == "linear":
        shapes = {tuple(layer.lora_A[n].weight.shape) for n, _ in present}
        if len(shapes) != 1:
            raise ValueError(f"combination_type='linear' needs the adapters to have one rank on every layer, "
                             f"got lora_A shapes {sorted(shapes)}")
        a = sum(math.copysign(math.sqrt(abs(w * layer.scaling[n])), w * layer.scaling[n]) * layer.lora_A[n].weight
                for n, w in present)
        b = sum(math.sqrt(abs(w * layer.scaling[n])) * layer.lora_B[n].weight for n, w in present)
        return a.to(dtype), b.to(dtype)
    delta = sum(w * layer.delta_weight(n).to(dtype) for n, w in present)  # [out, in]
    u, s, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
    b = u[:, :new_rank] @ torch.diag(s[:new_rank])
    a = vh[:new_rank, :]
    if svd_clamp is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), svd_clamp)
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return a.to(dtype), b.to(dtype)
