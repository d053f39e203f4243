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
* triton: two launches forward, one backward, built from ``peftkern.ops._lowrank``. A norm kernel
  reads W once, forms W + s B A tile by tile in registers (never in memory) and writes
  scale = m / ||W + s B A||_row (``weight_sq_norm`` is the torch face's cache; not needed here);
  then LoRA's forward launch (producers of u, GEMM tiles adding s u B^T after
  their K loop) applies the scale and the bias in its epilogue. The backward is LoRA's launch with
  dy scaled per column as its tiles load; the producers also reduce dm and db.

A base that is not a dense tensor (NF4) goes through :func:`dora_from_base`: the caller supplies
x W^T (with its own autograd) and the row norm (see :func:`dora_row_norm_from_rows`).

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and
autograd, public entry points.
"""
from __future__ import annotations

from typing import Callable

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import _lowrank as lr
from peftkern.ops import lora as lora_op
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import (device_guard, eager_function, matmul_precision, register_loop_vmap,
                                 register_once_differentiable)
from peftkern.reference.lora import dropout_keep_mask as _hash_keep_mask

OP = "dora_linear"
FACES = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dora_norm_kernel(w_ptr, a_ptr, b_ptr, mag_ptr, scale_ptr, N, K, R,
                      stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, scaling,
                      NORM_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """scale[cols] = m / ||W + s B A||_row (fp32) for BLOCK_N rows of W: each [BLOCK_N, BLOCK_K]
    tile of W + s B A is formed in registers (B[cols] A[:, ks] is a short dot) and squared into the
    row sums, so W is read once and W + s B A is never written (nor does its norm cancel, as the
    factored form of the torch face can)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_bn
    norm2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        v = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            b = tl.load(b_rows + ranks[None, :] * stride_br, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * stride_ar + ks[None, :] * stride_ak,
                        mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
            ba = tl.dot(b, a, ba, input_precision=NORM_PRECISION)
        v += scaling * ba
        norm2 += tl.sum(v * v, axis=1)
    norm = tl.where(col_ok, tl.sqrt(norm2), 1.0)
    mag = tl.load(mag_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + cols, mag / norm, mask=col_ok)


@triton.jit
def _dora_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, u_ptr, y_ptr, ynb_ptr, flag_ptr, M, N, K, R,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                     stride_um, stride_ur, stride_ym, stride_yn, scaling, p, inv_keep,
                     HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """LoRA's forward launch (producers of u = drop(x) A^T; GEMM tiles + u (s B)^T after the K loop)
    with DoRA's epilogue: y = scale * acc + b, and y - b stored to ``ynb`` when there is a bias."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    is_producer, tile_m, tile_n = lr.producer_tile(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ticket = tl.load(flag_ptr)
    if is_producer:
        lr.produce_u(x_ptr, a_ptr, u_ptr, flag_ptr + 1 + tile_m, rows, row_ok, K, R, R, stride_xm, stride_xk,
                     stride_ar, stride_ak, stride_um, stride_ur, ticket, p, inv_keep, HAS_DROPOUT, PRECISION, BLOCK_M,
                     BLOCK_K, BLOCK_R)
    else:
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = lr.xwt_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, K, stride_xm, stride_xk, stride_wn, stride_wk,
                          PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = lr.published_rank_term(acc, flag_ptr + 1 + tile_m, ticket, u_ptr, b_ptr, rows, row_ok, cols, col_ok, R,
                                     stride_um, stride_ur, stride_bn, stride_br, scaling, PRECISION, BLOCK_R)
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        out = rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if HAS_BIAS:
            tl.store(ynb_ptr + out, acc.to(ynb_ptr.dtype.element_ty), mask=tile_ok)
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dora_bwd_kernel(dy_ptr, scale_ptr, ynb_ptr, mag_ptr, w_ptr, x_ptr, a_ptr, b_ptr, u_ptr, g_ptr, seed_ptr,
                     dx_ptr, da_ptr, db_ptr, dmag_ptr, dbias_ptr, da_acc_ptr, db_acc_ptr, dmag_acc_ptr,
                     dbias_acc_ptr, count_ptr, flag_ptr, M, N, K, R,
                     stride_dym, stride_dyn, stride_ym, stride_yn, stride_wn, stride_wk, stride_xm, stride_xk,
                     stride_ar, stride_ak, stride_bn, stride_br, stride_um, stride_ur, stride_gm, stride_gr,
                     stride_dxm, stride_dxk, scaling, p, inv_keep,
                     HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """LoRA's backward launch on dy' = dy * scale (per column, scaled as its tiles load). The
    producers also reduce dm[N] += rowsum_tokens(dy * ynb) (ynb = y - b; times 1/m, 0 where m = 0,
    when cast) and db[N] += rowsum_tokens(dy) (always: one atomic per column and row tile, cheaper
    than a variant without it); the last producer adding into an N chunk casts dB, dm and db there
    to their dtypes."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    is_producer, tile_m, tile_k = lr.producer_tile(tl.program_id(0), tiles_m, tiles_k, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    seed = tl.load(seed_ptr)
    if is_producer:
        lr.g_and_db(dy_ptr, u_ptr, b_ptr, g_ptr, db_acc_ptr, scale_ptr, ynb_ptr, dmag_acc_ptr, dbias_acc_ptr, rows,
                    row_ok, N, R, R, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br, stride_gm,
                    stride_gr, stride_ym, stride_yn, scaling, True, True, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
        lr.publish(flag_ptr + tile_m, 0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            if lr.cast_db_chunk(count_ptr + tiles_k + n0 // BLOCK_N, tiles_m, db_acc_ptr, db_ptr, cols, col_ok, R, 1, 0,
                                BLOCK_R):
                mag = tl.load(mag_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
                inv_m = tl.where(mag != 0.0, 1.0 / tl.where(mag != 0.0, mag, 1.0), 0.0)
                dmag = tl.load(dmag_acc_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
                tl.store(dmag_ptr + cols, (dmag * inv_m).to(dmag_ptr.dtype.element_ty), mask=col_ok)
                lr.cast_tile(dbias_acc_ptr, dbias_ptr, cols, col_ok)
    else:
        lr.dense_dx_tile(dy_ptr, w_ptr, scale_ptr, dx_ptr, x_ptr, g_ptr, a_ptr, da_acc_ptr, da_acc_ptr, da_ptr,
                         flag_ptr + tile_m, count_ptr + tile_k, tiles_m, rows, row_ok, tile_k, N, K, R, R, 1,
                         stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_gm, stride_gr,
                         stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, scaling * inv_keep, True, HAS_DROPOUT,
                         COMPUTE_DX, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DA, BLOCK_R)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _norm_precision(dtype: torch.dtype) -> str:
    """The norm is a difference of large terms when s B A nearly cancels W: fp32 inputs stay IEEE."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _bwd_config(dtype: torch.dtype, block_r: int, dropout: bool, compute_dx: bool) -> dict:
    """LoRA's backward tiles (``_lowrank.lora_bwd_config``) with N steps of 32 (the producers also
    hold the dm / db column sums); fp32 in 32-row tiles."""
    cfg = {**lr.lora_bwd_config(dtype, block_r, dropout, compute_dx), "BLOCK_N": 32}
    if dtype == torch.float32:
        cfg["BLOCK_M"] = 32
    return cfg


def _norm_config(dtype: torch.dtype) -> dict:
    """Norm tiles: 64 rows of W by 64 columns; fp32 over 8 warps (its FMA dots hold more registers)."""
    return {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8 if dtype == torch.float32 else 4, "num_stages": 3}


def _triton_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0 or not lr.scale_fits_kernels(scaling):
        return _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p)
    dev = x2d.device
    y = x2d.new_empty(M, N)
    ynb = x2d.new_empty(M, N) if bias is not None else x2d.new_empty(0)
    u = x2d.new_empty(M, R)
    scale = torch.empty(N, dtype=torch.float32, device=dev)
    block_r = lr.rank_block(R, x2d.dtype)
    ncfg, nmeta = lr.split_config(_norm_config(x2d.dtype))
    cfg, meta = lr.split_config(lr.lora_fwd_config(x2d.dtype))
    tiles_m, tiles_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    flags = lr.flag_buffer(tiles_m, dropout_p, dev)
    with device_guard(x2d):
        _dora_norm_kernel[(triton.cdiv(N, ncfg["BLOCK_N"]),)](
            weight, lora_A, lora_B, magnitude, scale, N, K, R, weight.stride(0), weight.stride(1), lora_A.stride(0),
            lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), scaling,
            NORM_PRECISION=_norm_precision(x2d.dtype), BLOCK_R=block_r, **ncfg, **nmeta)
        _dora_fwd_kernel[(tiles_m * (1 + tiles_n),)](
            x2d, weight, bias if bias is not None else x2d, lora_A, lora_B, scale, u, y,
            ynb if bias is not None else y, flags, M, N, K, R, x2d.stride(0), x2d.stride(1), weight.stride(0),
            weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0),
            u.stride(1), y.stride(0), y.stride(1), scaling, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=block_r, **cfg, **meta)
    return y, u, scale, ynb, flags[:1]


def _triton_backward(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p, seed, need_dx,
                     need_dbias):
    """ynb = y - b -> (dx or None, dA, dB, dm [N] in m's dtype, db [N] in dy's dtype or None)."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0 or not lr.scale_fits_kernels(scaling / (1.0 - dropout_p)):
        return _torch_backward_dora(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p,
                                    seed, need_dx, need_dbias)
    block_r = lr.rank_block(R, x2d.dtype)
    cfg, meta = lr.split_config(_bwd_config(x2d.dtype, block_r, dropout_p > 0.0, need_dx))
    tiles_m, tiles_k = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"])
    chunks_n = triton.cdiv(N, cfg["BLOCK_N"])
    # One zero-filled buffer: fp32 sums of dA [R, K], dB [N, R], dm [N], db [N]; the counters of dA's
    # column tiles and of the N chunks; the producers' flags.
    sizes = (R * K, N * R, N, N, tiles_k + chunks_n, tiles_m)
    work = torch.zeros(sum(sizes), dtype=torch.int32, device=x2d.device)
    da_acc, db_acc, dmag_acc, dbias_acc, counts, flags = torch.split(work, sizes)
    d_a, d_b, g = x2d.new_empty(R, K), x2d.new_empty(N, R), x2d.new_empty(M, R)
    dmag = torch.empty(N, dtype=magnitude.dtype, device=x2d.device)
    dbias = x2d.new_empty(N)
    dx = x2d.new_empty(M, K) if need_dx else None
    out = dx if dx is not None else x2d
    f32 = torch.float32
    with device_guard(x2d):
        _dora_bwd_kernel[(tiles_m * (1 + tiles_k),)](
            dy, scale, ynb, magnitude, weight, x2d, lora_A, lora_B, u, g, seed, out, d_a, d_b, dmag, dbias,
            da_acc.view(f32), db_acc.view(f32), dmag_acc.view(f32),
            dbias_acc.view(f32), counts, flags, M, N, K, R,
            dy.stride(0), dy.stride(1), ynb.stride(0), ynb.stride(1), weight.stride(0), weight.stride(1),
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            u.stride(0), u.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1), scaling, dropout_p,
            1.0 / (1.0 - dropout_p), HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DX=need_dx,
            PRECISION=matmul_precision(x2d.dtype), BLOCK_R=block_r, **cfg, **meta)
    return dx, d_a, d_b, dmag, (dbias if need_dbias else None)


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, rank chunk and
    the constexpr features (cached ||W||^2; bias (DoRA also stores y - b), dropout; dx or dA only)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        for block_r in lr.rank_blocks(dtype):
            ncfg, nmeta = lr.split_config(_norm_config(dtype))
            specs.append(KernelSpec(
                _dora_norm_kernel, f"{t} r<={block_r} {ncfg['BLOCK_N']}x{ncfg['BLOCK_K']}",
                {"w_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}", "mag_ptr": f"*{t}", "scale_ptr": "*fp32",
                 **lr.i32("N", "K", "R", "stride_wn", "stride_wk", "stride_ar", "stride_ak", "stride_bn", "stride_br"),
                 "scaling": "fp32"},
                {"NORM_PRECISION": _norm_precision(dtype), "BLOCK_R": block_r, **ncfg}, **nmeta,
                unit_args=("stride_wk", "stride_ak", "stride_br"), plain_args=("R",)))
            cfg, meta = lr.split_config(lr.lora_fwd_config(dtype))
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
            for has_bias in (False, True):
                for dropout in (False, True):
                    specs.append(KernelSpec(
                        _dora_fwd_kernel, f"{t} r<={block_r} {tile} bias={int(has_bias)} dropout={int(dropout)}",
                        {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                         "scale_ptr": "*fp32", "u_ptr": f"*{t}", "y_ptr": f"*{t}", "ynb_ptr": f"*{t}",
                         "flag_ptr": "*i64",
                         **lr.i32("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ar",
                                  "stride_ak", "stride_bn", "stride_br", "stride_um", "stride_ur", "stride_ym",
                                  "stride_yn"),
                         "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"},
                        {"HAS_BIAS": has_bias, "HAS_DROPOUT": dropout, "PRECISION": precision, "BLOCK_R": block_r,
                         **cfg}, **meta,
                        unit_args=("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_ur", "stride_yn"),
                        plain_args=("R",)))
            for dropout in (False, True):
                for compute_dx in (True, False):
                    cfg, meta = lr.split_config(_bwd_config(dtype, block_r, dropout, compute_dx))
                    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{cfg['BLOCK_N']}"
                    specs.append(KernelSpec(
                        _dora_bwd_kernel, f"{t} r<={block_r} {tile} dropout={int(dropout)} dx={int(compute_dx)}",
                        {"dy_ptr": f"*{t}", "scale_ptr": "*fp32", "ynb_ptr": f"*{t}", "mag_ptr": f"*{t}",
                         "w_ptr": f"*{t}", "x_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": f"*{t}",
                         "g_ptr": f"*{t}", "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": f"*{t}", "db_ptr": f"*{t}",
                         "dmag_ptr": f"*{t}", "dbias_ptr": f"*{t}", "da_acc_ptr": "*fp32", "db_acc_ptr": "*fp32",
                         "dmag_acc_ptr": "*fp32", "dbias_acc_ptr": "*fp32", "count_ptr": "*i32", "flag_ptr": "*i32",
                         **lr.i32("M", "N", "K", "R", "stride_dym", "stride_dyn", "stride_ym", "stride_yn", "stride_wn",
                                  "stride_wk", "stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_bn",
                                  "stride_br", "stride_um", "stride_ur", "stride_gm", "stride_gr", "stride_dxm",
                                  "stride_dxk"),
                         "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"},
                        {"HAS_DROPOUT": dropout, "COMPUTE_DX": compute_dx, "PRECISION": precision, "BLOCK_R": block_r,
                         **cfg}, **meta,
                        unit_args=("stride_dyn", "stride_yn", "stride_wk", "stride_xk", "stride_ak", "stride_br",
                                   "stride_ur", "stride_gr", "stride_dxk"),
                        plain_args=("R",)))
    return specs


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


def _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p):
    seed = lr.draw_seed(x2d.device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x2d.device)
    scale = magnitude.detach().float() / dora_row_norm(weight, lora_A, lora_B, scaling, weight_sq_norm)
    u = lora_op.dropped(x2d, dropout_p, seed) @ lora_A.t()  # [M, r]
    y = x2d @ weight.t()
    y.addmm_(u, lora_B.t(), alpha=scaling).mul_(scale.to(x2d.dtype))
    if bias is None:
        return y, u, scale, x2d.new_empty(0), seed
    return y + bias, u, scale, y, seed


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
    dmag = dmag.mul_(_inverse_or_zero(magnitude)).to(magnitude.dtype)
    d_b = d_b.mul_(scaling).to(dy.dtype)
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_dbias else None
    if dropout_p == 0.0:
        d_a = torch.mm(g.t(), x2d).mul_(scaling)
        if dx is not None:
            dx.addmm_(g, lora_A, alpha=scaling)
    else:
        keep = _hash_keep_mask(seed, x2d.shape, dropout_p)
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
                    scaling: float, dropout_p: float,
                    face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r] = drop(x) A^T, scale [N] fp32 = m / ||W + s B A||_row,
    y - b [M, N] when there is a bias (else empty [0]), kept for dm; the dropout seed int64 [1])."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p)
    return _torch_forward(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p)


