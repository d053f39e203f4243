"""NF4 ops: dequantize, and the fused dequant-GEMM with an optional LoRA term (QLoRA).

* ``nf4_dequantize(w4, dtype)``: three faces. torch (the reference), Triton (one pass, elementwise)
  and CUDA C++ (csrc/nf4/nf4.cu, its math in nf4_math.cuh, tested on the CPU through the host twin).
* ``nf4_linear(x, w4, bias, lora_A, lora_B, scaling, dropout_p, training)``:
  y = x dequant(W4)^T + b + s (drop(x) A^T) B^T. The Triton face never writes a 16-bit copy of W:
  each program loads 4-bit codes and the per-block statistics (the 8-bit double-quantized absmax
  decoded in registers too), dequantizes its [BLOCK_N, BLOCK_K] tile in registers and feeds it to
  ``tl.dot``; the rank-r term joins the same accumulator (as ``peftkern.ops.lora`` does), so a
  QLoRA forward is one pass over the 4-bit weight. Few tokens (decode, M <= 8) take a GEMV kernel.
  The backward computes dx = dy dequant(W4) + s keep (g A) the same way, and dA, dB in the kernels
  that hold the tiles. The torch face dequantizes, then runs the LoRA op's torch face.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, then the registered ops and autograd.
"""
from __future__ import annotations

import ctypes
import itertools
import math

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import lora as _lora
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.reference import nf4 as ref

DEQUANT_OP = "nf4_dequantize"
LINEAR_OP = "nf4_linear"
DEQUANT_FACES = ("torch", "triton", "cuda")
LINEAR_FACES = ("torch", "triton")
GEMV_MAX_TOKENS = 8

