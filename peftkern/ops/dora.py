"""DoRA linear: y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b, never building W + s B A.

The row norm comes from the factored form, O(out * r + r^2) memory:

    ||W + s B A||^2_row = ||W||^2_row + 2 s rowsum((W A^T) * B) + s^2 rowsum((B (A A^T)) * B)

and is detached in backward (DoRA paper section 4.3, as PEFT does), so the backward is LoRA's with
dy scaled per output column by scale = m / norm, plus dm = rowsum_tokens(dy * (y - b)) / m: the
pre-scale output is recovered from the scaled one, so without a bias nothing [tokens, out]-sized is
stored beyond y itself (which the next layer often keeps anyway). With a bias, y - b is stored once
beside y (recovering it by subtraction would cancel digits in 16-bit).

Faces:
* torch: the CPU face. Row norm from the factored form over row chunks of W (no copy of W at any
  precision), the rank-r product and the scale applied in place into the base output.
* triton: one launch computes u = drop(x) A^T and W A^T (plus ||W||^2_row when not cached) from the
  same kernel; the forward GEMM takes the rank-r term into its accumulator and finishes the row
  norm, m / norm and the bias in its epilogue; the backward reuses y for dm inside the dy B kernel
  and scales dy on the fly in the dx GEMM.

A base that is not a dense tensor (NF4) goes through :func:`dora_from_base`: the caller supplies
x W^T (with its own autograd) and the row norm (see :func:`dora_row_norm_from_rows`).

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and autograd.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.lora import _grouped_tile, _keep_mask, _precision, _split, _torch_dropped, _torch_keep_mask

OP = "dora_linear"
FACES = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rows_times_a(src_ptr, a_ptr, rows, ranks, n_rows, K, R, stride_sm, stride_sk, stride_ar, stride_ak,
                  seed, p, PRECISION: tl.constexpr, WANT_SQ: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """(src[rows] @ A[ranks]^T, rowsum(src[rows]^2)) in fp32; the dropout mask applies when asked."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        s = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sk,
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < K), other=0.0)
        if p > 0.0:
            s = tl.where(_keep_mask(seed, rows, cols, K, p), s, 0.0).to(s.dtype)
        if WANT_SQ:
            sf = s.to(tl.float32)
            sq += tl.sum(sf * sf, axis=1)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(s, tl.trans(a), acc, input_precision=PRECISION)
    return acc, sq


