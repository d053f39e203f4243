"""AdamW step, 32-bit and 8-bit blockwise states: two registered ops with three faces each.

* torch: the CPU face. 32-bit fp32 parameters go through torch's own fused AdamW kernel; the rest
  runs torch.optim.AdamW's op sequence over cache-sized chunks. The 8-bit path dequantizes, updates
  and requantizes one chunk of blocks at a time (the fp32 states never exist whole) and finds the
  nearest codes with two table lookups instead of a binary search.
* triton: one pass per element: load, (dequantize,) update, (block absmax, requantize,) store.
* cuda: the same pass from csrc/optim/adamw.cu, launched through cuda-python.

The Triton and CUDA kernels compute ``peftkern.reference.adamw``'s fp32 formula in its order, with
correctly rounded division and square root and no fused multiply-add. The torch face follows
torch's AdamW (lerp, addcmul, addcdiv; torch's CPU sqrt is not correctly rounded), so the faces
agree to an ulp, and an 8-bit state that sits on a midpoint between two map values may land on
the neighbouring code. Parameters may be fp32, fp16 or bf16; 32-bit states are fp32; 8-bit
states are uint8 codes of bitsandbytes' dynamic maps (signed for m, unsigned for v) with one fp32
absmax per 256 elements.

Anchored penalty (EWC / L2-SP, ``reference.adamw.penalized_gradient``): given an ``anchor`` (the
parameter's dtype) and optionally a diagonal Fisher (fp32, or 8-bit codes of the unsigned map with
a block absmax), every face adds ``penalty * F * (p - anchor)`` to the gradient inside the same pass:
one extra read of the anchor and of F, no autograd term, no temporary of the parameter's size on
the GPU faces (the torch face builds the penalized gradient one cache-sized chunk at a time).

Launches enter the parameter's CUDA device (``launch.device_guard``) and restore the caller's, so a
model spread over several GPUs steps each tensor on its own device and stream.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, CUDA launchers, torch face, registered
ops, public entry points with the boundary checks.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Optional

import torch

from peftkern import _cuda, backend
from peftkern.ops import _checks
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import device_guard
from peftkern.reference.adamw import BLOCKSIZE, bias_corrections, dynamic_map, map_midpoints

OP_32BIT = "adamw_step"
OP_8BIT = "adamw8bit_step"
FACES = ("torch", "triton", "cuda")
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """The per-step fp32 constants every face uses, computed once in double precision."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float
    step_size: float
    bc2_sqrt: float
    eps: float
    step: int

    @classmethod
    def make(cls, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> "StepScalars":
        bc1, bc2_sqrt = bias_corrections(step, beta1, beta2)
        return cls(beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, lr / bc1, bc2_sqrt, eps, step)

    def as_tuple(self) -> tuple:
        """The eight fp32 kernel arguments, in the kernels' parameter order."""
        return (self.beta1, self.one_minus_beta1, self.beta2, self.one_minus_beta2, self.decay, self.step_size,
                self.bc2_sqrt, self.eps)


# Penalty modes, as the kernels' PENALTY constexpr (Triton) and the CUDA kernels' pointers say them.
NO_PENALTY, ANCHOR_ONLY, FISHER_32BIT, FISHER_8BIT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Penalty:
    """The anchored penalty of one tensor, flattened: ``anchor`` [n] (the parameter's dtype),
    ``fisher`` None (F = 1, L2-SP), fp32 [n], or uint8 codes [n] with ``fisher_absmax`` fp32
    [ceil(n / 256)]; ``lam`` the strength."""

    anchor: torch.Tensor
    fisher: torch.Tensor | None
    fisher_absmax: torch.Tensor | None
    lam: float

    @property
    def mode(self) -> int:
        if self.fisher is None:
            return ANCHOR_ONLY
        return FISHER_8BIT if self.fisher.dtype == torch.uint8 else FISHER_32BIT


def _penalty(anchor, fisher, fisher_absmax, lam: float) -> Penalty | None:
    return None if anchor is None else Penalty(anchor, fisher, fisher_absmax, float(lam))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _adamw_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps):
    """The fp32 update of reference.adamw.adamw_update, operation for operation."""
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    p = p * decay
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    return p, m, v


