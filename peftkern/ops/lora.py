"""LoRA linear: y = x W^T + b + s * (drop(x) A^T) B^T, one registered op with two faces.

* torch: the CPU face. Fewer passes than PEFT's chain: the rank-r product is added into the base
  output in place (``addmm_``), never as a separate [tokens, out] tensor.
* triton: one launch per direction, built from ``peftkern.ops._lowrank``. Forward: per row tile a
  producer program computes u = drop(x) A^T, and the base GEMM tiles add s u B^T into their
  accumulator after the K loop (waiting for the producer, dispatched before them, only there).
  Backward: producers compute g = dy B and dB = s dy^T u; the dx GEMM tiles add s keep * (g A)
  after their N loop and reduce dA = s g^T (keep * x) from x sub-tiles; fp32 sums are cast to the
  output dtype by the last program adding into them. Dropout masks are a hash of (seed, row,
  column) drawn in registers, never stored, the same in both faces.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and
autograd, public entry point.
"""
from __future__ import annotations

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import _lowrank as lr
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import (device_guard, eager_function, matmul_precision, register_loop_vmap,
                                 register_once_differentiable)
from peftkern.reference.lora import dropout_keep_mask as _hash_keep_mask

OP = "lora_linear"
FACES = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _lora_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, u_ptr, y_ptr, flag_ptr, M, N, K, R,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                     stride_um, stride_ur, stride_ym, stride_yn, scaling, p, inv_keep,
                     HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """Producers: u[rows] = drop(x[rows]) A^T (1 / (1 - p) included, s not), then publish.
    GEMM tiles: y = x W^T, then + s u B^T once the row tile's u is published, + b (zeros when the
    layer has none); y written once."""
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
        lr.finish_y(acc, y_ptr, bias_ptr, rows, row_ok, cols, col_ok, stride_ym, stride_yn)


