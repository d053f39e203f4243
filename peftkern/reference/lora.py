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


# The dropout keep-mask both faces draw: a counter-based hash of (seed, row, column), Murmur3's
# 32-bit finalizer, 24 bits compared with p (peftkern.ops._lowrank.keep_mask is the same in Triton).
_ROW_MUL, _COL_MUL, _MIX1, _MIX2 = 0x9E3779B1, 0x7FEB352D, 0x85EBCA6B, 0xC2B2AE35
_U32 = 0xFFFFFFFF


def _as_i32(value: int) -> int:
    """The int32 with the bit pattern of uint32 ``value``."""
    value &= _U32
    return value - (1 << 32) if value >= (1 << 31) else value


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """Murmur3's finalizer on int32 tensors holding uint32 bit patterns (wrapping multiplies; the
    right shifts masked to be logical), in place."""
    h.bitwise_xor_((h >> 16) & 0xFFFF)
    h.mul_(_as_i32(_MIX1))
    h.bitwise_xor_((h >> 13) & 0x7FFFF)
    h.mul_(_as_i32(_MIX2))
    h.bitwise_xor_((h >> 16) & 0xFFFF)
    return h


def _mix32_i64(h: torch.Tensor) -> torch.Tensor:
    """The same finalizer on int64 tensors holding uint32 values (for the short row/column vectors)."""
    h = h ^ (h >> 16)
    h = (h * _MIX1) & _U32
    h = h ^ (h >> 13)
    h = (h * _MIX2) & _U32
    return h ^ (h >> 16)


def _to_i32(h: torch.Tensor) -> torch.Tensor:
    return torch.where(h >= (1 << 31), h - (1 << 32), h).to(torch.int32)


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """bool [M, K]: the keep mask of an [M, K] input for ``seed`` (int64 tensor of one element, on
    the device the mask is wanted on; only its low 32 bits count). Computed on that device with no
    host sync: element (i, k) is kept when mix32(mix32(i * c1 + seed) ^ (k * c2)) >> 8 >= p * 2^24."""
    rows, cols = shape
    device = seed.device
    row = torch.arange(rows, dtype=torch.int64, device=device)
    row_hash = _mix32_i64((row * _ROW_MUL + (seed.reshape(1) & _U32)) & _U32)
    col_hash = (torch.arange(cols, dtype=torch.int64, device=device) * _COL_MUL) & _U32
    h = _mix32_(_to_i32(row_hash)[:, None] ^ _to_i32(col_hash)[None, :])
    return ((h >> 8) & 0xFFFFFF).to(torch.float32).mul_(1.0 / 16777216.0) >= dropout_p