@triton.jit
def _penalized(g, p, a_ptr, f_ptr, fabs_ptr, fmap_ptr, offs, mask, lam, PENALTY: tl.constexpr,
               QBLOCK: tl.constexpr):
    """g + lam * ((p - anchor) * F) (reference.adamw.penalized_gradient), p before this step.
    PENALTY: 0 none, 1 F = 1 (L2-SP), 2 F fp32 [n], 3 F as unsigned-map codes [n] with absmax per QBLOCK."""
    if PENALTY != 0:
        diff = p - tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PENALTY == 2:
            diff = diff * tl.load(f_ptr + offs, mask=mask, other=0.0)
        if PENALTY == 3:
            code = tl.load(f_ptr + offs, mask=mask, other=0).to(tl.int32)
            diff = diff * (tl.load(fmap_ptr + code) * tl.load(fabs_ptr + offs // QBLOCK, mask=mask, other=0.0))
        g = g + lam * diff
    return g


@triton.jit
def _adamw32_kernel(p_ptr, g_ptr, m_ptr, v_ptr, a_ptr, f_ptr, fabs_ptr, fmap_ptr, n, lam, beta1, one_minus_beta1,
                    beta2, one_minus_beta2, decay, step_size, bc2_sqrt, eps, BLOCK: tl.constexpr,
                    PENALTY: tl.constexpr, QBLOCK: tl.constexpr):
    """p, g [n] in the parameter dtype; m, v [n] fp32; all updated in place, one read and write each.
    With PENALTY, the anchor a [n] (parameter dtype) and F (see :func:`_penalized`) are read once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _penalized(g, p, a_ptr, f_ptr, fabs_ptr, fmap_ptr, offs, mask, lam, PENALTY, QBLOCK)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                          bc2_sqrt, eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _probe(mid_ptr, normed, idx, STEP: tl.constexpr):
    """One binary-search step over the sorted midpoints: move up by STEP where x lies above."""
    mid = tl.load(mid_ptr + (idx + (STEP - 1)))
    return tl.where(normed > mid, idx + STEP, idx)


@triton.jit
def _nearest_code(mid_ptr, x, absmax):
    """Index of the map value nearest to x / absmax (ties low) = how many of the 255 sorted
    midpoints lie below it, found in eight probes of the midpoint table."""
    normed = tl.where(absmax > 0.0, tl.div_rn(x, tl.where(absmax > 0.0, absmax, 1.0)), 0.0)
    idx = tl.zeros(x.shape, dtype=tl.int32)
    idx = _probe(mid_ptr, normed, idx, 128)
    idx = _probe(mid_ptr, normed, idx, 64)
    idx = _probe(mid_ptr, normed, idx, 32)
    idx = _probe(mid_ptr, normed, idx, 16)
    idx = _probe(mid_ptr, normed, idx, 8)
    idx = _probe(mid_ptr, normed, idx, 4)
    idx = _probe(mid_ptr, normed, idx, 2)
    idx = _probe(mid_ptr, normed, idx, 1)
    return idx


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, smap_ptr, umap_ptr, smid_ptr, umid_ptr,
                      a_ptr, f_ptr, fabs_ptr, n, lam, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
                      step_size, bc2_sqrt, eps, QBLOCK: tl.constexpr, PENALTY: tl.constexpr):
    """One quantization block per program: dequantize m, v (codes [n] uint8, absmax [blocks] fp32),
    update them and p in fp32, take the block's new absmax and store the nearest codes. With
    PENALTY, the anchor and F (8-bit F uses the unsigned map) join the gradient first."""
    block = tl.program_id(0).to(tl.int64)
    offs = block * QBLOCK + tl.arange(0, QBLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = _penalized(g, p, a_ptr, f_ptr, fabs_ptr, umap_ptr, offs, mask, lam, PENALTY, QBLOCK)
    mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    # Lanes past the end hold m = v = 0, so they stay 0 and drop out of the block absmax.
    m = tl.where(mask, tl.load(smap_ptr + mq) * tl.load(mabs_ptr + block), 0.0)
    v = tl.where(mask, tl.load(umap_ptr + vq) * tl.load(vabs_ptr + block), 0.0)
    p, m, v = _adamw_math(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, decay, step_size,
                          bc2_sqrt, eps)
    m_absmax = tl.max(tl.abs(m), axis=0)
    v_absmax = tl.max(tl.abs(v), axis=0)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(mq_ptr + offs, _nearest_code(smid_ptr, m, m_absmax).to(tl.uint8), mask=mask)
    tl.store(vq_ptr + offs, _nearest_code(umid_ptr, v, v_absmax).to(tl.uint8), mask=mask)
    tl.store(mabs_ptr + block, m_absmax)
    tl.store(vabs_ptr + block, v_absmax)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

_BLOCK_32BIT = 1024
_WARPS_32BIT = 4
_WARPS_8BIT = 2


@functools.lru_cache(maxsize=None)
def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed map, unsigned map, signed midpoints, unsigned midpoints) as fp32 on ``device``."""
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    return tuple(t.to(device) for t in (signed, unsigned, map_midpoints(signed), map_midpoints(unsigned)))


def _penalty_args(param: torch.Tensor, fmap: torch.Tensor, pen: Penalty | None) -> tuple:
    """(anchor, F or its codes, F's absmax, lam, PENALTY) kernel arguments; unused pointers point at
    tensors of the types the static report compiles with (the anchor slot at the parameter, the F
    slots at the map)."""
    if pen is None:
        return param, fmap, fmap, 0.0, NO_PENALTY
    fisher = pen.fisher if pen.fisher is not None else fmap
    absmax = pen.fisher_absmax if pen.fisher_absmax is not None else fmap
    return pen.anchor, fisher, absmax, pen.lam, pen.mode


def _triton_adamw32(param, grad, exp_avg, exp_avg_sq, scalars: StepScalars, pen: Penalty | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    umap = _maps(param.device)[1]
    anchor, fisher, absmax, lam, mode = _penalty_args(param, umap, pen)
    with device_guard(param):
        _adamw32_kernel[(triton.cdiv(n, _BLOCK_32BIT),)](
            param, grad, exp_avg, exp_avg_sq, anchor, fisher, absmax, umap, n, lam, *scalars.as_tuple(),
            BLOCK=_BLOCK_32BIT, PENALTY=mode, QBLOCK=BLOCKSIZE, num_warps=_WARPS_32BIT, enable_fp_fusion=False)


def _triton_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars: StepScalars,
                      pen: Penalty | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    smap, umap, smid, umid = _maps(param.device)
    anchor, fisher, absmax, lam, mode = _penalty_args(param, umap, pen)
    with device_guard(param):
        _adamw8bit_kernel[(triton.cdiv(n, BLOCKSIZE),)](
            param, grad, m_codes, m_absmax, v_codes, v_absmax, smap, umap, smid, umid, anchor, fisher, absmax, n,
            lam, *scalars.as_tuple(), QBLOCK=BLOCKSIZE, PENALTY=mode, num_warps=_WARPS_8BIT, enable_fp_fusion=False)


_SCALAR_ARGS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "step_size", "bc2_sqrt", "eps")
_MODE_NAMES = {NO_PENALTY: "", ANCHOR_ONLY: " +l2sp", FISHER_32BIT: " +ewc fp32 F", FISHER_8BIT: " +ewc 8-bit F"}


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch, per parameter dtype and penalty mode
    (``peftkern kernels``). The launchers compile with ``enable_fp_fusion=False`` (the faces agree
    to the bit only without contracted multiply-adds), and so does the report."""
    specs = []
    scalars = {name: "fp32" for name in _SCALAR_ARGS}
    fp_options = {"enable_fp_fusion": False}
    for dtype in PARAM_DTYPES:
        t = tl_dtype_name(dtype)
        for mode, label in _MODE_NAMES.items():
            penalty = {"a_ptr": f"*{t}", "f_ptr": "*u8" if mode == FISHER_8BIT else "*fp32", "fabs_ptr": "*fp32"}
            specs.append(_spec(
                _adamw32_kernel, f"{t} block={_BLOCK_32BIT}{label}",
                {"p_ptr": f"*{t}", "g_ptr": f"*{t}", "m_ptr": "*fp32", "v_ptr": "*fp32", **penalty,
                 "fmap_ptr": "*fp32", "n": "i64", "lam": "fp32", **scalars},
                {"BLOCK": _BLOCK_32BIT, "PENALTY": mode, "QBLOCK": BLOCKSIZE}, _WARPS_32BIT, fp_options))
            specs.append(_spec(
                _adamw8bit_kernel, f"{t} qblock={BLOCKSIZE}{label}",
                {"p_ptr": f"*{t}", "g_ptr": f"*{t}", "mq_ptr": "*u8", "mabs_ptr": "*fp32", "vq_ptr": "*u8",
                 "vabs_ptr": "*fp32", "smap_ptr": "*fp32", "umap_ptr": "*fp32", "smid_ptr": "*fp32", "umid_ptr": "*fp32",
                 **penalty, "n": "i64", "lam": "fp32", **scalars},
                {"QBLOCK": BLOCKSIZE, "PENALTY": mode}, _WARPS_8BIT, fp_options))
    return specs


def _spec(kernel, config: str, signature: dict, constexprs: dict, num_warps: int, options: dict) -> KernelSpec:
    """A KernelSpec carrying the launch's compile options where this KernelSpec has a field for them."""
    fields = {f.name for f in dataclasses.fields(KernelSpec)}
    extra = {"options": options} if "options" in fields else {}
    return KernelSpec(kernel, config, signature, constexprs, num_warps=num_warps, num_stages=1, **extra)


# ---------------------------------------------------------------------------------------------
# CUDA C++ launchers (csrc/optim/adamw.cu)
# ---------------------------------------------------------------------------------------------

_CUDA_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_CUDA_THREADS_32BIT = 256
_CUDA_MAX_GRID_8BIT = 8192  # blocks loop over quantization blocks, amortizing their map loads


_NULL = ctypes.c_void_p(0)


def _cuda_scalars(scalars: StepScalars) -> list:
    return [ctypes.c_float(x) for x in scalars.as_tuple()]


def _cuda_penalty_args(pen: Penalty, umap: torch.Tensor) -> list:
    """anchor, fisher fp32 | null, fisher codes | null, fisher absmax | null, fisher map, lam."""
    fisher32 = _cuda.pointer(pen.fisher) if pen.mode == FISHER_32BIT else _NULL
    codes = _cuda.pointer(pen.fisher) if pen.mode == FISHER_8BIT else _NULL
    absmax = _cuda.pointer(pen.fisher_absmax) if pen.mode == FISHER_8BIT else _NULL
    return [_cuda.pointer(pen.anchor), fisher32, codes, absmax, _cuda.pointer(umap), ctypes.c_float(pen.lam)]


def _cuda_adamw32(param, grad, exp_avg, exp_avg_sq, scalars: StepScalars, pen: Penalty | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, _CUDA_THREADS_32BIT), 1, 1)
    suffix = _CUDA_SUFFIX[param.dtype]
    args = [_cuda.pointer(param), _cuda.pointer(grad), _cuda.pointer(exp_avg), _cuda.pointer(exp_avg_sq)]
    if pen is None:
        name = f"peftkern_adamw32_step_{suffix}"
    else:
        name = f"peftkern_adamw32_penalty_step_{suffix}"
        args += _cuda_penalty_args(pen, _maps(param.device)[1])
    _cuda.launch(name, grid, (_CUDA_THREADS_32BIT, 1, 1), *args, ctypes.c_int64(n), *_cuda_scalars(scalars),
                 device_index=param.device.index)


def _cuda_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars: StepScalars,
                    pen: Penalty | None = None) -> None:
    n = param.numel()
    if n == 0:
        return
    smap, umap, _, _ = _maps(param.device)
    grid = (min(triton.cdiv(n, BLOCKSIZE), _CUDA_MAX_GRID_8BIT), 1, 1)
    suffix = _CUDA_SUFFIX[param.dtype]
    args = [_cuda.pointer(param), _cuda.pointer(grad), _cuda.pointer(m_codes), _cuda.pointer(m_absmax),
            _cuda.pointer(v_codes), _cuda.pointer(v_absmax), _cuda.pointer(smap), _cuda.pointer(umap)]
    if pen is None:
        name = f"peftkern_adamw8bit_step_{suffix}"
    else:  # the 8-bit kernel dequantizes F with the unsigned map it already stages
        name = f"peftkern_adamw8bit_penalty_step_{suffix}"
        args += _cuda_penalty_args(pen, umap)[:4] + [ctypes.c_float(pen.lam)]
    _cuda.launch(name, grid, (BLOCKSIZE, 1, 1), *args, ctypes.c_int64(n), *_cuda_scalars(scalars),
                 device_index=param.device.index)


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

