"""AdamW, defined plainly: the 32-bit update, bitsandbytes' dynamic 8-bit maps and the blockwise
quantization of optimizer states. Every face of ``peftkern.ops.adamw`` is tested against this file.

The update of one element, in fp32, with ``step`` the count after this step (1 on the first):

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)                       (decoupled weight decay)
    p = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

8-bit states hold m and v as one byte per element: the index of the nearest value of a 256-entry
map (signed for m, unsigned for v), times the absolute maximum of the element's block of 256. The
update reads the dequantized states, updates them in fp32, takes each block's new absmax and
stores the nearest codes again. Nearest means: the code whose value is closest, ties to the
lower index, i.e. the number of midpoints between neighbouring map values that lie below x.

Anchored quadratic penalty (EWC, L2-SP), folded into the step: the optimizer minimises
loss + lam / 2 * sum F (p - anchor)^2, whose gradient lam * F * (p - anchor) is added to the loss's
gradient before the moments, at the parameter's value before this step:

    g = g + lam * ((p - anchor) * F)          (F = 1 for L2-SP: the product is skipped)

F is the diagonal Fisher (fp32, or 8-bit codes of the unsigned dynamic map with a block absmax,
dequantized as the states are); the anchor has the parameter's dtype.
"""
from __future__ import annotations

import functools
import math

import torch

BLOCKSIZE = 256


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # Decade k (k = 0..6) covers magnitudes 10^(k-6) * [0.1, 1]: it is cut into equal slices
    # (2^k of them signed, 2^(k+1) unsigned) and each slice contributes its centre. With 0 and 1
    # this fills 256 codes; the arithmetic stays in fp32 so the values match bitsandbytes' map bit
    # for bit.
    values: list[float] = [0.0, 1.0]
    for decade in range(7):
        slices = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, slices + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10.0 ** (decade - 6)) * centres
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    if len(values) != 256:
        raise AssertionError(f"dynamic map has {len(values)} entries, expected 256")
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map: 256 sorted fp32 values in [-1, 1] (signed) or [0, 1].

    The signed map (for m) holds 0, 1 and +-127 values spread over seven decades; the unsigned map
    (for v) holds 0, 1 and 254 positive values, twice as fine.
    """
    return _dynamic_map_cpu(bool(signed)).to(device)


def map_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 midpoints between neighbouring values of a sorted 256-entry map."""
    return (code[:-1] + code[1:]) / 2.0


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE):
    """x (any shape, float) -> (codes uint8 with x's shape, absmax fp32 [ceil(numel / blocksize)]).

    Each block of ``blocksize`` consecutive elements (flattened order) is divided by its largest
    magnitude and stored as the index of the nearest map value (ties to the lower index); an
    all-zero block stores absmax 0 and the code of 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1) if blocks else torch.zeros(0, dtype=torch.float32, device=x.device)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = torch.where(absmax[:, None] > 0, padded / safe[:, None], torch.zeros_like(padded))
    codes = torch.searchsorted(map_midpoints(code.to(x.device)), normed.reshape(-1), right=False)
    return codes[:n].to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """codes uint8 (any shape), absmax fp32 [blocks] -> fp32 tensor of codes' shape: map[code] * absmax."""
    flat = code.to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(blocksize)[: flat.numel()]
    return (flat * scale).view(codes.shape)


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """(1 - beta1**step, sqrt(1 - beta2**step)) in double precision, as torch.optim.AdamW computes them."""
    return 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)


def penalized_gradient(param: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor | None,
                       lam: float, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """grad + lam * ((param - anchor) * fisher) in ``compute_dtype``: the gradient of
    loss + lam / 2 * sum fisher * (param - anchor)^2. ``fisher`` None means 1 (L2-SP)."""
    diff = param.to(compute_dtype) - anchor.to(compute_dtype)
    if fisher is not None:
        diff = diff * fisher.to(compute_dtype)
    return grad.to(compute_dtype) + lam * diff


def fisher_values(fisher) -> torch.Tensor | None:
    """An fp32 Fisher tensor as is; ``(codes uint8, absmax fp32)`` of the unsigned map dequantized
    (flattened); None stays None."""
    if fisher is None or isinstance(fisher, torch.Tensor):
        return fisher
    codes, absmax = fisher
    return dequantize_blockwise(codes.reshape(-1), absmax, dynamic_map(False, codes.device))


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 compute_dtype: torch.dtype = torch.float32, anchor: torch.Tensor | None = None,
                 fisher=None, penalty: float = 0.0):
    """One AdamW step, out of place: returns (param, exp_avg, exp_avg_sq) in ``compute_dtype``
    (param is returned unrounded; the caller casts it to the parameter's dtype).

    With ``anchor``, the penalty's gradient ``penalty * F * (param - anchor)`` joins ``grad`` first
    (``fisher``: None for F = 1, an fp32 tensor, or ``(codes, absmax)`` 8-bit blockwise codes)."""
    bc1, bc2_sqrt = bias_corrections(step, beta1, beta2)
    if anchor is not None:
        f = fisher_values(fisher)
        grad = penalized_gradient(param, grad, anchor, None if f is None else f.reshape(param.shape), penalty,
                                  compute_dtype)
    g = grad.to(compute_dtype)
    p = param.to(compute_dtype)
    m = exp_avg.to(compute_dtype) * beta1 + g * (1.0 - beta1)
    v = exp_avg_sq.to(compute_dtype) * beta2 + (g * g) * (1.0 - beta2)
    p = p * (1.0 - lr * weight_decay)
    denom = v.sqrt() / bc2_sqrt + eps
    p = p - (lr / bc1) * (m / denom)
    return p, m, v


def adamw8bit_update(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                     v_codes: torch.Tensor, v_absmax: torch.Tensor, step: int, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float, anchor: torch.Tensor | None = None,
                     fisher=None, penalty: float = 0.0):
    """One 8-bit AdamW step, out of place: returns (param fp32, m_codes, m_absmax, v_codes, v_absmax).

    The states are dequantized, updated in fp32 as in :func:`adamw_update` (with the anchored
    penalty, when given), the parameter moves with the fp32 states, and the states are requantized
    with their new block absmax.
    """
    signed, unsigned = dynamic_map(True, param.device), dynamic_map(False, param.device)
    m = dequantize_blockwise(m_codes, m_absmax, signed)
    v = dequantize_blockwise(v_codes, v_absmax, unsigned)
    p, m, v = adamw_update(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, anchor=anchor,
                           fisher=fisher, penalty=penalty)
    m_codes, m_absmax = quantize_blockwise(m, signed)
    v_codes, v_absmax = quantize_blockwise(v, unsigned)
    return p, m_codes, m_absmax, v_codes, v_absmax
