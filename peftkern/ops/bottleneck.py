"""Bottleneck adapter, one registered op with two faces:

    y = r + s * (act(h W_d^T + b_d) W_u^T + b_u)      r = h (serial: Houlsby, Pfeiffer) or given (parallel)

h [M, H] (any leading dims), W_d [R, H], b_d [R], W_u [H, R], b_u [H]; act one of relu, gelu (erf),
silu, tanh (``peftkern.reference.bottleneck``).

* triton: one program per block of rows. The forward reads h once for the down-projection
  (``_lowrank.down_tile``), keeps the [rows, R] activation in registers, and for each column tile
  computes the up-projection, adds s * (... + b_u) to the residual tile and writes y once; nothing
  [M, R] is stored. The backward recomputes the activation instead of keeping it: one pass over H
  accumulates z = h W_d^T and g = dy W_u together (and s * colsum(dy) into db_u), then
  dz = s * g * act'(z) in registers, and a second pass over the same row block (its h and dy tiles
  are L2-resident by then) adds dW_u += s dy^T act(z) and dW_d += dz^T h (fp32 atomics) and writes
  dh = dz W_d (+ dy when serial) once. Bottlenecks wider than 256 (64 in fp32) take the torch path.
* torch: the CPU face, the same recomputation with aten ops.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and autograd.
"""
from __future__ import annotations

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops._lowrank import down_tile, i32, split_config
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import device_guard, matmul_precision
from peftkern.reference.bottleneck import ACTIVATIONS

OP = "bottleneck_adapter"
FACES = ("torch", "triton")
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # relu 0, gelu 1, silu 2, tanh 3
RANK_BLOCKS = (16, 64, 256)  # the bottleneck widths the 16-bit kernels are compiled for (padded up to one)
FP32_RANK_BLOCKS = (16, 64)  # fp32: the backward of a 256 block spills (static report); wider takes torch


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _act_and_grad(z, act):
    """(act(z), act'(z)) in fp32 for the runtime code ``act`` (ACT_CODES; a scalar branch, not a
    constexpr: one compiled kernel serves every non-linearity); act(0) = 0 for each, so padded
    ranks stay 0."""
    if act == 0:
        a = tl.maximum(z, 0.0)
        d = (z > 0.0).to(tl.float32)
    elif act == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        a = z * cdf
        d = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif act == 2:
        sig = tl.sigmoid(z)
        a = z * sig
        d = sig * (1.0 + z * (1.0 - sig))
    else:
        a = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        d = 1.0 - a * a
    return a, d


