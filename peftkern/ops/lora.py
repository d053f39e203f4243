"""LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T, one registered op with two faces.

* torch: the CPU face. Fewer passes than PEFT's chain: the rank-r product is added into the base
  output in place (``addmm_``), never as a separate [tokens, out] tensor.
* triton: the base GEMM with the rank-r term added in its epilogue (forward), the dx GEMM with the
  (dy B) A term fused the same way (backward), dA and dB reduced in the kernels that already hold
  the tiles. Dropout masks are drawn in-kernel from a seed (Philox), never stored.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, then the registered ops and autograd.
"""
from __future__ import annotations

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton

OP = "lora_linear"
FACES = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mix32(h):
    """Murmur3's 32-bit finalizer: a cheap bijective avalanche on uint32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _keep_mask(seed, rows, cols, K, p):
    """Inverted-dropout keep mask for x[rows, cols] of an [M, K] input: a counter-based hash of
    (seed, row, col) mapped to [0, 1) and compared with p; the backward redraws exactly the
    forward's mask. A hash rather than Philox: one uint32 per element, so a 128x128 tile draws its
    mask without spilling. (K is unused by the hash; the NF4 and DoRA kernels pass it too.)"""
    row_hash = _mix32(rows.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32))
    h = _mix32(row_hash[:, None] ^ (cols.to(tl.uint32) * 0x7FEB352D)[None, :])
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


@triton.jit
def _lora_down_kernel(x_ptr, a_ptr, u_ptr, seed_ptr, M, K, R,
                      stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur, out_scale, p,
                      PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """u[M, R] = out_scale * drop(x)[M, K] @ A[R, K]^T (out_scale = s / (1 - p)), the mask drawn in
    registers; x is read once."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if p > 0.0:
            x = tl.where(_keep_mask(seed, rows, cols, K, p), x, 0.0).to(x.dtype)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
    acc = acc * out_scale
    tl.store(u_ptr + rows[:, None] * stride_um + ranks[None, :] * stride_ur, acc.to(u_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks[None, :] < R))


@triton.jit
def _grouped_tile(pid, rows_total, cols_total, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                  GROUP: tl.constexpr):
    """Program id -> (row tile, col tile), GROUP row tiles at a time so neighbours share L2."""
    tiles_r = tl.cdiv(rows_total, BLOCK_ROWS)
    tiles_c = tl.cdiv(cols_total, BLOCK_COLS)
    per_group = GROUP * tiles_c
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    return first + ((pid % per_group) % size), (pid % per_group) // size


