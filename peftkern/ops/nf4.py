"""NF4 ops: dequantize, and the fused dequant-GEMM with an optional LoRA term (QLoRA).

* ``nf4_dequantize(w4, dtype)``: three faces. torch (the reference), Triton (one pass, elementwise)
  and CUDA C++ (csrc/nf4/nf4.cu, its math in nf4_math.cuh, tested on the CPU through the host twin).
* ``nf4_linear(x, w4, bias, lora_A, lora_B, scaling, dropout_p, training)``:
  y = x dequant(W4)^T + b + s (drop(x) A^T) B^T. The Triton face never writes a 16-bit copy of W:
  each program loads 4-bit codes and the per-block statistics (the 8-bit double-quantized absmax
  decoded in registers too), dequantizes its [BLOCK_N, BLOCK_K] tile in registers and feeds it to
  ``tl.dot``. With LoRA the launch is built like LoRA's from ``peftkern.ops._lowrank``: producer
  programs compute u = drop(x) A^T per row tile, and the GEMM tiles add s u B^T after their K loop,
  so a QLoRA forward is one launch and one pass over the 4-bit weight. Few tokens (decode, M <= 8)
  take a GEMV kernel (its producers: one per token). The backward computes g = dy B and dB in
  producers, dx = dy dequant(W4) + s keep (g A) in the dx tiles, and dA from x sub-tiles there.
  The torch face dequantizes, then runs LoRA's torch face.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and
autograd, public entry points.
"""
from __future__ import annotations

import ctypes
import itertools
import math

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import _lowrank as lr
from peftkern.ops import lora as lora_op
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import (device_guard, eager_function, matmul_precision, register_loop_vmap,
                                 register_once_differentiable)
from peftkern.reference import nf4 as ref