@triton.jit
def _bottleneck_fwd_kernel(h_ptr, r_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, M, H, R,
                           stride_hm, stride_hk, stride_rm, stride_rk, stride_wdr, stride_wdk, stride_wun, stride_wur,
                           stride_ym, stride_yn, scaling, act,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr):
    """y[rows] = r[rows] + s * (act(h[rows] W_d^T + b_d) W_u^T + b_u); r_ptr is h_ptr when serial."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    z = down_tile(h_ptr, wd_ptr, rows, row_ok, ranks, rank_ok, H, stride_hm, stride_hk, stride_wdr, stride_wdk, 0, 0.0,
                  HAS_DROPOUT=False, PRECISION=PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    z += tl.load(bd_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
    a, _ = _act_and_grad(z, act)
    a = a.to(h_ptr.dtype.element_ty)
    r_rows = r_ptr + rows.to(tl.int64)[:, None] * stride_rm
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
    for n0 in range(0, H, BLOCK_K):
        cols = n0 + tl.arange(0, BLOCK_K)
        col_ok = cols < H
        wu = tl.load(wu_ptr + cols.to(tl.int64)[:, None] * stride_wun + ranks[None, :] * stride_wur,
                     mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        up = tl.dot(a, tl.trans(wu), input_precision=PRECISION)
        up += tl.load(bu_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tile_mask = row_ok[:, None] & col_ok[None, :]
        res = tl.load(r_rows + cols[None, :] * stride_rk, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(y_rows + cols[None, :] * stride_yn, (res + scaling * up).to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _bottleneck_bwd_kernel(dy_ptr, h_ptr, wd_ptr, bd_ptr, wu_ptr, dh_ptr, dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, M, H, R,
                           stride_dym, stride_dyn, stride_hm, stride_hk, stride_wdr, stride_wdk, stride_wun, stride_wur,
                           stride_dhm, stride_dhk, scaling, act, serial,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dh[rows] = dz W_d (+ dy[rows] when ``serial`` is 1) with dz = s * (dy W_u) * act'(z), z recomputed;
    into the fp32 buffers (atomics): dW_d [R, H] += dz^T h, db_d += colsum(dz),
    dW_u [H, R] += s dy^T act(z), db_u += s colsum(dy)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    z = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):  # pass 1: z = h W_d^T and g = dy W_u, h and dy read once
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        tile_mask = row_ok[:, None] & k_ok[None, :]
        h = tl.load(h_rows + ks[None, :] * stride_hk, mask=tile_mask, other=0.0)
        wd = tl.load(wd_ptr + ranks[:, None] * stride_wdr + ks[None, :] * stride_wdk,
                     mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.dot(h, tl.trans(wd), z, input_precision=PRECISION)
        dy = tl.load(dy_rows + ks[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        wu = tl.load(wu_ptr + ks.to(tl.int64)[:, None] * stride_wun + ranks[None, :] * stride_wur,
                     mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        g = tl.dot(dy, wu, g, input_precision=PRECISION)
        tl.atomic_add(dbu_ptr + ks, tl.sum(dy.to(tl.float32), axis=0) * scaling, mask=k_ok, sem="relaxed")
    z += tl.load(bd_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)[None, :]
    a, slope = _act_and_grad(z, act)
    dz = g * scaling * slope  # 0 on padded rows (dy = 0) and padded ranks (W_u = 0)
    tl.atomic_add(dbd_ptr + ranks, tl.sum(dz, axis=0), mask=rank_ok, sem="relaxed")
    a = a.to(h_ptr.dtype.element_ty)
    dz = dz.to(h_ptr.dtype.element_ty)
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * stride_dhm
    for k0 in range(0, H, BLOCK_K):  # pass 2: the same row block's tiles again (L2), weight grads and dh
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        tile_mask = row_ok[:, None] & k_ok[None, :]
        dy = tl.load(dy_rows + ks[None, :] * stride_dyn, mask=tile_mask, other=0.0)
        part = tl.dot(tl.trans(dy), a, input_precision=PRECISION) * scaling  # [BLOCK_K, BLOCK_R]
        tl.atomic_add(dwu_ptr + ks.to(tl.int64)[:, None] * R + ranks[None, :], part,
                      mask=k_ok[:, None] & rank_ok[None, :], sem="relaxed")
        h = tl.load(h_rows + ks[None, :] * stride_hk, mask=tile_mask, other=0.0)
        part = tl.dot(tl.trans(dz), h, input_precision=PRECISION)  # [BLOCK_R, BLOCK_K]
        tl.atomic_add(dwd_ptr + ranks.to(tl.int64)[:, None] * H + ks[None, :], part,
                      mask=rank_ok[:, None] & k_ok[None, :], sem="relaxed")
        wd = tl.load(wd_ptr + ranks[:, None] * stride_wdr + ks[None, :] * stride_wdk,
                     mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
        dh = tl.dot(dz, wd, input_precision=PRECISION)
        if serial != 0:
            dh += dy.to(tl.float32)
        tl.store(dh_rows + ks[None, :] * stride_dhk, dh.to(dh_ptr.dtype.element_ty), mask=tile_mask)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def rank_blocks(dtype: torch.dtype) -> tuple[int, ...]:
    return FP32_RANK_BLOCKS if dtype == torch.float32 else RANK_BLOCKS


def rank_block(bottleneck: int, dtype: torch.dtype) -> int | None:
    """The compiled bottleneck width that holds ``bottleneck`` (None: wider than any; torch path)."""
    return next((b for b in rank_blocks(dtype) if bottleneck <= b), None)


def _fwd_config(dtype: torch.dtype, block_r: int) -> dict:
    """Rows per program shrink as the bottleneck widens (the [rows, R] activation lives in
    registers); fp32 (tf32 dots hold twice the registers) takes half the rows over 8 warps
    (the static report: 0 spills on sm_80 and sm_90)."""
    if block_r >= 256:
        return {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_R": block_r, "num_warps": 8, "num_stages": 2}
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_R": block_r, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": block_r, "num_warps": 4 if block_r <= 16 else 8,
            "num_stages": 2}


def _bwd_config(dtype: torch.dtype, block_r: int) -> dict:
    """The backward holds z, g, act(z) and dz ([rows, R] each) beside its tiles: fewer rows than
    the forward for fp32 and for the widest bottleneck block."""
    if dtype == torch.float32:
        rows = 16 if block_r >= 256 else 32
        return {"BLOCK_M": rows, "BLOCK_K": rows, "BLOCK_R": block_r, "num_warps": 8, "num_stages": 1}
    if block_r >= 256:
        return {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_R": block_r, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": block_r, "num_warps": 4 if block_r <= 16 else 8,
            "num_stages": 1}


def _triton_forward(h, residual, w_down, b_down, w_up, b_up, scaling, activation):
    M, H = h.shape
    R = w_down.shape[0]
    block_r = rank_block(R, h.dtype)
    if M == 0 or H == 0 or R == 0 or block_r is None:
        return _torch_forward(h, residual, w_down, b_down, w_up, b_up, scaling, activation)
    r = residual if residual is not None else h
    y = h.new_empty(M, H)
    cfg, meta = split_config(_fwd_config(h.dtype, block_r))
    with device_guard(h):
        _bottleneck_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            h, r, w_down, b_down, w_up, b_up, y, M, H, R, h.stride(0), h.stride(1), r.stride(0), r.stride(1),
            w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1), y.stride(0), y.stride(1),
            float(scaling), ACT_CODES[activation], PRECISION=matmul_precision(h.dtype), **cfg, **meta)
    return y


def _triton_backward(dy, h, w_down, b_down, w_up, scaling, activation, serial):
    M, H = h.shape
    R = w_down.shape[0]
    block_r = rank_block(R, h.dtype)
    if M == 0 or H == 0 or R == 0 or block_r is None:
        return _torch_backward(dy, h, w_down, b_down, w_up, scaling, activation, serial)
    dh = h.new_empty(M, H)
    f32 = dict(dtype=torch.float32, device=h.device)
    dwd, dbd, dwu, dbu = (torch.zeros(R, H, **f32), torch.zeros(R, **f32), torch.zeros(H, R, **f32),
                          torch.zeros(H, **f32))
    cfg, meta = split_config(_bwd_config(h.dtype, block_r))
    with device_guard(h):
        _bottleneck_bwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            dy, h, w_down, b_down, w_up, dh, dwd, dbd, dwu, dbu, M, H, R, dy.stride(0), dy.stride(1),
            h.stride(0), h.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
            dh.stride(0), dh.stride(1), float(scaling), ACT_CODES[activation], int(serial),
            PRECISION=matmul_precision(h.dtype), **cfg, **meta)
    return dh, dwd, dbd, dwu, dbu


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): dtype x bottleneck block,
    forward and backward (the non-linearity and serial / parallel are runtime arguments)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        for block_r in rank_blocks(dtype):
            cfg, meta = split_config(_fwd_config(dtype, block_r))
            specs.append(KernelSpec(
                _bottleneck_fwd_kernel, f"{t} fwd {cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{block_r}",
                {"h_ptr": f"*{t}", "r_ptr": f"*{t}", "wd_ptr": f"*{t}", "bd_ptr": f"*{t}", "wu_ptr": f"*{t}",
                 "bu_ptr": f"*{t}", "y_ptr": f"*{t}", "M": "i32", "H": "i32", "R": "i32",
                 **i32("stride_hm", "stride_hk", "stride_rm", "stride_rk", "stride_wdr", "stride_wdk",
                       "stride_wun", "stride_wur", "stride_ym", "stride_yn"), "scaling": "fp32", "act": "i32"},
                {"PRECISION": precision, **cfg}, **meta,
                unit_args=("stride_hk", "stride_rk", "stride_wdk", "stride_wur", "stride_yn"),
                plain_args=("R", "act")))
            bcfg, bmeta = split_config(_bwd_config(dtype, block_r))
            specs.append(KernelSpec(
                _bottleneck_bwd_kernel, f"{t} bwd {bcfg['BLOCK_M']}x{bcfg['BLOCK_K']}x{block_r}",
                {"dy_ptr": f"*{t}", "h_ptr": f"*{t}", "wd_ptr": f"*{t}", "bd_ptr": f"*{t}", "wu_ptr": f"*{t}",
                 "dh_ptr": f"*{t}", "dwd_ptr": "*fp32", "dbd_ptr": "*fp32", "dwu_ptr": "*fp32",
                 "dbu_ptr": "*fp32", "M": "i32", "H": "i32", "R": "i32",
                 **i32("stride_dym", "stride_dyn", "stride_hm", "stride_hk", "stride_wdr", "stride_wdk",
                       "stride_wun", "stride_wur", "stride_dhm", "stride_dhk"), "scaling": "fp32",
                 "act": "i32", "serial": "i32"},
                {"PRECISION": precision, **bcfg}, **bmeta,
                unit_args=("stride_dyn", "stride_hk", "stride_wdk", "stride_wur", "stride_dhk"),
                plain_args=("R", "act", "serial")))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def _act_and_grad_torch(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(z), act'(z)), both in z's dtype."""
    if activation == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        return torch.nn.functional.gelu(z), cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if activation == "silu":
        sig = torch.sigmoid(z)
        return z * sig, sig * (1.0 + z * (1.0 - sig))
    t = torch.tanh(z)
    return t, 1.0 - t * t