@triton.jit
def _lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr, M, N, K, R,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
                     stride_ym, stride_yn, has_bias,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x W^T + b + u B^T with u already scaled by s: after the main loop the rank-r product
    is one more short K-step into the same accumulator, so it needs no registers of its own and
    y is written once."""
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
    if has_bias:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _lora_bwd_g_kernel(dy_ptr, b_ptr, u_ptr, g_ptr, db_ptr, M, N, R,
                       stride_dym, stride_dyn, stride_bn, stride_br, stride_um, stride_ur, stride_gm, stride_gr,
                       db_scale, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """g[M, R] = dy B, and dB[N, R] += db_scale * dy^T u for this row block (fp32 atomics), in one
    read of dy. (LoRA's Triton face folds the scaling into u and passes db_scale = 1.)"""
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
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        g = tl.dot(dy, b, g, input_precision=PRECISION)
        part = tl.dot(tl.trans(dy), u, input_precision=PRECISION) * db_scale
        tl.atomic_add(db_ptr + cols[:, None] * R + ranks[None, :], part, mask=col_ok[:, None] & rank_ok[None, :])
    tl.store(g_ptr + rows[:, None] * stride_gm + ranks[None, :] * stride_gr, g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_bwd_dx_kernel(dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, seed_ptr, dx_ptr, da_ptr, M, N, K, R,
                        stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
                        stride_xm, stride_xk, stride_dxm, stride_dxk, lora_scale, p, compute_dx,
                        PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """dx = dy W + lora_scale * keep * (g A), the rank-r term first in the GEMM's accumulator (masked
    there, before the base product joins it); then dA[R, K] += lora_scale * g^T (keep * x) for this
    row block (fp32 atomics) from x sub-tiles of BLOCK_DA columns, so the mask and the x tile never
    hold a whole BLOCK_M x BLOCK_K tile of registers beside anything else."""
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


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep mask as a uint8 tensor, for tests and for replaying a step with the reference."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(tl.load(seed_ptr), rows, cols, K, p)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.uint8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _block_r_choices(dtype: torch.dtype | None) -> tuple[int, int]:
    return (16, 32) if dtype == torch.float32 else (16, 64)


def _block_r(rank: int, dtype: torch.dtype | None = None) -> int:
    """Rank chunk: tl.dot needs >= 16; chunks of at most 64 (32 for fp32) keep the epilogue in
    registers. Two choices per dtype only, so few configs need compiling."""
    small, large = _block_r_choices(dtype)
    return small if rank <= small else large


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gemm_config(dtype: torch.dtype) -> dict:
    """Tiles of the forward GEMM: 128x128x64 for 16-bit inputs, 128x64x32 for fp32 (tf32 operands
    need twice the registers)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _dx_config(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


_DOWN_CONFIG = {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
_G_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_G_CONFIG_FP32 = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def _g_config(dtype: torch.dtype) -> dict:
    return _G_CONFIG_FP32 if dtype == torch.float32 else _G_CONFIG


def _split(config: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    return {k: v for k, v in config.items() if k not in meta}, meta


def _triton_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    M, K = shape
    out = torch.empty((M, K), dtype=torch.uint8, device=seed.device)
    if M and K:
        _keep_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](seed, out, M, K, dropout_p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def _triton_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    y = x2d.new_empty(M, N)
    u = x2d.new_empty(M, R)
    if M == 0:
        return y, u
    if K == 0:
        u.zero_()
        return (y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()), u
    precision = _precision(x2d.dtype)
    block_r = _block_r(R, x2d.dtype)
    down, down_meta = _split(_DOWN_CONFIG)
    _lora_down_kernel[(triton.cdiv(M, down["BLOCK_M"]), triton.cdiv(R, block_r))](
        x2d, lora_A, u, seed, M, K, R, x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1),
        u.stride(0), u.stride(1), scaling / (1.0 - dropout_p), dropout_p,
        PRECISION=precision, BLOCK_R=block_r, **down, **down_meta)
    cfg, meta = _split(_gemm_config(x2d.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        x2d, weight, bias if bias is not None else x2d, u, lora_B, y, M, N, K, R,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), u.stride(0), u.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), int(bias is not None),
        PRECISION=precision, BLOCK_R=block_r, **cfg, **meta)
    return y, u


def _triton_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    d_a = torch.zeros((R, K), dtype=torch.float32, device=x2d.device)
    d_b = torch.zeros((N, R), dtype=torch.float32, device=x2d.device)
    dx = x2d.new_empty(M, K) if need_dx else None
    if M == 0 or K == 0 or N == 0:
        if dx is not None:
            dx.zero_()
        return dx, d_a.to(x2d.dtype), d_b.to(x2d.dtype)
    precision = _precision(x2d.dtype)
    block_r = _block_r(R, x2d.dtype)
    g = x2d.new_empty(M, R)
    gcfg, gmeta = _split(_g_config(x2d.dtype))
    _lora_bwd_g_kernel[(triton.cdiv(M, gcfg["BLOCK_M"]), triton.cdiv(R, block_r))](
        dy, lora_B, u, g, d_b, M, N, R, dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
        u.stride(0), u.stride(1), g.stride(0), g.stride(1), 1.0,
        PRECISION=precision, BLOCK_R=block_r, **gcfg, **gmeta)
    cfg, meta = _split(_dx_config(x2d.dtype))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_K"]),)
    out = dx if dx is not None else x2d
    _lora_bwd_dx_kernel[grid](
        dy, weight, g, lora_A, x2d, seed, out, d_a, M, N, K, R,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        lora_A.stride(0), lora_A.stride(1), x2d.stride(0), x2d.stride(1), out.stride(0), out.stride(1),
        scaling / (1.0 - dropout_p), dropout_p, int(need_dx),
        PRECISION=precision, BLOCK_R=block_r, **cfg, **meta)
    return dx, d_a.to(x2d.dtype), d_b.to(x2d.dtype)


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch: per dtype and rank chunk (``peftkern kernels``).
    Dropout, bias and dx-or-not are runtime branches, not compile-time variants."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = _precision(dtype)
        for block_r in _block_r_choices(dtype):
            down, down_meta = _split(_DOWN_CONFIG)
            specs.append(KernelSpec(
                _lora_down_kernel, f"{t} r<={block_r} {down['BLOCK_M']}x{down['BLOCK_K']}",
                {"x_ptr": f"*{t}", "a_ptr": f"*{t}", "u_ptr": f"*{t}", "seed_ptr": "*i64", "M": "i32", "K": "i32",
                 "R": "i32", **_i32("stride_xm", "stride_xk", "stride_ar", "stride_ak", "stride_um", "stride_ur"),
                 "out_scale": "fp32", "p": "fp32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **down}, **down_meta,
                unit_args=("stride_xk", "stride_ak", "stride_ur"), plain_args=("R",)))
            cfg, meta = _split(_gemm_config(dtype))
            specs.append(KernelSpec(
                _lora_fwd_kernel, f"{t} r<={block_r} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}",
                {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "u_ptr": f"*{t}", "b_ptr": f"*{t}",
                 "y_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                 **_i32("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_um", "stride_ur", "stride_bn",
                        "stride_br", "stride_ym", "stride_yn"), "has_bias": "i32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta,
                unit_args=("stride_xk", "stride_wk", "stride_ur", "stride_br", "stride_yn"),
                plain_args=("R", "has_bias")))
            gcfg, gmeta = _split(_g_config(dtype))
            specs.append(KernelSpec(
                _lora_bwd_g_kernel, f"{t} r<={block_r} {gcfg['BLOCK_M']}x{gcfg['BLOCK_N']}",
                {"dy_ptr": f"*{t}", "b_ptr": f"*{t}", "u_ptr": f"*{t}", "g_ptr": f"*{t}", "db_ptr": "*fp32",
                 "M": "i32", "N": "i32", "R": "i32",
                 **_i32("stride_dym", "stride_dyn", "stride_bn", "stride_br", "stride_um", "stride_ur", "stride_gm",
                        "stride_gr"), "db_scale": "fp32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **gcfg}, **gmeta,
                unit_args=("stride_dyn", "stride_br", "stride_ur", "stride_gr"), plain_args=("R",)))
            cfg, meta = _split(_dx_config(dtype))
            specs.append(KernelSpec(
                _lora_bwd_dx_kernel, f"{t} r<={block_r} {cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{cfg['BLOCK_N']}",
                {"dy_ptr": f"*{t}", "w_ptr": f"*{t}", "g_ptr": f"*{t}", "a_ptr": f"*{t}", "x_ptr": f"*{t}",
                 "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                 "R": "i32", **_i32("stride_dym", "stride_dyn", "stride_wn", "stride_wk", "stride_gm", "stride_gr",
                                    "stride_ar", "stride_ak", "stride_xm", "stride_xk", "stride_dxm", "stride_dxk"),
                 "lora_scale": "fp32", "p": "fp32", "compute_dx": "i32"},
                {"PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta,
                unit_args=("stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_xk", "stride_dxk",
                           "compute_dx"), plain_args=("R",)))
    specs.append(KernelSpec(_keep_mask_kernel, "32x32", {"seed_ptr": "*i64", "out_ptr": "*u8", "M": "i32", "K": "i32",
                                                         "p": "fp32"}, {"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4,
                            plain_args=("M", "K")))
    return specs


def _i32(*names) -> dict:
    return {name: "i32" for name in names}


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def _torch_keep_mask(seed: torch.Tensor, shape, device) -> torch.Tensor:
    """Uniforms in [0, 1) drawn from torch's generator seeded with ``seed``; keep where >= p."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=generator, device=device)


def _torch_dropped(x2d, dropout_p, seed):
    if dropout_p == 0.0:
        return x2d
    keep = _torch_keep_mask(seed, x2d.shape, x2d.device) >= dropout_p
    return x2d * keep / (1.0 - dropout_p)


def _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    u = _torch_dropped(x2d, dropout_p, seed) @ lora_A.t()  # [M, r]
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    y.addmm_(u, lora_B.t(), alpha=scaling)
    return y, u


def _torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    g = dy @ lora_B  # [M, r]
    d_lora_B = torch.mm(dy.t(), u).mul_(scaling)
    dx = None
    if dropout_p == 0.0:
        d_lora_A = torch.mm(g.t(), x2d).mul_(scaling)
        if need_dx:
            dx = dy @ weight
            dx.addmm_(g, lora_A, alpha=scaling)
    else:
        keep = _torch_keep_mask(seed, x2d.shape, x2d.device) >= dropout_p
        factor = scaling / (1.0 - dropout_p)
        d_lora_A = torch.mm(g.t(), x2d * keep).mul_(factor)
        if need_dx:
            dx = dy @ weight
            dx.add_((g @ lora_A) * keep, alpha=factor)
    return dx, d_lora_A, d_lora_B


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, face: str) -> torch.Tensor:
    """The bool keep-mask that ``face`` applies to x (shape [M, K]) for ``seed``: for tests, and for
    reproducing a training step with the reference."""
    if face == "triton":
        return _triton_keep_mask(seed, shape, dropout_p)
    return _torch_keep_mask(seed, shape, seed.device) >= dropout_p


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r]): u, kept for the backward, is the face's own rank-r
    activation (drop(x) A^T on the torch face; scaling times it on the Triton face, where the
    scaling is folded in once so the GEMM epilogue needs no multiply)."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@lora_linear_fwd.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, face):
    return x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[0])