@triton.jit
def _lora_bwd_kernel(dy_ptr, w_ptr, x_ptr, a_ptr, b_ptr, u_ptr, g_ptr, seed_ptr, dx_ptr, da_ptr, db_ptr,
                     da_acc_ptr, db_acc_ptr, count_ptr, flag_ptr, M, N, K, R,
                     stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_ar, stride_ak,
                     stride_bn, stride_br, stride_um, stride_ur, stride_gm, stride_gr, stride_dxm, stride_dxk,
                     scaling, p, inv_keep,
                     HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """Producers (one per row tile): g[rows] = dy B and dB += s dy^T u, published; the last producer
    to add into an N chunk of dB casts it to dB's dtype. dx tiles: dx = dy W, then + s keep * (g A)
    once the row tile's g is published; then dA[:, ks] += s g^T (keep * x), cast by the last row
    tile adding into it. The fp32 sums, counters and flags start at zero (one buffer per launch)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_k = tl.cdiv(K, BLOCK_K)
    is_producer, tile_m, tile_k = lr.producer_tile(tl.program_id(0), tiles_m, tiles_k, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    seed = tl.load(seed_ptr)
    if is_producer:
        lr.produce_g(dy_ptr, u_ptr, b_ptr, g_ptr, db_acc_ptr, db_acc_ptr, db_ptr, flag_ptr + tile_m, count_ptr + tiles_k,
                     rows, row_ok, N, R, R, 1, tiles_m, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn,
                     stride_br, stride_gm, stride_gr, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        lr.dense_dx_tile(dy_ptr, w_ptr, dy_ptr, dx_ptr, x_ptr, g_ptr, a_ptr, da_acc_ptr, da_acc_ptr, da_ptr,
                         flag_ptr + tile_m, count_ptr + tile_k, tiles_m, rows, row_ok, tile_k, N, K, R, R, 1,
                         stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_gm, stride_gr,
                         stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, scaling * inv_keep, False, HAS_DROPOUT,
                         COMPUTE_DX, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DA, BLOCK_R)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kernels' keep mask as a uint8 tensor: tests hold it equal to the torch face's."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = lr.keep_mask(tl.load(seed_ptr), rows, cols, p)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.uint8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _triton_keep_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    M, K = shape
    out = torch.empty((M, K), dtype=torch.uint8, device=seed.device)
    if M and K:
        with device_guard(seed):
            _keep_mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](seed, out, M, K, dropout_p,
                                                                        BLOCK_M=32, BLOCK_K=32)
    return out.bool()


def _triton_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """-> (y [M, N], u [M, r] = drop(x) A^T, seed int64 [1])."""
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0 or not lr.scale_fits_kernels(scaling):
        return torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)
    cfg, meta = lr.split_config(lr.lora_fwd_config(x2d.dtype))
    tiles_m, tiles_n = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
    flags = lr.flag_buffer(tiles_m, dropout_p, x2d.device)
    y = x2d.new_empty(M, N)
    u = x2d.new_empty(M, R)
    with device_guard(x2d):
        _lora_fwd_kernel[(tiles_m * (1 + tiles_n),)](
            x2d, weight, lr.bias_or_zeros(bias, N, x2d.dtype, x2d.device), lora_A, lora_B, u, y, flags, M, N, K, R,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1), y.stride(0), y.stride(1),
            scaling, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=lr.rank_block(R, x2d.dtype), **cfg, **meta)
    return y, u, flags[:1]


def _triton_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0 or N == 0 or K == 0 or not lr.scale_fits_kernels(scaling / (1.0 - dropout_p)):
        return torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    block_r = lr.rank_block(R, x2d.dtype)
    cfg, meta = lr.split_config(lr.lora_bwd_config(x2d.dtype, block_r, dropout_p > 0.0, need_dx))
    tiles_m, tiles_k = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(K, cfg["BLOCK_K"])
    chunks_n = triton.cdiv(N, cfg["BLOCK_N"])
    # One zero-filled buffer: fp32 sums of dA [R, K] and dB [N, R], the counters of dA's column
    # tiles and dB's row chunks, and the producers' flags.
    work = torch.zeros(R * K + N * R + tiles_k + chunks_n + tiles_m, dtype=torch.int32, device=x2d.device)
    da_acc = work[:R * K].view(torch.float32)
    db_acc = work[R * K:R * K + N * R].view(torch.float32)
    counts = work[R * K + N * R:R * K + N * R + tiles_k + chunks_n]
    flags = work[R * K + N * R + tiles_k + chunks_n:]
    d_a = x2d.new_empty(R, K)
    d_b = x2d.new_empty(N, R)
    g = x2d.new_empty(M, R)
    dx = x2d.new_empty(M, K) if need_dx else None
    out = dx if dx is not None else x2d
    with device_guard(x2d):
        _lora_bwd_kernel[(tiles_m * (1 + tiles_k),)](
            dy, weight, x2d, lora_A, lora_B, u, g, seed, out, d_a, d_b, da_acc, db_acc, counts, flags, M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), x2d.stride(0), x2d.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), u.stride(0), u.stride(1),
            g.stride(0), g.stride(1), out.stride(0), out.stride(1), scaling, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DX=need_dx, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=block_r, **cfg, **meta)
    return dx, d_a, d_b


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, rank chunk and
    the constexpr features (dropout; dx or dA only)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        for block_r in lr.rank_blocks(dtype):
            cfg, meta = lr.split_config(lr.lora_fwd_config(dtype))
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
            for dropout in (False, True):
                specs.append(KernelSpec(
                    _lora_fwd_kernel, f"{t} r<={block_r} {tile} dropout={int(dropout)}",
                    {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                     "u_ptr": f"*{t}", "y_ptr": f"*{t}", "flag_ptr": "*i64",
                     **lr.i32("M", "N", "K", "R", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ar",
                              "stride_ak", "stride_bn", "stride_br", "stride_um", "stride_ur", "stride_ym", "stride_yn"),
                     "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"},
                    {"HAS_DROPOUT": dropout, "PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta,
                    unit_args=("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_ur", "stride_yn"),
                    plain_args=("R",)))
            for dropout in (False, True):
                for compute_dx in (True, False):
                    cfg, meta = lr.split_config(lr.lora_bwd_config(dtype, block_r, dropout, compute_dx))
                    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{cfg['BLOCK_N']}"
                    specs.append(KernelSpec(
                        _lora_bwd_kernel, f"{t} r<={block_r} {tile} dropout={int(dropout)} dx={int(compute_dx)}",
                        {"dy_ptr": f"*{t}", "w_ptr": f"*{t}", "x_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                         "u_ptr": f"*{t}", "g_ptr": f"*{t}", "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": f"*{t}",
                         "db_ptr": f"*{t}", "da_acc_ptr": "*fp32", "db_acc_ptr": "*fp32", "count_ptr": "*i32",
                         "flag_ptr": "*i32",
                         **lr.i32("M", "N", "K", "R", "stride_dym", "stride_dyn", "stride_wn", "stride_wk", "stride_xm",
                                  "stride_xk", "stride_ar", "stride_ak", "stride_bn", "stride_br", "stride_um",
                                  "stride_ur", "stride_gm", "stride_gr", "stride_dxm", "stride_dxk"),
                         "scaling": "fp32", "p": "fp32", "inv_keep": "fp32"},
                        {"HAS_DROPOUT": dropout, "COMPUTE_DX": compute_dx, "PRECISION": precision, "BLOCK_R": block_r,
                         **cfg}, **meta,
                        unit_args=("stride_dyn", "stride_wk", "stride_xk", "stride_ak", "stride_br", "stride_ur",
                                   "stride_gr", "stride_dxk"),
                        plain_args=("R",)))
    specs.append(KernelSpec(_keep_mask_kernel, "32x32", {"seed_ptr": "*i64", "out_ptr": "*u8", "M": "i32", "K": "i32",
                                                         "p": "fp32"}, {"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4,
                            plain_args=("M", "K")))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def dropped(x2d: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """drop(x) = x * keep / (1 - p) with the faces' shared keep mask (x itself when p = 0)."""
    if dropout_p == 0.0:
        return x2d
    keep = _hash_keep_mask(seed, x2d.shape, dropout_p)
    return x2d * keep / (1.0 - dropout_p)


def torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p):
    """The torch face: (y, u = drop(x) A^T, seed int64 [1]); the seed drawn here when p > 0."""
    seed = lr.draw_seed(x2d.device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x2d.device)
    u = dropped(x2d, dropout_p, seed) @ lora_A.t()  # [M, r]
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    y.addmm_(u, lora_B.t(), alpha=scaling)
    return y, u, seed


def torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """The torch face: (dx or None, dA, dB) with the forward's mask redrawn from ``seed``."""
    g = dy @ lora_B  # [M, r]
    d_lora_B = torch.mm(dy.t(), u).mul_(scaling)
    dx = None
    if dropout_p == 0.0:
        d_lora_A = torch.mm(g.t(), x2d).mul_(scaling)
        if need_dx:
            dx = dy @ weight
            dx.addmm_(g, lora_A, alpha=scaling)
    else:
        keep = _hash_keep_mask(seed, x2d.shape, dropout_p)
        factor = scaling / (1.0 - dropout_p)
        d_lora_A = torch.mm(g.t(), x2d * keep).mul_(factor)
        if need_dx:
            dx = dy @ weight
            dx.add_((g @ lora_A) * keep, alpha=factor)
    return dx, d_lora_A, d_lora_B


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, face: str = "torch") -> torch.Tensor:
    """The bool keep-mask (shape [M, K]) both faces apply to x for ``seed``: for tests, and for
    reproducing a training step with the reference. ``face="triton"`` draws it with the kernels'
    own hash (the same mask)."""
    if face == "triton":
        return _triton_keep_mask(seed, shape, dropout_p)
    return _hash_keep_mask(seed, shape, dropout_p)


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dropout_p: float,
                    face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], u [M, r] = drop(x) A^T (kept for the backward), seed int64 [1]: the
    dropout seed drawn for this call from torch's generator, 0 without dropout)."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)
    return torch_forward(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p)