def _torch_forward(h, residual, w_down, b_down, w_up, b_up, scaling, activation):
    a, _ = _act_and_grad_torch(torch.addmm(b_down, h, w_down.t()), activation)
    up = torch.addmm(b_up, a, w_up.t())
    return torch.add(residual if residual is not None else h, up, alpha=scaling)


def _torch_backward(dy, h, w_down, b_down, w_up, scaling, activation, serial):
    # recomputed, not stored; the [M, R] elementwise chain in fp32 (as the kernel), one rounding per result
    a, slope = _act_and_grad_torch(torch.addmm(b_down, h, w_down.t()).float(), activation)
    dz = ((dy @ w_up).float() * slope * scaling).to(h.dtype)
    a = a.to(h.dtype)
    dwu = (dy.t() @ a).float() * scaling
    dbu = dy.float().sum(0) * scaling
    dwd = (dz.t() @ h).float()
    dbd = dz.float().sum(0)
    dh = torch.addmm(dy, dz, w_down) if serial else dz @ w_down
    return dh, dwd, dbd, dwu, dbu


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd(h: torch.Tensor, residual: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor,
                           w_up: torch.Tensor, b_up: torch.Tensor, scaling: float, activation: str,
                           face: str) -> torch.Tensor:
    """h [M, H] -> y [M, H] = (residual or h) + scaling * up(act(down(h)))."""
    if face == "triton":
        return _triton_forward(h, residual, w_down, b_down, w_up, b_up, scaling, activation)
    return _torch_forward(h, residual, w_down, b_down, w_up, b_up, scaling, activation)