_grouped_tile = _lora._grouped_tile
_keep_mask = _lora._keep_mask


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _nf4_scale(absmax_ptr, nested_ptr, ncode_ptr, offset, block, mask, log2_nbs, DOUBLE: tl.constexpr):
    """fp32 absmax of NF4 blocks ``block`` (any shape), decoded from the 8-bit index when DOUBLE."""
    if DOUBLE:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + q) * tl.load(nested_ptr + (block >> log2_nbs), mask=mask, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, idx, mask,
                log2_bs, log2_nbs, DOUBLE: tl.constexpr):
    """fp32 values of the elements at flat int32 indices ``idx`` (any shape): code[nibble] * absmax.
    Works for any shape and blocksize (one gather per element)."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble)
    return value * _nf4_scale(absmax_ptr, nested_ptr, ncode_ptr, offset, idx >> log2_bs, mask, log2_nbs, DOUBLE)


@triton.jit
def _nf4_row_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, rows, k0, K, row_ok,
                  log2_bs, log2_nbs, DOUBLE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile W[rows, k0:k0+BLOCK_K] when every row of the tile lies inside one NF4 block (K is a
    multiple of the blocksize, the blocksize a multiple of BLOCK_K, k0 a multiple of BLOCK_K): one
    byte load per two codes, one absmax per row."""
    half = tl.arange(0, BLOCK_K // 2)
    byte_idx = rows[:, None] * (K // 2) + (k0 // 2 + half[None, :])
    byte = tl.load(packed_ptr + byte_idx, mask=row_ok[:, None], other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte >> 4, byte & 15), (BLOCK_ROWS, BLOCK_K))
    value = tl.load(code_ptr + codes)
    scale = _nf4_scale(absmax_ptr, nested_ptr, ncode_ptr, offset, (rows * K + k0) >> log2_bs, row_ok, log2_nbs, DOUBLE)
    return value * scale[:, None]


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, out_ptr, n, offset,
                        log2_bs, log2_nbs, DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] = dequant(packed), rounded once to out's dtype."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    w = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, idx, mask,
                    log2_bs, log2_nbs, DOUBLE)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_fwd_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
                    M, N, K, R, offset, log2_bs, log2_nbs,
                    stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                    has_bias, DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x dequant(W)^T + b + scaling * u B^T, W [N, K] dequantized tile by tile in registers
    (ROW_BLOCKS: the one-absmax-per-row tile path, see _nf4_row_tile)."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur,
                        mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0)
            acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
        acc = acc * scaling
    col_ok = cols < N
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        if ROW_BLOCKS:
            w = _nf4_row_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, cols, k0, K, col_ok,
                              log2_bs, log2_nbs, DOUBLE, BLOCK_N, BLOCK_K)
        else:
            w_mask = col_ok[:, None] & (ks[None, :] < K)
            w = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset,
                            cols[:, None] * K + ks[None, :], w_mask, log2_bs, log2_nbs, DOUBLE)
            w = tl.where(w_mask, w, 0.0)
        acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=PRECISION)
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,
                     N, K, R, offset, log2_bs, log2_nbs,
                     stride_xm, stride_xk, stride_um, stride_ur, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                     has_bias, DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One token row m (program axis 1) times BLOCK_N rows of W: y[m, n] = sum_k x[m, k] W[n, k]
    (+ b + scaling * u[m] . B[n]), with products and sums in fp32 (no tensor cores: decode reads
    W once and is bound by its bytes)."""
    m = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + m * stride_xm + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        if ROW_BLOCKS:
            w = _nf4_row_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, cols, k0, K, col_ok,
                              log2_bs, log2_nbs, DOUBLE, BLOCK_N, BLOCK_K)
        else:
            w_mask = col_ok[:, None] & k_ok[None, :]
            w = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset,
                            cols[:, None] * K + ks[None, :], w_mask, log2_bs, log2_nbs, DOUBLE)
            w = tl.where(w_mask, w, 0.0)
        acc += tl.sum(w.to(x_ptr.dtype.element_ty).to(tl.float32) * x[None, :], axis=1)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            r_ok = ranks < R
            u = tl.load(u_ptr + m * stride_um + ranks * stride_ur, mask=r_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                        mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            lora += tl.sum(b * u[None, :], axis=1)
        acc += lora * scaling
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _nf4_bwd_dx_kernel(dy_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, g_ptr, a_ptr, x_ptr,
                       seed_ptr, dx_ptr, da_ptr, M, N, K, R, offset, log2_bs, log2_nbs,
                       stride_dym, stride_dyn, stride_gm, stride_gr, stride_ar, stride_ak,
                       stride_xm, stride_xk, stride_dxm, stride_dxk, lora_scale, p,
                       DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr,
                       COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = dy dequant(W) + lora_scale * keep * (g A), W's [BLOCK_N, BLOCK_K] tiles dequantized in
    registers; then dA[R, K] += lora_scale * g^T (keep * x) for this row block (fp32 atomics)."""
    tile_m, tile_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    seed = tl.load(seed_ptr)
    if COMPUTE_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                g = tl.load(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr,
                            mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
                a = tl.load(a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
                            mask=(ranks[:, None] < R) & k_ok[None, :], other=0.0)
                acc = tl.dot(g, a, acc, input_precision=PRECISION)
            acc = acc * lora_scale
            if HAS_DROPOUT:
                acc = tl.where(_keep_mask(seed, rows, ks, K, p), acc, 0.0)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                         mask=row_ok[:, None] & (ns[None, :] < N), other=0.0)
            if ROW_BLOCKS:
                w = _nf4_row_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, ns,
                                  tile_k * BLOCK_K, K, ns < N, log2_bs, log2_nbs, DOUBLE, BLOCK_N, BLOCK_K)
            else:
                w_mask = (ns[:, None] < N) & k_ok[None, :]
                w = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset,
                                ns[:, None] * K + ks[None, :], w_mask, log2_bs, log2_nbs, DOUBLE)
                w = tl.where(w_mask, w, 0.0)
            acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])
    if HAS_LORA:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, rows, ks, K, p), x, 0.0).to(x.dtype)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr,
                        mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
            part = tl.dot(tl.trans(g), x, input_precision=PRECISION) * lora_scale
            tl.atomic_add(da_ptr + ranks[:, None] * K + ks[None, :], part, mask=(ranks[:, None] < R) & k_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

_DEQUANT_BLOCK = 1024


def _gemm_config(dtype: torch.dtype, row_blocks: bool = True) -> dict:
    """Forward tiles: the dequantized W tile (codes, values, scales) lives in registers beside the
    accumulator, so the K depth is 32 (a W tile row then sits inside one NF4 block at every
    blocksize) and the pipeline two stages deep; fp32 halves the N width. The general path (a
    gather and an absmax decode per element, for shapes whose rows cross NF4 blocks) takes 64x64."""
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and hold far more registers
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    if not row_blocks:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}


