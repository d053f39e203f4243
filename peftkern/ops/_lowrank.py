"""The low-rank core: the ``@triton.jit`` building blocks the LoRA, DoRA, NF4 and multi-adapter
LoRA kernels are made of (IA3 takes the tile order and the launch helpers), and the launch helpers
their launchers share (docs/ARCHITECTURE.md, "ops/"; docs/kernels.md, "The low-rank core").

Every name here is public on purpose: an op's kernels are compositions of these blocks, and no op
imports another op's private names. Features are constexpr flags (HAS_DROPOUT, COMPUTE_DX,
HAS_COL_SCALE, COL_SUMS), so each launch compiles only what it uses; a rank R = 0 (a row tile of
the base alone in a multi-adapter launch) makes every rank-r block do nothing.

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
* forward: :func:`produce_u` (the producer program: :func:`down_tile` per rank chunk, u stored,
  published); :func:`xwt_tile` (the dense base GEMM tile); :func:`published_rank_term` (wait, then
  :func:`rank_term`: acc += s u B^T over rank chunks after the K loop); :func:`finish_y` (+ bias,
  store).
* backward: :func:`produce_g` (the producer program: :func:`g_and_db` = g += dy' B and dB += s dy'^T u
  per N step (:func:`g_db_step`), published, dB's N chunks cast by :func:`cast_db_chunk`);
  :func:`dense_dx_tile` (the dx program over a dense W: :func:`dyw_tile`, then :func:`dx_and_da` =
  wait, + s keep (g A) (:func:`ga_term`), store, dA from x sub-tiles (:func:`da_from_x`), then
  :func:`cast_da_tile`). dy' is dy scaled per output column (:func:`scaled_dy`, HAS_COL_SCALE: DoRA's
  m / ||W + s B A||); COL_SUMS adds DoRA's column sums of dy and dy * y to the producer's N loop.
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
def scaled_dy(dy, col_scale_ptr, cols, col_ok, HAS_COL_SCALE: tl.constexpr):
    """dy [rows, cols] times a per-column fp32 scale (DoRA's m / ||W + s B A||), back in dy's dtype;
    dy itself without HAS_COL_SCALE (the pointer is then never read)."""
    if HAS_COL_SCALE:
        col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
        dy = (dy.to(tl.float32) * col_scale[None, :]).to(dy.dtype)
    return dy


@triton.jit
def dyw_tile(dy_ptr, w_ptr, col_scale_ptr, rows, row_ok, ks, k_ok, N, stride_dym, stride_dyn, stride_wn, stride_wk,
             HAS_COL_SCALE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_K] = dy'[rows] W[:, ks] over N (the backward's dx GEMM tile), dy' = dy
    scaled per column when HAS_COL_SCALE (:func:`scaled_dy`), dy otherwise."""
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy = tl.load(dy_rows + ns[None, :] * stride_dyn, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        dy = scaled_dy(dy, col_scale_ptr, ns, n_ok, HAS_COL_SCALE)
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
def store_tile(ptr, value, rows, row_ok, cols, col_ok, stride_r, stride_c):
    """ptr[rows, cols] = value in ptr's dtype (int64 row offsets), masked to real rows and columns."""
    tl.store(ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c,
             value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def produce_u(x_ptr, a_ptr, u_ptr, flag_ptr, rows, row_ok, K, R, U_COLS, stride_xm, stride_xk, stride_ar, stride_ak,
              stride_um, stride_ur, ticket, p, inv_keep, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """The forward's producer of a row tile: u[rows, :R] = drop(x[rows]) A^T / (1 - p) per rank chunk
    (:func:`down_tile`), zeros in u's columns R..U_COLS (an adapter stack's padding; none when
    U_COLS = R), then the tile's flag published (``flag_ptr``)."""
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        u = down_tile(x_ptr, a_ptr, rows, row_ok, ranks, ranks < R, K, stride_xm, stride_xk, stride_ar, stride_ak,
                      ticket, p, HAS_DROPOUT, PRECISION, BLOCK_M, BLOCK_K, BLOCK_R) * inv_keep
        store_tile(u_ptr, u, rows, row_ok, ranks, ranks < U_COLS, stride_um, stride_ur)
    for r0 in range(tl.cdiv(R, BLOCK_R) * BLOCK_R, U_COLS, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        store_tile(u_ptr, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), rows, row_ok, ranks, ranks < U_COLS,
                   stride_um, stride_ur)
    publish(flag_ptr, ticket)


@triton.jit
def finish_y(acc, y_ptr, bias_ptr, rows, row_ok, cols, col_ok, stride_ym, stride_yn):
    """y[rows, cols] = acc + b[cols] (fp32 accumulator; b's zeros when the layer has none)."""
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, rows, row_ok, cols, col_ok, stride_ym, stride_yn)


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
def published_rank_term(acc, flag_ptr, ticket, u_ptr, b_ptr, rows, row_ok, cols, col_ok, R, stride_um, stride_ur,
                        stride_bn, stride_br, scale, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """A GEMM tile's rank-r term: wait for its row tile's u (``flag_ptr``), then :func:`rank_term`.
    R = 0 (rows without an adapter): acc as it is, no wait."""
    if R > 0:
        wait_published(flag_ptr, ticket)
        acc = rank_term(acc, u_ptr, b_ptr, rows, row_ok, cols, col_ok, R, stride_um, stride_ur, stride_bn, stride_br,
                        scale, PRECISION, BLOCK_R)
    return acc


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
def g_and_db(dy_ptr, u_ptr, b_ptr, g_ptr, db_ptr, col_scale_ptr, y_ptr, dy_y_sum_ptr, dy_sum_ptr, rows, row_ok, N, R,
             DB_R, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br, stride_gm, stride_gr,
             stride_ym, stride_yn, db_scale, HAS_COL_SCALE: tl.constexpr, COL_SUMS: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The backward's producer over a row block, per rank chunk: g[rows] = dy' B (stored in g's dtype)
    and dB += db_scale * dy'^T u into the fp32 dB [N, DB_R] (atomics, :func:`g_db_step`), dy read
    once per rank chunk; dy' = dy scaled per column when HAS_COL_SCALE (:func:`scaled_dy`).
    COL_SUMS: also the column sums of dy * y[rows] and of dy over the row block, added (fp32
    atomics) into dy_y_sum [N] and dy_sum [N] from the first rank chunk's dy tiles (DoRA's
    magnitude and bias gradients). R = 0 stores nothing (a row tile without an adapter)."""
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
            g = g_db_step(g, scaled_dy(dy, col_scale_ptr, cols, col_ok, HAS_COL_SCALE), u, cols, col_ok, ranks,
                          rank_ok, b_ptr, db_ptr, stride_bn, stride_br, DB_R, db_scale, PRECISION)
            if COL_SUMS:
                if r0 == 0:
                    dyf = dy.to(tl.float32)
                    y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn,
                                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                    tl.atomic_add(dy_y_sum_ptr + cols, tl.sum(dyf * y, axis=0), mask=col_ok, sem="relaxed")
                    tl.atomic_add(dy_sum_ptr + cols, tl.sum(dyf, axis=0), mask=col_ok, sem="relaxed")
        store_tile(g_ptr, g, rows, row_ok, ranks, rank_ok, stride_gm, stride_gr)


@triton.jit
def cast_db_chunk(counter_ptr, arrivals, db_acc_ptr, db_ptr, cols, col_ok, R, copies, copy_stride,
                  BLOCK_R: tl.constexpr):
    """Count a producer into an N chunk of dB (rows ``cols``); the last of ``arrivals`` casts that
    chunk of the fp32 sums to dB's dtype in each of ``copies`` copies (adapters) of [N, R],
    ``copy_stride`` elements apart. Returns whether this program was the last."""
    last = last_arrival(counter_ptr, arrivals)
    if last:
        src = db_acc_ptr
        dst = db_ptr
        for _e in range(0, copies):
            for r0 in range(0, R, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                cast_tile(src, dst, cols.to(tl.int64)[:, None] * R + ranks[None, :],
                          col_ok[:, None] & (ranks[None, :] < R))
            src += copy_stride
            dst += copy_stride
    return last


@triton.jit
def produce_g(dy_ptr, u_ptr, b_ptr, g_ptr, db_sum_ptr, db_acc_ptr, db_ptr, flag_ptr, count_ptr, rows, row_ok, N, R,
              DB_R, copies, arrivals, stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br, stride_gm,
              stride_gr, db_scale, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """The backward's producer program of a row tile: g = dy B and dB += db_scale dy^T u into the fp32
    sums at ``db_sum_ptr`` (:func:`g_and_db`), the tile published (``flag_ptr``), then each N chunk
    counted in (``count_ptr``, one counter per chunk) and cast by the last of ``arrivals`` producers
    (:func:`cast_db_chunk`, ``copies`` adapters of [N, DB_R] from ``db_acc_ptr``)."""
    g_and_db(dy_ptr, u_ptr, b_ptr, g_ptr, db_sum_ptr, dy_ptr, dy_ptr, db_sum_ptr, db_sum_ptr, rows, row_ok, N, R, DB_R,
             stride_dym, stride_dyn, stride_um, stride_ur, stride_bn, stride_br, stride_gm, stride_gr, stride_dym,
             stride_dyn, db_scale, False, False, PRECISION, BLOCK_M, BLOCK_N, BLOCK_R)
    publish(flag_ptr, 0)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cast_db_chunk(count_ptr + n0 // BLOCK_N, arrivals, db_acc_ptr, db_ptr, cols, cols < N, DB_R, copies,
                      N * DB_R, BLOCK_R)


@triton.jit
def cast_da_tile(counter_ptr, arrivals, da_acc_ptr, da_ptr, ks, k_ok, K, R, copies, BLOCK_R: tl.constexpr):
    """Count a dx tile into dA's column tile ``ks``; the last of ``arrivals`` casts those columns of
    the fp32 sums [copies, R, K] (contiguous) to dA's dtype, in every copy (adapter)."""
    if last_arrival(counter_ptr, arrivals):
        src = da_acc_ptr
        dst = da_ptr
        for _e in range(0, copies):
            for r0 in range(0, R, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                cast_tile(src, dst, ranks.to(tl.int64)[:, None] * K + ks[None, :], (ranks[:, None] < R) & k_ok[None, :])
            src += R * K
            dst += R * K


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


@triton.jit
def dx_and_da(acc, dx_ptr, x_ptr, g_ptr, a_ptr, da_sum_ptr, flag_ptr, rows, row_ok, ks, k_ok, k_first, K, R,
              stride_xm, stride_xk, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, scale,
              HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_R: tl.constexpr):
    """A dx tile's rank-r work, once its row tile's g is published (``flag_ptr``, ticket 0): with
    COMPUTE_DX, dx[rows, ks] = acc + scale * keep * (g A[:, ks]) (:func:`ga_term`; the mask applies
    to the rank-r term only) is stored; then dA[:, ks] += scale * g^T (keep * x) into the fp32 sums
    at ``da_sum_ptr`` [R, K] (:func:`da_from_x`). R = 0 (rows without an adapter): dx = acc, no dA."""
    wait_published(flag_ptr, 0)
    if COMPUTE_DX:
        if R > 0:
            if HAS_DROPOUT:
                lora = ga_term(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), g_ptr, a_ptr, rows, row_ok, ks, k_ok, R,
                               stride_gm, stride_gr, stride_ar, stride_ak, scale, PRECISION, BLOCK_R)
                acc += tl.where(keep_mask(seed, rows, ks, p), lora, 0.0)
            else:
                acc = ga_term(acc, g_ptr, a_ptr, rows, row_ok, ks, k_ok, R, stride_gm, stride_gr, stride_ar, stride_ak,
                              scale, PRECISION, BLOCK_R)
        store_tile(dx_ptr, acc, rows, row_ok, ks, k_ok, stride_dxm, stride_dxk)
    if R > 0:
        da_from_x(da_sum_ptr, x_ptr, g_ptr, rows, row_ok, k_first, K, R, stride_xm, stride_xk, stride_gm, stride_gr,
                  seed, p, scale, HAS_DROPOUT, PRECISION, BLOCK_K, BLOCK_DA, BLOCK_R)


@triton.jit
def dense_dx_tile(dy_ptr, w_ptr, col_scale_ptr, dx_ptr, x_ptr, g_ptr, a_ptr, da_sum_ptr, da_acc_ptr, da_ptr, flag_ptr,
                  counter_ptr, arrivals, rows, row_ok, tile_k, N_GEMM, K, R, DA_R, copies, stride_dym, stride_dyn,
                  stride_wn, stride_wk, stride_xm, stride_xk, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm,
                  stride_dxk, seed, p, scale, HAS_COL_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_R: tl.constexpr):
    """A dx tile program over a dense W, column tile ``tile_k``: dx = dy' W[:, ks] over N_GEMM
    (:func:`dyw_tile`; 0 skips the GEMM for a tile without rows) with COMPUTE_DX, then
    :func:`dx_and_da` (the rank-r term, dA into ``da_sum_ptr``) and :func:`cast_da_tile` (dA's
    columns cast by the last of ``arrivals`` tiles, ``copies`` adapters of [DA_R, K])."""
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if COMPUTE_DX:
        acc = dyw_tile(dy_ptr, w_ptr, col_scale_ptr, rows, row_ok, ks, k_ok, N_GEMM, stride_dym, stride_dyn, stride_wn,
                       stride_wk, HAS_COL_SCALE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    dx_and_da(acc, dx_ptr, x_ptr, g_ptr, a_ptr, da_sum_ptr, flag_ptr, rows, row_ok, ks, k_ok, tile_k * BLOCK_K, K, R,
              stride_xm, stride_xk, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk, seed, p, scale,
              HAS_DROPOUT, COMPUTE_DX, PRECISION, BLOCK_M, BLOCK_K, BLOCK_DA, BLOCK_R)
    cast_da_tile(counter_ptr, arrivals, da_acc_ptr, da_ptr, ks, k_ok, K, DA_R, copies, BLOCK_R)


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