@bottleneck_adapter_fwd.register_fake
def _(h, residual, w_down, b_down, w_up, b_up, scaling, activation, face):
    return h.new_empty(h.shape)


@torch.library.custom_op("peftkern::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd(dy: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor,
                           w_up: torch.Tensor, scaling: float, activation: str, serial: bool,
                           face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh [M, H], dW_d [R, H], db_d [R], dW_u [H, R], db_u [H]); the weight grads in the weights' dtype."""
    if face == "triton":
        dh, dwd, dbd, dwu, dbu = _triton_backward(dy, h, w_down, b_down, w_up, scaling, activation, serial)
    else:
        dh, dwd, dbd, dwu, dbu = _torch_backward(dy, h, w_down, b_down, w_up, scaling, activation, serial)
    dt = w_down.dtype
    return dh, dwd.to(dt), dbd.to(dt), dwu.to(dt), dbu.to(dt)


@bottleneck_adapter_bwd.register_fake
def _(dy, h, w_down, b_down, w_up, scaling, activation, serial, face):
    return (h.new_empty(h.shape), w_down.new_empty(w_down.shape), w_down.new_empty(w_down.shape[0]),
            w_down.new_empty(w_up.shape), w_down.new_empty(w_up.shape[0]))


def _setup_context(ctx, inputs, output):
    h, residual, w_down, b_down, w_up, b_up, scaling, activation, face = inputs
    ctx.save_for_backward(h, w_down, b_down, w_up)  # the activation is recomputed, never kept
    ctx.scaling, ctx.activation, ctx.face, ctx.serial = scaling, activation, face, residual is None