@triton.jit
def _dora_down_kernel(x_ptr, w_ptr, a_ptr, u_ptr, wa_ptr, wsq_ptr, gram_ptr, seed_ptr, M, N, K, R,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_um, stride_ur,
                      u_scale, p, compute_wsq, PRECISION: tl.constexpr, NORM_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One launch, three skinny GEMMs against A: row blocks of x give u[M, R] = s drop(x) A^T; row
    blocks of W give wa[N, R] = W A^T (fp32) and, when not cached, wsq[N] = ||W||^2_row; the last
    program row gives gram[R, R] = A A^T (fp32) for its rank block."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tiles_x = tl.cdiv(M, BLOCK_M)
    seed = tl.load(seed_ptr)
    if pid < tiles_x:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        acc, _ = _rows_times_a(x_ptr, a_ptr, rows, ranks, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
                               seed, p, PRECISION, False, BLOCK_M, BLOCK_K, BLOCK_R)
        acc = acc * u_scale
        tl.store(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur, acc.to(u_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))
    elif pid < tiles_x + tl.cdiv(N, BLOCK_M):
        rows = (pid - tiles_x) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc, sq = _rows_times_a(w_ptr, a_ptr, rows, ranks, N, K, R, stride_wn, stride_wk, stride_ar, stride_ak,
                                seed, 0.0, NORM_PRECISION, True, BLOCK_M, BLOCK_K, BLOCK_R)
        tl.store(wa_ptr + rows[:, None] * R + ranks[None, :], acc, mask=(rows[:, None] < N) & (ranks[None, :] < R))
        if compute_wsq != 0 and pid_r == 0:
            tl.store(wsq_ptr + rows, sq, mask=rows < N)
    else:
        for c0 in range(0, R, BLOCK_R):
            cr = c0 + tl.arange(0, BLOCK_R)
            g, _ = _rows_times_a(a_ptr, a_ptr, ranks, cr, R, K, R, stride_ar, stride_ak, stride_ar, stride_ak,
                                 seed, 0.0, "ieee", False, BLOCK_R, BLOCK_K, BLOCK_R)
            tl.store(gram_ptr + ranks[:, None] * R + cr[None, :], g, mask=(ranks[:, None] < R) & (cr[None, :] < R))


@triton.jit
def _dora_row_scale(wsq_ptr, wa_ptr, gram_ptr, b_ptr, mag_ptr, cols, N, R, stride_bn, stride_br, scaling,
                    BLOCK_N: tl.constexpr, NORM_R: tl.constexpr):
    """(m / norm, norm) for output columns ``cols``, fp32, from the factored row norm:
    ||W||^2 + 2 s rowsum(wa * B) + s^2 rowsum((B G) * B), G = A A^T, in NORM_R-wide rank chunks
    (small tiles: it runs beside the GEMM's accumulator)."""
    col_ok = cols < N
    norm2 = tl.load(wsq_ptr + cols, mask=col_ok, other=1.0)
    for r0 in range(0, R, NORM_R):
        ranks = r0 + tl.arange(0, NORM_R)
        rank_ok = ranks < R
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        wa = tl.load(wa_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        bg = tl.zeros((BLOCK_N, NORM_R), dtype=tl.float32)
        for c0 in range(0, R, NORM_R):
            cr = c0 + tl.arange(0, NORM_R)
            bc = tl.load(b_ptr + cols[:, None] * stride_bn + cr[None, :] * stride_br,
                         mask=col_ok[:, None] & (cr[None, :] < R), other=0.0).to(tl.float32)
            g = tl.load(gram_ptr + cr[:, None] * R + ranks[None, :], mask=(cr[:, None] < R) & rank_ok[None, :],
                        other=0.0)
            bg = tl.dot(bc, g, bg, input_precision="ieee")
        norm2 += tl.sum((2.0 * scaling * wa + (scaling * scaling) * bg) * b, axis=1)
    norm = tl.sqrt(tl.maximum(norm2, 0.0))
    mag = tl.load(mag_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return mag / norm, norm


@triton.jit
def _dora_scale_kernel(wsq_ptr, wa_ptr, gram_ptr, b_ptr, mag_ptr, scale_ptr, N, R, stride_bn, stride_br, scaling,
                       BLOCK_N: tl.constexpr, NORM_R: tl.constexpr):
    """scale[N] = m / ||W + s B A||_row (fp32) from the factored parts, BLOCK_N rows per program."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    scale, _ = _dora_row_scale(wsq_ptr, wa_ptr, gram_ptr, b_ptr, mag_ptr, cols, N, R, stride_bn, stride_br, scaling,
                               BLOCK_N, NORM_R)
    tl.store(scale_ptr + cols, scale, mask=cols < N)


@triton.jit
def _dora_fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, scale_ptr, y_ptr, ynb_ptr,
                     M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur,
                     stride_bn, stride_br, stride_ym, stride_yn, has_bias,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = scale * (x W^T + u B^T) + b with u already scaled by s, scale = m / norm per column (from
    _dora_scale_kernel): the rank-r product is one more short K-step into the GEMM's accumulator after
    the main loop; the epilogue scales like a second bias and adds the bias (also storing y - b to
    ``ynb`` when there is one)."""
    tile_m, tile_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur,
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(cols[:, None] < N) & (ranks[None, :] < R), other=0.0)
        acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    tile_ok = (rows[:, None] < M) & (cols[None, :] < N)
    if has_bias:
        tl.store(ynb_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(ynb_ptr.dtype.element_ty),
                 mask=tile_ok)
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _dora_bwd_g_kernel(dy_ptr, ynb_ptr, scale_ptr, mag_ptr, b_ptr, u_ptr, g_ptr, db_ptr, dmag_ptr, dbias_ptr,
                       M, N, R, stride_dym, stride_dyn, stride_ym, stride_yn, stride_bn, stride_br,
                       stride_um, stride_ur, stride_gm, stride_gr, scaling, need_dbias,
                       PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """With dy' = dy * scale (per column, on the fly): g[M, R] = dy' B, dB += s dy'^T u, and from
    the first rank block dmag[N] += rowsum_tokens(dy * ynb) / m, ynb = y - b (0 where m = 0), and,
    dbias[N] += rowsum_tokens(dy); fp32 atomics, one read of dy and y."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = ranks < R
    u = tl.load(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        tile_ok = row_ok[:, None] & col_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=tile_ok, other=0.0)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        dys = (dy.to(tl.float32) * scale[None, :]).to(dy.dtype)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        g = tl.dot(dys, b, g, input_precision=PRECISION)
        part = tl.dot(tl.trans(dys), u, input_precision=PRECISION) * scaling
        tl.atomic_add(db_ptr + cols[:, None] * R + ranks[None, :], part, mask=col_ok[:, None] & rank_ok[None, :])
        if pid_r == 0:
            y = tl.load(ynb_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=tile_ok,
                        other=0.0).to(tl.float32)
            dyf = tl.where(tile_ok, dy.to(tl.float32), 0.0)
            mag = tl.load(mag_ptr + cols, mask=col_ok, other=0.0)
            inv_m = tl.where(mag != 0.0, 1.0 / tl.where(mag != 0.0, mag, 1.0), 0.0)
            tl.atomic_add(dmag_ptr + cols, tl.sum(dyf * y, axis=0) * inv_m, mask=col_ok)
            if need_dbias:
                tl.atomic_add(dbias_ptr + cols, tl.sum(dyf, axis=0), mask=col_ok)
    tl.store(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr, g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _dora_bwd_dx_kernel(dy_ptr, scale_ptr, w_ptr, g_ptr, a_ptr, x_ptr, seed_ptr, dx_ptr, da_ptr, M, N, K, R,
                        stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
                        stride_xm, stride_xk, stride_dxm, stride_dxk, lora_scale, p, compute_dx,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = (dy * scale) W + lora_scale * keep * (g A), dy scaled per column as its tiles load;
    then dA[R, K] += lora_scale * g^T (keep * x) for this row block (fp32 atomics), from x sub-tiles
    of BLOCK_DA columns so the mask and x never hold a whole tile of registers beside the rest."""
    tile_m, tile_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    seed = tl.load(seed_ptr)
    if compute_dx:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr,
                        mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
                        mask=(ranks[:, None] < R) & k_ok[None, :], other=0.0)
            acc = tl.dot(g, a, acc, input_precision=PRECISION)
        acc = acc * lora_scale
        if p > 0.0:
            acc = tl.where(_keep_mask(seed, rows, ks, K, p), acc, 0.0)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                         mask=row_ok[:, None] & (ns[None, :] < N), other=0.0)
            scale = tl.load(scale_ptr + ns, mask=ns < N, other=0.0)
            dy = (dy.to(tl.float32) * scale[None, :]).to(dy.dtype)
            w = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
                        mask=(ns[:, None] < N) & k_ok[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])
    for kk in range(0, BLOCK_K, BLOCK_DA):
        sub = tile_k * BLOCK_K + kk + tl.arange(0, BLOCK_DA)
        sub_ok = sub < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + sub[None, :] * stride_xk,
                    mask=row_ok[:, None] & sub_ok[None, :], other=0.0)
        if p > 0.0:
            x = tl.where(_keep_mask(seed, rows, sub, K, p), x, 0.0).to(x.dtype)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr,
                        mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0)
            part = tl.dot(tl.trans(g), x, input_precision=PRECISION) * lora_scale
            tl.atomic_add(da_ptr + ranks[:, None] * K + sub[None, :], part,
                          mask=(ranks[:, None] < R) & sub_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _norm_precision(dtype: torch.dtype) -> str:
    """The norm is a difference of large terms when s B A nearly cancels W: fp32 inputs stay IEEE."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_chunk(rank: int, dtype: torch.dtype) -> int:
    """Rank chunk of the GEMM kernels: tl.dot needs >= 16; at most 64 (32 for fp32) keeps the
    rank-r tiles in registers beside the accumulator. Two choices per dtype, few configs."""
    small, large = _rank_chunks(dtype)
    return small if rank <= small else large


def _rank_chunks(dtype: torch.dtype) -> tuple[int, int]:
    return (16, 32) if dtype == torch.float32 else (16, 64)


def _gemm_config(dtype: torch.dtype) -> dict:
    """Forward GEMM tiles: 128x128x64 for 16-bit inputs, 64x64x32 over 8 warps for fp32 (tf32
    operands need twice the registers: the same tile over 4 warps spilled on sm_80)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _dx_config(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


_DOWN_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
def _g_config(dtype: torch.dtype) -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}


_SCALE_BLOCK = 64


def _triton_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0:
        return _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed)
    dev = x2d.device
    y = x2d.new_empty(M, N)
    ynb = x2d.new_empty(M, N) if bias is not None else x2d.new_empty(0)
    u = x2d.new_empty(M, R)
    wa = torch.empty((N, R), dtype=torch.float32, device=dev)
    wsq = weight_sq_norm.contiguous() if weight_sq_norm is not None else torch.empty(N, dtype=torch.float32,
                                                                                      device=dev)
    gram = torch.empty((R, R), dtype=torch.float32, device=dev)
    scale = torch.empty(N, dtype=torch.float32, device=dev)
    precision = _precision(x2d.dtype)
    block_r = _rank_chunk(R, x2d.dtype)
    down, down_meta = _split(_DOWN_CONFIG)
    grid = (triton.cdiv(M, down["BLOCK_M"]) + triton.cdiv(N, down["BLOCK_M"]) + 1, triton.cdiv(R, block_r))
    _dora_down_kernel[grid](
        x2d, weight, lora_A, u, wa, wsq, gram, seed, M, N, K, R, x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), u.stride(0), u.stride(1),
        scaling / (1.0 - dropout_p), dropout_p, int(weight_sq_norm is None), PRECISION=precision,
        NORM_PRECISION=_norm_precision(x2d.dtype), BLOCK_R=block_r, **down, **down_meta)
    _dora_scale_kernel[(triton.cdiv(N, _SCALE_BLOCK),)](
        wsq, wa, gram, lora_B, magnitude.detach().float().contiguous(), scale, N, R, lora_B.stride(0),
        lora_B.stride(1), scaling, BLOCK_N=_SCALE_BLOCK, NORM_R=16, num_warps=4)
    cfg, meta = _split(_gemm_config(x2d.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _dora_fwd_kernel[grid](
        x2d, weight, bias if bias is not None else x2d, u, lora_B, scale, y, ynb if bias is not None else y,
        M, N, K, R,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), int(bias is not None),
        PRECISION=precision, BLOCK_R=block_r, **cfg, **meta)
    return y, u, scale, ynb


def _triton_backward(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p, seed, need_dx,
                     need_dbias):
    """ynb = y - b -> (dx or None, dA, dB, dm [N] fp32 = rowsum_tokens(dy * ynb) / m, dbias [N] fp32 or None)."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0:
        return _torch_backward_dora(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p,
                                    seed, need_dx, need_dbias)
    dev = x2d.device
    d_a = torch.zeros((R, K), dtype=torch.float32, device=dev)
    d_b = torch.zeros((N, R), dtype=torch.float32, device=dev)
    dmag = torch.zeros(N, dtype=torch.float32, device=dev)
    dbias = torch.zeros(N, dtype=torch.float32, device=dev) if need_dbias else None
    dx = x2d.new_empty(M, K) if need_dx else None
    precision = _precision(x2d.dtype)
    block_r = _rank_chunk(R, x2d.dtype)
    g = x2d.new_empty(M, R)
    gcfg, gmeta = _split(_g_config(x2d.dtype))
    _dora_bwd_g_kernel[(triton.cdiv(M, gcfg["BLOCK_M"]), triton.cdiv(R, block_r))](
        dy, ynb, scale, magnitude.detach().float().contiguous(), lora_B, u, g, d_b, dmag,
        dbias if dbias is not None else dmag,
        M, N, R, dy.stride(0), dy.stride(1), ynb.stride(0), ynb.stride(1), lora_B.stride(0), lora_B.stride(1),
        u.stride(0), u.stride(1), g.stride(0), g.stride(1), 1.0, int(need_dbias), PRECISION=precision,
        BLOCK_R=block_r, **gcfg, **gmeta)
    cfg, meta = _split(_dx_config(x2d.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    out = dx if dx is not None else x2d
    _dora_bwd_dx_kernel[grid](
        dy, scale, weight, g, lora_A, x2d, seed, out, d_a, M, N, K, R,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        lora_A.stride(0), lora_A.stride(1), x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
        scaling / (1.0 - dropout_p), dropout_p, int(need_dx), PRECISION=precision, BLOCK_R=block_r, **cfg, **meta)
    return dx, d_a.to(x2d.dtype), d_b.to(x2d.dtype), dmag, dbias


def _i32(*names) -> dict:
    return {n: "i32" for n in names}


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch: per dtype and rank chunk (``peftkern kernels``).
    Dropout, bias, cached ||W||^2 and dx-or-not are runtime branches, not compile-time variants."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = _precision(dtype)
        for block_r in _rank_chunks(dtype):
            down, meta = _split(_DOWN_CONFIG)
            specs.append(KernelSpec(
                _dora_down_kernel, f"{t} r<={block_r} {down['BLOCK_M']}x{down['BLOCK_K']}",
                {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "a_ptr": f"*{t}", "u_ptr": f"*{t}", "wa_ptr": "*fp32",
                 "wsq_ptr": "*fp32", "gram_ptr": "*fp32", "seed_ptr": "*i64",
                 **_i32("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ar",
                        "stride_ak", "stride_um", "stride_ur"),
                 "u_scale": "fp32", "p": "fp32", "compute_wsq": "i32"},
                {"PRECISION": precision, "NORM_PRECISION": _norm_precision(dtype), "BLOCK_R": block_r, **down},
                **meta))
            cfg, meta = _split(_gemm_config(dtype))
            specs.append(KernelSpec(
                _dora_fwd_kernel, f"{t} r<={block_r} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}",
                {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "u_ptr": f"*{t}", "b_ptr": f"*{t}",
                 "scale_ptr": "*fp32", "y_ptr": f"*{t}", "ynb_ptr": f"*{t}",
                 **_i32("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_um",
                        "stride_ur", "stride_bn", "stride_br", "stride_ym", "stride_yn"),
                 "has_bias": "i32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta))
            if block_r == _rank_chunks(dtype)[0]:  # the scale kernel has no rank-chunk variant
                specs.append(KernelSpec(
                    _dora_scale_kernel, f"{t} {_SCALE_BLOCK}x16",
                    {"wsq_ptr": "*fp32", "wa_ptr": "*fp32", "gram_ptr": "*fp32", "b_ptr": f"*{t}", "mag_ptr": "*fp32",
                     "scale_ptr": "*fp32", **_i32("N", "R", "stride_bn", "stride_br"), "scaling": "fp32"},
                    {"BLOCK_N": _SCALE_BLOCK, "NORM_R": 16}, num_warps=4))
            gcfg, meta = _split(_g_config(dtype))
            specs.append(KernelSpec(
                _dora_bwd_g_kernel, f"{t} r<={block_r} {gcfg['BLOCK_M']}x{gcfg['BLOCK_N']}",
                {"dy_ptr": f"*{t}", "ynb_ptr": f"*{t}", "scale_ptr": "*fp32", "mag_ptr": "*fp32", "b_ptr": f"*{t}",
                 "u_ptr": f"*{t}", "g_ptr": f"*{t}", "db_ptr": "*fp32", "dmag_ptr": "*fp32", "dbias_ptr": "*fp32",
                 **_i32("M", "N", "R", "stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_bn", "stride_br",
                        "stride_um", "stride_ur", "stride_gm", "stride_gr"),
                 "scaling": "fp32", "need_dbias": "i32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **gcfg}, **meta))
            cfg, meta = _split(_dx_config(dtype))
            specs.append(KernelSpec(
                _dora_bwd_dx_kernel, f"{t} r<={block_r} {cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{cfg['BLOCK_N']}",
                {"dy_ptr": f"*{t}", "scale_ptr": "*fp32", "w_ptr": f"*{t}", "g_ptr": f"*{t}", "a_ptr": f"*{t}",
                 "x_ptr": f"*{t}", "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": "*fp32",
                 **_i32("M", "N", "K", "R", "stride_dym", "stride_dyn", "stride_wn", "stride_wk", "stride_gm",
                        "stride_gr", "stride_ar", "stride_ak", "stride_xm", "stride_xk", "stride_dxm", "stride_dxk"),
                 "lora_scale": "fp32", "p": "fp32", "compute_dx": "i32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta))
    return [_with_launch_hints(spec) for spec in specs]


# What Triton's JIT sees in the common launch (contiguous tensors, aligned sizes): inner strides are
# 1 and compiled as constants; flags and the rank carry no alignment. Without these hints the static
# compile neither vectorizes nor pipelines the loads, and its register figures mean little.
_UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_ak", "stride_ur", "stride_br", "stride_yn", "stride_dyn",
                 "stride_gr", "stride_dxk")
_PLAIN_INTS = ("R", "has_bias", "compute_wsq", "need_dbias", "compute_dx")


def _with_launch_hints(spec: KernelSpec) -> KernelSpec:
    return dataclasses.replace(spec, unit_args=tuple(a for a in _UNIT_STRIDES if a in spec.signature),
                               plain_args=tuple(a for a in _PLAIN_INTS if a in spec.signature))


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

# Row chunk for the norm and dm reductions: bounds every fp32 temporary to ~4 MiB.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, cols))


def _torch_norm_from_parts(wsq, wa, gram, lora_B, scaling):
    """||W + s B A||_row, fp32 [out], from ||W||^2_row, W A^T [out, r] and A A^T [r, r] (fp32)."""
    b = lora_B.float()
    norm2 = wsq + (2.0 * scaling) * (wa * b).sum(1) + (scaling * scaling) * ((b @ gram) * b).sum(1)
    return norm2.clamp_min_(0.0).sqrt_()


def dora_row_norm_from_rows(rows: Callable[[int, int], torch.Tensor], out_features: int, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, scaling: float, weight_sq_norm: torch.Tensor | None = None,
                            chunk_rows: int | None = None) -> torch.Tensor:
    """||W + s B A|| per output row, fp32 [out], detached, from W given row block by row block.

    ``rows(start, stop)`` returns W[start:stop] as a dense float tensor [stop - start, in] (e.g. the
    dequantized rows of a 4-bit weight); at most ``chunk_rows`` rows live at a time, so no full copy
    of W is made. ``weight_sq_norm`` (fp32 [out]) skips recomputing ||W||^2_row.
    """
    with torch.no_grad():
        a = lora_A.float()
        in_features = a.shape[1]
        step = chunk_rows or _chunk_rows(in_features)
        wa = torch.empty((out_features, a.shape[0]), dtype=torch.float32, device=a.device)
        wsq = weight_sq_norm if weight_sq_norm is not None else torch.empty(out_features, dtype=torch.float32,
                                                                             device=a.device)
        for start in range(0, out_features, step):
            stop = min(out_features, start + step)
            block = rows(start, stop)
            if block.dtype != torch.float32:
                block = block.float()
            torch.mm(block, a.t(), out=wa[start:stop])
            if weight_sq_norm is None:
                torch.linalg.vector_norm(block, dim=1, out=wsq[start:stop]).square_()
        return _torch_norm_from_parts(wsq, wa, a @ a.t(), lora_B, scaling)


def weight_row_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||^2 per row, fp32 [out], chunked (no fp32 copy of a 16-bit W): the cache for a frozen W."""
    with torch.no_grad():
        out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        step = _chunk_rows(weight.shape[1])
        for start in range(0, weight.shape[0], step):
            block = weight[start:start + step].float()
            torch.linalg.vector_norm(block, dim=1, out=out[start:start + step]).square_()
        return out


def dora_row_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s B A|| per output row of a dense weight [out, in], fp32 [out], detached, factored."""
    if weight.dtype == torch.float32:
        wa = (weight.detach() @ lora_A.detach().float().t())
        a = lora_A.detach().float()
        wsq = weight_sq_norm if weight_sq_norm is not None else weight_row_sq_norm(weight)
        return _torch_norm_from_parts(wsq, wa, a @ a.t(), lora_B.detach(), scaling)
    w = weight.detach()
    return dora_row_norm_from_rows(lambda i, j: w[i:j], w.shape[0], lora_A.detach(), lora_B.detach(), scaling,
                                   weight_sq_norm)


def _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed):
    scale = magnitude.detach().float() / dora_row_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    u = _torch_dropped(x2d, dropout_p, seed) @ lora_A.t()  # [M, r]
    y = x2d @ weight.t()
    y.addmm_(u, lora_B.t(), alpha=scaling).mul_(scale.to(x2d.dtype))
    if bias is None:
        return y, u, scale, x2d.new_empty(0)
    return y + bias, u, scale, y


def _inverse_or_zero(magnitude: torch.Tensor) -> torch.Tensor:
    """1 / m, fp32, with 0 where m = 0 (y - b holds no trace of the pre-scale output there)."""
    m = magnitude.detach().float()
    return torch.where(m != 0, 1.0 / torch.where(m != 0, m, torch.ones_like(m)), torch.zeros_like(m))


def _torch_dmag(dy, ynb, magnitude):
    """rowsum over tokens of dy * ynb / m, fp32 [out], in row chunks (small temporaries)."""
    out = torch.zeros(dy.shape[1], dtype=torch.float32, device=dy.device)
    step = _chunk_rows(dy.shape[1])
    for start in range(0, dy.shape[0], step):
        rows = ynb[start:start + step].to(torch.float32, copy=True)
        out.add_(rows.mul_(dy[start:start + step]).sum(0))
    return out.mul_(_inverse_or_zero(magnitude))


def _torch_backward_dora(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p, seed,
                         need_dx, need_dbias):
    """LoRA's backward with dy' = dy * scale, never materialized whole: dy' lives one row chunk at
    a time (for g = dy' B, dB, dx = dy' W and dm), so DoRA's backward needs no [tokens, out] more
    than LoRA's."""
    M, N = dy.shape
    scale = scale.to(dy.dtype)
    g = dy.new_empty(M, lora_B.shape[1])
    d_b = torch.zeros(lora_B.shape, dtype=torch.float32, device=dy.device)
    dx = dy.new_empty(M, x2d.shape[1]) if need_dx else None
    dmag = torch.zeros(N, dtype=torch.float32, device=dy.device)
    # 64K elements of dy' at a time, but never fewer than 128 rows: thinner GEMMs cost more time on
    # the CPU than the (N * 512 bytes in fp32) temporary saves.
    step = max(128, (1 << 16) // max(1, N))
    for i in range(0, M, step):
        j = min(M, i + step)
        dys = dy[i:j] * scale
        torch.mm(dys, lora_B, out=g[i:j])
        d_b.add_(torch.mm(dys.t(), u[i:j]))
        if dx is not None:
            torch.mm(dys, weight, out=dx[i:j])
        dmag.add_((ynb[i:j].float() * dy[i:j]).sum(0))
    dmag.mul_(_inverse_or_zero(magnitude))
    d_b = d_b.mul_(scaling).to(dy.dtype)
    dbias = dy.sum(0, dtype=torch.float32) if need_dbias else None
    if dropout_p == 0.0:
        d_a = torch.mm(g.t(), x2d).mul_(scaling)
        if dx is not None:
            dx.addmm_(g, lora_A, alpha=scaling)
    else:
        keep = _torch_keep_mask(seed, x2d.shape, x2d.device) >= dropout_p
        factor = scaling / (1.0 - dropout_p)
        d_a = torch.mm(g.t(), x2d * keep).mul_(factor)
        if dx is not None:
            dx.add_((g @ lora_A) * keep, alpha=factor)
    return dx, d_a, d_b, dmag, dbias


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, magnitude: torch.Tensor, weight_sq_norm: torch.Tensor | None,
                    scaling: float, dropout_p: float, seed: torch.Tensor,
                    face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r] = drop(x) A^T, scale [N] fp32 = m / ||W + s B A||_row,
    y - b [M, N] when there is a bias (else empty [0]), kept for dm)."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed)
    return _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed)