DEQUANT_OP = "nf4_dequantize"
LINEAR_OP = "nf4_linear"
DEQUANT_FACES = ("torch", "triton", "cuda")
LINEAR_FACES = ("torch", "triton")
GEMV_MAX_TOKENS = 8


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
    Works for any shape and blocksize (one gather per element); weights hold < 2^31 elements."""
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
def _nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, rows, row_ok, k0, ks, k_ok, K,
                log2_bs, log2_nbs, DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """fp32 tile W[rows, ks] (ks = k0 + arange(BLOCK_K)), zero outside W: the one-absmax-per-row
    path when ROW_BLOCKS, else one gather per element."""
    if ROW_BLOCKS:
        w = _nf4_row_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, rows, k0, K, row_ok,
                          log2_bs, log2_nbs, DOUBLE, BLOCK_ROWS, BLOCK_K)
    else:
        w_mask = row_ok[:, None] & k_ok[None, :]
        w = _nf4_values(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset,
                        rows[:, None] * K + ks[None, :], w_mask, log2_bs, log2_nbs, DOUBLE)
        w = tl.where(w_mask, w, 0.0)
    return w


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
def _nf4_fwd_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, bias_ptr, a_ptr, b_ptr, u_ptr,
                    y_ptr, flag_ptr, M, N, K, R, offset, log2_bs, log2_nbs,
                    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_um, stride_ur,
                    stride_ym, stride_yn, scaling, p, inv_keep,
                    DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x dequant(W)^T + b (+ s u B^T), W [N, K] dequantized tile by tile in registers. With LoRA,
    producers compute u = drop(x) A^T per row tile first (as LoRA's forward)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    if HAS_LORA:
        is_producer, tile_m, tile_n = lr.producer_tile(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
        ticket = tl.load(flag_ptr)
    else:
        tile_m, tile_n = lr.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        is_producer = False
        ticket = 0
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if is_producer:
        lr.produce_u(x_ptr, a_ptr, u_ptr, flag_ptr + 1 + tile_m, rows, row_ok, K, R, R, stride_xm, stride_xk,
                     stride_ar, stride_ak, stride_um, stride_ur, ticket, p, inv_keep, HAS_DROPOUT, PRECISION, BLOCK_M,
                     BLOCK_K, BLOCK_R)
    else:
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, cols, col_ok, k0, ks,
                            k_ok, K, log2_bs, log2_nbs, DOUBLE, ROW_BLOCKS, BLOCK_N, BLOCK_K)
            acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc, input_precision=PRECISION)
        if HAS_LORA:
            acc = lr.published_rank_term(acc, flag_ptr + 1 + tile_m, ticket, u_ptr, b_ptr, rows, row_ok, cols, col_ok,
                                         R, stride_um, stride_ur, stride_bn, stride_br, scaling, PRECISION, BLOCK_R)
        lr.finish_y(acc, y_ptr, bias_ptr, rows, row_ok, cols, col_ok, stride_ym, stride_yn)


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, bias_ptr, a_ptr, b_ptr, u_ptr,
                     y_ptr, flag_ptr, M, N, K, R, offset, log2_bs, log2_nbs,
                     stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_um, stride_ur,
                     stride_ym, stride_yn, scaling, p, inv_keep,
                     DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """Few tokens: programs 0..M-1 (with LoRA) each produce one token's u[m] = drop(x[m]) A^T; then
    each program takes one token row m and BLOCK_N rows of W: y[m, n] = sum_k x[m, k] W[n, k]
    (+ b + s u[m] . B[n]), products and sums in fp32 (no tensor cores: decode reads W once and is
    bound by its bytes)."""
    pid = tl.program_id(0)
    is_producer = False
    producers = 0
    ticket = 0
    if HAS_LORA:
        ticket = tl.load(flag_ptr)
        is_producer = pid < M
        producers = M
    if is_producer:
        m = pid
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            r_ok = ranks < R
            u = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + ks * stride_xk, mask=k_ok, other=0.0)
                if HAS_DROPOUT:
                    keep = lr.keep_mask(ticket, m + tl.arange(0, 1), ks, p)
                    x = tl.where(tl.reshape(keep, (BLOCK_K,)), x, 0.0)
                a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * stride_ar + ks[None, :] * stride_ak,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                u += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            tl.store(u_ptr + m.to(tl.int64) * stride_um + ranks * stride_ur, (u * inv_keep).to(u_ptr.dtype.element_ty),
                     mask=r_ok)
        lr.publish(flag_ptr + 1 + m, ticket)
    else:
        tiles_n = tl.cdiv(N, BLOCK_N)
        m = (pid - producers) // tiles_n
        cols = ((pid - producers) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + ks * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
            w = _nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, cols, col_ok, k0, ks,
                            k_ok, K, log2_bs, log2_nbs, DOUBLE, ROW_BLOCKS, BLOCK_N, BLOCK_K)
            acc += tl.sum(w.to(x_ptr.dtype.element_ty).to(tl.float32) * x[None, :], axis=1)
        if HAS_LORA:
            lr.wait_published(flag_ptr + 1 + m, ticket)
            lora = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                r_ok = ranks < R
                u = tl.load(u_ptr + m.to(tl.int64) * stride_um + ranks * stride_ur, mask=r_ok, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
                b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_bn + ranks[None, :] * stride_br,
                            mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                lora += tl.sum(b * u[None, :], axis=1)
            acc += lora * scaling
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _nf4_bwd_kernel(dy_ptr, packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, x_ptr, a_ptr, b_ptr, u_ptr,
                    g_ptr, seed_ptr, dx_ptr, da_ptr, db_ptr, da_acc_ptr, db_acc_ptr, count_ptr, flag_ptr,
                    M, N, K, R, offset, log2_bs, log2_nbs,
                    stride_dym, stride_dyn, stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
                    stride_um, stride_ur, stride_gm, stride_gr, stride_dxm, stride_dxk, scaling, p, inv_keep,
                    DOUBLE: tl.constexpr, ROW_BLOCKS: tl.constexpr, HAS_LORA: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = dy dequant(W) (+ s keep * (g A)), W's [BLOCK_N, BLOCK_K] tiles dequantized in registers.
    With LoRA the launch is LoRA's backward (see peftkern.ops.lora._lora_bwd_kernel): producers make
    g = dy B and dB, the dx tiles add the rank-r term after their N loop and reduce dA."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    if HAS_LORA:
        is_producer, tile_m, tile_k = lr.producer_tile(tl.program_id(0), tiles_m, tiles_k, GROUP_M)
        seed = tl.load(seed_ptr)
    else:
        tile_m, tile_k = lr.grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
        is_producer = False
        seed = 0
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    scale = scaling * inv_keep
    if is_producer:
        lr.produce_g(dy_ptr, u_ptr, b_ptr, g_ptr, db_acc_ptr, db_acc_ptr, db_ptr, flag_ptr + tile_m, count_ptr + tiles_k,
                     rows, row_ok, N, R, R, 1, tiles_m, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn,
                     stride_br, stride_gm, stride_gr, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if COMPUTE_DX:
            dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
            for n0 in range(0, N, BLOCK_N):
                ns = n0 + tl.arange(0, BLOCK_N)
                n_ok = ns < N
                dy = tl.load(dy_rows + ns[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                w = _nf4_w_tile(packed_ptr, absmax_ptr, nested_ptr, ncode_ptr, code_ptr, offset, ns, n_ok,
                                tile_k * BLOCK_K, ks, k_ok, K, log2_bs, log2_nbs, DOUBLE, ROW_BLOCKS, BLOCK_N, BLOCK_K)
                acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        if HAS_LORA:
            lr.dx_and_da(acc, dx_ptr, x_ptr, g_ptr, a_ptr, da_acc_ptr, flag_ptr + tile_m, rows, row_ok, ks, k_ok,
                         tile_k * BLOCK_K, K, R, stride_xm, stride_xk, stride_gm, stride_gr, stride_ar, stride_ak,
                         stride_dxm, stride_dxk, seed, p, scale, HAS_DROPOUT, COMPUTE_DX, PRECISION, BLOCK_M,
                         BLOCK_K, BLOCK_DA, BLOCK_R)
            lr.cast_da_tile(count_ptr + tile_k, tiles_m, da_acc_ptr, da_ptr, ks, k_ok, K, R, 1, BLOCK_R)
        elif COMPUTE_DX:
            lr.store_tile(dx_ptr, acc, rows, row_ok, ks, k_ok, stride_dxm, stride_dxk)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

_DEQUANT_BLOCK = 1024
RANK_BLOCK = 16  # the LoRA rank is looped in chunks of 16 (tl.dot's minimum): the dequant tiles hold the registers


def _gemm_config(dtype: torch.dtype, row_blocks: bool = True) -> dict:
    """Forward tiles: the dequantized W tile (codes, values, scales) lives in registers beside the
    accumulator, so the K depth is 32 (a W tile row then sits inside one NF4 block at every
    blocksize) and the pipeline two stages deep; fp32 halves the N width. The general path (a
    gather and an absmax decode per element, for shapes whose rows cross NF4 blocks) takes 64x64."""
    if dtype == torch.float32:  # IEEE fp32 dots run on FMA units and hold far more registers (32-row
        # tiles spilled 8 bytes under Triton 3.6 on sm_80, and under 3.9 on sm_90 with 8 warps)
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    if not row_blocks:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}


def _dx_config(dtype: torch.dtype, row_blocks: bool = True, dropout: bool = False, compute_dx: bool = True) -> dict:
    """dx tiles: K depth 64 (one NF4 block per W tile row at blocksize >= 64), N steps of 32 (the
    producers' N step too); dA from x sub-tiles of 32 columns. fp32 over 8 warps and 2 stages (4
    warps spilled on sm_80, 8 warps and 1 stage on sm_90); with dropout, 64-row tiles (the masked
    g A term needs a second tile of registers). Without dx (dA only), fp32 and the 16-bit dropout
    tiles take 4 warps (8 spilled 8 / 16 bytes on sm_80 under Triton 3.9 with the _lowrank blocks)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8,
                "num_warps": 8 if compute_dx else 4, "num_stages": 2}
    if not row_blocks:
        return {"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 1}
    # with dropout, dA sub-tiles of 16 columns (32 spilled 8 bytes under Triton 3.6 on sm_80)
    return {"BLOCK_M": 64 if dropout else 128, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_DA": 16 if dropout else 32,
            "GROUP_M": 8, "num_warps": 4 if (dropout and not compute_dx) else 8, "num_stages": 2}


_GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


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
    with device_guard(out):
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
    with device_guard(out):
        _cuda.launch("pk_nf4_dequantize", (blocks,), (threads,),
                     _cuda.pointer(w4.packed), _cuda.pointer(absmax), _cuda.pointer(nested), _cuda.pointer(ncode),
                     ctypes.c_float(float(w4.offset) if w4.double_quant else 0.0), ctypes.c_int64(w4.numel),
                     ctypes.c_int32(w4.blocksize), ctypes.c_int32(w4.nested_blocksize),
                     ctypes.c_int32(1 if w4.double_quant else 0), ctypes.c_int32(kind), _cuda.pointer(out))
    return out.view(w4.shape)


def _triton_forward(x2d, w4, bias, lora_A, lora_B, scaling, dropout_p):
    """(y [M, N], u [M, r] or an empty [M, 0] without LoRA, seed int64 [1])."""
    M, K = x2d.shape
    N = w4.shape[0]
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 0
    if M == 0 or K == 0 or (has_lora and not lr.scale_fits_kernels(scaling)):
        return _torch_forward(x2d, _torch_dequantize(w4, x2d.dtype), bias, lora_A, lora_B, scaling, dropout_p)
    y = x2d.new_empty(M, N)
    u = x2d.new_empty(M, R)
    packed, absmax, nested, ncode, code, offset, log2_bs, log2_nbs, double = _weight_args(w4, x2d.device)
    a_arg, b_arg = (lora_A, lora_B) if has_lora else (x2d, x2d)
    u_arg = u if has_lora else x2d
    gemv = M <= GEMV_MAX_TOKENS
    cfg, meta = lr.split_config(_GEMV_CONFIG if gemv else _gemm_config(x2d.dtype, _row_blocks(
        w4, _gemm_config(x2d.dtype)["BLOCK_K"])))
    row_blocks = _row_blocks(w4, cfg["BLOCK_K"])
    tiles_m = M if gemv else triton.cdiv(M, cfg["BLOCK_M"])
    tiles_n = triton.cdiv(N, cfg["BLOCK_N"])
    flags = lr.flag_buffer(tiles_m if has_lora else 0, dropout_p, x2d.device)
    args = (x2d, packed, absmax, nested, ncode, code, lr.bias_or_zeros(bias, N, x2d.dtype, x2d.device), a_arg, b_arg,
            u_arg, y, flags,
            M, N, K, R, offset, log2_bs, log2_nbs, x2d.stride(0), x2d.stride(1), a_arg.stride(0), a_arg.stride(1),
            b_arg.stride(0), b_arg.stride(1), u_arg.stride(0), u_arg.stride(1), y.stride(0), y.stride(1),
            scaling, dropout_p, 1.0 / (1.0 - dropout_p))
    flags_kw = dict(DOUBLE=double, ROW_BLOCKS=row_blocks, HAS_LORA=has_lora, HAS_DROPOUT=dropout_p > 0.0,
                    BLOCK_R=RANK_BLOCK)
    grid = ((M if has_lora else 0) + M * tiles_n,) if gemv else (tiles_m * ((1 if has_lora else 0) + tiles_n),)
    with device_guard(x2d):
        if gemv:
            _nf4_gemv_kernel[grid](*args, **flags_kw, **cfg, **meta)
        else:
            _nf4_fwd_kernel[grid](*args, **flags_kw, PRECISION=matmul_precision(x2d.dtype), **cfg, **meta)
    return y, u, flags[:1]


def _triton_backward(dy, x2d, w4, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """-> (dx or None, dA or None, dB or None)."""
    M, K = x2d.shape
    N = w4.shape[0]
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 0
    if (M == 0 or K == 0 or N == 0 or not (has_lora or need_dx)
            or (has_lora and not lr.scale_fits_kernels(scaling / (1.0 - dropout_p)))):
        return _torch_backward(dy, x2d, _torch_dequantize(w4, x2d.dtype), lora_A, lora_B, u, scaling, dropout_p, seed,
                               need_dx)
    cfg, meta = lr.split_config(_dx_config(x2d.dtype, _row_blocks(w4, _dx_config(x2d.dtype)["BLOCK_K"]),
                                           dropout_p > 0.0, need_dx or not has_lora))
    row_blocks = _row_blocks(w4, cfg["BLOCK_K"])
    tiles_m, tiles_k = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"])
    chunks_n = triton.cdiv(N, cfg["BLOCK_N"])
    if has_lora:
        work = torch.zeros(R * K + N * R + tiles_k + chunks_n + tiles_m, dtype=torch.int32, device=x2d.device)
        da_acc = work[:R * K].view(torch.float32)
        db_acc = work[R * K:R * K + N * R].view(torch.float32)
        counts = work[R * K + N * R:R * K + N * R + tiles_k + chunks_n]
        flags = work[R * K + N * R + tiles_k + chunks_n:]
        d_a, d_b, g = x2d.new_empty(R, K), x2d.new_empty(N, R), x2d.new_empty(M, R)
        a_arg, b_arg = lora_A, lora_B
    else:
        da_acc = db_acc = counts = flags = d_a = d_b = g = a_arg = b_arg = u = x2d
    dx = x2d.new_empty(M, K) if need_dx else None
    out = dx if dx is not None else x2d
    packed, absmax, nested, ncode, code, offset, log2_bs, log2_nbs, double = _weight_args(w4, x2d.device)
    grid = (tiles_m * ((1 if has_lora else 0) + tiles_k),)
    with device_guard(x2d):
        _nf4_bwd_kernel[grid](
            dy, packed, absmax, nested, ncode, code, x2d, a_arg, b_arg, u, g, seed, out, d_a, d_b, da_acc, db_acc,
            counts, flags, M, N, K, R, offset, log2_bs, log2_nbs, dy.stride(0), dy.stride(1), x2d.stride(0),
            x2d.stride(1), a_arg.stride(0), a_arg.stride(1), b_arg.stride(0), b_arg.stride(1), u.stride(0),
            u.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1), scaling, dropout_p,
            1.0 / (1.0 - dropout_p), DOUBLE=double, ROW_BLOCKS=row_blocks, HAS_LORA=has_lora,
            HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DX=need_dx, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=RANK_BLOCK, **cfg, **meta)
    if not has_lora:
        return dx, None, None
    return dx, d_a, d_b


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, double quant
    (absmax pointer uint8) or not (fp32), row-block tile path or the general one, and the constexpr
    features (LoRA, dropout; dx or dA only). The rank is looped in chunks of 16; the bias is always
    added (a cached zero vector without one)."""
    specs = []
    scalars = {"offset": "fp32", "log2_bs": "i32", "log2_nbs": "i32"}
    fwd_tail = {**lr.i32("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_bn", "stride_br", "stride_um",
                         "stride_ur", "stride_ym", "stride_yn"), "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"}
    fwd_units = ("stride_xk", "stride_ak", "stride_br", "stride_ur", "stride_yn")
    for dtype, double in itertools.product((torch.float32, torch.float16, torch.bfloat16), (False, True)):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        wsig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double else "*fp32", "nested_ptr": "*fp32",
                "ncode_ptr": "*fp32", "code_ptr": "*fp32"}
        specs.append(KernelSpec(_nf4_dequant_kernel, f"{t} dq={int(double)} {_DEQUANT_BLOCK}",
                                {**wsig, "out_ptr": f"*{t}", "n": "i32", **scalars},
                                {"DOUBLE": double, "BLOCK": _DEQUANT_BLOCK}, num_warps=4))
        for row_blocks in (False, True):
            io = {"x_ptr": f"*{t}", **wsig, "bias_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": f"*{t}",
                  "y_ptr": f"*{t}", "flag_ptr": "*i64", **lr.i32("M", "N", "K", "R"), **scalars, **fwd_tail}
            for has_lora, dropout in ((False, False), (True, False), (True, True)):
                name = f"{t} dq={int(double)} rb={int(row_blocks)} lora={int(has_lora)} dropout={int(dropout)}"
                features = {"DOUBLE": double, "ROW_BLOCKS": row_blocks, "HAS_LORA": has_lora, "HAS_DROPOUT": dropout,
                            "BLOCK_R": RANK_BLOCK}
                cfg, meta = lr.split_config(_gemm_config(dtype, row_blocks))
                specs.append(KernelSpec(_nf4_fwd_kernel, name, io, {**features, "PRECISION": precision, **cfg}, **meta,
                                        unit_args=fwd_units, plain_args=("R", "M")))
                gcfg, gmeta = lr.split_config(_GEMV_CONFIG)
                specs.append(KernelSpec(_nf4_gemv_kernel, name, io, {**features, **gcfg}, **gmeta,
                                        unit_args=fwd_units, plain_args=("R", "M")))
            for has_lora, dropout, compute_dx in itertools.product((False, True), (False, True), (True, False)):
                if not has_lora and (dropout or not compute_dx):
                    continue
                cfg, meta = lr.split_config(_dx_config(dtype, row_blocks, dropout, compute_dx))
                specs.append(KernelSpec(
                    _nf4_bwd_kernel, f"{t} dq={int(double)} rb={int(row_blocks)} lora={int(has_lora)} "
                                     f"dropout={int(dropout)} dx={int(compute_dx)}",
                    {"dy_ptr": f"*{t}", **wsig, "x_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": f"*{t}",
                     "g_ptr": f"*{t}", "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": f"*{t}", "db_ptr": f"*{t}",
                     "da_acc_ptr": "*fp32", "db_acc_ptr": "*fp32", "count_ptr": "*i32", "flag_ptr": "*i32",
                     **lr.i32("M", "N", "K", "R"), **scalars,
                     **lr.i32("stride_dym", "stride_dyn", "stride_xm", "stride_xk", "stride_ar", "stride_ak",
                              "stride_bn", "stride_br", "stride_um", "stride_ur", "stride_gm", "stride_gr",
                              "stride_dxm", "stride_dxk"), "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"},
                    {"DOUBLE": double, "ROW_BLOCKS": row_blocks, "HAS_LORA": has_lora, "HAS_DROPOUT": dropout,
                     "COMPUTE_DX": compute_dx, "PRECISION": precision, "BLOCK_R": RANK_BLOCK, **cfg}, **meta,
                    unit_args=("stride_dyn", "stride_xk", "stride_ak", "stride_br", "stride_ur", "stride_gr",
                               "stride_dxk"), plain_args=("R",)))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def _torch_dequantize(w4, dtype: torch.dtype) -> torch.Tensor:
    return ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, w4.blocksize, dtype)


def _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p):
    if lora_A is None:
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        return y, x2d.new_empty(x2d.shape[0], 0), torch.zeros(1, dtype=torch.int64, device=x2d.device)
    return lora_op.torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)


def _torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    if lora_A is None:
        return (dy @ weight if need_dx else None), None, None
    return lora_op.torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


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
                    lora_B: torch.Tensor | None, scaling: float, dropout_p: float,
                    face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r] = drop(x) A^T kept for the backward ([M, 0] without LoRA),
    seed int64 [1]: the dropout seed drawn for this call, 0 without dropout)."""
    w4 = _W4(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape)
    if face == "triton":
        return _triton_forward(x2d, w4, bias, lora_A, lora_B, scaling, dropout_p)
    weight = _torch_dequantize(w4, x2d.dtype)
    return _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)