def _dx_config(dtype: torch.dtype, row_blocks: bool = True) -> dict:
    """dx tiles: K depth 64 (one NF4 block per W tile row at blocksize >= 64), N steps of 32."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    if not row_blocks:
        return {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_N": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}


_GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
_RANK_CHUNK = 16  # the LoRA rank is looped over in chunks of 16 (tl.dot's minimum)


def _lora_block_r(rank: int, dtype: torch.dtype) -> int:
    """The rank chunk the LoRA op's own kernels (down projection, dy B) are launched with."""
    try:
        return _lora._block_r(rank, dtype)
    except TypeError:  # an ops.lora whose chunk does not depend on the dtype
        return _lora._block_r(rank)


def _row_blocks(w4, block_k: int) -> bool:
    """The W tiles [rows, k0:k0+block_k] each lie inside one NF4 block per row (the fast tile path)."""
    k = w4.shape[1]
    return k % w4.blocksize == 0 and w4.blocksize % block_k == 0


def _weight_args(w4, device):
    """(packed, absmax, nested_absmax, nested_code, nf4_code, offset, log2_bs, log2_nbs, DOUBLE)."""
    code = ref.nf4_code(device)
    if w4.double_quant:
        return (w4.packed, w4.absmax, w4.nested_absmax, w4.nested_code, code, float(w4.offset),
                int(math.log2(w4.blocksize)), int(math.log2(w4.nested_blocksize)), True)
    return (w4.packed, w4.absmax, w4.absmax, code, code, 0.0, int(math.log2(w4.blocksize)), 0, False)