@dora_linear_fwd.register_fake
def _(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, face):
    ynb = x2d.new_empty(x2d.shape[0], weight.shape[0]) if bias is not None else x2d.new_empty(0)
    return (x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[0]),
            x2d.new_empty(weight.shape[0], dtype=torch.float32), ynb)


@torch.library.custom_op("peftkern::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, ynb: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor,
                    scale: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str,
                    need_dx: bool, need_dbias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dA [r, K], dB [N, r],
    dm [N] fp32 = rowsum_tokens(dy * ynb) / m, dbias [N] fp32 (empty when not needed)); ynb = y - b."""
    impl = _triton_backward if face == "triton" else _torch_backward_dora
    dx, d_a, d_b, dmag, dbias = impl(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p,
                                     seed, need_dx, need_dbias)
    if dx is None:
        dx = x2d.new_empty(0, x2d.shape[1])
    if dbias is None:
        dbias = dmag.new_empty(0)
    return dx, d_a, d_b, dmag, dbias


@dora_linear_bwd.register_fake
def _(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p, seed, face, need_dx, need_dbias):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    n = weight.shape[0]
    return (dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
            dy.new_empty(n, dtype=torch.float32), dy.new_empty(n if need_dbias else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, seed, face = inputs
    y, u, scale, ynb = output
    ctx.set_materialize_grads(False)  # u, scale and y - b are for the backward only: no zero-filled grads for them
    ctx.save_for_backward(x2d, ynb if bias is not None else y, weight, lora_A, lora_B, magnitude, u, scale, seed)
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _du, _dscale, _dynb):
    x2d, ynb, weight, lora_A, lora_B, magnitude, u, scale, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 11
    need_dx, need_w, need_bias, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dx, d_a, d_b, dmag, dbias = torch.ops.peftkern.dora_linear_bwd(
        dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude.detach(), ctx.scaling, ctx.dropout_p, seed, ctx.face,
        need_dx, bool(need_bias and ctx.has_bias))
    d_weight = (dy * scale.to(dy.dtype)).t() @ x2d if need_w else None
    return (dx if need_dx else None, d_weight, dbias.to(ctx.bias_dtype) if (need_bias and ctx.has_bias) else None,
            d_a if need_a else None, d_b if need_lb else None, dmag.to(magnitude.dtype) if need_m else None,
            None, None, None, None, None)


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("peftkern::dora_from_base_fwd", mutates_args=())
def dora_from_base_fwd(base2d: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                       dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """base2d [M, N] = x W^T (no bias) -> (y [M, N] = (m / norm) * (base + s u B^T) + b, u [M, r],
    y - b (empty [0] without a bias))."""
    u = _torch_dropped(x2d, dropout_p, seed) @ lora_A.t()
    scale = (magnitude.detach().float() / norm).to(x2d.dtype)
    y = torch.addmm(base2d, u, lora_B.t(), alpha=scaling).mul_(scale)
    if bias is None:
        return y, u, x2d.new_empty(0)
    return y + bias, u, y


@dora_from_base_fwd.register_fake
def _(base2d, x2d, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed):
    ynb = base2d.new_empty(base2d.shape) if bias is not None else base2d.new_empty(0)
    return base2d.new_empty(base2d.shape), x2d.new_empty(x2d.shape[0], lora_A.shape[0]), ynb


def _from_base_setup(ctx, inputs, output):
    base2d, x2d, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed = inputs
    y, u, ynb = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x2d, ynb if bias is not None else y, lora_A, lora_B, magnitude, u, norm, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _from_base_backward(ctx, dy, _du, _dynb):
    x2d, ynb, lora_A, lora_B, magnitude, u, norm, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 10
    need_base, need_x, need_bias, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    scale = magnitude.detach().float() / norm
    dys = dy * scale.to(dy.dtype)
    g = dys @ lora_B
    d_b = torch.mm(dys.t(), u).mul_(ctx.scaling) if need_lb else None
    keep = None
    if ctx.dropout_p > 0.0:
        keep = _torch_keep_mask(seed, x2d.shape, x2d.device) >= ctx.dropout_p
    factor = ctx.scaling / (1.0 - ctx.dropout_p)
    d_a = dx = None
    if need_a:
        d_a = torch.mm(g.t(), x2d if keep is None else x2d * keep).mul_(factor)
    if need_x:
        dx = g @ lora_A
        dx = dx.mul_(factor) if keep is None else dx.mul_(keep).mul_(factor)
    dm = _torch_dmag(dy, ynb, magnitude).to(magnitude.dtype) if need_m else None
    d_bias = dy.sum(0).to(ctx.bias_dtype) if (need_bias and ctx.bias_dtype is not None) else None
    return (dys if need_base else None, dx, d_bias, d_a, d_b, dm, None, None, None, None)


dora_from_base_fwd.register_autograd(_from_base_backward, setup_context=_from_base_setup)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def _check_adapter(op, x, lora_A, lora_B, magnitude, bias, scaling, dropout_p, out_features, in_features):
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in], got shape {tuple(x.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the weight "
                         f"expects in={in_features}")
    if lora_A.dim() != 2 or lora_A.shape[0] == 0:
        raise ValueError(f"{op}: lora_A must be [r, in] with rank r >= 1, got shape {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    _checks.check_shape(op, "lora_A", lora_A, (rank, in_features), "[r, in]")
    _checks.check_shape(op, "lora_B", lora_B, (out_features, rank), f"[out, r] with r={rank} from lora_A")
    _checks.check_shape(op, "magnitude", magnitude, (out_features,), "[out], one entry per output row")
    if bias is not None:
        _checks.check_shape(op, "bias", bias, (out_features,), "[out]")
    _checks.check_finite_scalar(op, "scaling", scaling)
    _checks.check_probability(op, "dropout_p", dropout_p)


def _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, weight_sq_norm):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude)):
        _checks.check_float(name, t)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
                       dtype=x.dtype)
    _checks.check_same(OP, {"x": x, "magnitude": magnitude, "weight_sq_norm": weight_sq_norm})
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be [out, in], got shape {tuple(weight.shape)}")
    _check_adapter(OP, x, lora_A, lora_B, magnitude, bias, scaling, dropout_p, *weight.shape)
    if weight_sq_norm is not None:
        _checks.check_float("weight_sq_norm", weight_sq_norm, (torch.float32,))
        _checks.check_shape(OP, "weight_sq_norm", weight_sq_norm, (weight.shape[0],), "[out] fp32, ||W||^2 per row")


def _seed(p: float, device) -> torch.Tensor:
    if p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,), device=device)
    return torch.zeros(1, dtype=torch.int64, device=device)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                training: bool = False, weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b, the norm detached.

    x [..., in] (any strides), weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r]:
    one float dtype (fp32, fp16, bf16) and device; magnitude [out] any float dtype. Dropout
    (inverted, on the LoRA branch only) applies when ``training`` and ``dropout_p > 0``.
    ``weight_sq_norm`` (fp32 [out], :func:`weight_row_sq_norm`) caches ||W||^2_row for a frozen W.
    Returns [..., out] in x's dtype. Gradients reach x, lora_A, lora_B, magnitude, and weight and
    bias when they require grad.
    """
    _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, weight_sq_norm)
    face = backend.pick(OP, FACES, x.device.type)
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.ops.peftkern.dora_linear_fwd(x2d, weight, bias, lora_A, lora_B, magnitude,
                                                 weight_sq_norm.detach() if weight_sq_norm is not None else None,
                                                 float(scaling), p, _seed(p, x.device), face)[0]
    return y.view(*lead, weight.shape[0])