# Elements per chunk of the torch face: big enough that Python overhead vanishes, small enough
# that the chunk's fp32 temporaries (512 KiB each) stay in cache between the ops that reuse them.
_TORCH_CHUNK = 512 * BLOCKSIZE
# Codes by table: a float's top 17 bits (sign, exponent, 8 mantissa bits) pick a bucket holding
# at most one midpoint of either map (checked when the tables are built).
_BUCKET_SHIFT = 15
_BUCKETS = 1 << (32 - _BUCKET_SHIFT)


def _torch_update_(p32, g32, m, v, s: StepScalars) -> None:
    """In place on fp32 tensors, in torch.optim.AdamW's own op sequence (lerp, addcmul, addcdiv):
    the reference formula up to an ulp, and torch's AdamW to the bit."""
    m.lerp_(g32, s.one_minus_beta1)
    v.mul_(s.beta2).addcmul_(g32, g32, value=s.one_minus_beta2)
    denom = v.sqrt().div_(s.bc2_sqrt).add_(s.eps)
    p32.mul_(s.decay).addcdiv_(m, denom, value=-s.step_size)


def _torch_fisher_chunk(param, pen: Penalty, start: int, out: torch.Tensor) -> torch.Tensor:
    """fp32 F into ``out`` for elements ``start .. start + out.numel()`` (``start`` a multiple of 256),
    from its 8-bit codes."""
    count = out.numel()
    f = torch.index_select(_maps(param.device)[1], 0, pen.fisher[start:start + count].int(), out=out)
    whole = count // BLOCKSIZE * BLOCKSIZE
    first = start // BLOCKSIZE
    f[:whole].view(-1, BLOCKSIZE).mul_(pen.fisher_absmax[first:first + whole // BLOCKSIZE].view(-1, 1))
    if whole < count:
        f[whole:].mul_(pen.fisher_absmax[first + whole // BLOCKSIZE])
    return f


class _PenaltyBuffers:
    """Two fp32 scratch chunks reused over a step's chunks: allocating half a megabyte per chunk
    would go to the kernel (mmap) and fault every page in again."""

    def __init__(self, param: torch.Tensor):
        size = min(param.numel(), _TORCH_CHUNK)
        self.diff = torch.empty(size, dtype=torch.float32, device=param.device)
        self.fisher = torch.empty(size, dtype=torch.float32, device=param.device)

    def penalized_grad(self, param, grad, pen: Penalty, chunk: slice) -> torch.Tensor:
        """fp32 grad + lam * F * (p - anchor) for one chunk in two passes (a difference, then one
        addcmul, both into the scratch), the reference's formula to an ulp."""
        p, a, g = param[chunk], pen.anchor[chunk], grad[chunk]
        diff = self.diff[:p.numel()]
        if p.dtype == torch.float32:
            torch.sub(p, a, out=diff)
        else:  # a 16-bit difference would round: widen first (exactly), then subtract in fp32
            diff.copy_(p).sub_(a)
        if pen.mode == ANCHOR_ONLY:
            return torch.add(g, diff, alpha=pen.lam, out=diff)
        if pen.mode == FISHER_32BIT:
            f = pen.fisher[chunk]
        else:
            f = _torch_fisher_chunk(param, pen, chunk.start, self.fisher[:p.numel()])
        return torch.addcmul(g, diff, f, value=pen.lam, out=diff)


def _torch_adamw32(param, grad, exp_avg, exp_avg_sq, scalars: StepScalars, lr: float, weight_decay: float,
                   pen: Penalty | None = None) -> None:
    fused = param.dtype == torch.float32 and hasattr(torch, "_fused_adamw_")
    if fused:
        # torch's fused AdamW kernel: one vectorized pass (the step tensor is read, not advanced)
        step = torch.tensor(float(scalars.step), dtype=torch.float32, device=param.device)
        hyper = dict(lr=lr, beta1=scalars.beta1, beta2=scalars.beta2, weight_decay=weight_decay, eps=scalars.eps,
                     amsgrad=False, maximize=False)
        if pen is None:
            torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], **hyper)
            return
    scratch = _PenaltyBuffers(param) if pen is not None else None
    for start in range(0, param.numel(), _TORCH_CHUNK):
        chunk = slice(start, start + _TORCH_CHUNK)
        g = grad[chunk] if pen is None else scratch.penalized_grad(param, grad, pen, chunk)
        if fused:
            torch._fused_adamw_([param[chunk]], [g], [exp_avg[chunk]], [exp_avg_sq[chunk]], [], [step], **hyper)
            continue
        p32 = param[chunk].float()
        _torch_update_(p32, g.float(), exp_avg[chunk], exp_avg_sq[chunk], scalars)
        if param.dtype != torch.float32:
            param[chunk].copy_(p32)


@functools.lru_cache(maxsize=None)
def _code_tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes below the bucket int32 [2^17], the bucket's midpoint or +inf fp32 [2^17]) for one map:
    nearest code of x = below[b] + (x > mid[b]), b = x's bits >> 15, the same as a binary search."""
    midpoints = map_midpoints(dynamic_map(signed))
    first_bits = torch.arange(_BUCKETS, dtype=torch.int64) << _BUCKET_SHIFT
    last_bits = first_bits | ((1 << _BUCKET_SHIFT) - 1)
    ends = [bits.to(torch.int32).view(torch.float32) for bits in (first_bits, last_bits)]
    low, high = torch.minimum(*ends), torch.maximum(*ends)  # negative floats order backwards
    below = torch.searchsorted(midpoints, low, right=False)
    inside = torch.searchsorted(midpoints, high, right=True) - below
    usable = torch.isfinite(low) & torch.isfinite(high)
    if inside[usable].max().item() > 1:
        raise AssertionError("a code-table bucket holds two midpoints; use more bucket bits")
    mid = torch.where(inside > 0, midpoints[below.clamp(max=midpoints.numel() - 1)], torch.full_like(low, float("inf")))
    return below.to(torch.int32).to(device), mid.to(device)


def _nearest_codes(normed: torch.Tensor, tables) -> torch.Tensor:
    below, mid = tables
    bucket = normed.view(torch.int32).bitwise_right_shift(_BUCKET_SHIFT).bitwise_and_(_BUCKETS - 1)
    codes = torch.index_select(below, 0, bucket)
    return codes.add_(normed > torch.index_select(mid, 0, bucket))


def _quantize_chunk_(x: torch.Tensor, tables, codes_out: torch.Tensor, absmax_out: torch.Tensor) -> None:
    """x fp32 [blocks, 256] (zero-padded tail, overwritten) -> nearest codes into codes_out
    [elements] and the block absmax into absmax_out [blocks]."""
    # reducing the transposed view runs torch's vectorized outer-dimension reduction, ~10x faster
    # on the CPU than reducing each 256-element row
    absmax = x.abs().t().amax(dim=0).view(-1, 1)
    normed = x.div_(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))
    codes_out.copy_(_nearest_codes(normed.view(-1), tables)[: codes_out.numel()])
    absmax_out.copy_(absmax.view(-1))


def _torch_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars: StepScalars,
                     pen: Penalty | None = None) -> None:
    smap, umap, _, _ = _maps(param.device)
    signed_tables, unsigned_tables = _code_tables(True, param.device), _code_tables(False, param.device)
    n = param.numel()
    scratch = _PenaltyBuffers(param) if pen is not None else None
    for start in range(0, n, _TORCH_CHUNK):
        chunk = slice(start, min(start + _TORCH_CHUNK, n))
        blocks = slice(start // BLOCKSIZE, -(-chunk.stop // BLOCKSIZE))
        count = chunk.stop - start
        padded = -(-count // BLOCKSIZE) * BLOCKSIZE
        m = torch.empty(padded, dtype=torch.float32, device=param.device)
        v = torch.empty(padded, dtype=torch.float32, device=param.device)
        m[count:] = 0.0
        v[count:] = 0.0
        torch.index_select(smap, 0, m_codes[chunk].int(), out=m[:count])
        torch.index_select(umap, 0, v_codes[chunk].int(), out=v[:count])
        m2, v2 = m.view(-1, BLOCKSIZE), v.view(-1, BLOCKSIZE)
        m2.mul_(m_absmax[blocks].view(-1, 1))
        v2.mul_(v_absmax[blocks].view(-1, 1))
        g = grad[chunk].float() if pen is None else scratch.penalized_grad(param, grad, pen, chunk)
        p32 = param[chunk].float()
        _torch_update_(p32, g, m[:count], v[:count], scalars)
        if param.dtype != torch.float32:
            param[chunk].copy_(p32)
        _quantize_chunk_(m2, signed_tables, m_codes[chunk], m_absmax[blocks])
        _quantize_chunk_(v2, unsigned_tables, v_codes[chunk], v_absmax[blocks])


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::adamw_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adamw_step_op(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  face: str, anchor: Optional[torch.Tensor] = None, fisher: Optional[torch.Tensor] = None,
                  fisher_absmax: Optional[torch.Tensor] = None, penalty: float = 0.0) -> None:
    """One AdamW step in place on contiguous param [n], grad [n] (param dtype), exp_avg, exp_avg_sq [n] fp32;
    with ``anchor`` [n] the anchored penalty (``fisher`` None, fp32 [n], or uint8 codes [n] + ``fisher_absmax``)."""
    scalars = StepScalars.make(step, lr, beta1, beta2, eps, weight_decay)
    pen = _penalty(anchor, fisher, fisher_absmax, penalty)
    if face == "triton":
        _triton_adamw32(param, grad, exp_avg, exp_avg_sq, scalars, pen)
    elif face == "cuda":
        _cuda_adamw32(param, grad, exp_avg, exp_avg_sq, scalars, pen)
    else:
        _torch_adamw32(param, grad, exp_avg, exp_avg_sq, scalars, lr, weight_decay, pen)


@adamw_step_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, face, anchor=None, fisher=None,
      fisher_absmax=None, penalty=0.0):
    return None


@torch.library.custom_op("peftkern::adamw8bit_step",
                         mutates_args=("param", "m_codes", "m_absmax", "v_codes", "v_absmax"))
def adamw8bit_step_op(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                      v_codes: torch.Tensor, v_absmax: torch.Tensor, step: int, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, face: str,
                      anchor: Optional[torch.Tensor] = None, fisher: Optional[torch.Tensor] = None,
                      fisher_absmax: Optional[torch.Tensor] = None, penalty: float = 0.0) -> None:
    """One 8-bit AdamW step in place: codes [n] uint8, absmax [ceil(n / 256)] fp32; penalty as adamw_step's."""
    scalars = StepScalars.make(step, lr, beta1, beta2, eps, weight_decay)
    pen = _penalty(anchor, fisher, fisher_absmax, penalty)
    if face == "triton":
        _triton_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars, pen)
    elif face == "cuda":
        _cuda_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars, pen)
    else:
        _torch_adamw8bit(param, grad, m_codes, m_absmax, v_codes, v_absmax, scalars, pen)