@torch.library.custom_op("peftkern::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, u: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dA [r, K], dB [N, r])."""
    if face == "triton":
        dx, d_a, d_b = _triton_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    else:
        dx, d_a, d_b = _torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if dx is None:
        dx = x2d.new_empty(0, x2d.shape[1])
    return dx, d_a, d_b


@lora_linear_bwd.register_fake
def _(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, face, need_dx):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, face = inputs
    _, u = output
    ctx.save_for_backward(x2d, weight, lora_A, lora_B, u, seed)
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _du):
    x2d, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    need_dx, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, d_a, d_b = torch.ops.peftkern.lora_linear_bwd(dy, x2d, weight, lora_A, lora_B, u, ctx.scaling,
                                                      ctx.dropout_p, seed, ctx.face, need_dx)
    d_weight = dy.t() @ x2d if need_w else None
    d_bias = dy.sum(0) if (need_b and ctx.has_bias) else None
    return (dx if need_dx else None, d_weight, d_bias, d_a if need_a else None, d_b if need_lb else None,
            None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

def _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _checks.check_float(name, t)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
                       dtype=x.dtype)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension [..., in], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{OP}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects in={in_features}")
    if lora_A.dim() != 2 or lora_A.shape[0] == 0:
        raise ValueError(f"{OP}: lora_A must be [r, in] with rank r >= 1, got shape {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    _checks.check_shape(OP, "lora_A", lora_A, (rank, in_features), "[r, in]")
    _checks.check_shape(OP, "lora_B", lora_B, (out_features, rank), f"[out, r] with r={rank} from lora_A")
    if bias is not None:
        _checks.check_shape(OP, "bias", bias, (out_features,), "[out]")
    _checks.check_finite_scalar(OP, "scaling", scaling)
    _checks.check_probability(OP, "dropout_p", dropout_p)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T + b + scaling * (drop(x) A^T) B^T.

    x [..., in] (any strides), weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r],
    all of one float dtype (fp32, fp16, bf16) and device. Dropout (inverted, on the LoRA branch
    only) applies when ``training`` and ``dropout_p > 0``. Returns [..., out] in x's dtype.
    Gradients flow to x, lora_A, lora_B, and to weight and bias when they require grad.
    """
    _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    face = backend.pick(OP, FACES, x.device.type)
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device)
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    y, _ = torch.ops.peftkern.lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, float(scaling), p, seed, face)
    return y.view(*lead, weight.shape[0])