def dora_from_base(base: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                   dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """DoRA over a base the caller computes (e.g. an NF4 matmul): base [..., out] = x W^T without
    bias, norm fp32 [out] = ||W + s B A||_row (:func:`dora_row_norm_from_rows`; treated as constant).

    Returns (m / norm) * (base + s (drop(x) A^T) B^T) + b; the gradient reaches ``base`` as
    dy * m / norm, and x (LoRA branch), lora_A, lora_B, magnitude, bias. torch ops on any device.
    """
    op = "dora_from_base"
    for name, t in (("base", base), ("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude),
                    ("norm", norm)):
        _checks.check_float(name, t)
    _checks.check_same(op, {"base": base, "x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}, dtype=x.dtype)
    _checks.check_same(op, {"x": x, "magnitude": magnitude, "norm": norm})
    out_features = lora_B.shape[0] if lora_B.dim() == 2 else -1
    _check_adapter(op, x, lora_A, lora_B, magnitude, bias, scaling, dropout_p, out_features, x.shape[-1])
    _checks.check_shape(op, "base", base, (*x.shape[:-1], out_features), "[..., out], x W^T")
    _checks.check_shape(op, "norm", norm, (out_features,), "[out]")
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    y = torch.ops.peftkern.dora_from_base_fwd(base.reshape(-1, out_features), x.reshape(-1, x.shape[-1]), bias,
                                                 lora_A, lora_B, magnitude, norm.detach().float(), float(scaling), p,
                                                 _seed(p, x.device))[0]
    return y.view(*lead, out_features)
