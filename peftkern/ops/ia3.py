"""(IA)^3 linear: a learned vector l scales a linear layer, one registered op with two faces.

    output scale (attention keys / values):  y = (x W^T + b) * l,   l: [out]
    input scale (feed-forward modules):      y = (x * l) W^T + b,   l: [in]

* triton: the scale is folded into the GEMM: the output scale multiplies the accumulator in the
  epilogue (before the single store of y), the input scale multiplies W's columns as its tiles are
  loaded, so no pass over the activations is added. The backward is the dx GEMM with the scale
  folded the same way (dy's columns, or the accumulator's columns), and the vector's gradient comes
  from tiles that kernel already holds: for the output scale, dl = colsum(dy * z) from the dy tiles
  of one column of programs and the unscaled output z the forward stored (the one [tokens, out]
  tensor besides y, kept only when l trains); for the input scale, dl = colsum(x * (dy W)) from
  the dx accumulator and x tiles, nothing stored.
* torch: the CPU face; the scale goes into a scaled copy of W ([out, in], never [tokens, ...]) or
  one in-place multiply of the output.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and autograd.
"""
from __future__ import annotations

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import _lowrank as lr
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import device_guard, matmul_precision

OP = "ia3_linear"
FACES = ("torch", "triton")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ia3_fwd_kernel(x_ptr, w_ptr, bias_ptr, l_ptr, y_ptr, z_ptr, M, N, K,
                    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                    PRECISION: tl.constexpr, FEEDFORWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
                    STORE_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """FEEDFORWARD: y = x (W * l[None, :])^T + b, each W tile scaled by l as it is loaded.
    Otherwise: y = (x W^T + b) * l in the epilogue, and z = x W^T + b stored too when STORE_Z (the
    backward's dl). y is written once."""
    tile_m, tile_n = lr.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if FEEDFORWARD:
            scale_k = tl.load(l_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = (w.to(tl.float32) * scale_k[None, :]).to(w.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if not FEEDFORWARD:
        if STORE_Z:
            tl.store(z_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(z_ptr.dtype.element_ty),
                     mask=out_mask)
        acc = acc * tl.load(l_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _ia3_bwd_kernel(dy_ptr, w_ptr, l_ptr, x_ptr, z_ptr, dx_ptr, dl_ptr, M, N, K, k_span,
                    stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_dxm, stride_dxk,
                    PRECISION: tl.constexpr, FEEDFORWARD: tl.constexpr, NEED_DX: tl.constexpr,
                    NEED_DL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """dx = (dy * l[None, :]) W (output scale) or (dy W) * l[None, :] (input scale), one GEMM over N.

    dl, fp32 atomics into a zeroed [out] / [in] buffer: output scale: colsum(dy * z) over this row
    block, from the dy tiles the programs of the first K tile load anyway (z: the stored unscaled
    output, same strides as dy); input scale: colsum(x * (dy W)) from the finished accumulator and
    this program's x tile. ``k_span``: K, or BLOCK_K when only dl of an output scale is wanted (one
    K tile of programs)."""
    tile_m, tile_k = lr.grouped_tile(tl.program_id(0), M, k_span, BLOCK_M, BLOCK_K, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        tile_mask = row_ok[:, None] & n_ok[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        if not FEEDFORWARD:
            if NEED_DL:
                if tile_k == 0:
                    z = tl.load(z_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn, mask=tile_mask,
                                other=0.0)
                    part = tl.sum(dy.to(tl.float32) * z.to(tl.float32), axis=0)
                    tl.atomic_add(dl_ptr + ns, part, mask=n_ok)
            if NEED_DX:
                scale_n = tl.load(l_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)
                dy = (dy.to(tl.float32) * scale_n[None, :]).to(dy.dtype)
        if NEED_DX or FEEDFORWARD:
            w = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    if FEEDFORWARD:
        if NEED_DL:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            tl.atomic_add(dl_ptr + ks, tl.sum(x.to(tl.float32) * acc, axis=0), mask=k_ok)
        acc = acc * tl.load(l_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    if NEED_DX:
        tl.store(dx_ptr + rows[:, None] * stride_dxm + ks[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _fwd_config(dtype: torch.dtype, feedforward: bool) -> dict:
    """Tiles of the forward GEMM: 128x128x64 for 16-bit inputs, 128x64x32 for fp32 (tf32 operands
    need twice the registers), K steps of 16 in fp32 (an input scale's W tile passes through
    registers: 32 spilled at K steps of 32; an output scale spilled 8 under Triton 3.6)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 8,
                "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _bwd_config(dtype: torch.dtype) -> dict:
    """The dx GEMM's tiles; fp32 over 8 warps (4 spilled with the scaled dy tile, static report)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _triton_forward(x2d, weight, bias, scale, feedforward, keep_unscaled):
    M, K = x2d.shape
    N = weight.shape[0]
    y = x2d.new_empty(M, N)
    store_z = keep_unscaled and not feedforward
    z = x2d.new_empty(M, N) if store_z else x2d.new_empty(0)
    if M == 0:
        return y, z
    if K == 0:  # x W^T is 0: the bias (scaled or not) alone
        base = bias.expand(M, N).to(y.dtype) if bias is not None else y.zero_()
        if store_z:
            z.copy_(base)
        return y.copy_(base if feedforward else base * scale.to(y.dtype)), z
    cfg, meta = lr.split_config(_fwd_config(x2d.dtype, feedforward))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    with device_guard(x2d):
        _ia3_fwd_kernel[grid](
            x2d, weight, bias if bias is not None else x2d, scale, y, z if store_z else y, M, N, K,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            PRECISION=matmul_precision(x2d.dtype), FEEDFORWARD=feedforward, HAS_BIAS=bias is not None,
            STORE_Z=store_z, **cfg, **meta)
    return y, z


def _triton_backward(dy, x2d, z, weight, scale, feedforward, need_dx, need_dscale):
    M, K = x2d.shape
    N = weight.shape[0]
    dx = x2d.new_empty(M, K) if need_dx else None
    dl = torch.zeros(scale.shape[0], dtype=torch.float32, device=x2d.device) if need_dscale else None
    if M == 0 or N == 0 or K == 0 or not (need_dx or need_dscale):
        if dx is not None:
            dx.zero_()
        if need_dscale and not feedforward and M and N:  # K == 0: z is the bias alone
            dl = (dy.float() * z.float()).sum(0)
        return dx, dl
    cfg, meta = lr.split_config(_bwd_config(x2d.dtype))
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"]) if (need_dx or feedforward) else 1
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * k_tiles,)
    with device_guard(x2d):
        _ia3_bwd_kernel[grid](
            dy, weight, scale, x2d, z if z.numel() else dy, dx if dx is not None else x2d,
            dl if dl is not None else scale, M, N, K, K if (need_dx or feedforward) else cfg["BLOCK_K"],
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), x2d.stride(0), x2d.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            PRECISION=matmul_precision(x2d.dtype), FEEDFORWARD=feedforward, NEED_DX=need_dx, NEED_DL=need_dscale,
            **cfg, **meta)
    return dx, dl


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype and per
    constexpr specialization the launchers use."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        for feedforward in (False, True):
            cfg, meta = lr.split_config(_fwd_config(dtype, feedforward))
            tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
            for has_bias in (False, True):
                for store_z in ((False,) if feedforward else (False, True)):
                    name = (f"{t} {'in' if feedforward else 'out'}-scale{' bias' if has_bias else ''}"
                            f"{' z' if store_z else ''} {tiles}")
                    specs.append(KernelSpec(
                        _ia3_fwd_kernel, name,
                        {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "l_ptr": f"*{t}", "y_ptr": f"*{t}",
                         "z_ptr": f"*{t}", "M": "i32", "N": "i32", "K": "i32",
                         **_i32("stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ym", "stride_yn")},
                        {"PRECISION": precision, "FEEDFORWARD": feedforward, "HAS_BIAS": has_bias,
                         "STORE_Z": store_z, **cfg}, **meta,
                        unit_args=("stride_xk", "stride_wk", "stride_yn")))
        bcfg, bmeta = lr.split_config(_bwd_config(dtype))
        btiles = f"{bcfg['BLOCK_M']}x{bcfg['BLOCK_K']}x{bcfg['BLOCK_N']}"
        for feedforward in (False, True):
            for need_dx, need_dl in ((True, True), (True, False), (False, True)):
                name = (f"{t} {'in' if feedforward else 'out'}-scale{' dx' if need_dx else ''}"
                        f"{' dl' if need_dl else ''} {btiles}")
                specs.append(KernelSpec(
                    _ia3_bwd_kernel, name,
                    {"dy_ptr": f"*{t}", "w_ptr": f"*{t}", "l_ptr": f"*{t}", "x_ptr": f"*{t}", "z_ptr": f"*{t}",
                     "dx_ptr": f"*{t}", "dl_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "k_span": "i32",
                     **_i32("stride_dym", "stride_dyn", "stride_wn", "stride_wk", "stride_xm", "stride_xk",
                            "stride_dxm", "stride_dxk")},
                    {"PRECISION": precision, "FEEDFORWARD": feedforward, "NEED_DX": need_dx, "NEED_DL": need_dl,
                     **bcfg}, **bmeta,
                    unit_args=("stride_dyn", "stride_wk", "stride_xk", "stride_dxk")))
    return specs


def _i32(*names) -> dict:
    return {name: "i32" for name in names}


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def _times(t: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t * scale (broadcast), computed in the wider of the two dtypes and returned in ``dtype``."""
    return (t * scale).to(dtype) if scale.dtype != t.dtype else t * scale


def _torch_forward(x2d, weight, bias, scale, feedforward, keep_unscaled):
    if feedforward:
        w = _times(weight, scale[None, :], weight.dtype)
        y = torch.addmm(bias, x2d, w.t()) if bias is not None else x2d @ w.t()
        return y, x2d.new_empty(0)
    z = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    y = _times(z, scale, z.dtype)
    return y, (z if keep_unscaled else x2d.new_empty(0))


def _torch_backward(dy, x2d, z, weight, scale, feedforward, need_dx, need_dscale):
    dx = dl = None
    if feedforward:
        g = dy @ weight  # [M, K]
        if need_dscale:
            dl = torch.linalg.vecdot(x2d.float(), g.float(), dim=0)  # (einsum: 30x slower on the CPU)
        if need_dx:
            dx = _times(g, scale, g.dtype)
        return dx, dl
    if need_dscale:  # first, so its [M, N] temporary is gone before dx is made
        dl = torch.linalg.vecdot(dy.float(), z.float(), dim=0)
    if need_dx:  # the scale on the smaller operand: dy's columns or W's rows
        if dy.shape[0] <= weight.shape[1]:
            dx = _times(dy, scale, dy.dtype) @ weight
        else:
            dx = dy @ _times(weight, scale[:, None], weight.dtype)
    return dx, dl


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::ia3_linear_fwd", mutates_args=())
def ia3_linear_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                   feedforward: bool, keep_unscaled: bool, face: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d [M, K] -> (y [M, N], z): z = x W^T + b [M, N] when the output is scaled and
    ``keep_unscaled`` (the backward's dl), else an empty tensor."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, scale, feedforward, keep_unscaled)
    return _torch_forward(x2d, weight, bias, scale, feedforward, keep_unscaled)


@ia3_linear_fwd.register_fake
def _(x2d, weight, bias, scale, feedforward, keep_unscaled, face):
    z_rows = x2d.shape[0] if (keep_unscaled and not feedforward) else 0
    y = x2d.new_empty(x2d.shape[0], weight.shape[0])
    return y, (x2d.new_empty(z_rows, weight.shape[0]) if z_rows else x2d.new_empty(0))


@torch.library.custom_op("peftkern::ia3_linear_bwd", mutates_args=())
def ia3_linear_bwd(dy: torch.Tensor, x2d: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   feedforward: bool, need_dx: bool, need_dscale: bool, face: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dscale in scale's dtype (empty when not needed))."""
    if face == "triton":
        dx, dl = _triton_backward(dy, x2d, z, weight, scale, feedforward, need_dx, need_dscale)
    else:
        dx, dl = _torch_backward(dy, x2d, z, weight, scale, feedforward, need_dx, need_dscale)
    dx = dx if dx is not None else x2d.new_empty(0, x2d.shape[1])
    dl = dl.to(scale.dtype) if dl is not None else scale.new_empty(0)
    return dx, dl


@ia3_linear_bwd.register_fake
def _(dy, x2d, z, weight, scale, feedforward, need_dx, need_dscale, face):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    return dx, (scale.new_empty(scale.shape) if need_dscale else scale.new_empty(0))


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, scale, feedforward, _keep_unscaled, face = inputs
    _, z = output
    # x is needed for dl of an input scale and for dW; a frozen weight with an output scale needs none of it
    keep_x = weight.requires_grad or (feedforward and scale.requires_grad)
    ctx.save_for_backward(x2d if keep_x else None, z, weight, scale)
    ctx.feedforward, ctx.face, ctx.has_bias = feedforward, face, bias is not None
    ctx.set_materialize_grads(False)  # z is for the backward only: no zero-filled [M, N] grad for it


def _backward(ctx, dy, _dz):
    x2d, z, weight, scale = ctx.saved_tensors
    need_dx, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    if dy is None:
        return (None,) * 7
    dy = dy.contiguous()
    ff = ctx.feedforward
    if need_l and not ff and z.dim() != 2:  # z kept is [M, N]; not kept, an empty [0]
        raise RuntimeError("ia3_linear: the scale needs a gradient but its forward ran without keeping the "
                           "unscaled output (the scale did not require grad then)")
    # an output scale with a frozen W never reads x: a stand-in of its shape, a view of W's first row
    # (no memory, no launch)
    x_arg = x2d if x2d is not None else (weight[:1] if weight.shape[0] else weight.new_zeros(1, weight.shape[1])
                                         ).expand(dy.shape[0], weight.shape[1])
    dx, dl = None, None
    if need_dx or need_l:
        dx, dl = torch.ops.peftkern.ia3_linear_bwd(dy, x_arg, z, weight, scale, ff, need_dx, need_l, ctx.face)
    d_weight = d_bias = None
    if need_w:
        d_weight = dy.t() @ _times(x2d, scale, x2d.dtype) if ff else _times(dy, scale, dy.dtype).t() @ x2d
    if need_b and ctx.has_bias:
        d_bias = dy.sum(0) if ff else _times(dy, scale, dy.dtype).sum(0)
    return (dx if need_dx else None, d_weight, d_bias, dl if need_l else None, None, None, None)


ia3_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

def _check(x, weight, bias, scale, feedforward):
    for name, t in (("x", x), ("weight", weight), ("scale", scale)):
        _checks.check_float(name, t)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"x": x, "weight": weight, "bias": bias}, dtype=x.dtype)
    _checks.check_same(OP, {"x": x, "scale": scale})
    if not isinstance(feedforward, bool):
        raise TypeError(f"{OP}: feedforward must be a bool, got {feedforward!r}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension [..., in], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{OP}: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{OP}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects in={in_features}")
    if bias is not None:
        _checks.check_shape(OP, "bias", bias, (out_features,), "[out]")
    expected = (in_features,) if feedforward else (out_features,)
    _checks.check_shape(OP, "scale", scale, expected,
                        "[in]: feed-forward scales the input" if feedforward else "[out]: scales the output")


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
               feedforward: bool = False) -> torch.Tensor:
    """y = (x W^T + b) * scale, or with ``feedforward`` y = (x * scale) W^T + b.

    x [..., in] (any strides), weight [out, in], bias [out] or None: one float dtype (fp32, fp16,
    bf16) and device; scale [out] (or [in] with ``feedforward``), any float dtype. Returns [..., out]
    in x's dtype. Gradients reach x and scale, and weight and bias when they require grad.
    """
    _check(x, weight, bias, scale, feedforward)
    face = backend.pick(OP, FACES, x.device.type)
    lead = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # no view of a 2-D leaf: its grad is then not copied
    keep_unscaled = (not feedforward) and scale.requires_grad and torch.is_grad_enabled()
    y, _ = torch.ops.peftkern.ia3_linear_fwd(x2d, weight, bias, scale, feedforward, keep_unscaled, face)
    return y if x.dim() == 2 else y.view(*lead, weight.shape[0])