@dora_linear_fwd.register_fake
def _(x2d, weight, bias, lora_A, lora_B, magnitude, weight_sq_norm, scaling, dropout_p, face):
    ynb = x2d.new_empty(x2d.shape[0], weight.shape[0]) if bias is not None else x2d.new_empty(0)
    return (x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[0]),
            x2d.new_empty(weight.shape[0], dtype=torch.float32), ynb, x2d.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("peftkern::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, ynb: torch.Tensor, weight: torch.Tensor,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor,
                    scale: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str,
                    need_dx: bool, need_dbias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dA [r, K], dB [N, r],
    dm [N] = rowsum_tokens(dy * ynb) / m in m's dtype, dbias [N] in dy's dtype (empty when not
    needed)); ynb = y - b."""
    impl = _triton_backward if face == "triton" else _torch_backward_dora
    dx, d_a, d_b, dmag, dbias = impl(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p,
                                     seed, need_dx, need_dbias)
    if dx is None:
        dx = x2d.new_empty(0, x2d.shape[1])
    if dbias is None:
        dbias = dy.new_empty(0)
    return dx, d_a, d_b, dmag, dbias


@dora_linear_bwd.register_fake
def _(dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude, scaling, dropout_p, seed, face, need_dx, need_dbias):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    n = weight.shape[0]
    return (dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(n),
            dy.new_empty(n if need_dbias else 0))


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, magnitude, _weight_sq_norm, scaling, dropout_p, face = inputs
    y, u, scale, ynb, seed = output
    ctx.set_materialize_grads(False)  # u, scale, y - b and the seed are for the backward only
    saved = (x2d, ynb if bias is not None else y, weight, lora_A, lora_B, magnitude, u, scale, seed)
    ctx.save_for_backward(*saved)
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None
    return saved


def _backward(ctx, dy, *_):
    x2d, ynb, weight, lora_A, lora_B, magnitude, u, scale, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 10
    need_dx, need_w, need_bias, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
    dy = dy.contiguous()
    dx, d_a, d_b, dmag, dbias = torch.ops.peftkern.dora_linear_bwd(
        dy, x2d, ynb, weight, lora_A, lora_B, u, scale, magnitude.detach(), ctx.scaling, ctx.dropout_p, seed, ctx.face,
        need_dx, bool(need_bias and ctx.has_bias))
    d_weight = (dy * scale.to(dy.dtype)).t() @ x2d if need_w else None
    return (dx if need_dx else None, d_weight, dbias if (need_bias and ctx.has_bias) else None,
            d_a if need_a else None, d_b if need_lb else None, dmag if need_m else None, None, None, None, None)


def _jvp(ctx, dx, d_weight, d_bias, d_a, d_b, d_m, *_):
    """Forward-mode rule with the norm held constant (as in the backward): y = c * pre + b with
    c = m / norm, so dy = (dm / norm) * pre + c * dpre + db, pre and dpre linear in x, W, A, B."""
    x2d, _, weight, lora_A, lora_B, magnitude, u, scale, seed = ctx.saved_tensors
    s, p = ctx.scaling, ctx.dropout_p
    dtype = x2d.dtype
    terms = []
    if dx is not None:
        terms += [dx @ weight.t(), s * (lora_op.dropped(dx, p, seed) @ lora_A.t()) @ lora_B.t()]
    if d_weight is not None:
        terms.append(x2d @ d_weight.t())
    if d_a is not None:
        terms.append(s * (lora_op.dropped(x2d, p, seed) @ d_a.t()) @ lora_B.t())
    if d_b is not None:
        terms.append(s * u @ d_b.t())
    out = [sum(terms[1:], terms[0]) * scale.to(dtype)] if terms else []
    if d_m is not None:
        pre = torch.addmm(x2d @ weight.t(), u, lora_B.t(), alpha=s)
        norm = magnitude.detach().float() / scale
        out.append(pre * (d_m.float() / norm).to(dtype))
    if d_bias is not None:
        out.append(d_bias.expand(x2d.shape[0], weight.shape[0]))
    return (sum(out[1:], out[0]) if out else None), None, None, None, None


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_loop_vmap(dora_linear_fwd, (0, 0, 0, 0, 0))
register_loop_vmap(dora_linear_bwd, (0, 0, 0, 0, 0))
register_once_differentiable(dora_linear_bwd, "dora_linear")


_DoRALinear = eager_function(torch.ops.peftkern.dora_linear_fwd, _setup_context, _backward, _jvp, "_DoRALinear")


@torch.library.custom_op("peftkern::dora_from_base_fwd", mutates_args=())
def dora_from_base_fwd(base2d: torch.Tensor, x2d: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                       dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """base2d [M, N] = x W^T (no bias) -> (y [M, N] = (m / norm) * (base + s u B^T) + b, u [M, r],
    y - b (empty [0] without a bias)). Torch ops on any device; the dropout mask is drawn from
    ``seed`` on the device, with no host sync."""
    u = lora_op.dropped(x2d, dropout_p, seed) @ lora_A.t()
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
    _base2d, x2d, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p, seed = inputs
    y, u, ynb = output
    ctx.set_materialize_grads(False)
    saved = (x2d, ynb if bias is not None else y, lora_A, lora_B, magnitude, u, norm, seed)
    ctx.save_for_backward(*saved)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.bias_dtype = bias.dtype if bias is not None else None
    return saved


def _from_base_backward(ctx, dy, *_):
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
        keep = _hash_keep_mask(seed, x2d.shape, ctx.dropout_p)
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


def _from_base_jvp(ctx, d_base, dx, d_bias, d_a, d_b, d_m, *_):
    """Forward-mode rule, the norm constant: dy = c * (dbase + s dU B^T + s u dB^T) + (dm / norm) *
    pre + db, with pre = (y - b) / c (0 where m = 0, as for dm in the backward)."""
    x2d, ynb, lora_A, lora_B, magnitude, u, norm, seed = ctx.saved_tensors
    s, p = ctx.scaling, ctx.dropout_p
    dtype = x2d.dtype
    scale = magnitude.detach().float() / norm
    terms = []
    if d_base is not None:
        terms.append(d_base)
    if dx is not None:
        terms.append(s * (lora_op.dropped(dx, p, seed) @ lora_A.t()) @ lora_B.t())
    if d_a is not None:
        terms.append(s * (lora_op.dropped(x2d, p, seed) @ d_a.t()) @ lora_B.t())
    if d_b is not None:
        terms.append(s * u @ d_b.t())
    out = [sum(terms[1:], terms[0]) * scale.to(dtype)] if terms else []
    if d_m is not None:
        out.append(ynb * (d_m.float() * _inverse_or_zero(magnitude)).to(dtype))
    if d_bias is not None:
        out.append(d_bias.expand(x2d.shape[0], lora_B.shape[0]))
    return (sum(out[1:], out[0]) if out else None), None, None


dora_from_base_fwd.register_autograd(_from_base_backward, setup_context=_from_base_setup)
register_loop_vmap(dora_from_base_fwd, (0, 0, 0))


_DoRAFromBase = eager_function(torch.ops.peftkern.dora_from_base_fwd, _from_base_setup, _from_base_backward,
                               _from_base_jvp, "_DoRAFromBase")


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


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                training: bool = False, weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b, the norm detached.

    x [..., in] (any strides), weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r]:
    one float dtype (fp32, fp16, bf16) and device; magnitude [out] any float dtype. Dropout
    (inverted, on the LoRA branch only) applies when ``training`` and ``dropout_p > 0``.
    ``weight_sq_norm`` (fp32 [out], :func:`weight_row_sq_norm`) caches ||W||^2_row for a frozen W.
    Returns [..., out] in x's dtype (the autocast dtype under ``torch.autocast``, which casts x,
    weight, bias and the adapter as ``F.linear`` casts; the magnitude keeps its dtype). Gradients
    reach x, lora_A, lora_B, magnitude, and weight and bias when they require grad, in reverse and
    (eager) forward mode.
    """
    scaling = _checks.check_finite_scalar(OP, "scaling", scaling)
    dropout_p = _checks.check_probability(OP, "dropout_p", dropout_p)
    x, weight, bias, lora_A, lora_B = _checks.autocast_inputs(x, weight, bias, lora_A, lora_B)
    _check(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, weight_sq_norm)
    face = backend.pick(OP, FACES, x.device.type)
    p = dropout_p if training else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    inputs = (x2d, weight, bias, lora_A, lora_B, magnitude,
              weight_sq_norm.detach() if weight_sq_norm is not None else None, scaling, p, face)
    if torch.compiler.is_compiling():
        y = torch.ops.peftkern.dora_linear_fwd(*inputs)[0]
    else:
        y = _DoRALinear.apply(*inputs)[0]
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
    scaling = _checks.check_finite_scalar(op, "scaling", scaling)
    dropout_p = _checks.check_probability(op, "dropout_p", dropout_p)
    base, x, bias, lora_A, lora_B = _checks.autocast_inputs(base, x, bias, lora_A, lora_B)
    for name, t in (("base", base), ("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("magnitude", magnitude),
                    ("norm", norm)):
        _checks.check_float(name, t)
    _checks.check_same(op, {"base": base, "x": x, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}, dtype=x.dtype)
    _checks.check_same(op, {"x": x, "magnitude": magnitude, "norm": norm})
    out_features = lora_B.shape[0] if lora_B.dim() == 2 else -1
    _check_adapter(op, x, lora_A, lora_B, magnitude, bias, scaling, dropout_p, out_features, x.shape[-1])
    _checks.check_shape(op, "base", base, (*x.shape[:-1], out_features), "[..., out], x W^T")
    _checks.check_shape(op, "norm", norm, (out_features,), "[out]")
    p = dropout_p if training else 0.0
    seed = lr.draw_seed(x.device) if p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x.device)
    lead = x.shape[:-1]
    inputs = (base.reshape(-1, out_features), x.reshape(-1, x.shape[-1]), bias, lora_A, lora_B, magnitude,
              norm.detach().float(), scaling, p, seed)
    if torch.compiler.is_compiling():
        y = torch.ops.peftkern.dora_from_base_fwd(*inputs)[0]
    else:
        y = _DoRAFromBase.apply(*inputs)[0]
    return y.view(*lead, out_features)