@lora_linear_fwd.register_fake
def _(x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, face):
    return (x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[0]),
            x2d.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("peftkern::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, u: torch.Tensor, scaling: float, dropout_p: float,
                    seed: torch.Tensor, face: str, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dA [r, K], dB [N, r])."""
    if face == "triton":
        dx, d_a, d_b = _triton_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    else:
        dx, d_a, d_b = torch_backward(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if dx is None:
        dx = x2d.new_empty(0, x2d.shape[1])
    return dx, d_a, d_b


@lora_linear_bwd.register_fake
def _(dy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, face, need_dx):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, scaling, dropout_p, face = inputs
    _, u, seed = output
    ctx.set_materialize_grads(False)  # u and the seed are for the backward only
    saved = (x2d, weight, lora_A, lora_B, u, seed)
    ctx.save_for_backward(*saved)
    ctx.scaling, ctx.dropout_p, ctx.face = scaling, dropout_p, face
    ctx.has_bias = bias is not None
    return saved


def _backward(ctx, dy, _du=None, _dseed=None):
    x2d, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 8
    need_dx, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, d_a, d_b = torch.ops.peftkern.lora_linear_bwd(dy, x2d, weight, lora_A, lora_B, u, ctx.scaling,
                                                      ctx.dropout_p, seed, ctx.face, need_dx)
    d_weight = dy.t() @ x2d if need_w else None
    d_bias = dy.sum(0) if (need_b and ctx.has_bias) else None
    return (dx if need_dx else None, d_weight, d_bias, d_a if need_a else None, d_b if need_lb else None,
            None, None, None)


def _jvp(ctx, dx, d_weight, d_bias, d_a, d_b, *_):
    """Forward-mode rule: the op is linear in each of x, W, b, A, B, so the tangent of y is the sum
    of the op's terms with one argument replaced by its tangent (the same dropout mask)."""
    x2d, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    s, p = ctx.scaling, ctx.dropout_p
    terms = []
    if dx is not None:
        terms += [dx @ weight.t(), s * (dropped(dx, p, seed) @ lora_A.t()) @ lora_B.t()]
    if d_weight is not None:
        terms.append(x2d @ d_weight.t())
    if d_bias is not None:
        terms.append(d_bias.expand(x2d.shape[0], weight.shape[0]))
    if d_a is not None:
        terms.append(s * (dropped(x2d, p, seed) @ d_a.t()) @ lora_B.t())
    if d_b is not None:
        terms.append(s * u @ d_b.t())
    return sum(terms[1:], terms[0]) if terms else None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)
register_loop_vmap(lora_linear_fwd, (0, 0, 0))
register_loop_vmap(lora_linear_bwd, (0, 0, 0))
register_once_differentiable(lora_linear_bwd, "lora_linear")


_LoRALinear = eager_function(torch.ops.peftkern.lora_linear_fwd, _setup_context, _backward, _jvp, "_LoRALinear")


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
    out_features, in_features = _checks.check_linear(OP, x, weight)
    if lora_A.dim() != 2 or lora_A.shape[0] == 0:
        raise ValueError(f"{OP}: lora_A must be [r, in] with rank r >= 1, got shape {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    _checks.check_shape(OP, "lora_A", lora_A, (rank, in_features), "[r, in]")
    _checks.check_shape(OP, "lora_B", lora_B, (out_features, rank), f"[out, r] with r={rank} from lora_A")
    if bias is not None:
        _checks.check_shape(OP, "bias", bias, (out_features,), "[out]")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """y = x W^T + b + scaling * (drop(x) A^T) B^T.

    x [..., in] (any strides), weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r],
    all of one float dtype (fp32, fp16, bf16) and device. Dropout (inverted, on the LoRA branch
    only) applies when ``training`` and ``dropout_p > 0``. Returns [..., out] in x's dtype (the
    autocast dtype under ``torch.autocast``, which casts every input as ``F.linear`` does).
    Gradients flow to x, lora_A, lora_B, and to weight and bias when they require grad;
    forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func.grad`` /
    ``jacrev`` / ``jacfwd`` work in eager mode.
    """
    scaling = _checks.check_finite_scalar(OP, "scaling", scaling)
    dropout_p = _checks.check_probability(OP, "dropout_p", dropout_p)
    x, weight, bias, lora_A, lora_B = _checks.autocast_inputs(x, weight, bias, lora_A, lora_B)
    _check(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    face = backend.pick(OP, FACES, x.device.type)
    p = dropout_p if training else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = torch.ops.peftkern.lora_linear_fwd(x2d, weight, bias, lora_A, lora_B, scaling, p, face)[0]
    else:
        y = _LoRALinear.apply(x2d, weight, bias, lora_A, lora_B, scaling, p, face)[0]
    return y.view(*lead, weight.shape[0])