@adamw8bit_step_op.register_fake
def _(param, grad, m_codes, m_absmax, v_codes, v_absmax, step, lr, beta1, beta2, eps, weight_decay, face,
      anchor=None, fisher=None, fisher_absmax=None, penalty=0.0):
    return None


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def check_hyperparameters(op: str, step: int, lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float) -> None:
    """Raise naming the first hyperparameter out of range."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1 (the count including this step), got {step!r}")
    lr = _checks.check_finite_scalar(op, "lr", lr)
    if lr < 0.0:
        raise ValueError(f"{op}: lr must be >= 0, got {lr}")
    _checks.check_probability(op, "beta1", beta1)
    _checks.check_probability(op, "beta2", beta2)
    if _checks.check_finite_scalar(op, "eps", eps) < 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if _checks.check_finite_scalar(op, "weight_decay", weight_decay) < 0.0:
        raise ValueError(f"{op}: weight_decay must be >= 0, got {weight_decay}")


def _check_param_grad(op: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    _checks.check_float("param", param, PARAM_DTYPES)
    _checks.check_float("grad", grad, PARAM_DTYPES)
    if grad.is_sparse or param.is_sparse:
        raise TypeError(f"{op}: sparse tensors are not supported")
    if grad.dtype != param.dtype:
        raise TypeError(f"{op}: grad has dtype {grad.dtype} but param has {param.dtype}")
    _checks.check_shape(op, "grad", grad, tuple(param.shape), "the parameter's shape")
    for name, t in (("param", param), ("grad", grad)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")


def _check_state(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.numel() != numel or not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous with {numel} elements, got shape {tuple(t.shape)}"
                         f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def check_penalty(op: str, param: torch.Tensor, anchor, fisher, penalty: float) -> tuple:
    """Validate an anchored penalty for ``param``: returns the flat (anchor, fisher, fisher_absmax,
    penalty) the registered ops take (all None / 0.0 without an anchor)."""
    penalty = _checks.check_finite_scalar(op, "penalty", penalty)
    if penalty < 0.0:
        raise ValueError(f"{op}: penalty (the EWC / L2-SP lambda) must be >= 0, got {penalty}")
    if anchor is None:
        if fisher is not None:
            raise ValueError(f"{op}: a Fisher was given without an anchor; the penalty is lam/2 F (p - anchor)^2")
        return None, None, None, 0.0
    if not isinstance(anchor, torch.Tensor):
        raise TypeError(f"{op}: anchor must be a torch.Tensor, got {type(anchor).__name__}")
    if anchor.dtype != param.dtype:
        raise TypeError(f"{op}: anchor has dtype {anchor.dtype} but param has {param.dtype}")
    _checks.check_shape(op, "anchor", anchor, tuple(param.shape), "the parameter's shape")
    if not anchor.is_contiguous():
        raise ValueError(f"{op}: anchor must be contiguous (shape {tuple(anchor.shape)}, strides {anchor.stride()})")
    n = param.numel()
    absmax = None
    if isinstance(fisher, (tuple, list)):
        if len(fisher) != 2:
            raise ValueError(f"{op}: an 8-bit Fisher is a pair (codes uint8, absmax fp32), got {len(fisher)} items")
        fisher, absmax = fisher
        _check_state(op, "fisher codes", fisher, torch.uint8, n)
        _check_state(op, "fisher absmax", absmax, torch.float32, -(-n // BLOCKSIZE))
    elif fisher is not None:
        _check_state(op, "fisher", fisher, torch.float32, n)
    _checks.check_same(op, {"param": param, "anchor": anchor, "fisher": fisher, "fisher absmax": absmax})
    return anchor.view(-1), (None if fisher is None else fisher.view(-1)), absmax, penalty


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, anchor: torch.Tensor | None = None, fisher=None,
               penalty: float = 0.0) -> None:
    """One AdamW step in place (``reference.adamw.adamw_update``).

    param and grad: contiguous, one dtype (fp32, fp16, bf16), one shape; exp_avg and exp_avg_sq:
    contiguous fp32 with param's element count; ``step`` counts this step (1 on the first).

    Anchored penalty (EWC / L2-SP): with ``anchor`` (param's dtype and shape) the step minimises
    loss + penalty / 2 * sum F (param - anchor)^2; ``fisher`` is None (F = 1, L2-SP), an fp32
    tensor of param's element count, or a pair (codes uint8 [n], absmax fp32 [ceil(n / 256)]) of
    the unsigned dynamic map (``reference.adamw.quantize_blockwise(F, dynamic_map(False))``).
    """
    _check_param_grad(OP_32BIT, param, grad)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_state(OP_32BIT, name, t, torch.float32, param.numel())
    _checks.check_same(OP_32BIT, {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    check_hyperparameters(OP_32BIT, step, lr, beta1, beta2, eps, weight_decay)
    anchor, fisher, fisher_absmax, penalty = check_penalty(OP_32BIT, param, anchor, fisher, penalty)
    face = backend.pick(OP_32BIT, FACES, param.device.type, param.device.index)
    torch.ops.peftkern.adamw_step(param.view(-1), grad.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1), int(step),
                                  float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), face,
                                  anchor, fisher, fisher_absmax, penalty)


def adamw8bit_step(param: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                   v_codes: torch.Tensor, v_absmax: torch.Tensor, *, step: int, lr: float, beta1: float = 0.9,
                   beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                   anchor: torch.Tensor | None = None, fisher=None, penalty: float = 0.0) -> None:
    """One 8-bit AdamW step in place (``reference.adamw.adamw8bit_update``).

    param, grad as in :func:`adamw_step`; m_codes, v_codes: contiguous uint8 with param's element
    count; m_absmax, v_absmax: fp32 [ceil(numel / 256)]. Fresh states are all-zero codes and absmax.
    ``anchor``, ``fisher``, ``penalty``: the anchored penalty, as in :func:`adamw_step`.
    """
    _check_param_grad(OP_8BIT, param, grad)
    n = param.numel()
    blocks = -(-n // BLOCKSIZE)
    for name, t, dtype, count in (("m_codes", m_codes, torch.uint8, n), ("v_codes", v_codes, torch.uint8, n),
                                  ("m_absmax", m_absmax, torch.float32, blocks),
                                  ("v_absmax", v_absmax, torch.float32, blocks)):
        _check_state(OP_8BIT, name, t, dtype, count)
    _checks.check_same(OP_8BIT, {"param": param, "grad": grad, "m_codes": m_codes, "m_absmax": m_absmax,
                                 "v_codes": v_codes, "v_absmax": v_absmax})
    check_hyperparameters(OP_8BIT, step, lr, beta1, beta2, eps, weight_decay)
    anchor, fisher, fisher_absmax, penalty = check_penalty(OP_8BIT, param, anchor, fisher, penalty)
    face = backend.pick(OP_8BIT, FACES, param.device.type, param.device.index)
    torch.ops.peftkern.adamw8bit_step(param.view(-1), grad.view(-1), m_codes.view(-1), m_absmax, v_codes.view(-1),
                                      v_absmax, int(step), float(lr), float(beta1), float(beta2), float(eps),
                                      float(weight_decay), face, anchor, fisher, fisher_absmax, penalty)