@_nf4_linear_fwd.register_fake
def _(x2d, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, bias, lora_A,
      lora_B, scaling, dropout_p, face):
    r = lora_A.shape[0] if lora_A is not None else 0
    return (x2d.new_empty(x2d.shape[0], shape[0]), x2d.new_empty(x2d.shape[0], r),
            x2d.new_empty(1, dtype=torch.int64))


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
_N_INPUTS = 15


def _setup_context(ctx, inputs, output):
    x2d = inputs[0]
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape = inputs[_WEIGHT_ARGS]
    bias, lora_A, lora_B, scaling, dropout_p, face = inputs[9:]
    _, u, seed = output
    ctx.set_materialize_grads(False)  # u and the seed are for the backward only
    saved = (x2d, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, u, seed)
    ctx.save_for_backward(*saved)
    ctx.offset, ctx.blocksize, ctx.nested_blocksize, ctx.shape = offset, blocksize, nested_blocksize, shape
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None
    return saved


def _backward(ctx, dy, _du=None, _dseed=None):
    x2d, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, u, seed = ctx.saved_tensors
    grads = [None] * _N_INPUTS
    if dy is None:
        return tuple(grads)
    needs = ctx.needs_input_grad
    need_dx, need_bias, need_a, need_b = needs[0], needs[9], needs[10], needs[11]
    dy = dy.contiguous()
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