def _triton_dequantize(w4, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(w4.numel, dtype=dtype, device=w4.device)
    packed, absmax, nested, ncode, code, offset, log2_bs, log2_nbs, double = _weight_args(w4, w4.device)
    grid = (triton.cdiv(w4.numel, _DEQUANT_BLOCK),)
    _nf4_dequant_kernel[grid](packed, absmax, nested, ncode, code, out, w4.numel, offset, log2_bs, log2_nbs,
                              DOUBLE=double, BLOCK=_DEQUANT_BLOCK, num_warps=4)
    return out.view(w4.shape)


def _cuda_dequantize(w4, dtype: torch.dtype) -> torch.Tensor:
    from peftkern import _cuda

    out = torch.empty(w4.numel, dtype=dtype, device=w4.device)
    kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    threads = 256
    blocks = (w4.numel + threads * 2 - 1) // (threads * 2)
    absmax = w4.absmax
    nested = w4.nested_absmax if w4.double_quant else absmax
    ncode = w4.nested_code if w4.double_quant else absmax
    _cuda.launch("pk_nf4_dequantize", (blocks,), (threads,),
                 _cuda.pointer(w4.packed), _cuda.pointer(absmax), _cuda.pointer(nested), _cuda.pointer(ncode),
                 ctypes.c_float(float(w4.offset) if w4.double_quant else 0.0), ctypes.c_int64(w4.numel),
                 ctypes.c_int32(w4.blocksize), ctypes.c_int32(w4.nested_blocksize),
                 ctypes.c_int32(1 if w4.double_quant else 0), ctypes.c_int32(kind), _cuda.pointer(out))
    return out.view(w4.shape)


def _triton_forward(x2d, w4, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(y [M, N], u [M, r] or an empty [M, 0] without LoRA)."""
    M, K = x2d.shape
    N = w4.shape[0]
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 0
    y = x2d.new_empty(M, N)
    u = x2d.new_empty(M, R)
    if M == 0:
        return y, u
    precision = _lora._precision(x2d.dtype)
    block_r = _lora_block_r(max(R, 1), x2d.dtype)
    if has_lora:
        down, down_meta = _lora._split(_lora._DOWN_CONFIG)
        flags = {"HAS_DROPOUT": dropout_p > 0.0} if "HAS_DROPOUT" in _lora._lora_down_kernel.arg_names else {}
        _lora._lora_down_kernel[(triton.cdiv(M, down["BLOCK_M"]), triton.cdiv(R, block_r))](
            x2d, lora_A, u, seed, M, K, R, x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1),
            u.stride(0), u.stride(1), 1.0 / (1.0 - dropout_p), dropout_p,
            PRECISION=precision, BLOCK_R=block_r, **flags, **down, **down_meta)
    packed, absmax, nested, ncode, code, offset, log2_bs, log2_nbs, double = _weight_args(w4, x2d.device)
    b_arg = lora_B if has_lora else x2d
    common = (packed, absmax, nested, ncode, code, bias if bias is not None else x2d, u if has_lora else x2d, b_arg, y)
    lora_strides = (u.stride(0), u.stride(1), b_arg.stride(0), b_arg.stride(1))
    if M <= GEMV_MAX_TOKENS:
        cfg, meta = _lora._split(_GEMV_CONFIG)
        _nf4_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), M)](
            x2d, *common, N, K, R, offset, log2_bs, log2_nbs, x2d.stride(0), x2d.stride(1), *lora_strides,
            y.stride(0), y.stride(1), scaling, int(bias is not None), DOUBLE=double,
            ROW_BLOCKS=_row_blocks(w4, cfg["BLOCK_K"]), HAS_LORA=has_lora, BLOCK_R=_RANK_CHUNK, **cfg, **meta)
        return y, u
    row_blocks = _row_blocks(w4, _gemm_config(x2d.dtype)["BLOCK_K"])
    cfg, meta = _lora._split(_gemm_config(x2d.dtype, row_blocks))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _nf4_fwd_kernel[grid](
        x2d, *common, M, N, K, R, offset, log2_bs, log2_nbs, x2d.stride(0), x2d.stride(1), *lora_strides,
        y.stride(0), y.stride(1), scaling, int(bias is not None), DOUBLE=double,
        ROW_BLOCKS=row_blocks, HAS_LORA=has_lora, PRECISION=precision, BLOCK_R=_RANK_CHUNK,
        **cfg, **meta)
    return y, u


def _triton_backward(dy, x2d, w4, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """-> (dx or None, dA or None, dB or None)."""
    M, K = x2d.shape
    N = w4.shape[0]
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 0
    dx = x2d.new_empty(M, K) if need_dx else None
    d_a = torch.zeros((R, K), dtype=torch.float32, device=x2d.device) if has_lora else None
    d_b = torch.zeros((N, R), dtype=torch.float32, device=x2d.device) if has_lora else None
    if M == 0:
        if dx is not None:
            dx.zero_()
    elif has_lora or need_dx:
        precision = _lora._precision(x2d.dtype)
        block_r = _lora_block_r(max(R, 1), x2d.dtype)
        g = x2d.new_empty(M, R)
        if has_lora:
            g_config = _lora._g_config(x2d.dtype) if hasattr(_lora, "_g_config") else _lora._G_CONFIG
            gcfg, gmeta = _lora._split(g_config)
            _lora._lora_bwd_g_kernel[(triton.cdiv(M, gcfg["BLOCK_M"]), triton.cdiv(R, block_r))](
                dy, lora_B, u, g, d_b, M, N, R, dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
                u.stride(0), u.stride(1), g.stride(0), g.stride(1), scaling,
                PRECISION=precision, BLOCK_R=block_r, **gcfg, **gmeta)
        packed, absmax, nested, ncode, code, offset, log2_bs, log2_nbs, double = _weight_args(w4, x2d.device)
        a_arg = lora_A if has_lora else x2d
        out = dx if dx is not None else x2d
        row_blocks = _row_blocks(w4, _dx_config(x2d.dtype)["BLOCK_K"])
        cfg, meta = _lora._split(_dx_config(x2d.dtype, row_blocks))
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
        _nf4_bwd_dx_kernel[grid](
            dy, packed, absmax, nested, ncode, code, g, a_arg, x2d, seed, out, d_a if has_lora else x2d,
            M, N, K, R, offset, log2_bs, log2_nbs, dy.stride(0), dy.stride(1), g.stride(0), g.stride(1),
            a_arg.stride(0), a_arg.stride(1), x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
            scaling / (1.0 - dropout_p), dropout_p, DOUBLE=double, ROW_BLOCKS=row_blocks,
            HAS_LORA=has_lora, HAS_DROPOUT=dropout_p > 0.0,
            COMPUTE_DX=need_dx, PRECISION=precision, BLOCK_R=_RANK_CHUNK, **cfg, **meta)
    if has_lora:
        d_a, d_b = d_a.to(x2d.dtype), d_b.to(x2d.dtype)
    return dx, d_a, d_b



def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, double quant
    (absmax pointer uint8) or not (fp32), row-block tile path or the general one, LoRA or not; the
    rank is looped in chunks of 16 and the bias is a runtime flag, so neither multiplies configs.
    (_lora_down_kernel and _lora_bwd_g_kernel, also launched here, are listed by peftkern.ops.lora.)"""
    specs = []
    scalars = {"offset": "fp32", "log2_bs": "i32", "log2_nbs": "i32"}
    lora_strides = {s: "i32" for s in ("stride_xm", "stride_xk", "stride_um", "stride_ur", "stride_bn", "stride_br",
                                       "stride_ym", "stride_yn")}
    dx_strides = {s: "i32" for s in ("stride_dym", "stride_dyn", "stride_gm", "stride_gr", "stride_ar", "stride_ak",
                                     "stride_xm", "stride_xk", "stride_dxm", "stride_dxk")}
    for dtype, double in itertools.product((torch.float32, torch.float16, torch.bfloat16), (False, True)):
        t = tl_dtype_name(dtype)
        precision = _lora._precision(dtype)
        wsig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double else "*fp32", "nested_ptr": "*fp32",
                "ncode_ptr": "*fp32", "code_ptr": "*fp32"}
        specs.append(KernelSpec(_nf4_dequant_kernel, f"{t} dq={int(double)} {_DEQUANT_BLOCK}",
                                {**wsig, "out_ptr": f"*{t}", "n": "i32", **scalars},
                                {"DOUBLE": double, "BLOCK": _DEQUANT_BLOCK}, num_warps=4))
        for row_blocks, has_lora in itertools.product((False, True), (False, True)):
            name = f"{t} dq={int(double)} rb={int(row_blocks)} lora={int(has_lora)}"
            io = {"x_ptr": f"*{t}", **wsig, "bias_ptr": f"*{t}", "u_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}"}
            tail = {**scalars, **lora_strides, "scaling": "fp32", "has_bias": "i32"}
            cfg, meta = _lora._split(_gemm_config(dtype, row_blocks))
            specs.append(KernelSpec(
                _nf4_fwd_kernel, name, {**io, "M": "i32", "N": "i32", "K": "i32", "R": "i32", **tail},
                {"DOUBLE": double, "ROW_BLOCKS": row_blocks, "HAS_LORA": has_lora, "PRECISION": precision,
                 "BLOCK_R": _RANK_CHUNK, **cfg}, **meta))
            gcfg, gmeta = _lora._split(_GEMV_CONFIG)
            specs.append(KernelSpec(
                _nf4_gemv_kernel, name, {**io, "N": "i32", "K": "i32", "R": "i32", **tail},
                {"DOUBLE": double, "ROW_BLOCKS": row_blocks, "HAS_LORA": has_lora, "BLOCK_R": _RANK_CHUNK, **gcfg},
                **gmeta))
            for dropout in ((False, True) if has_lora else (False,)):
                cfg, meta = _lora._split(_dx_config(dtype, row_blocks))
                specs.append(KernelSpec(
                    _nf4_bwd_dx_kernel, f"{name} dropout={int(dropout)}",
                    {"dy_ptr": f"*{t}", **wsig, "g_ptr": f"*{t}", "a_ptr": f"*{t}", "x_ptr": f"*{t}",
                     "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                     "R": "i32", **scalars, **dx_strides, "lora_scale": "fp32", "p": "fp32"},
                    {"DOUBLE": double, "ROW_BLOCKS": row_blocks, "HAS_LORA": has_lora, "HAS_DROPOUT": dropout,
                     "COMPUTE_DX": True, "PRECISION": precision, "BLOCK_R": _RANK_CHUNK, **cfg}, **meta))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def _torch_dequantize(w4, dtype: torch.dtype) -> torch.Tensor:
    return ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, w4.blocksize, dtype)


def _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if lora_A is None:
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        return y, x2d.new_empty(x2d.shape[0], 0)
    return _lora._torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    if lora_A is None:
        return (dy @ weight if need_dx else None), None, None
    return _lora._torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

class _W4:
    """The NF4Weight fields the kernels read, rebuilt from a registered op's flat arguments."""

    def __init__(self, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape):
        self.packed, self.absmax = packed, absmax
        self.nested_absmax, self.nested_code = nested_absmax, nested_code
        self.offset, self.blocksize, self.nested_blocksize = offset, blocksize, nested_blocksize
        self.shape = torch.Size(shape)
        self.numel = math.prod(shape)
        self.device = packed.device
        self.double_quant = nested_absmax is not None

    def absmax_fp32(self):
        if not self.double_quant:
            return self.absmax
        return ref.decode_absmax(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)


def _flat(w4) -> tuple:
    return (w4.packed, w4.absmax, w4.nested_absmax, w4.nested_code, float(w4.offset or 0.0), int(w4.blocksize),
            int(w4.nested_blocksize), [int(s) for s in w4.shape])


@torch.library.custom_op("peftkern::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                       nested_code: torch.Tensor | None, offset: float, blocksize: int, nested_blocksize: int,
                       shape: list[int], dtype: torch.dtype, face: str) -> torch.Tensor:
    w4 = _W4(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape)
    if face == "triton":
        return _triton_dequantize(w4, dtype)
    if face == "cuda":
        return _cuda_dequantize(w4, dtype)
    return _torch_dequantize(w4, dtype)


@_nf4_dequantize_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype, face):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("peftkern::nf4_linear_fwd", mutates_args=())
def _nf4_linear_fwd(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                    nested_code: torch.Tensor | None, offset: float, blocksize: int, nested_blocksize: int,
                    shape: list[int], bias: torch.Tensor | None, lora_A: torch.Tensor | None,
                    lora_B: torch.Tensor | None, scaling: float, dropout_p: float, seed: torch.Tensor,
                    face: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r] kept for the backward; [M, 0] without LoRA)."""
    w4 = _W4(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape)
    if face == "triton":
        return _triton_forward(x2d, w4, bias, lora_A, lora_B, scaling, dropout_p, seed)
    weight = _torch_dequantize(w4, x2d.dtype)
    return _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@_nf4_linear_fwd.register_fake
def _(x2d, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, bias, lora_A,
      lora_B, scaling, dropout_p, seed, face):
    r = lora_A.shape[0] if lora_A is not None else 0
    return x2d.new_empty(x2d.shape[0], shape[0]), x2d.new_empty(x2d.shape[0], r)


@torch.library.custom_op("peftkern::nf4_linear_bwd", mutates_args=())
def _nf4_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                    nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: float,
                    blocksize: int, nested_blocksize: int, shape: list[int], lora_A: torch.Tensor | None,
                    lora_B: torch.Tensor | None, u: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] or [0, K], dA [r, K] or [0, K], dB [N, r] or [N, 0])."""
    w4 = _W4(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape)
    if face == "triton":
        dx, d_a, d_b = _triton_backward(dy, x2d, w4, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    else:
        weight = _torch_dequantize(w4, x2d.dtype)
        dx, d_a, d_b = _torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    K = x2d.shape[1]
    if dx is None:
        dx = x2d.new_empty(0, K)
    if d_a is None:
        d_a, d_b = x2d.new_empty(0, K), x2d.new_empty(shape[0], 0)
    return dx, d_a, d_b


@_nf4_linear_bwd.register_fake
def _(dy, x2d, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, lora_A, lora_B,
      u, scaling, dropout_p, seed, face, need_dx):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    if lora_A is None:
        return dx, x2d.new_empty(0, x2d.shape[1]), x2d.new_empty(shape[0], 0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


_WEIGHT_ARGS = slice(1, 9)  # packed .. shape in the forward's inputs


def _setup_context(ctx, inputs, output):
    x2d = inputs[0]
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape = inputs[_WEIGHT_ARGS]
    bias, lora_A, lora_B, scaling, dropout_p, seed, face = inputs[9:]
    _, u = output
    ctx.save_for_backward(x2d, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, u, seed)
    ctx.offset, ctx.blocksize, ctx.nested_blocksize, ctx.shape = offset, blocksize, nested_blocksize, shape
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _du):
    x2d, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, u, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx, need_bias, need_a, need_b = needs[0], needs[9], needs[10], needs[11]
    dy = dy.contiguous()
    grads = [None] * 16
    if need_dx or need_a or need_b:
        dx, d_a, d_b = torch.ops.peftkern.nf4_linear_bwd(
            dy, x2d, packed, absmax, nested_absmax, nested_code, ctx.offset, ctx.blocksize, ctx.nested_blocksize,
            ctx.shape, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, ctx.face, need_dx)
        grads[0] = dx if need_dx else None
        if lora_A is not None:
            grads[10] = d_a if need_a else None
            grads[11] = d_b if need_b else None
    if need_bias and ctx.has_bias:
        grads[9] = dy.sum(0)
    return tuple(grads)


_nf4_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def _check_w4(op: str, w4) -> None:
    for name in ("packed", "absmax", "shape", "blocksize"):
        if not hasattr(w4, name):
            raise TypeError(f"{op}: expected an NF4Weight (peftkern.quant.quantize_nf4), got {type(w4).__name__}")
    if w4.packed.dtype != torch.uint8:
        raise TypeError(f"{op}: packed codes must be uint8, got {w4.packed.dtype}")
    if w4.blocksize not in ref.BLOCKSIZES:
        raise ValueError(f"{op}: blocksize must be one of {ref.BLOCKSIZES}, got {w4.blocksize}")
    n = math.prod(w4.shape)
    if w4.packed.numel() != (n + 1) // 2:
        raise ValueError(f"{op}: {w4.packed.numel()} packed bytes cannot hold shape {tuple(w4.shape)}")
    if w4.absmax.numel() != -(-n // w4.blocksize):
        raise ValueError(f"{op}: {w4.absmax.numel()} absmax entries, {-(-n // w4.blocksize)} blocks expected")
    if n >= 2**31:
        raise ValueError(f"{op}: weights of {n} >= 2^31 elements are not supported (int32 indexing); split the layer")
    expected = torch.uint8 if w4.nested_absmax is not None else torch.float32
    if w4.absmax.dtype != expected:
        raise TypeError(f"{op}: absmax must be {expected} {'with' if expected == torch.uint8 else 'without'} "
                        f"double quant, got {w4.absmax.dtype}")
    named = {k: v for k, v in w4.tensors().items()} if hasattr(w4, "tensors") else {"packed": w4.packed}
    _checks.check_same(op, named)


def nf4_dequantize(w4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight -> W of ``w4.shape`` in ``dtype`` (fp32/fp16/bf16), through the picked face."""
    _check_w4(DEQUANT_OP, w4)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{DEQUANT_OP}: dtype must be one of {_checks.FLOAT_DTYPES}, got {dtype}")
    face = backend.pick(DEQUANT_OP, DEQUANT_FACES, w4.device.type)
    return torch.ops.peftkern.nf4_dequantize(*_flat(w4), dtype, face)


def nf4_linear(x: torch.Tensor, w4, bias: torch.Tensor | None = None, lora_A: torch.Tensor | None = None,
               lora_B: torch.Tensor | None = None, scaling: float = 1.0, dropout_p: float = 0.0,
               training: bool = False) -> torch.Tensor:
    """y = x dequant(W4)^T + b (+ scaling * (drop(x) A^T) B^T when lora_A/lora_B are given).

    x [..., in] in fp32/fp16/bf16 (the compute dtype); w4 an NF4Weight of shape [out, in] on x's
    device; bias [out], lora_A [r, in], lora_B [out, r] in x's dtype. Returns [..., out] in x's
    dtype. Gradients flow to x, bias, lora_A and lora_B (the 4-bit weight is frozen).
    """
    _checks.check_float("x", x)
    _check_w4(LINEAR_OP, w4)
    if len(w4.shape) != 2:
        raise ValueError(f"{LINEAR_OP}: the weight must be [out, in], got shape {tuple(w4.shape)}")
    out_features, in_features = w4.shape
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{LINEAR_OP}: x has shape {tuple(x.shape)}, expected [..., {in_features}]")
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{LINEAR_OP}: give both lora_A and lora_B, or neither")
    named = {"x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in named.items():
        if t is not None and name != "x":
            _checks.check_float(name, t)
    _checks.check_same(LINEAR_OP, named, dtype=x.dtype)
    _checks.check_same(LINEAR_OP, {"x": x, "weight codes": w4.packed})
    if bias is not None:
        _checks.check_shape(LINEAR_OP, "bias", bias, (out_features,), "[out]")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[0] == 0:
            raise ValueError(f"{LINEAR_OP}: lora_A must be [r, in] with r >= 1, got {tuple(lora_A.shape)}")
        rank = lora_A.shape[0]
        _checks.check_shape(LINEAR_OP, "lora_A", lora_A, (rank, in_features), "[r, in]")
        _checks.check_shape(LINEAR_OP, "lora_B", lora_B, (out_features, rank), f"[out, r] with r={rank}")
    scaling = _checks.check_finite_scalar(LINEAR_OP, "scaling", scaling)
    _checks.check_probability(LINEAR_OP, "dropout_p", dropout_p)
    face = backend.pick(LINEAR_OP, LINEAR_FACES, x.device.type)
    p = float(dropout_p) if (training and lora_A is not None) else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1 and face == "triton":
        x2d = x2d.contiguous()
    if p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    y, _ = torch.ops.peftkern.nf4_linear_fwd(x2d, *_flat(w4), bias, lora_A, lora_B, scaling, p, seed, face)
    return y.view(*lead, out_features)
