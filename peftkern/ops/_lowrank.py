"""The low-rank core: the ``@triton.jit`` building blocks the LoRA, DoRA and NF4 kernels are made
of, and the launch helpers their launchers share (docs/ARCHITECTURE.md, "ops/").

Every name here is public on purpose: an op's kernels are compositions of these blocks, and no op
imports another op's private names.

The blocks, in the order a LoRA step uses them:

* :func:`keep_mask` (with :func:`mix32`): the inverted-dropout keep mask of x, a counter-based hash
  of (seed, row, column) drawn in registers and never stored; forward and backward redraw the same
  mask. ``peftkern.reference.lora.dropout_keep_mask`` is the same hash in torch ops, so both faces
  drop the same elements for the same seed.
* :func:`producer_tile`: program id -> (producer?, row tile, column tile). A launch holds, per group
  of GROUP_M row tiles, first one *producer* program per row tile (the skinny rank-r work of that
  row tile) and then the group's GEMM tiles, grouped so neighbours share L2. :func:`grouped_tile` is
  the same order without producers.
* :func:`publish` / :func:`wait_published`: a producer announces that its row tile's rank-r
  activation (u in the forward, g = dy B in the backward) is in memory; a GEMM tile waits for it in
  its epilogue, after the main loop, when the producer (dispatched before it) is long done. Waits
  only ever point at programs with a lower id, so they never deadlock; the flags live in a
  per-launch buffer (:func:`flag_buffer`).
* :func:`down_tile`: drop(x[rows]) A^T in fp32 (the producer of the forward).
* :func:`rank_term`: acc += s u[rows] B[cols]^T over rank chunks, the rank-r term added to a GEMM
  accumulator after its K loop.
* :func:`g_db_step`: one N step of the backward's producer: g += dy B, and dB += s dy^T u (atomics).
* :func:`g_and_db`: the backward's whole producer over a row block (g stored, dB accumulated).
* :func:`xwt_tile` / :func:`dyw_tile`: the dense base GEMM tiles, x W^T over K and dy W over N.
* :func:`ga_term`: acc += s g[rows] A[:, ks], the rank-r term of dx.
* :func:`da_from_x`: dA[:, ks] += s g^T (keep * x) from x sub-tiles (atomics).
* :func:`last_arrival` and :func:`cast_tile`: fp32 atomic accumulators are cast to the output dtype
  by the last program that adds into them, so no cast launch follows.

Row offsets are computed in int64 (``rows.to(tl.int64) * stride``): rows x stride exceeds 2^31 for
a 128k-vocabulary head from ~16.7k tokens. Column offsets stay int32 (they are < 2^31 at every
documented shape, see docs/kernels.md).
"""
from __future__ import annotations

import torch

from peftkern.ops._triton import tl, triton

# ---------------------------------------------------------------------------------------------
# dropout: the keep-mask hash
# ---------------------------------------------------------------------------------------------