def _jvp(ctx, tangents):
    """Forward-mode rule: W4 is frozen; y is linear in x, b, A and B (the same dropout mask)."""
    x2d, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, u, seed = ctx.saved_tensors
    dx, d_bias, d_a, d_b = tangents[0], tangents[9], tangents[10], tangents[11]
    s, p = ctx.scaling, ctx.dropout_p
    terms = []
    if dx is not None:
        flat = (packed, absmax, nested_absmax, nested_code, ctx.offset, ctx.blocksize, ctx.nested_blocksize, ctx.shape)
        terms.append(torch.ops.peftkern.nf4_linear_fwd(dx, *flat, None, None, None, 1.0, 0.0, ctx.face)[0])
        if lora_A is not None:
            terms.append(s * (lora_op.dropped(dx, p, seed) @ lora_A.t()) @ lora_B.t())
    if d_bias is not None:
        terms.append(d_bias.expand(x2d.shape[0], ctx.shape[0]))
    if d_a is not None:
        terms.append(s * (lora_op.dropped(x2d, p, seed) @ d_a.t()) @ lora_B.t())
    if d_b is not None:
        terms.append(s * u @ d_b.t())
    return sum(terms[1:], terms[0]) if terms else None, None, None


_nf4_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_loop_vmap(_nf4_linear_fwd, (0, 0, 0))
register_loop_vmap(_nf4_linear_bwd, (0, 0, 0))
register_once_differentiable(_nf4_linear_bwd, "nf4_linear")


_NF4Linear = eager_function(torch.ops.peftkern.nf4_linear_fwd, _setup_context, _backward,
                            lambda ctx, *tangents: _jvp(ctx, tangents), "_NF4Linear")


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
    scaling = _checks.check_finite_scalar(LINEAR_OP, "scaling", scaling)
    dropout_p = _checks.check_probability(LINEAR_OP, "dropout_p", dropout_p)
    x, bias, lora_A, lora_B = _checks.autocast_inputs(x, bias, lora_A, lora_B)
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
    face = backend.pick(LINEAR_OP, LINEAR_FACES, x.device.type)
    p = dropout_p if (training and lora_A is not None) else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    inputs = (x2d, *_flat(w4), bias, lora_A, lora_B, scaling, p, face)
    if torch.compiler.is_compiling():
        y = torch.ops.peftkern.nf4_linear_fwd(*inputs)[0]
    else:
        y = _NF4Linear.apply(*inputs)[0]
    return y.view(*lead, out_features)