def _backward(ctx, dy):
    h, w_down, b_down, w_up = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None or not any(need[:6]):
        return (None,) * 9
    dh, dwd, dbd, dwu, dbu = torch.ops.peftkern.bottleneck_adapter_bwd(
        dy.contiguous(), h, w_down, b_down, w_up, ctx.scaling, ctx.activation, ctx.serial, ctx.face)
    d_residual = dy if (not ctx.serial and need[1]) else None
    return (dh if need[0] else None, d_residual, dwd if need[2] else None, dbd if need[3] else None,
            dwu if need[4] else None, dbu if need[5] else None, None, None, None)


bottleneck_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

def _check(h, w_down, b_down, w_up, b_up, residual, non_linearity):
    named = {"h": h, "w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up}
    if residual is not None:
        named["residual"] = residual
    for name, t in named.items():
        _checks.check_float(name, t)
    _checks.check_same(OP, named, dtype=h.dtype)
    if non_linearity not in ACT_CODES:
        raise ValueError(f"{OP}: unknown non_linearity {non_linearity!r}; choose from {', '.join(ACTIVATIONS)}")
    if h.dim() < 1:
        raise ValueError(f"{OP}: h must have at least one dimension [..., hidden], got shape {tuple(h.shape)}")
    if w_down.dim() != 2:
        raise ValueError(f"{OP}: w_down must be [bottleneck, hidden], got shape {tuple(w_down.shape)}")
    bottleneck, hidden = w_down.shape
    if h.shape[-1] != hidden:
        raise ValueError(f"{OP}: h has {h.shape[-1]} features (shape {tuple(h.shape)}) but w_down "
                         f"{tuple(w_down.shape)} expects hidden={hidden}")
    _checks.check_shape(OP, "b_down", b_down, (bottleneck,), "[bottleneck]")
    _checks.check_shape(OP, "w_up", w_up, (hidden, bottleneck), "[hidden, bottleneck]")
    _checks.check_shape(OP, "b_up", b_up, (hidden,), "[hidden]")
    if residual is not None:
        _checks.check_shape(OP, "residual", residual, tuple(h.shape), "the shape of h")


def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, scaling: float = 1.0, non_linearity: str = "relu",
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = r + scaling * (act(h W_d^T + b_d) W_u^T + b_u), r = h (serial) or ``residual`` (parallel).

    h [..., hidden] (any strides), w_down [bottleneck, hidden], b_down [bottleneck], w_up [hidden,
    bottleneck], b_up [hidden], residual None or h's shape: one float dtype (fp32, fp16, bf16) and
    device. non_linearity: relu, gelu (exact), silu or tanh. Returns h's shape and dtype. Gradients
    reach h, residual and the four weights; the activation is recomputed in the backward.
    """
    _check(h, w_down, b_down, w_up, b_up, residual, non_linearity)
    scaling = _checks.check_finite_scalar(OP, "scaling", scaling)
    face = backend.pick(OP, FACES, h.device.type)
    lead = h.shape[:-1]
    h2d = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
    r2d = None if residual is None else (residual if residual.dim() == 2 else residual.reshape(-1, h.shape[-1]))
    y = torch.ops.peftkern.bottleneck_adapter_fwd(h2d, r2d, w_down, b_down, w_up, b_up, scaling, non_linearity, face)
    return y if h.dim() == 2 else y.view(*lead, h.shape[-1])