@triton.jit
def mix32(h):
    """Murmur3's 32-bit finalizer: a cheap bijective avalanche on uint32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(seed, rows, cols, p):
    """Inverted-dropout keep mask (bool [len(rows), len(cols)]) for x[rows, cols]: the hash of
    (seed, row, col) mapped to [0, 1) with 24 bits and compared with p. A hash rather than Philox:
    one uint32 per element, so a 128x128 tile draws its mask without spilling."""
    row_hash = mix32(rows.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32))
    h = mix32(row_hash[:, None] ^ (cols.to(tl.uint32) * 0x7FEB352D)[None, :])
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p


# ---------------------------------------------------------------------------------------------
# tile order and the producer -> GEMM-tile hand-off
# ---------------------------------------------------------------------------------------------


@triton.jit
def grouped_tile(pid, rows_total, cols_total, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
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
def producer_tile(pid, tiles_r, tiles_c, GROUP: tl.constexpr):
    """Program id -> (is_producer, row tile, col tile) for a launch of ``tiles_r * (1 + tiles_c)``
    programs: per group of GROUP row tiles, first one producer per row tile (col tile 0), then the
    group's GEMM tiles in grouped order. Every GEMM tile's producer has a lower program id."""
    span = GROUP * (1 + tiles_c)
    group = pid // span
    local = pid % span
    first = group * GROUP
    size = tl.minimum(tiles_r - first, GROUP)
    is_producer = local < size
    gemm = tl.maximum(local - size, 0)
    tile_r = tl.where(is_producer, first + local, first + gemm % size)
    tile_c = tl.where(is_producer, 0, gemm // size)
    return is_producer, tile_r, tile_c


@triton.jit
def publish(flag_ptr, ticket):
    """Announce that everything this program stored before is visible: the flag becomes
    ``ticket + 1`` (release, after a barrier so every thread's stores are ordered before it)."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, ticket + 1, sem="release")


@triton.jit
def wait_published(flag_ptr, ticket):
    """Spin until the flag reads ``ticket + 1`` (acquire). Only ever called on a flag a program of a
    lower id publishes; read what it published with ``cache_modifier=".cg"`` (not through L1)."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while seen != ticket + 1:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def last_arrival(counter_ptr, total):
    """Count this program in (acq_rel, after a barrier) and return whether it is the ``total``-th,
    the last to add into what the counter guards: that program then reads the complete sums."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == total - 1


@triton.jit
def cast_tile(src_ptr, dst_ptr, offsets, mask):
    """dst[offsets] = src[offsets] (fp32 sums, read past L1) in dst's dtype."""
    value = tl.load(src_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(dst_ptr + offsets, value.to(dst_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# the dense base GEMM tiles
# ---------------------------------------------------------------------------------------------


@triton.jit
def xwt_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, K, stride_xm, stride_xk, stride_wn, stride_wk,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = x[rows] W[cols]^T over K (the forward's base GEMM tile)."""
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wk, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def dyw_tile(dy_ptr, w_ptr, rows, row_ok, ks, k_ok, N, stride_dym, stride_dyn, stride_wn, stride_wk,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_K] = dy[rows] W[:, ks] over N (the backward's dx GEMM tile)."""
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy = tl.load(dy_rows + ns[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ns.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    return acc


# ---------------------------------------------------------------------------------------------
# the rank-r tile math
# ---------------------------------------------------------------------------------------------


@triton.jit
def down_tile(x_ptr, a_ptr, rows, row_ok, ranks, rank_ok, K, stride_xm, stride_xk, stride_ar, stride_ak, seed, p,
              HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R] = (keep * x[rows]) A[ranks]^T, x read once (unscaled: the caller
    multiplies by 1 / (1 - p) and whatever else)."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_rows = a_ptr + ranks.to(tl.int64)[:, None] * stride_ar
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, cols, p), x, 0.0).to(x.dtype)
        a = tl.load(a_rows + cols[None, :] * stride_ak, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
    return acc


@triton.jit
def rank_term(acc, u_ptr, b_ptr, rows, row_ok, cols, col_ok, R, stride_um, stride_ur, stride_bn, stride_br, scale,
              PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale * u[rows] B[cols]^T over rank chunks of BLOCK_R: one more short K-step into the
    GEMM's accumulator, as ((acc / s) + u B^T) * s in fp32. So the scale touches neither u (which
    may sit near its 16-bit dtype's range) nor a 16-bit B tile (no extra rounding), and the dot's
    operands stay as loaded. The launcher keeps s in [2^-64, 2^64] (:func:`scale_fits_kernels`).
    u is read past L1 (a producer wrote it)."""
    u_rows = u_ptr + rows.to(tl.int64)[:, None] * stride_um
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_bn
    acc = acc * (1.0 / scale)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        u = tl.load(u_rows + ranks[None, :] * stride_ur, mask=row_ok[:, None] & rank_ok[None, :], other=0.0,
                    cache_modifier=".cg")
        b = tl.load(b_rows + ranks[None, :] * stride_br, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def g_db_step(g, dy, u, cols, col_ok, ranks, rank_ok, b_ptr, db_ptr, stride_bn, stride_br, R, db_scale,
              PRECISION: tl.constexpr):
    """One N step of the backward's producer over a row block: returns g + dy B[cols, ranks], and adds
    db_scale * dy^T u into the fp32 dB[cols, ranks] (atomics; dB is [N, R] contiguous)."""
    b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
    g = tl.dot(dy, b, g, input_precision=PRECISION)
    part = tl.dot(tl.trans(dy), u, input_precision=PRECISION) * db_scale
    tl.atomic_add(db_ptr + cols.to(tl.int64)[:, None] * R + ranks[None, :], part,
                  mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")
    return g


@triton.jit
def g_and_db(dy_ptr, u_ptr, b_ptr, g_ptr, db_ptr, rows, row_ok, N, R, DB_R, stride_dym, stride_dyn, stride_um,
             stride_ur, stride_bn, stride_br, stride_gm, stride_gr, db_scale, PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The backward's producer over a row block, per rank chunk: g[rows] = dy B (stored in g's dtype)
    and dB += db_scale * dy^T u into the fp32 dB [N, DB_R] (atomics, :func:`g_db_step`), dy read
    once per rank chunk."""
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        u = tl.load(u_ptr + rows.to(tl.int64)[:, None] * stride_um + ranks[None, :] * stride_ur,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            dy = tl.load(dy_rows + cols[None, :] * stride_dyn, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            g = g_db_step(g, dy, u, cols, col_ok, ranks, rank_ok, b_ptr, db_ptr, stride_bn, stride_br, DB_R, db_scale,
                          PRECISION)
        tl.store(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + ranks[None, :] * stride_gr,
                 g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def ga_term(acc, g_ptr, a_ptr, rows, row_ok, ks, k_ok, R, stride_gm, stride_gr, stride_ar, stride_ak, scale,
            PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale * g[rows] A[:, ks] over rank chunks: the rank-r term of dx, as in :func:`rank_term`
    (((acc / s) + g A) * s in fp32). g is read past L1 (a producer wrote it)."""
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    acc = acc * (1.0 / scale)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        g = tl.load(g_rows + ranks[None, :] * stride_gr, mask=row_ok[:, None] & rank_ok[None, :], other=0.0,
                    cache_modifier=".cg")
        a = tl.load(a_ptr + ranks.to(tl.int64)[:, None] * stride_ar + ks[None, :] * stride_ak,
                    mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, a, acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def da_from_x(da_ptr, x_ptr, g_ptr, rows, row_ok, k_first, K, R, stride_xm, stride_xk, stride_gm, stride_gr,
              seed, p, scale, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_DA: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA[:, k_first:k_first+BLOCK_K] += scale * g[rows]^T (keep * x[rows, ...]) into the fp32
    dA [R, K] (contiguous; atomics), from x sub-tiles of BLOCK_DA columns, so the mask and the x tile
    never hold a whole [rows, BLOCK_K] tile of registers beside anything else."""
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gm
    for kk in range(0, BLOCK_K, BLOCK_DA):
        sub = k_first + kk + tl.arange(0, BLOCK_DA)
        sub_ok = sub < K
        x = tl.load(x_rows + sub[None, :] * stride_xk, mask=row_ok[:, None] & sub_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, sub, p), x, 0.0).to(x.dtype)
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < R
            g = tl.load(g_rows + ranks[None, :] * stride_gr, mask=row_ok[:, None] & rank_ok[None, :], other=0.0,
                        cache_modifier=".cg")
            part = tl.dot(tl.trans(g), x, input_precision=PRECISION) * scale
            tl.atomic_add(da_ptr + ranks.to(tl.int64)[:, None] * K + sub[None, :], part,
                          mask=rank_ok[:, None] & sub_ok[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

META_KEYS = ("num_warps", "num_stages")


def split_config(config: dict) -> tuple[dict, dict]:
    """A kernel config -> (constexpr block sizes, launch meta: num_warps / num_stages)."""
    meta = {k: v for k, v in config.items() if k in META_KEYS}
    return {k: v for k, v in config.items() if k not in META_KEYS}, meta


def lora_fwd_config(dtype: torch.dtype) -> dict:
    """The LoRA forward's tiles (GEMM and producers alike): 128x128x64 for 16-bit inputs, 128x64x16
    for fp32 (tf32 operands need twice the registers; K steps of 32 spilled 16 bytes under Triton 3.6)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def lora_bwd_config(dtype: torch.dtype, block_r: int, dropout: bool, compute_dx: bool) -> dict:
    """The LoRA backward's tiles: dx tiles BLOCK_M x BLOCK_K over N steps of BLOCK_N (the producers'
    N step too). 16-bit: 128x128 over 8 warps; without dx (dA only) at rank chunk 16 over 4 warps (8
    left ptxas at 128 registers with a spill on sm_80); with dropout at rank chunk 64, 64-row tiles
    (the masked g A term needs a second tile of registers)."""
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 3}
    cfg = {"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_DA": 32, "GROUP_M": 8, "num_warps": 8,
           "num_stages": 3}
    if not compute_dx and block_r == 16:
        cfg["num_warps"] = 4
    if compute_dx and dropout and block_r == 64:
        cfg["BLOCK_M"] = 64
    return cfg


def rank_blocks(dtype: torch.dtype) -> tuple[int, ...]:
    """The rank chunks a dtype's kernels are compiled for: tl.dot needs >= 16; 16-bit inputs take
    16 or 64 (the rank-r tiles stay in registers beside the accumulator); fp32, whose dots hold
    far more registers, loops over chunks of 16 at every rank (32 spilled on sm_80)."""
    return (16,) if dtype == torch.float32 else (16, 64)


def rank_block(rank: int, dtype: torch.dtype) -> int:
    """The rank chunk for ``rank``: the smallest compiled one that holds it, else the largest (looped)."""
    blocks = rank_blocks(dtype)
    return next((b for b in blocks if rank <= b), blocks[-1])


def scale_fits_kernels(scale: float) -> bool:
    """Whether the kernels can apply ``scale`` to a rank-r term (they divide the accumulator by it
    and multiply back in fp32): nonzero and within [2^-64, 2^64]. A launcher runs the torch face
    for any other scale (0 included: the adapter then adds nothing)."""
    return 2.0 ** -64 <= abs(scale) <= 2.0 ** 64


def i32(*names) -> dict:
    """Signature entries for ``KernelSpec``: every name an int32 scalar."""
    return {name: "i32" for name in names}


def flag_buffer(tiles: int, dropout_p: float, device) -> torch.Tensor:
    """int64 [1 + tiles]: entry 0 is the launch's ticket (and its dropout seed), entries 1.. the
    producers' flags, each set to ticket + 1 once its row tile is published.

    One launch makes it: zeros without dropout (ticket 0), and with dropout ``random_`` from torch's
    generator (a fresh seed, reproducible under ``torch.manual_seed`` and CUDA-graph safe), where
    a flag starts equal to ticket + 1 with probability 2^-63 (the draws are independent)."""
    buf = torch.empty(1 + tiles, dtype=torch.int64, device=device)
    return buf.random_() if dropout_p > 0.0 else buf.zero_()


_ZEROS: dict = {}


def bias_or_zeros(bias: torch.Tensor | None, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``bias``, or a read-only zero vector of ``n`` entries: the GEMM epilogues always add a bias,
    so no kernel needs a with/without-bias variant. The zeros are made once per device and dtype
    (grown to the next power of two when a wider layer comes), not per call."""
    if bias is not None:
        return bias
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    zeros = _ZEROS.get(key)
    if zeros is None or zeros.numel() < n:
        zeros = _ZEROS[key] = torch.zeros(max(1024, triton.next_power_of_2(n)), dtype=dtype, device=device)
    return zeros[:n]


def draw_seed(device) -> torch.Tensor:
    """int64 [1]: a dropout seed from torch's generator for ``device`` (no host sync)."""
    return torch.empty(1, dtype=torch.int64, device=device).random_()
