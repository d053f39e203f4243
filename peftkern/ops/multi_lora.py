"""Many LoRA adapters over one frozen base in one batch: row i of x runs through adapter
``adapter_index[i]`` (-1: the base alone), forward and backward, with one pass over W.

    y_i = x_i W^T + b + s_e (drop(x_i) A_e^T) B_e^T,   e = adapter_index[i]

The adapters come as a stack, lora_A [E, R, in] and lora_B [E, out, R], padded to the largest rank
R; ``ranks[e]`` says how many of adapter e's ranks are real (the padding is masked, never read,
and its gradient is zero). dA_e and dB_e come from adapter e's own rows only, so E adapters
(different data, hyperparameters, or GRPO policies) train in one batch over one copy of the base.

* torch: the CPU face. One base GEMM over every row, then per adapter the rank-r terms of its rows
  (gathered with one sort of the index), added into the output in place.
* triton: the rows are sorted by adapter (on the device, no host sync) and cut into row tiles of a
  single adapter each (each adapter's segment padded to a whole tile, as S-LoRA / Punica's SGMV
  do for inference): a launch has at most cdiv(M, BLOCK_M) + E + 1 row tiles. Each tile is the
  LoRA kernel's tile (``peftkern.ops._lowrank``) over its gathered rows, with its adapter's A, B,
  rank and scaling: producers compute u = drop(x) A_e^T (g = dy B_e and dB_e in the backward), the
  base GEMM tiles read W once for all adapters and add s_e u B_e^T after their K loop (s_e g A_e
  and dA_e in the backward). Base-only tiles skip the rank-r work. The dropout mask is the hash of
  (seed, row, column) on the original row numbers, so both faces drop the same elements.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and
autograd, public entry point.
"""
from __future__ import annotations

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops import _lowrank as lr
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import device_guard, matmul_precision
from peftkern.reference.lora import dropout_keep_mask as hash_keep_mask

OP = "multi_lora_linear"
FACES = ("torch", "triton")
BASE = -1  # the adapter index of a row that runs through the base alone


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_rows(perm_ptr, tile_ptr, rank_ptr, tile, BLOCK_M: tl.constexpr):
    """A row tile of the plan -> (its original row numbers, which are real, how many, its adapter
    (0 for base rows: a valid index whose A / B / scaling are then never used), its rank (0 for base
    rows, so the rank-r blocks do nothing))."""
    start = tl.load(tile_ptr + 3 * tile)
    count = tl.load(tile_ptr + 3 * tile + 1)
    adapter = tl.load(tile_ptr + 3 * tile + 2)
    slots = tl.arange(0, BLOCK_M)
    row_ok = slots < count
    rows = tl.load(perm_ptr + start + slots, mask=row_ok, other=0)
    adapter_c = tl.maximum(adapter, 0)
    rank = tl.where(adapter >= 0, tl.load(rank_ptr + adapter_c), 0)
    return rows, row_ok, count, adapter_c, rank


@triton.jit
def _multi_fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, u_ptr, y_ptr, flag_ptr, perm_ptr, tile_ptr, scale_ptr,
                      rank_ptr, T, N, K, RMAX, stride_xm, stride_xk, stride_wn, stride_wk, stride_ae, stride_ar,
                      stride_ak, stride_be, stride_bn, stride_br, stride_um, stride_ur, stride_ym, stride_yn, p,
                      inv_keep,
                      HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """Producers: u[rows] = drop(x[rows]) A_e^T for their tile's adapter e, then publish. GEMM tiles:
    y = x W^T over the tile's gathered rows, + s_e u B_e^T (adapter tiles, once u is published), + b."""
    is_producer, tile, tile_n = lr.producer_tile(tl.program_id(0), T, tl.cdiv(N, BLOCK_N), GROUP_M)
    rows, row_ok, count, adapter_c, R = _tile_rows(perm_ptr, tile_ptr, rank_ptr, tile, BLOCK_M)
    ticket = tl.load(flag_ptr)
    if is_producer:
        lr.produce_u(x_ptr, a_ptr + adapter_c.to(tl.int64) * stride_ae, u_ptr, flag_ptr + 1 + tile, rows, row_ok, K, R,
                     RMAX, stride_xm, stride_xk, stride_ar, stride_ak, stride_um, stride_ur, ticket, p, inv_keep,
                     HAS_DROPOUT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R)
    elif count > 0:
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = lr.xwt_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, K, stride_xm, stride_xk, stride_wn, stride_wk,
                          PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc = lr.published_rank_term(acc, flag_ptr + 1 + tile, ticket, u_ptr, b_ptr + adapter_c.to(tl.int64) * stride_be,
                                     rows, row_ok, cols, col_ok, R, stride_um, stride_ur, stride_bn, stride_br,
                                     tl.load(scale_ptr + adapter_c), PRECISION, BLOCK_R)
        lr.finish_y(acc, y_ptr, bias_ptr, rows, row_ok, cols, col_ok, stride_ym, stride_yn)


@triton.jit
def _multi_bwd_kernel(dy_ptr, w_ptr, x_ptr, a_ptr, b_ptr, u_ptr, g_ptr, seed_ptr, dx_ptr, da_ptr, db_ptr,
                      da_acc_ptr, db_acc_ptr, count_ptr, flag_ptr, perm_ptr, tile_ptr, scale_ptr, rank_ptr,
                      T, E, N, K, RMAX, stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk,
                      stride_ae, stride_ar, stride_ak, stride_be, stride_bn, stride_br, stride_um, stride_ur,
                      stride_gm, stride_gr, stride_dxm, stride_dxk, p, inv_keep,
                      HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_DA: tl.constexpr, GROUP_M: tl.constexpr):
    """Producers (one per row tile): g[rows] = dy B_e and dB_e += s_e dy^T u over the tile's rows,
    published; the last producer to add into an N chunk of dB casts that chunk of every adapter.
    dx tiles: dx = dy W, + s_e keep * (g A_e) on adapter tiles; then dA_e[:, ks] += s_e g^T (keep * x),
    cast by the last tile adding into the column tile. dA / dB sums, counters and flags start at
    zero (one buffer per launch); dA_e and dB_e hold adapter e's rows only."""
    tiles_k = tl.cdiv(K, BLOCK_K)
    is_producer, tile, tile_k = lr.producer_tile(tl.program_id(0), T, tiles_k, GROUP_M)
    rows, row_ok, count, adapter_c, R = _tile_rows(perm_ptr, tile_ptr, rank_ptr, tile, BLOCK_M)
    seed = tl.load(seed_ptr)
    scaling = tl.load(scale_ptr + adapter_c)
    if is_producer:
        lr.produce_g(dy_ptr, u_ptr, b_ptr + adapter_c.to(tl.int64) * stride_be, g_ptr,
                     db_acc_ptr + adapter_c.to(tl.int64) * N * RMAX, db_acc_ptr, db_ptr, flag_ptr + tile,
                     count_ptr + tiles_k, rows, row_ok, N, R, RMAX, E, T, stride_dym, stride_dyn, stride_um, stride_ur,
                     stride_bn, stride_br, stride_gm, stride_gr, scaling, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        lr.dense_dx_tile(dy_ptr, w_ptr, dy_ptr, dx_ptr, x_ptr, g_ptr, a_ptr + adapter_c.to(tl.int64) * stride_ae,
                         da_acc_ptr + adapter_c.to(tl.int64) * RMAX * K, da_acc_ptr, da_ptr, flag_ptr + tile,
                         count_ptr + tile_k, T, rows, row_ok, tile_k, tl.where(count > 0, N, 0), K, R, RMAX, E,
                         stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_gm, stride_gr,
                         stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, scaling * inv_keep, False, HAS_DROPOUT,
                         COMPUTE_DX, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DA, BLOCK_R)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _fwd_config(dtype: torch.dtype) -> dict:
    """LoRA's forward tiles (``_lowrank.lora_fwd_config``); fp32 64x64x32 (LoRA's 128-row tile
    spilled on sm_80 under Triton 3.6 with the gathered rows)."""
    if dtype == torch.float32:
        return {**lr.lora_fwd_config(dtype), "BLOCK_M": 64, "BLOCK_K": 32}
    return lr.lora_fwd_config(dtype)


def _bwd_config(dtype: torch.dtype, block_r: int, dropout: bool, compute_dx: bool) -> dict:
    """LoRA's backward tiles (``_lowrank.lora_bwd_config``); fp32 differs where ptxas spilled
    (static report, Triton 3.6 or 3.9): 1 stage without dx; with dx 8 warps, and N steps of 16
    with dropout."""
    cfg = lr.lora_bwd_config(dtype, block_r, dropout, compute_dx)
    if dtype == torch.float32:
        if not compute_dx:
            cfg["num_stages"] = 1
        else:
            cfg["num_warps"] = 8
            if dropout:
                cfg["BLOCK_N"] = 16
    return cfg


def segment_plan(adapter_index: torch.Tensor, num_adapters: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows cut into tiles of one adapter each, on the index's device with no host sync.

    adapter_index: int64 [M] in [-1, E). Returns (perm int32 [M]: row numbers sorted by adapter,
    base rows first; tiles int32 [T, 3]: per tile (first position in perm, rows in it <= block_m,
    adapter or -1)), T = cdiv(M, block_m) + E + 1 (an upper bound; tiles past the last real one
    hold no rows)."""
    m = adapter_index.numel()
    key = adapter_index + 1  # 0: the base rows
    perm = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_adapters + 1, dtype=torch.int64, device=key.device)
    counts.index_add_(0, key, torch.ones_like(key))  # bincount without its host sync
    seg_start = torch.cumsum(counts, 0) - counts
    seg_tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(seg_tiles, 0)
    total = triton.cdiv(m, block_m) + num_adapters + 1
    t = torch.arange(total, dtype=torch.int64, device=key.device)
    seg = torch.searchsorted(tiles_end, t, right=True)
    real = seg <= num_adapters
    seg = seg.clamp(max=num_adapters)
    offset = (t - (tiles_end[seg] - seg_tiles[seg])) * block_m
    count = torch.where(real, (counts[seg] - offset).clamp(0, block_m), 0)
    adapter = torch.where(real & (count > 0), seg - 1, BASE)
    tiles = torch.stack([seg_start[seg] + offset, count, adapter], 1).to(torch.int32)
    return perm, tiles


_PLANS: dict = {}
_LISTS: dict = {}


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's contents while the tensor is held: storage address, layout, device and
    version counter (bumped by every in-place write)."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), t._version)


def _memo(key: tuple, held: torch.Tensor, make):
    """``make()`` cached under ``key`` (whose first part is ``_tensor_key(held)``); the entry keeps
    ``held`` alive, so no other tensor can take its address while the entry lives."""
    hit = _PLANS.get(key)
    if hit is not None:
        return hit[1]
    if len(_PLANS) >= 16:
        _PLANS.clear()
    value = make()
    _PLANS[key] = (held, value)
    return value


def cached_segment_plan(adapter_index: torch.Tensor, num_adapters: int, block_m: int):
    """:func:`segment_plan`, made once per index (the same contents in the same memory) and tile
    height: every layer of a model call, and the backward after the forward, share one plan, so its
    few small launches are paid once per batch rather than per layer and direction."""
    return _memo(("plan", _tensor_key(adapter_index), num_adapters, block_m), adapter_index,
                 lambda: segment_plan(adapter_index, num_adapters, block_m))


def row_index(adapter_index: torch.Tensor, lead: tuple) -> torch.Tensor:
    """int64 [prod(lead)]: ``adapter_index`` (shape ``lead`` or a prefix of it) repeated over the
    rest of ``lead``, made once per index so that layers share it (and its plan)."""
    def make():
        index = adapter_index.reshape(*adapter_index.shape, *([1] * (len(lead) - adapter_index.dim())))
        return index.expand(lead).reshape(-1).to(torch.int64)
    if torch.compiler.is_compiling():
        return make()
    return _memo(("rows", _tensor_key(adapter_index), tuple(lead)), adapter_index, make)


def _device_lists(scalings, ranks, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters' scalings (fp32) and ranks (int32) on ``device``, copied there once per value."""
    key = (tuple(scalings), tuple(ranks), str(device))
    if key not in _LISTS:
        if len(_LISTS) > 256:
            _LISTS.clear()
        _LISTS[key] = (torch.tensor(list(scalings), dtype=torch.float32, device=device),
                       torch.tensor(list(ranks), dtype=torch.int32, device=device))
    return _LISTS[key]


def _triton_forward(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p):
    """-> (y [M, N], u [M, R] (zero where a row has no adapter or a rank is padding), seed int64 [1])."""
    M, K = x2d.shape
    N = weight.shape[0]
    E, RMAX = lora_A.shape[0], lora_A.shape[1]
    if M == 0 or N == 0 or K == 0 or not all(lr.scale_fits_kernels(s) for s in scalings):
        return torch_forward(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p)
    cfg, meta = lr.split_config(_fwd_config(x2d.dtype))
    perm, tiles = cached_segment_plan(adapter_index, E, cfg["BLOCK_M"])
    T = tiles.shape[0]
    flags = lr.flag_buffer(T, dropout_p, x2d.device)
    scale_t, rank_t = _device_lists(scalings, ranks, x2d.device)
    y = x2d.new_empty(M, N)
    u = x2d.new_empty(M, RMAX)  # every element written by the producers
    with device_guard(x2d):
        _multi_fwd_kernel[(T * (1 + triton.cdiv(N, cfg["BLOCK_N"])),)](
            x2d, weight, lr.bias_or_zeros(bias, N, x2d.dtype, x2d.device), lora_A, lora_B, u, y, flags, perm, tiles,
            scale_t, rank_t, T, N, K, RMAX, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2),
            u.stride(0), u.stride(1), y.stride(0), y.stride(1), dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=lr.rank_block(RMAX, x2d.dtype), **cfg, **meta)
    return y, u, flags[:1]


def _triton_backward(dy, x2d, weight, lora_A, lora_B, u, adapter_index, scalings, ranks, dropout_p, seed, need_dx):
    M, K = x2d.shape
    N = weight.shape[0]
    E, RMAX = lora_A.shape[0], lora_A.shape[1]
    if M == 0 or N == 0 or K == 0 or not all(lr.scale_fits_kernels(s / (1.0 - dropout_p)) for s in scalings):
        return torch_backward(dy, x2d, weight, lora_A, lora_B, u, adapter_index, scalings, ranks, dropout_p, seed,
                              need_dx)
    block_r = lr.rank_block(RMAX, x2d.dtype)
    cfg, meta = lr.split_config(_bwd_config(x2d.dtype, block_r, dropout_p > 0.0, need_dx))
    perm, tiles = cached_segment_plan(adapter_index, E, cfg["BLOCK_M"])
    T = tiles.shape[0]
    tiles_k, chunks_n = triton.cdiv(K, cfg["BLOCK_K"]), triton.cdiv(N, cfg["BLOCK_N"])
    # One zero-filled buffer: fp32 sums of dA [E, R, K] and dB [E, N, R], the counters of dA's column
    # tiles and dB's row chunks, and the producers' flags.
    n_a, n_b = E * RMAX * K, E * N * RMAX
    work = torch.zeros(n_a + n_b + tiles_k + chunks_n + T, dtype=torch.int32, device=x2d.device)
    da_acc = work[:n_a].view(torch.float32)
    db_acc = work[n_a:n_a + n_b].view(torch.float32)
    counts = work[n_a + n_b:n_a + n_b + tiles_k + chunks_n]
    flags = work[n_a + n_b + tiles_k + chunks_n:]
    scale_t, rank_t = _device_lists(scalings, ranks, x2d.device)
    d_a = x2d.new_empty(E, RMAX, K)
    d_b = x2d.new_empty(E, N, RMAX)
    g = x2d.new_empty(M, RMAX)
    dx = x2d.new_empty(M, K) if need_dx else None
    out = dx if dx is not None else x2d
    with device_guard(x2d):
        _multi_bwd_kernel[(T * (1 + tiles_k),)](
            dy, weight, x2d, lora_A, lora_B, u, g, seed, out, d_a, d_b, da_acc, db_acc, counts, flags, perm, tiles,
            scale_t, rank_t, T, E, N, K, RMAX, dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2), lora_B.stride(0),
            lora_B.stride(1), lora_B.stride(2), u.stride(0), u.stride(1), g.stride(0), g.stride(1), out.stride(0),
            out.stride(1), dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, COMPUTE_DX=need_dx, PRECISION=matmul_precision(x2d.dtype),
            BLOCK_R=block_r, **cfg, **meta)
    return dx, d_a, d_b


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels --op multi_lora``)."""
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype)
        for block_r in lr.rank_blocks(dtype):
            cfg, meta = lr.split_config(_fwd_config(dtype))
            tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
            for dropout in (False, True):
                specs.append(KernelSpec(
                    _multi_fwd_kernel, f"{t} r<={block_r} {tile} dropout={int(dropout)}",
                    {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                     "u_ptr": f"*{t}", "y_ptr": f"*{t}", "flag_ptr": "*i64", "perm_ptr": "*i32", "tile_ptr": "*i32",
                     "scale_ptr": "*fp32", "rank_ptr": "*i32",
                     **lr.i32("T", "N", "K", "RMAX", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_ae",
                              "stride_ar", "stride_ak", "stride_be", "stride_bn", "stride_br", "stride_um",
                              "stride_ur", "stride_ym", "stride_yn"),
                     "p": "fp32", "inv_keep": "fp32"},
                    {"HAS_DROPOUT": dropout, "PRECISION": precision, "BLOCK_R": block_r, **cfg}, **meta,
                    unit_args=("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_ur", "stride_yn"),
                    plain_args=("T", "RMAX")))
            for dropout in (False, True):
                for compute_dx in (True, False):
                    cfg, meta = lr.split_config(_bwd_config(dtype, block_r, dropout, compute_dx))
                    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_K']}x{cfg['BLOCK_N']}"
                    specs.append(KernelSpec(
                        _multi_bwd_kernel, f"{t} r<={block_r} {tile} dropout={int(dropout)} dx={int(compute_dx)}",
                        {"dy_ptr": f"*{t}", "w_ptr": f"*{t}", "x_ptr": f"*{t}", "a_ptr": f"*{t}", "b_ptr": f"*{t}",
                         "u_ptr": f"*{t}", "g_ptr": f"*{t}", "seed_ptr": "*i64", "dx_ptr": f"*{t}", "da_ptr": f"*{t}",
                         "db_ptr": f"*{t}", "da_acc_ptr": "*fp32", "db_acc_ptr": "*fp32", "count_ptr": "*i32",
                         "flag_ptr": "*i32", "perm_ptr": "*i32", "tile_ptr": "*i32", "scale_ptr": "*fp32",
                         "rank_ptr": "*i32",
                         **lr.i32("T", "E", "N", "K", "RMAX", "stride_dym", "stride_dyn", "stride_wn", "stride_wk",
                                  "stride_xm", "stride_xk", "stride_ae", "stride_ar", "stride_ak", "stride_be",
                                  "stride_bn", "stride_br", "stride_um", "stride_ur", "stride_gm", "stride_gr",
                                  "stride_dxm", "stride_dxk"),
                         "p": "fp32", "inv_keep": "fp32"},
                        {"HAS_DROPOUT": dropout, "COMPUTE_DX": compute_dx, "PRECISION": precision, "BLOCK_R": block_r,
                         **cfg}, **meta,
                        unit_args=("stride_dyn", "stride_wk", "stride_xk", "stride_ak", "stride_br", "stride_ur",
                                   "stride_gr", "stride_dxk"),
                        plain_args=("T", "E", "RMAX")))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def sorted_segments(adapter_index: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor | None, list]:
    """The rows in adapter order: (perm: int64 row numbers sorted by adapter, base rows first, or None
    when the rows already are in that order; [(adapter e, start, stop)] for every adapter with rows,
    positions in the sorted order). One sort of the index and a host sync for the counts (the torch
    face's loop needs them), made once per index as :func:`cached_segment_plan` is."""
    def make():
        order = torch.argsort(adapter_index, stable=True)
        counts = torch.bincount(adapter_index + 1, minlength=num_adapters + 1).tolist()
        in_order = adapter_index.numel() < 2 or bool((adapter_index[1:] >= adapter_index[:-1]).all())
        segments, start = [], counts[0]
        for e in range(num_adapters):
            if counts[e + 1]:
                segments.append((e, start, start + counts[e + 1]))
            start += counts[e + 1]
        return (None if in_order else order), segments
    return _memo(("segments", _tensor_key(adapter_index), num_adapters), adapter_index, make)


def _keep(x2d, dropout_p, seed):
    return None if dropout_p == 0.0 else hash_keep_mask(seed, x2d.shape, dropout_p)


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    """t's rows ``rows``: a slice (a view) or row numbers (a gather)."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def torch_forward(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p):
    """The torch face: (y, u [M, R] = drop(x) A_e^T per row (zero elsewhere), seed int64 [1]).

    One base GEMM over every row, then per adapter its rank-r term. Rows already in adapter order
    (train_adapters' batches): each adapter's rows are a block, its term added into the block in
    place (addmm_, no copies); otherwise its rows are gathered and the term added back with
    index_add_ (one gather and one scatter in all measured faster than sorting x, y and dx whole)."""
    seed = lr.draw_seed(x2d.device) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64, device=x2d.device)
    perm, segments = sorted_segments(adapter_index, lora_A.shape[0])
    keep = _keep(x2d, dropout_p, seed)
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    u = x2d.new_zeros(x2d.shape[0], lora_A.shape[1])
    for e, a, b in segments:
        r = ranks[e]
        rows = slice(a, b) if perm is None else perm[a:b]
        x_e = _take(x2d, rows)
        if keep is not None:
            x_e = x_e * _take(keep, rows) / (1.0 - dropout_p)
        u_e = x_e @ lora_A[e, :r].t()
        u[rows, :r] = u_e
        if perm is None:
            y[a:b].addmm_(u_e, lora_B[e, :, :r].t(), alpha=scalings[e])
        else:
            y.index_add_(0, rows, u_e @ lora_B[e, :, :r].t(), alpha=scalings[e])
    return y, u, seed


def torch_backward(dy, x2d, weight, lora_A, lora_B, u, adapter_index, scalings, ranks, dropout_p, seed, need_dx):
    """The torch face: (dx or None, dA [E, R, K], dB [E, N, R]); adapter e's gradients from its rows
    (a block, or gathered, as in the forward)."""
    perm, segments = sorted_segments(adapter_index, lora_A.shape[0])
    keep = _keep(x2d, dropout_p, seed)
    factor_of = 1.0 if keep is None else 1.0 / (1.0 - dropout_p)
    d_a = torch.zeros_like(lora_A)
    d_b = torch.zeros_like(lora_B)
    dx = dy @ weight if need_dx else None
    for e, a, b in segments:
        r, s = ranks[e], scalings[e]
        rows = slice(a, b) if perm is None else perm[a:b]
        dy_e = _take(dy, rows)
        g_e = dy_e @ lora_B[e, :, :r]
        d_b[e, :, :r] = torch.mm(dy_e.t(), _take(u, rows)[:, :r]).mul_(s)
        x_e = _take(x2d, rows)
        keep_e = None if keep is None else _take(keep, rows)
        if keep_e is not None:
            x_e = x_e * keep_e
        d_a[e, :r] = torch.mm(g_e.t(), x_e).mul_(s * factor_of)
        if need_dx:
            if perm is None and keep_e is None:
                dx[a:b].addmm_(g_e, lora_A[e, :r], alpha=s)
                continue
            term = g_e @ lora_A[e, :r]
            if keep_e is not None:
                term = term * keep_e
            if perm is None:
                dx[a:b].add_(term, alpha=s * factor_of)
            else:
                dx.index_add_(0, rows, term, alpha=s * factor_of)
    return dx, d_a, d_b


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("peftkern::multi_lora_fwd", mutates_args=())
def multi_lora_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, adapter_index: torch.Tensor, scalings: list[float], ranks: list[int],
                   dropout_p: float, face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d [M, K], adapter_index int64 [M] -> (y [M, N], u [M, R] (kept for the backward), seed int64 [1])."""
    if face == "triton":
        return _triton_forward(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p)
    return torch_forward(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p)


@multi_lora_fwd.register_fake
def _(x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p, face):
    return (x2d.new_empty(x2d.shape[0], weight.shape[0]), x2d.new_empty(x2d.shape[0], lora_A.shape[1]),
            x2d.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("peftkern::multi_lora_bwd", mutates_args=())
def multi_lora_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                   lora_B: torch.Tensor, u: torch.Tensor, adapter_index: torch.Tensor, scalings: list[float],
                   ranks: list[int], dropout_p: float, seed: torch.Tensor, face: str,
                   need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [M, K] (empty [0, K] when not needed), dA [E, R, K], dB [E, N, R])."""
    args = (dy, x2d, weight, lora_A, lora_B, u, adapter_index, scalings, ranks, dropout_p, seed, need_dx)
    dx, d_a, d_b = _triton_backward(*args) if face == "triton" else torch_backward(*args)
    if dx is None:
        dx = x2d.new_empty(0, x2d.shape[1])
    return dx, d_a, d_b


@multi_lora_bwd.register_fake
def _(dy, x2d, weight, lora_A, lora_B, u, adapter_index, scalings, ranks, dropout_p, seed, face, need_dx):
    dx = x2d.new_empty(x2d.shape) if need_dx else x2d.new_empty(0, x2d.shape[1])
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, adapter_index, scalings, ranks, dropout_p, face = inputs
    _, u, seed = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x2d, weight, lora_A, lora_B, u, adapter_index, seed)
    ctx.scalings, ctx.ranks, ctx.dropout_p, ctx.face = scalings, ranks, dropout_p, face
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _du=None, _dseed=None):
    x2d, weight, lora_A, lora_B, u, adapter_index, seed = ctx.saved_tensors
    if dy is None:
        return (None,) * 10
    need_dx, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, d_a, d_b = torch.ops.peftkern.multi_lora_bwd(dy, x2d, weight, lora_A, lora_B, u, adapter_index, ctx.scalings,
                                                     ctx.ranks, ctx.dropout_p, seed, ctx.face, need_dx)
    d_weight = dy.t() @ x2d if need_w else None
    d_bias = dy.sum(0) if (need_b and ctx.has_bias) else None
    return (dx if need_dx else None, d_weight, d_bias, d_a if need_a else None, d_b if need_lb else None,
            None, None, None, None, None)


multi_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------

def _check(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, check_index):
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _checks.check_float(name, t)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
                       dtype=x.dtype)
    _checks.check_same(OP, {"x": x, "adapter_index": adapter_index})
    out_features, in_features = _checks.check_linear(OP, x, weight)
    if lora_A.dim() != 3 or lora_A.shape[0] == 0 or lora_A.shape[1] == 0:
        raise ValueError(f"{OP}: lora_A must be a stack [E, r, in] of E >= 1 adapters with r >= 1, "
                         f"got shape {tuple(lora_A.shape)}")
    n_adapters, rank = lora_A.shape[:2]
    _checks.check_shape(OP, "lora_A", lora_A, (n_adapters, rank, in_features), "[E, r, in]")
    _checks.check_shape(OP, "lora_B", lora_B, (n_adapters, out_features, rank),
                        f"[E, out, r] with E={n_adapters}, r={rank} from lora_A")
    if bias is not None:
        _checks.check_shape(OP, "bias", bias, (out_features,), "[out]")
    if len(scalings) != n_adapters:
        raise ValueError(f"{OP}: scalings has {len(scalings)} entries but lora_A stacks {n_adapters} adapters")
    if len(ranks) != n_adapters:
        raise ValueError(f"{OP}: ranks has {len(ranks)} entries but lora_A stacks {n_adapters} adapters")
    for e, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= rank:
            raise ValueError(f"{OP}: ranks[{e}] = {r!r}; each rank must be an integer in [1, {rank}] "
                             f"(the stack's padded rank)")
    if adapter_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{OP}: adapter_index must be an integer tensor, got {adapter_index.dtype}")
    lead = tuple(x.shape[:-1])
    if tuple(adapter_index.shape) != lead[:adapter_index.dim()] or adapter_index.dim() > len(lead):
        raise ValueError(f"{OP}: adapter_index has shape {tuple(adapter_index.shape)}; expected x's leading "
                         f"shape {lead} or a prefix of it (one adapter per row or per sequence)")
    if check_index and adapter_index.numel() and not torch.compiler.is_compiling():
        low, high = int(adapter_index.min()), int(adapter_index.max())
        if low < BASE or high >= n_adapters:
            raise ValueError(f"{OP}: adapter_index holds {low if low < BASE else high}; entries must be in "
                             f"[-1, {n_adapters}) (-1: the base alone, e: adapter e of the stack)")


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scalings, adapter_index: torch.Tensor, ranks=None,
                      dropout_p: float = 0.0, training: bool = False, check_index: bool = True) -> torch.Tensor:
    """y_i = x_i W^T + b + s_e (drop(x_i) A_e[:r_e]^T) B_e[:, :r_e]^T with e = adapter_index[i]
    (-1: y_i = x_i W^T + b), one pass over W for every adapter.

    x [..., in] (any strides), weight [out, in], bias [out] or None, lora_A [E, R, in] and
    lora_B [E, out, R] (adapter e's first ``ranks[e]`` ranks are real, default R for all), all one
    float dtype (fp32, fp16, bf16) and device; ``scalings``: E real numbers; ``adapter_index``:
    integer, shape x.shape[:-1] or a prefix of it (e.g. [batch] for x [batch, seq, in]: one adapter
    per sequence), values in [-1, E) (checked unless ``check_index=False``, a host sync on a GPU).
    Dropout (one p for every adapter, on the LoRA branches only) applies when ``training``.
    Returns [..., out] in x's dtype. Gradients flow to x, lora_A, lora_B (adapter e's from its own
    rows; zero on padded ranks and on adapters without rows), and to weight / bias when they
    require grad.
    """
    dropout_p = _checks.check_probability(OP, "dropout_p", dropout_p)
    scalings = [_checks.check_finite_scalar(OP, f"scalings[{e}]", s) for e, s in enumerate(scalings)]
    ranks = [lora_A.shape[1]] * lora_A.shape[0] if ranks is None else [int(r) if isinstance(r, torch.Tensor) else r
                                                                      for r in ranks]
    x, weight, bias, lora_A, lora_B = _checks.autocast_inputs(x, weight, bias, lora_A, lora_B)
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"{OP}: adapter_index must be an integer tensor, got {type(adapter_index).__name__}")
    _check(x, weight, bias, lora_A, lora_B, scalings, ranks, adapter_index, check_index)
    face = backend.pick(OP, FACES, x.device.type)
    p = dropout_p if training else 0.0
    lead = x.shape[:-1]
    index = row_index(adapter_index, tuple(lead))
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.ops.peftkern.multi_lora_fwd(x2d, weight, bias, lora_A, lora_B, index, scalings, ranks, p, face)[0]
    return y.view(*lead, weight.shape[0])
