"""Per-token log-probs through the output head without building the [tokens, V] logits of a batch,
and losses over them whose gradients are formed in the forward pass.

logits = h W^T + b + u B^T with u = s * h A^T (a LoRA on the head; u is formed outside the ops, so
autograd carries its gradient on to h and A), z = logits / T, and per token:
logp = z[target] - lse(z), entropy = lse - sum_j p_j z_j, mean_logp = mean_j z_j - lse.
Given coefficients d_logp, d_ent, d_mean per token, the gradient of the logits is

    G = dlogp * (onehot - p) - dent * p * (z - lse + entropy) + dmean * (1/V - p),  scaled by 1/T

and dh = G W, dW = G^T h, db = sum_rows G, du = G B, dB = G^T u.

Two registered ops:
* ``linear_logprobs_fwd`` -> (logp, entropy, mean_logp, lse) for any use of the log-probs. Only the
  per-token statistics are kept; the backward recomputes each chunk's logits (four vocabulary
  GEMMs). This is the path for losses that are not a sum over independent units (see
  docs/losses.md).
* ``linear_unit_loss`` -> the value of a registered per-unit loss (``peftkern.ops.logprob_units``)
  and its gradients, all formed in the forward: for each chunk of whole units the logits are
  computed once, the loss gives d value / d statistics, G is formed in place and multiplied out
  (three vocabulary GEMMs, the floor). Its backward only scales the stored gradients.

Faces, both behind the same plan of chunks:
* torch (the CPU face): a [chunk, V] fp32 block per chunk, only the tokens whose target is kept.
* triton: a logits kernel per (token tile, vocab tile) that stores the chunk's fp32 logits and the
  tile's softmax partials, a softmax-gradient kernel that turns each tile into G (masked by the live
  rows), and one products kernel whose programs compute dh = G W and dW += G^T h tiles, each output
  tile owned by one program (no atomics but the bias column sums). The statistics-only forward is
  one kernel with an online log-sum-exp (no logits stored).

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, the shared chunk engine,
registered ops and autograd, public entry points.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton
from peftkern.ops.launch import device_guard, matmul_precision
from peftkern.ops.logprob_units import UnitChunk, UnitGrads, plan_compact, plan_dense, unit_loss

OP = "fused_linear_logprobs"
FACES = ("torch", "triton")

# The torch face's [chunk, V] fp32 workspace scales with the call (docs/losses.md, "Faces and chunks"):
# 1 / CHUNK_FRACTION of its tokens (so the workspace is at most 1/8 of the [tokens, V] logits the naive
# path builds, whose peak holds about 2.9 of those), rounded down to a power of two, at least
# MIN_CHUNK_ROWS (shorter GEMMs leave the cores idle and re-read dW once per chunk), at most
# CHUNK_ELEMENTS (per torch thread count; benchmarks/bench_losses.py on a 2-core CPU at V = 32000,
# H = 512) elements; a unit loss's chunk also grows to its largest unit when that fits the cap (a
# split unit pays one more logits GEMM per block).
CHUNK_ELEMENTS = {1: 1 << 24, 2: 1 << 24}
CHUNK_FRACTION = 8
MIN_CHUNK_ROWS = 64
# fp32 logits elements per chunk of the Triton face (the stored logits plus G in the compute dtype):
# 2^28 = 1 GiB of logits, 8192 tokens at V = 32000 and 2048 at V = 128256.
TRITON_CHUNK_ELEMENTS = 1 << 28


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, row_ok, col_ok, H, R,
                stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br, inv_temp,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = (h W^T + b + u B^T) / T for these rows (int64) and columns, fp32."""
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & (ks[None, :] < H), other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(u_ptr + rows[:, None] * stride_un + rs[None, :] * stride_ur,
                        mask=row_ok[:, None] & (rs[None, :] < R), other=0.0)
            b = tl.load(b_ptr + cols64[:, None] * stride_bv + rs[None, :] * stride_br,
                        mask=col_ok[:, None] & (rs[None, :] < R), other=0.0)
            acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _logprobs_fwd_kernel(rows_ptr, h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, tgt_ptr, logp_ptr, ent_ptr, mean_ptr,
                         lse_ptr, C, V, H, R, ignore_index,
                         stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                         inv_temp,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ENTROPY: tl.constexpr, MEAN: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per BLOCK_N of the C listed rows: online (max, sum of exp) over vocabulary tiles,
    the target's logit picked on the way; a block whose targets are all ignored computes nothing.
    Outputs are indexed by list position (0 .. C - 1)."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = local < C
    rows = tl.load(rows_ptr + local, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, valid, col_ok, H, R,
                            stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                            inv_temp, HAS_BIAS, HAS_LORA, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_R)
            z_ok = tl.where(col_ok[None, :], z, 0.0)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            if ENTROPY:
                pz = pz * alpha + tl.sum(e * z_ok, axis=1)
            if MEAN:
                z_sum += tl.sum(z_ok, axis=1)
            z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z_ok, 0.0), axis=1)
            m = m_new
    s = tl.where(valid, s, 1.0)  # blocks skipped above keep (m, s) = (-inf, 0): no log(0) below
    lse = tl.where(valid, tl.where(valid, m, 0.0) + tl.log(s), 0.0)
    tl.store(lse_ptr + local, lse, mask=row_ok)
    tl.store(logp_ptr + local, tl.where(valid, z_tgt - lse, 0.0), mask=row_ok)
    if ENTROPY:
        tl.store(ent_ptr + local, tl.where(valid, lse - pz / s, 0.0), mask=row_ok)
    if MEAN:
        tl.store(mean_ptr + local, tl.where(valid, z_sum / V - lse, 0.0), mask=row_ok)


@triton.jit
def _logits_kernel(rows_ptr, h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, tgt_ptr, z_ptr, part_ptr,
                   C, V, H, R, NV, ignore_index,
                   stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br, inv_temp,
                   HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (BLOCK_N listed rows, BLOCK_V vocabulary columns): the logit tile, stored to the
    chunk's fp32 logits z [C, V], and with STATS the tile's softmax partials per row
    (max, sum exp(z - max), sum exp(z - max) z, sum z) into part [C, NV, 4]. Tiles whose rows all have
    ignored targets are skipped (nothing stored: the gradient kernel never reads them)."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = local < C
    col_ok = cols < V
    rows = tl.load(rows_ptr + local, mask=row_ok, other=0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    live = row_ok & (tgt != ignore_index)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        z = _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, live, col_ok, H, R,
                        stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                        inv_temp, HAS_BIAS, HAS_LORA, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_R)
        local64 = local.to(tl.int64)
        tl.store(z_ptr + local64[:, None] * V + cols[None, :], z, mask=live[:, None] & col_ok[None, :])
        if STATS:
            zm = tl.where(col_ok[None, :], z, float("-inf"))
            m = tl.max(zm, axis=1)
            e = tl.exp(zm - m[:, None])
            z_ok = tl.where(col_ok[None, :], z, 0.0)
            base = part_ptr + (local64 * NV + tl.program_id(1)) * 4
            tl.store(base, m, mask=live)
            tl.store(base + 1, tl.sum(e, axis=1), mask=live)
            tl.store(base + 2, tl.sum(e * z_ok, axis=1), mask=live)
            tl.store(base + 3, tl.sum(z_ok, axis=1), mask=live)


@triton.jit
def _softmax_grad_kernel(z_ptr, g_ptr, tgt_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, dmean_ptr, db_ptr, C, V,
                         inv_temp, ENTROPY: tl.constexpr, MEAN: tl.constexpr, NEED_DB: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per (BLOCK_N chunk rows, BLOCK_V columns): G from the stored logits, written in the
    compute dtype (in place when that is fp32). ``tgt`` [C] holds each chunk row's target or -1 when
    ignored; only rows with a target and a non-zero coefficient are live: every other row is written
    as zeros and never exponentiated (a padding row's large logit must not make inf * 0 = NaN)."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = local < C
    col_ok = cols < V
    tgt = tl.load(tgt_ptr + local, mask=row_ok, other=-1)
    dl = tl.load(dlogp_ptr + local, mask=row_ok, other=0.0)
    dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    de = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if MEAN:
        dm = tl.load(dmean_ptr + local, mask=row_ok, other=0.0)
    if ENTROPY:
        de = tl.load(dent_ptr + local, mask=row_ok, other=0.0)
    live = row_ok & (tgt >= 0) & ((dl != 0.0) | (dm != 0.0) | (de != 0.0))
    keep = live[:, None] & col_ok[None, :]
    local64 = local.to(tl.int64)
    offs = local64[:, None] * V + cols[None, :]
    g = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        z = tl.load(z_ptr + offs, mask=keep, other=0.0)
        lse = tl.load(lse_ptr + local, mask=live, other=0.0)
        p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)
        g = -p * (dl + dm)[:, None]
        if ENTROPY:
            ent = tl.load(ent_ptr + local, mask=live, other=0.0)
            g -= de[:, None] * p * (z - lse[:, None] + ent[:, None])
        if MEAN:
            g += dm[:, None] / V
        g += tl.where(cols[None, :] == tgt[:, None], dl[:, None], 0.0)
        g = tl.where(keep, g * inv_temp, 0.0)
    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _grad_products_kernel(g_ptr, y_ptr, x_ptr, rows_ptr, dx_ptr, dy_ptr, C, V, K, n_dx,
                          stride_yv, stride_yk, stride_xn, stride_xk,
                          NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both products of G [C, V] (chunk rows, listed by ``rows``): programs 0 .. n_dx - 1 each own a
    (BLOCK_N rows, BLOCK_K) tile of dx = G Y [rows, K] (fp32, written once); the rest each own a
    (BLOCK_V, BLOCK_K) tile of dy += G^T X[rows] [V, K] (fp32, read-modify-write once per chunk).
    With (Y, X) = (W, h) these are dh and dW, with (B, u) the head LoRA's du and dB. Every output
    tile has one owner, so no atomics."""
    pid = tl.program_id(0)
    n_k = tl.cdiv(K, BLOCK_K)
    if NEED_DX and pid < n_dx:
        local = (pid // n_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = (pid % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = local < C
        k_ok = ks < K
        local64 = local.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            v_ok = vs < V
            g = tl.load(g_ptr + local64[:, None] * V + vs[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
            y = tl.load(y_ptr + vs.to(tl.int64)[:, None] * stride_yv + ks[None, :] * stride_yk,
                        mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(g, y, acc, input_precision=PRECISION)
        rows = tl.load(rows_ptr + local, mask=row_ok, other=0)
        tl.store(dx_ptr + rows[:, None] * K + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])
    elif NEED_DY:
        q = pid - n_dx
        vs = (q // n_k) * BLOCK_V + tl.arange(0, BLOCK_V)
        ks = (q % n_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        v_ok = vs < V
        k_ok = ks < K
        acc = tl.zeros((BLOCK_V, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, C, BLOCK_N):
            local = n0 + tl.arange(0, BLOCK_N)
            row_ok = local < C
            rows = tl.load(rows_ptr + local, mask=row_ok, other=0)
            g = tl.load(g_ptr + local.to(tl.int64)[:, None] * V + vs[None, :], mask=row_ok[:, None] & v_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        offs = vs.to(tl.int64)[:, None] * K + ks[None, :]
        mask = v_ok[:, None] & k_ok[None, :]
        tl.store(dy_ptr + offs, tl.load(dy_ptr + offs, mask=mask, other=0.0) + acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _stats_config(dtype: torch.dtype) -> dict:
    """Tiles (tokens x vocabulary columns x hidden step) of the two logits kernels, chosen so that
    every variant compiles without register spills for sm_80 and sm_90 under Triton 3.6 and 3.9
    (``peftkern kernels``)."""
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_H": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}


def _grad_config(dtype: torch.dtype) -> dict:
    return {"BLOCK_N": 32, "BLOCK_V": 128, "num_warps": 4, "num_stages": 1}


def _products_config(dtype: torch.dtype, k: int) -> dict:
    block_k = min(64, max(16, triton.next_power_of_2(max(k, 1))))
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 3}


BLOCK_R = 16  # LoRA rank step (tl.dot's minimum); larger ranks loop, so one config serves every rank


def _split(config: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    return {k: v for k, v in config.items() if k not in meta}, meta


class Stats(NamedTuple):
    """Per-token statistics of some rows, fp32: logp, entropy (or None), mean_logp (or None), lse."""

    logp: torch.Tensor
    ent: torch.Tensor | None
    mean: torch.Tensor | None
    lse: torch.Tensor


class Coefs(NamedTuple):
    """d loss / d (logp, entropy, mean_logp) per row, fp32 [n]; 0 on ignored rows. None: all zero."""

    d_logp: torch.Tensor
    d_ent: torch.Tensor | None
    d_mean: torch.Tensor | None


class _TritonHead:
    """The head's tensors as the kernels take them, and the per-block steps of the Triton face."""

    def __init__(self, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature):
        self.hidden, self.weight, self.bias, self.lora_u, self.lora_B = hidden, weight, bias, lora_u, lora_B
        self.targets, self.ignore_index, self.inv_temp = targets, ignore_index, 1.0 / temperature
        self.V, self.H = weight.shape
        self.R = lora_u.shape[1] if lora_u is not None else 0
        self.dtype = hidden.dtype
        self.precision = matmul_precision(hidden.dtype)
        u, b = (lora_u, lora_B) if lora_u is not None else (hidden, hidden)
        self.args = (hidden, weight, bias if bias is not None else hidden, u, b)
        self.strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                        u.stride(0) if lora_u is not None else 0, u.stride(1) if lora_u is not None else 0,
                        b.stride(0) if lora_u is not None else 0, b.stride(1) if lora_u is not None else 0)
        self.flags = {"HAS_BIAS": bias is not None, "HAS_LORA": lora_u is not None, "PRECISION": self.precision,
                      "BLOCK_R": BLOCK_R}

    def _f32(self, *shape):
        return torch.empty(shape, dtype=torch.float32, device=self.hidden.device)

    def stats(self, rows, want_ent, want_mean) -> Stats:
        """Statistics of the listed rows (int64 [C]) without storing logits."""
        C = rows.shape[0]
        logp, lse = self._f32(C), self._f32(C)
        ent, mean = self._f32(C if want_ent else 0), self._f32(C if want_mean else 0)
        if C:
            cfg, meta = _split(_stats_config(self.dtype))
            with device_guard(self.hidden):
                _logprobs_fwd_kernel[(triton.cdiv(C, cfg["BLOCK_N"]),)](
                    rows, *self.args, self.targets, logp, ent if want_ent else logp, mean if want_mean else logp,
                    lse, C, self.V, self.H, self.R, self.ignore_index, *self.strides, self.inv_temp,
                    ENTROPY=want_ent, MEAN=want_mean, **self.flags, **cfg, **meta)
        return Stats(logp, ent if want_ent else None, mean if want_mean else None, lse)

    def logits(self, rows, want_stats, want_ent=False, want_mean=False):
        """(z [C, V] fp32 of the listed rows, Stats or None). Rows with an ignored target hold garbage."""
        C, V = rows.shape[0], self.V
        cfg, meta = _split(_stats_config(self.dtype))
        nv = triton.cdiv(V, cfg["BLOCK_V"])
        z = self._f32(C, V)
        part = self._f32(C, nv, 4) if want_stats else z
        if C:
            with device_guard(self.hidden):
                _logits_kernel[(triton.cdiv(C, cfg["BLOCK_N"]), nv)](
                    rows, *self.args, self.targets, z, part, C, V, self.H, self.R, nv, self.ignore_index,
                    *self.strides, self.inv_temp, STATS=want_stats, **self.flags, **cfg, **meta)
        if not want_stats:
            return z, None
        tgt = self.targets.index_select(0, rows)
        scored = tgt != self.ignore_index
        m_t, s_t, pz_t, zs_t = part.unbind(2)
        m = m_t.max(dim=1).values
        scale = torch.exp(m_t - m[:, None])
        total = (s_t * scale).sum(1)
        lse = m + torch.log(total)
        logp = z.gather(1, tgt.clamp(min=0)[:, None])[:, 0] - lse
        zero = torch.zeros((), dtype=torch.float32, device=z.device)
        ent = torch.where(scored, lse - (pz_t * scale).sum(1) / total, zero) if want_ent else None
        mean = torch.where(scored, zs_t.sum(1) / V - lse, zero) if want_mean else None
        return z, Stats(torch.where(scored, logp, zero), ent, mean, torch.where(scored, lse, zero))

    def block_grads(self, rows, z, stats: Stats, coefs: Coefs, grads, needs):
        """Turn the stored logits z of the listed rows into G and add its products into ``grads``."""
        C, V = z.shape
        if C == 0:
            return
        dh, dw, db, du, dlb = grads
        need_dh, need_dw, need_db, need_du, need_dlb = needs
        g = z if self.dtype == torch.float32 else torch.empty((C, V), dtype=self.dtype, device=z.device)
        tgt = torch.where(self.targets.index_select(0, rows) != self.ignore_index,
                          self.targets.index_select(0, rows), -1)
        d_ent, d_mean = coefs.d_ent, coefs.d_mean
        cfg, meta = _split(_grad_config(self.dtype))
        with device_guard(self.hidden):
            _softmax_grad_kernel[(triton.cdiv(C, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
                z, g, tgt, stats.lse, stats.ent if d_ent is not None else stats.lse, coefs.d_logp,
                d_ent if d_ent is not None else coefs.d_logp, d_mean if d_mean is not None else coefs.d_logp, db,
                C, V, self.inv_temp, ENTROPY=d_ent is not None, MEAN=d_mean is not None, NEED_DB=need_db,
                **cfg, **meta)
            if need_dh or need_dw:
                self._products(g, self.weight, self.hidden, rows, dh, dw, need_dh, need_dw)
            if need_du or need_dlb:
                self._products(g, self.lora_B, self.lora_u, rows, du, dlb, need_du, need_dlb)

    def _products(self, g, y, x, rows, dx, dy, need_dx, need_dy):
        C, V = g.shape
        K = y.shape[1]
        cfg, meta = _split(_products_config(self.dtype, K))
        n_k = triton.cdiv(K, cfg["BLOCK_K"])
        n_dx = triton.cdiv(C, cfg["BLOCK_N"]) * n_k if need_dx else 0
        n_dy = triton.cdiv(V, cfg["BLOCK_V"]) * n_k if need_dy else 0
        _grad_products_kernel[(n_dx + n_dy,)](
            g, y, x, rows, dx if need_dx else g, dy if need_dy else g, C, V, K, n_dx,
            y.stride(0), y.stride(1), x.stride(0), x.stride(1), NEED_DX=need_dx, NEED_DY=need_dy,
            PRECISION=self.precision, **cfg, **meta)

    def recompute_grads(self, rows, stats: Stats, coefs: Coefs, grads, needs):
        z, _ = self.logits(rows, False)
        self.block_grads(rows, z, stats, coefs, grads, needs)


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, with and
    without a LoRA on the head, the entropy and label-smoothing terms on (the heaviest variant of
    each; the rest only drop code); the products kernel at the hidden-size tile and the rank-16 tile."""
    specs = []
    strides = ("stride_hn", "stride_hk", "stride_wv", "stride_wk", "stride_un", "stride_ur", "stride_bv", "stride_br")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = matmul_precision(dtype) if dtype != torch.float32 else "ieee"
        head = {"rows_ptr": "*i64", "h_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "u_ptr": f"*{t}",
                "b_ptr": f"*{t}", "tgt_ptr": "*i64"}
        sizes = {"C": "i32", "V": "i32", "H": "i32", "R": "i32"}
        tail = {**{s: "i32" for s in strides}, "inv_temp": "fp32"}
        for lora in (False, True):
            flags = {"HAS_BIAS": True, "HAS_LORA": lora, "PRECISION": precision, "BLOCK_R": BLOCK_R}
            cfg, meta = _split(_stats_config(dtype))
            tag = f"{t} lora={int(lora)} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}"
            specs.append(KernelSpec(
                _logprobs_fwd_kernel, tag,
                {**head, "logp_ptr": "*fp32", "ent_ptr": "*fp32", "mean_ptr": "*fp32", "lse_ptr": "*fp32", **sizes,
                 "ignore_index": "i32", **tail}, {**flags, "ENTROPY": True, "MEAN": True, **cfg}, **meta,
                plain_args=("ignore_index",)))
            specs.append(KernelSpec(
                _logits_kernel, tag,
                {**head, "z_ptr": "*fp32", "part_ptr": "*fp32", **sizes, "NV": "i32", "ignore_index": "i32", **tail},
                {**flags, "STATS": True, **cfg}, **meta, plain_args=("ignore_index",)))
        cfg, meta = _split(_grad_config(dtype))
        specs.append(KernelSpec(
            _softmax_grad_kernel, f"{t} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}",
            {"z_ptr": "*fp32", "g_ptr": f"*{t}", "tgt_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
             "dlogp_ptr": "*fp32", "dent_ptr": "*fp32", "dmean_ptr": "*fp32", "db_ptr": "*fp32", "C": "i32",
             "V": "i32", "inv_temp": "fp32"}, {"ENTROPY": True, "MEAN": True, "NEED_DB": True, **cfg}, **meta))
        for k in (4096, 16):
            cfg, meta = _split(_products_config(dtype, k))
            specs.append(KernelSpec(
                _grad_products_kernel, f"{t} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_K']}",
                {"g_ptr": f"*{t}", "y_ptr": f"*{t}", "x_ptr": f"*{t}", "rows_ptr": "*i64", "dx_ptr": "*fp32",
                 "dy_ptr": "*fp32", "C": "i32", "V": "i32", "K": "i32", "n_dx": "i32", "stride_yv": "i32",
                 "stride_yk": "i32", "stride_xn": "i32", "stride_xk": "i32"},
                {"NEED_DX": True, "NEED_DY": True, "PRECISION": precision, **cfg}, **meta,
                unit_args=("stride_yk", "stride_xk"), plain_args=("n_dx",)))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def default_chunk_size(num_tokens: int, vocab: int, face: str = "torch", threads: int | None = None,
                       unit_tokens: int = 0) -> int:
    """Tokens per [chunk, V] fp32 block. Torch face: ``num_tokens / CHUNK_FRACTION`` rounded down to a
    power of two, at least ``MIN_CHUNK_ROWS``, at most :data:`CHUNK_ELEMENTS` / V for the torch thread
    count (a power of two between 16 and 8192), raised to ``unit_tokens`` (the largest unit of a unit
    loss) when that fits the cap. Triton face: :data:`TRITON_CHUNK_ELEMENTS` / V (a multiple of 128).
    Never more than the tokens there are (at least 1)."""
    if face == "triton":
        chunk = max(128, (TRITON_CHUNK_ELEMENTS // max(vocab, 1)) // 128 * 128)
    else:
        threads = threads or torch.get_num_threads()
        elements = CHUNK_ELEMENTS.get(threads, CHUNK_ELEMENTS[max(CHUNK_ELEMENTS)])
        cap = 1 << max(4, min(13, int(math.log2(max(1, elements // max(vocab, 1))))))
        scaled = 1 << int(math.log2(max(1, num_tokens // CHUNK_FRACTION)))
        chunk = min(cap, max(MIN_CHUNK_ROWS, scaled))
        if unit_tokens <= cap:
            chunk = max(chunk, unit_tokens)
    return max(1, min(chunk, num_tokens))


def _fp32(t):
    return None if t is None else (t if t.dtype == torch.float32 else t.float())


class _TorchHead:
    """The head's tensors in fp32 (converted once per call), and the per-block steps of the torch face.

    Every [rows, V] block is computed into one workspace that the call reuses (allocated at the first
    block, as large as the largest): a fresh 64 MiB block costs more in page faults than its
    log-softmax, and the peak stays at one block. After the GEMM that writes a block, every
    elementwise pass runs a few rows at a time (:func:`_pass_rows`), so only the first of them
    reads the block from memory."""

    def __init__(self, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, max_rows):
        self.hidden, self.lora_u, self.targets, self.ignore_index = hidden, lora_u, targets, ignore_index
        self.w, self.b, self.lb = _fp32(weight), _fp32(bias), _fp32(lora_B)
        self.inv_temp = 1.0 / temperature
        self.max_rows, self.workspace = max_rows, None
        self.col_sums = {}

    def rows(self, rows):
        """(h, u) of these rows in fp32: views for a slice, gathered copies for an index tensor."""
        if isinstance(rows, slice):
            h = _fp32(self.hidden[rows])
            u = _fp32(self.lora_u[rows]) if self.lora_u is not None else None
        else:
            h = self.hidden.index_select(0, rows).float()
            u = self.lora_u.index_select(0, rows).float() if self.lora_u is not None else None
        return h, u

    def block(self, n: int) -> torch.Tensor:
        """A [n, V] fp32 view of the workspace (sized once, for the chunk size the call was given)."""
        if self.workspace is None or self.workspace.shape[0] < n:
            rows = max(n, min(self.max_rows, self.hidden.shape[0]))
            self.workspace = torch.empty((rows, self.w.shape[0]), dtype=torch.float32, device=self.w.device)
        return self.workspace[:n]

    def z(self, h, u, out):
        if self.b is not None:
            torch.addmm(self.b, h, self.w.t(), out=out)
        else:
            torch.mm(h, self.w.t(), out=out)
        if u is not None:
            out.addmm_(u, self.lb.t())
        if self.inv_temp != 1.0:
            out.mul_(self.inv_temp)
        return out

    def col_sum(self, y: torch.Tensor) -> torch.Tensor:
        """sum over the vocabulary of W (or of the LoRA's B), [K], computed once per call."""
        key = id(y)
        if key not in self.col_sums:
            self.col_sums[key] = y.sum(0)
        return self.col_sums[key]

    def log_probs(self, rows, want_ent, want_mean, probs=False):
        """(block [C, V] fp32 (the workspace), Stats, (h, u)) of these rows (every target kept). The
        block holds log p, or with ``probs`` p itself (what :meth:`block_grads` multiplies out)."""
        h, u = self.rows(rows)
        block = self.z(h, u, self.block(h.shape[0]))
        tgt = self.targets[rows]
        C = block.shape[0]
        logp, lse = block.new_empty(C), block.new_empty(C)
        ent = block.new_empty(C) if want_ent else None
        mean = block.new_empty(C) if want_mean else None
        step = _pass_rows(block.shape[1])
        for s in range(0, C, step):
            part, t, r = block[s:s + step], tgt[s:s + step].unsqueeze(1), slice(s, s + step)
            z_t = part.gather(1, t).squeeze(1)
            # in place: the CPU kernel reads each row whole before writing it (tests compare with the reference)
            torch.log_softmax(part, 1, out=part)
            torch.gather(part, 1, t, out=logp[r].unsqueeze(1))
            torch.sub(z_t, logp[r], out=lse[r])
            if want_ent:
                ent[r] = _entropy(part)
            if want_mean:
                torch.mean(part, 1, out=mean[r])
            if probs:
                part.exp_()
        return block, Stats(logp, ent, mean, lse), (h, u)

    def block_grads(self, rows, block, hu, stats: Stats, coefs: Coefs, grads, needs, probs=False):
        """Add this block's gradients to ``grads``; ``block`` holds p (``probs``) or log p."""
        if probs and coefs.d_ent is None:
            _accumulate_from_probs(grads, self, rows, block, *hu, coefs, needs)
            return
        if probs:
            block.log_()  # only when a loss reads the entropy of a block computed as p
        g = _logit_grad_(block, self.targets[rows], coefs.d_logp, coefs.d_ent, stats.ent, coefs.d_mean, self.inv_temp)
        _accumulate(grads, self, rows, g, *hu, needs)

    def recompute_grads(self, rows, stats: Stats, coefs: Coefs, grads, needs):
        h, u = self.rows(rows)
        block = self.z(h, u, self.block(h.shape[0]))
        probs = coefs.d_ent is None
        step = _pass_rows(block.shape[1])
        for s in range(0, block.shape[0], step):
            part = block[s:s + step].sub_(stats.lse[s:s + step].unsqueeze(1))
            if probs:
                part.exp_()
        self.block_grads(rows, block, (h, u), stats, coefs, grads, needs, probs)


# rows per pass of the entropy and its gradient: their exp(log p) temporaries stay small
_ENTROPY_ROWS = 64
# fp32 elements in one elementwise pass over a block on one torch thread (1 MiB: a core's L2 here)
_PASS_ELEMENTS = 1 << 18


def _pass_rows(vocab: int) -> int:
    """Rows of a [C, V] block per elementwise pass. One thread: about :data:`_PASS_ELEMENTS`, so the
    passes after the first find the rows in cache. More threads: the whole block, because every op is
    a parallel region whose threads meet at its end, and on a shared CPU a thread that is not
    scheduled makes the other wait: many small regions cost more than the cache saves (measured on
    the 2-core machine at load ~20: 24.7 s against 16.3 s per SFT step of 4096 tokens)."""
    if torch.get_num_threads() > 1:
        return 1 << 62
    return max(1, _PASS_ELEMENTS // max(vocab, 1))


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log p_j per row of log p [C, V]."""
    return torch.cat([-torch.linalg.vecdot(torch.exp(part), part) for part in log_p.split(_ENTROPY_ROWS)]
                     or [log_p.new_zeros(0)])


def _row_blocks(targets, ignore_index, chunk):
    """Blocks of at most ``chunk`` rows whose target is not ignored: slices when no row is ignored
    (views, no copies), else index tensors of the kept rows only (ignored rows cost nothing)."""
    keep = targets != ignore_index
    n = targets.shape[0]
    if bool(keep.all()):
        return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    idx = keep.nonzero().squeeze(1)
    return [idx[s:s + chunk] for s in range(0, idx.numel(), chunk)]


def _put(dst, rows, values):
    if isinstance(rows, slice):
        dst[rows] = values
    else:
        dst.index_copy_(0, rows, values)


def _torch_forward(head: _TorchHead, N, chunk, want_entropy, want_mean):
    f32 = dict(dtype=torch.float32, device=head.hidden.device)
    logp, lse = torch.zeros(N, **f32), torch.zeros(N, **f32)
    ent = torch.zeros(N if want_entropy else 0, **f32)
    mean = torch.zeros(N if want_mean else 0, **f32)
    for rows in _row_blocks(head.targets, head.ignore_index, chunk):
        _, st, _ = head.log_probs(rows, want_entropy, want_mean)
        _put(lse, rows, st.lse)
        _put(logp, rows, st.logp)
        if want_mean:
            _put(mean, rows, st.mean)
        if want_entropy:
            _put(ent, rows, st.ent)
    return logp, ent, mean, lse


def _logit_grad_(log_p, tgt, d_logp, d_ent, ent, d_mean, inv_temp):
    """Turn log p [C, V] into G = dL/dlogits in place (formula in the module docstring)."""
    V = log_p.shape[1]
    coef = d_logp + d_mean if d_mean is not None else d_logp
    if d_ent is not None:
        # G = -p * (dlogp + dmean + dent * (log p + H)), a few rows at a time (p is a temporary)
        for s in range(0, log_p.shape[0], _ENTROPY_ROWS):
            part, r = log_p[s:s + _ENTROPY_ROWS], slice(s, s + _ENTROPY_ROWS)
            p = torch.exp(part)
            part.add_(ent[r].unsqueeze(1)).mul_(d_ent[r].unsqueeze(1)).add_(coef[r].unsqueeze(1)).mul_(p).neg_()
        g = log_p
    else:
        g = log_p.exp_().mul_(coef.neg().unsqueeze(1))
    g.scatter_add_(1, tgt.unsqueeze(1), d_logp.unsqueeze(1))
    if d_mean is not None:
        g.add_(d_mean.unsqueeze(1) / V)
    if inv_temp != 1.0:
        g.mul_(inv_temp)
    return g


def _accumulate(grads, head, rows, g, h, u, needs):
    dh, dw, db, du, dlb = grads
    need_dh, need_dw, need_db, need_du, need_dlb = needs
    if need_dh:
        if isinstance(rows, slice):
            torch.mm(g, head.w, out=dh[rows])
        else:
            dh.index_copy_(0, rows, g @ head.w)
    if need_dw:
        dw.addmm_(g.t(), h)
    if need_db:
        db.add_(g.sum(0))
    if need_du:
        _put(du, rows, g @ head.lb)
    if need_dlb:
        dlb.addmm_(g.t(), u)


def _accumulate_from_probs(grads, head, rows, p, h, u, coefs: Coefs, needs):
    """This block's gradients from p [C, V] without forming G (no pass over the block but the two
    GEMMs that read it). With a = d_logp / T, c = (d_logp + d_mean) / T, m = d_mean / (V T) per row,
    G = diag(a) onehot(t) - diag(c) p + m 1^T, so for the head's [V, K] matrix Y (W, or the LoRA's B)
    and the rows' inputs X [C, K] (h, or u):

        G Y   = a * Y[t] - c * (p Y) + m * colsum(Y)         [C, K]
        G^T X = index_add(t, a * X) - p^T (c * X) + 1 (m^T X)   [V, K]

    Only [C, K] tensors are scaled; the extra terms are a gather and an index_add of C rows."""
    dh, dw, db, du, dlb = grads
    need_dh, need_dw, need_db, need_du, need_dlb = needs
    tgt = head.targets[rows]
    a = coefs.d_logp * head.inv_temp
    c = a if coefs.d_mean is None else (coefs.d_logp + coefs.d_mean) * head.inv_temp
    m = None if coefs.d_mean is None else coefs.d_mean * (head.inv_temp / p.shape[1])

    def left(y, out, need):  # G y, into ``out`` at ``rows``
        if not need:
            return
        gy = torch.mm(p, y, out=out[rows]) if isinstance(rows, slice) else p @ y
        gy.mul_(c.neg().unsqueeze(1)).add_(y.index_select(0, tgt) * a.unsqueeze(1))
        if m is not None:
            gy.add_(m.unsqueeze(1) * head.col_sum(y).unsqueeze(0))
        if not isinstance(rows, slice):
            out.index_copy_(0, rows, gy)

    def right(dy, x, need):  # dy += G^T x
        if not need:
            return
        dy.addmm_(p.t(), x * c.neg().unsqueeze(1))
        dy.index_add_(0, tgt, x * a.unsqueeze(1))
        if m is not None:
            dy.add_((m @ x).unsqueeze(0))

    left(head.w, dh, need_dh)
    right(dw, h, need_dw)
    if need_db:
        db.addmv_(p.t(), c, alpha=-1.0)
        db.index_add_(0, tgt, a)
        if m is not None:
            db.add_(m.sum())
    left(head.lb, du, need_du)
    right(dlb, u, need_dlb)


# ---------------------------------------------------------------------------------------------
# the chunk engine both faces share
# ---------------------------------------------------------------------------------------------

def _grad_buffers(hidden, weight, lora_u, lora_B, needs):
    """fp32 gradient buffers (dh, dW, db, du, dB), each [0] when not needed."""
    f32 = dict(dtype=torch.float32, device=hidden.device)
    shapes = (hidden.shape, weight.shape, (weight.shape[0],), lora_u.shape if lora_u is not None else (0,),
              lora_B.shape if lora_B is not None else (0,))
    return [torch.zeros(s if need else (0,), **f32) for s, need in zip(shapes, needs)]


def _make_head(face, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk):
    if face == "triton":
        return _TritonHead(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature)
    return _TorchHead(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk)


def _check_targets_in_range(targets, ignore_index, vocab):
    """Raise on a target outside [0, V) that is not ignore_index: at once on the CPU, as an
    asynchronous device assert on a GPU (no host sync per call)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    message = f"{OP}: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    if targets.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{message}; found {targets[bad][0].item()}")
    else:
        torch._assert_async(~bad.any(), message)


def _autocast_off(t: torch.Tensor):
    """Autocast off inside an op: its inputs already carry the dtype to run in (``_prepare`` casts
    them), and its fp32 statistics and accumulators must stay fp32."""
    return torch.autocast(t.device.type, enabled=False)


def _resolve_chunk(chunk: int, hidden, weight, face: str) -> int:
    """The tokens per chunk: ``chunk``, or the default for this face when 0."""
    return chunk if chunk > 0 else default_chunk_size(hidden.shape[0], weight.shape[0], face)


def _mask(d, scored):
    return None if d is None else torch.where(scored, d.float(), 0.0)


def _unit_chunk(stats: Stats, pos, scored, plan, layout) -> UnitChunk:
    G, U, T = layout
    return UnitChunk(pos, scored, stats.logp, stats.ent, stats.mean, plan.u0, plan.u1, G, U, T)


def _cat_stats(parts: list) -> Stats:
    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values)
    return Stats(cat("logp"), cat("ent"), cat("mean"), cat("lse"))


def _unit_loss_impl(face, hidden, weight, bias, lora_u, lora_B, targets, entry, tensors, scalars, variant, layout,
                    ignore_index, temperature, chunk, want_ent, want_mean, needs):
    """-> (value, logp [N], ent [N] or [0], mean [N] or [0], fp32 grads): the chunk loop of
    ``linear_unit_loss`` for either face; ``chunk`` tokens per chunk, 0 for the default (which, on the
    torch face, also holds the largest unit when it can)."""
    N = targets.shape[0]
    scored_all = targets != ignore_index
    if chunk <= 0:
        unit = 0
        if face == "torch" and not entry.token_local and N:
            G, U, T = layout
            unit = int(scored_all.view(G, U, T).sum((0, 2)).max())
        chunk = default_chunk_size(N, weight.shape[0], face, unit_tokens=unit)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp_all = torch.zeros(N, **f32)
    ent_all = torch.zeros(N if want_ent else 0, **f32)
    mean_all = torch.zeros(N if want_mean else 0, **f32)
    grads = _grad_buffers(hidden, weight, lora_u, lora_B, needs)
    head = _make_head(face, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk)
    any_grad = any(needs)
    if face == "triton":
        plans = plan_dense(N, layout, chunk, entry.token_local, hidden.device)
    else:
        plans = plan_compact(scored_all, layout, chunk, entry.token_local)
    value = torch.zeros((), **f32)
    # the torch face keeps p, not log p, in a block whose gradient comes next (unless the loss reads
    # the entropy, whose gradient needs log p)
    probs = any_grad and not want_ent

    def coefs_of(result: UnitGrads, scored, stats: Stats) -> Coefs:
        d_logp = _mask(result.d_logp, scored)
        if d_logp is None:
            d_logp = torch.zeros_like(stats.logp)
        d_ent = _mask(result.d_entropy, scored) if want_ent else None
        d_mean = _mask(result.d_mean_logp, scored) if want_mean else None
        return Coefs(d_logp, d_ent, d_mean)

    def record(pos, stats: Stats):
        logp_all.index_copy_(0, pos, stats.logp)
        if want_ent:
            ent_all.index_copy_(0, pos, stats.ent)
        if want_mean:
            mean_all.index_copy_(0, pos, stats.mean)

    for plan in plans:
        pos = plan.pos
        scored = scored_all.index_select(0, pos)
        if plan.blocks is None:  # a whole chunk: logits once, gradient from the same block
            if face == "triton":
                state = head.logits(pos, True, want_ent, want_mean)
                stats = state[1]
            else:
                log_p, stats, hu = head.log_probs(pos, want_ent, want_mean, probs=probs)
            result = entry.fn(_unit_chunk(stats, pos, scored, plan, layout), tensors, scalars, variant)
            value = value + result.value.float()
            record(pos, stats)
            if any_grad:
                coefs = coefs_of(result, scored, stats)
                if face == "triton":
                    head.block_grads(pos, state[0], stats, coefs, grads, needs)
                else:
                    head.block_grads(pos, log_p, hu, stats, coefs, grads, needs, probs)
            continue
        # one unit larger than a chunk: statistics block by block, the loss once, then each
        # block's logits again for its gradient
        if face == "triton":
            parts = [head.stats(b, want_ent, want_mean) for b in plan.blocks]
        else:  # the last block's log-probs stay in the workspace: its gradient needs no recompute
            parts = []
            for b in plan.blocks:
                log_p, part, hu = head.log_probs(b, want_ent, want_mean, probs=probs and b is plan.blocks[-1])
                parts.append(part)
        stats = _cat_stats(parts)
        result = entry.fn(_unit_chunk(stats, pos, scored, plan, layout), tensors, scalars, variant)
        value = value + result.value.float()
        record(pos, stats)
        if any_grad:
            coefs = coefs_of(result, scored, stats)
            bounds = [0]
            for b in plan.blocks:
                bounds.append(bounds[-1] + b.shape[0])
            for i in reversed(range(len(plan.blocks))):
                b, part, sl = plan.blocks[i], parts[i], slice(bounds[i], bounds[i + 1])
                block_coefs = Coefs(*(None if c is None else c[sl] for c in coefs))
                if face == "torch" and i == len(plan.blocks) - 1:
                    head.block_grads(b, log_p, hu, part, block_coefs, grads, needs, probs)
                else:
                    head.recompute_grads(b, part, block_coefs, grads, needs)
    return value, logp_all, ent_all, mean_all, grads


# ---------------------------------------------------------------------------------------------
# registered ops (torch.library) and autograd
# ---------------------------------------------------------------------------------------------

def _stat_shapes(hidden, want_entropy, want_mean):
    n = hidden.shape[0]
    return n, (n if want_entropy else 0), (n if want_mean else 0)


@torch.library.custom_op("peftkern::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, targets: torch.Tensor,
                        ignore_index: int, temperature: float, chunk: int, want_entropy: bool, want_mean: bool,
                        face: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H] -> (logp [N], entropy [N] or [0], mean_logp [N] or [0], lse [N]), all fp32."""
    with _autocast_off(hidden):
        return _logprobs_fwd_impl(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk,
                                  want_entropy, want_mean, face)


def _logprobs_fwd_impl(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk, want_entropy,
                       want_mean, face):
    _check_targets_in_range(targets, ignore_index, weight.shape[0])
    chunk = _resolve_chunk(chunk, hidden, weight, face)
    head = _make_head(face, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk)
    if face == "triton":
        rows = torch.arange(targets.shape[0], device=hidden.device)
        st = head.stats(rows, want_entropy, want_mean)
        empty = lambda: hidden.new_zeros(0, dtype=torch.float32)
        return (st.logp, st.ent if want_entropy else empty(), st.mean if want_mean else empty(), st.lse)
    return _torch_forward(head, targets.shape[0], chunk, want_entropy, want_mean)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk, want_entropy, want_mean,
      face):
    n, ne, nm = _stat_shapes(hidden, want_entropy, want_mean)
    new = lambda k: hidden.new_empty(k, dtype=torch.float32)
    return new(n), new(ne), new(nm), new(n)


def _backward_blocks(face, targets, ignore_index, chunk):
    """Row blocks for the recompute backward: the torch face's kept rows, the Triton face's
    consecutive rows (its kernels skip tiles of ignored rows; no host sync)."""
    if face == "triton":
        n = targets.shape[0]
        return [torch.arange(s, min(s + chunk, n), device=targets.device) for s in range(0, n, chunk)]
    return _row_blocks(targets, ignore_index, chunk)


@torch.library.custom_op("peftkern::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, targets: torch.Tensor,
                        lse: torch.Tensor, ent: torch.Tensor, d_logp: torch.Tensor, d_ent: torch.Tensor | None,
                        d_mean: torch.Tensor | None, ignore_index: int, temperature: float, chunk: int, face: str,
                        needs: list[bool]) -> list[torch.Tensor]:
    """-> [dh [N, H], dW [V, H], db [V], du [N, r], dB [V, r]] in fp32, each [0] when not needed.
    The coefficients are 0 on ignored rows."""
    with _autocast_off(hidden):
        return _logprobs_bwd_impl(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean,
                                  ignore_index, temperature, chunk, face, needs)


def _logprobs_bwd_impl(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean, ignore_index,
                       temperature, chunk, face, needs):
    grads = _grad_buffers(hidden, weight, lora_u, lora_B, needs)
    chunk = _resolve_chunk(chunk, hidden, weight, face)
    head = _make_head(face, hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk)
    for rows in _backward_blocks(face, targets, ignore_index, chunk):
        pick = (lambda t: None if t is None else t[rows])
        stats = Stats(None, pick(ent) if d_ent is not None else None, None, lse[rows])
        head.recompute_grads(rows, stats, Coefs(d_logp[rows], pick(d_ent), pick(d_mean)), grads, needs)
    return grads


def _fake_grads(hidden, weight, lora_u, lora_B, needs):
    shapes = (hidden.shape, weight.shape, (weight.shape[0],),
              lora_u.shape if lora_u is not None else (0,), lora_B.shape if lora_B is not None else (0,))
    return [hidden.new_empty(s if need else (0,), dtype=torch.float32) for s, need in zip(shapes, needs)]


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean, ignore_index, temperature,
      chunk, face, needs):
    return _fake_grads(hidden, weight, lora_u, lora_B, needs)


def _needs(ctx, first: int) -> list[bool]:
    """needs_input_grad for (hidden, weight, bias, lora_u, lora_B), given where hidden sits."""
    flags = ctx.needs_input_grad[first:first + 5]
    present = (True, True, ctx.has_bias, ctx.has_lora, ctx.has_lora)
    return [bool(f and p) for f, p in zip(flags, present)]


def _cast_grads(grads, inputs):
    return [g.to(t.dtype) if (t is not None and g.numel()) else None for g, t in zip(grads, inputs)]


def _fwd_setup(ctx, inputs, output):
    hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk, want_entropy, _, face = inputs
    _, ent, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, ent)
    ctx.ignore_index, ctx.temperature, ctx.chunk, ctx.face = ignore_index, temperature, chunk, face
    ctx.has_bias, ctx.has_lora, ctx.want_entropy = bias is not None, lora_u is not None, want_entropy
    ctx.set_materialize_grads(False)  # an unused output (entropy, lse) costs no zero tensor and no work


def _fwd_backward(ctx, d_logp, d_ent, d_mean, _d_lse):
    hidden, weight, bias, lora_u, lora_B, targets, lse, ent = ctx.saved_tensors
    needs = _needs(ctx, 0)
    valid = targets != ctx.ignore_index

    def coef(d):
        return None if d is None or d.numel() == 0 else torch.where(valid, d.float(), 0.0).contiguous()

    d_logp_c = coef(d_logp)
    if d_logp_c is None:
        d_logp_c = torch.zeros_like(lse)
    d_ent_c = coef(d_ent) if ctx.want_entropy else None
    grads = torch.ops.peftkern.linear_logprobs_bwd(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp_c,
                                                   d_ent_c, coef(d_mean), ctx.ignore_index, ctx.temperature,
                                                   ctx.chunk, ctx.face, needs)
    return (*_cast_grads(grads, (hidden, weight, bias, lora_u, lora_B)),) + (None,) * 7


linear_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@torch.library.custom_op("peftkern::linear_unit_loss", mutates_args=())
def linear_unit_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, targets: torch.Tensor, loss: str,
                     variant: str, tensors: list[torch.Tensor], scalars: list[float], layout: list[int],
                     ignore_index: int, temperature: float, chunk: int, want_entropy: bool, want_mean: bool,
                     face: str, needs: list[bool]) -> list[torch.Tensor]:
    """-> [value (fp32 scalar), logp [N], entropy [N] or [0], mean_logp [N] or [0], then the value's
    gradients dh, dW, db, du, dB (in their inputs' dtypes, [0] when not needed)], all formed here.
    ``loss`` names a registered unit loss (``peftkern.ops.logprob_units``); ``layout`` is (G, U, T)."""
    _check_targets_in_range(targets, ignore_index, weight.shape[0])
    with _autocast_off(hidden):
        value, logp, ent, mean, grads = _unit_loss_impl(
            face, hidden, weight, bias, lora_u, lora_B, targets, unit_loss(loss), list(tensors), list(scalars),
            variant, tuple(layout), ignore_index, temperature, chunk, want_entropy, want_mean, needs)
    # cast now: the fp32 buffers are freed at once, and only input-dtype gradients wait for the backward
    inputs = (hidden, weight, bias, lora_u, lora_B)
    return [value, logp, ent, mean] + [g.to(t.dtype) if t is not None else g for g, t in zip(grads, inputs)]


@linear_unit_loss.register_fake
def _(hidden, weight, bias, lora_u, lora_B, targets, loss, variant, tensors, scalars, layout, ignore_index,
      temperature, chunk, want_entropy, want_mean, face, needs):
    n, ne, nm = _stat_shapes(hidden, want_entropy, want_mean)
    new = lambda k: hidden.new_empty(k, dtype=torch.float32)
    grads = _fake_grads(hidden, weight, lora_u, lora_B, needs)
    inputs = (hidden, weight, bias, lora_u, lora_B)
    return [hidden.new_empty((), dtype=torch.float32), new(n), new(ne), new(nm)] + [
        g.to(t.dtype) if t is not None else g for g, t in zip(grads, inputs)]


def _unit_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[4:])
    # the backward returns the inputs' structure: a list of Nones for a list of tensors (an empty
    # list counts as one), None for anything else
    ctx.list_lengths = {i: len(x) for i, x in enumerate(inputs)
                        if isinstance(x, list) and all(isinstance(e, torch.Tensor) for e in x)}
    ctx.mark_non_differentiable(*output[1:4])
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zero tensors


def _unit_backward(ctx, grads_out):
    d_value = grads_out[0]
    grads = [None if (g.numel() == 0 or d_value is None) else g * d_value.to(g.dtype) for g in ctx.saved_tensors]
    rest = [[None] * ctx.list_lengths[i] if i in ctx.list_lengths else None for i in range(5, 18)]
    return (*grads, *rest)


linear_unit_loss.register_autograd(_unit_backward, setup_context=_unit_setup)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def _check(hidden, weight, targets, bias, temperature, lora_A, lora_B, lora_scaling, chunk_size):
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"hidden": hidden, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
                       dtype=None if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
    _checks.check_same(OP, {"hidden": hidden, "targets": targets})
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP}: targets must be an int64 or int32 tensor, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: hidden must be [..., H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight must be [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    V, H = weight.shape
    if hidden.shape[-1] != H:
        raise ValueError(f"{OP}: hidden has {hidden.shape[-1]} features (shape {tuple(hidden.shape)}) but weight "
                         f"{tuple(weight.shape)} expects H={H}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: targets has shape {tuple(targets.shape)}, expected {tuple(hidden.shape[:-1])} "
                         f"(hidden's leading dims)")
    if bias is not None:
        _checks.check_shape(OP, "bias", bias, (V,), "[V]")
    temperature = _checks.check_finite_scalar(OP, "temperature", temperature)
    if temperature <= 0.0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temperature}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{OP}: give both lora_A and lora_B or neither")
    if lora_A is not None:
        if lora_A.dim() != 2 or lora_A.shape[0] == 0:
            raise ValueError(f"{OP}: lora_A must be [r, H] with r >= 1, got shape {tuple(lora_A.shape)}")
        _checks.check_shape(OP, "lora_A", lora_A, (lora_A.shape[0], H), "[r, H]")
        _checks.check_shape(OP, "lora_B", lora_B, (V, lora_A.shape[0]), "[V, r]")
        _checks.check_finite_scalar(OP, "lora_scaling", lora_scaling)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{OP}: chunk_size must be a positive int, got {chunk_size!r}")


def _autocast(tensors):
    """Under autocast the head runs in the autocast dtype (as F.linear would), with tensor cores; the
    casts are recorded by autograd, so fp32 parameters get fp32 gradients."""
    first = tensors[0]
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return [None if t is None else t.to(dtype) for t in tensors]


class _Operands(NamedTuple):
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_u: torch.Tensor | None  # [N, r] = s * hidden A^T
    lora_B: torch.Tensor | None
    targets: torch.Tensor  # [N] int64
    face: str
    chunk: int


def _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A, lora_B, lora_scaling,
             chunk_size) -> _Operands:
    """Checks, then the flat operands."""
    _check(hidden, weight, targets, bias, temperature, lora_A, lora_B, lora_scaling, chunk_size)
    hidden, weight, bias, lora_A, lora_B = _autocast([hidden, weight, bias, lora_A, lora_B])
    face = backend.pick(OP, FACES, hidden.device.type)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    if face == "triton" or not h2d.is_contiguous():
        h2d = h2d.contiguous()
    t1d = targets.reshape(-1).long().contiguous()
    u = None
    if lora_A is not None:
        u = ((h2d @ lora_A.t()) * float(lora_scaling)).contiguous()
    chunk = chunk_size or 0  # 0: the default, chosen inside the op (it reads the thread count at run time)
    if bias is not None:
        bias = bias.contiguous()
    if face == "triton":
        weight = weight.contiguous()
        lora_B = lora_B.contiguous() if lora_B is not None else None
    return _Operands(h2d, weight, bias, u, lora_B if u is not None else None, t1d, face, int(chunk))


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                          *, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                          lora_scaling: float = 1.0, chunk_size: int | None = None):
    """Per-token log p(target) under softmax((hidden W^T + b + s (hidden A^T) B^T) / temperature),
    without building the [tokens, V] logits.

    hidden [..., H] (fp32, fp16 or bf16; under autocast the autocast dtype), weight [V, H], targets
    [...] int64 (ignore_index marks positions to skip), bias [V] or None, lora_A [r, H] and lora_B
    [V, r] with lora_scaling s for a LoRA on the head (None: no LoRA). Returns logp [...] fp32 (0 at
    ignored positions), and with ``return_entropy`` also the entropy of each position's
    distribution [...] fp32 (0 at ignored positions). Gradients flow to hidden, weight, bias, lora_A
    and lora_B (through both outputs; the backward recomputes the logits); ignored positions get
    none. Accumulation is fp32 whatever the input dtype. ``chunk_size`` overrides the tokens per
    block (default: :func:`default_chunk_size`). For a loss that is a sum over independent units,
    :func:`fused_unit_loss` forms the gradients in the forward instead (one GEMM fewer).
    """
    logp, ent, _ = fused_linear_logprob_stats(hidden, weight, targets, ignore_index, bias, temperature,
                                              entropy=return_entropy, lora_A=lora_A, lora_B=lora_B,
                                              lora_scaling=lora_scaling, chunk_size=chunk_size)
    return (logp, ent) if return_entropy else logp


def fused_linear_logprob_stats(hidden, weight, targets, ignore_index=-100, bias=None, temperature=1.0, *,
                               entropy=False, mean_logp=False, lora_A=None, lora_B=None, lora_scaling=1.0,
                               chunk_size=None):
    """(logp, entropy or None, mean_logp or None), each [...] fp32: :func:`fused_linear_logprobs`
    plus the vocabulary mean of log p (the label-smoothing term) when ``mean_logp``."""
    ops = _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A, lora_B, lora_scaling,
                   chunk_size)
    logp, ent, mean, _ = torch.ops.peftkern.linear_logprobs_fwd(
        ops.hidden, ops.weight, ops.bias, ops.lora_u, ops.lora_B, ops.targets, int(ignore_index), float(temperature),
        ops.chunk, bool(entropy), bool(mean_logp), ops.face)
    lead = hidden.shape[:-1]
    return logp.view(lead), (ent.view(lead) if entropy else None), (mean.view(lead) if mean_logp else None)


class UnitLossOutput(NamedTuple):
    """:func:`fused_unit_loss`'s result: the loss (fp32 scalar, differentiable) and the per-token
    statistics it was computed from (each [...] fp32, detached; None when not asked for)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None
    mean_logp: torch.Tensor | None


def fused_unit_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss: str, *,
                    tensors=(), scalars=(), variant: str = "", group: int = 1, ignore_index: int = -100,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, entropy: bool = False,
                    mean_logp: bool = False, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                    chunk_size: int | None = None) -> UnitLossOutput:
    """A registered per-unit loss (``peftkern.ops.logprob_units.register_unit_loss``) of the per-token
    log-probs, from hidden states, with its gradients formed in the forward pass.

    hidden [G * U, T, H] (U units of ``group`` = G sequences of T tokens, the g-th sequences of all
    units together: chosen sequences first, then rejected ones, for pairs) or, for a token-local
    loss, any [..., H]; weight, targets, bias, LoRA, temperature as :func:`fused_linear_logprobs`.
    ``tensors`` (fixed data the loss reads: reference log-probs, labels, advantages) and ``scalars``
    (its hyper-parameters) and ``variant`` go to the loss function unchanged; ``entropy`` and
    ``mean_logp`` ask for those statistics. Returns the loss (fp32 scalar) whose backward scales the
    stored gradients, and the detached statistics.
    """
    entry = unit_loss(loss)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"fused_unit_loss: group must be a positive int, got {group!r}")
    if entry.token_local:
        layout = (1, 1, max(hidden[..., 0].numel(), 1))
    else:
        if hidden.dim() != 3 or hidden.shape[0] % group:
            raise ValueError(f"fused_unit_loss: loss {loss!r} needs hidden [G * U, T, H] with G = {group} sequences "
                             f"per unit, got shape {tuple(hidden.shape)}")
        layout = (group, hidden.shape[0] // group, hidden.shape[1])
    ops = _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A, lora_B, lora_scaling,
                   chunk_size)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad
             for t in (ops.hidden, ops.weight, ops.bias, ops.lora_u, ops.lora_B)]
    tensors = [t.detach() for t in tensors]
    out = torch.ops.peftkern.linear_unit_loss(
        ops.hidden, ops.weight, ops.bias, ops.lora_u, ops.lora_B, ops.targets, loss, str(variant), tensors,
        [float(s) for s in scalars], list(layout), int(ignore_index), float(temperature), ops.chunk, bool(entropy),
        bool(mean_logp), ops.face, needs)
    lead = hidden.shape[:-1]
    return UnitLossOutput(out[0], out[1].view(lead), out[2].view(lead) if entropy else None,
                          out[3].view(lead) if mean_logp else None)


def fused_linear_logprob_dot(hidden, weight, targets, c_logp, c_mean=None, ignore_index=-100, bias=None,
                             temperature=1.0, *, lora_A=None, lora_B=None, lora_scaling=1.0, chunk_size=None):
    """sum_i c_logp[i] logp[i] + c_mean[i] mean_logp[i] as an fp32 scalar, with the gradients formed in
    the forward pass (the coefficients are constants: c_logp, c_mean [...] like targets)."""
    valid = targets.reshape(-1) != ignore_index
    coefs = [torch.where(valid, c_logp.reshape(-1).detach().float(), 0.0)]
    if c_mean is not None:
        coefs.append(torch.where(valid, c_mean.reshape(-1).detach().float(), 0.0))
    return fused_unit_loss(hidden, weight, targets, "linear", tensors=coefs, ignore_index=ignore_index, bias=bias,
                           temperature=temperature, mean_logp=c_mean is not None, lora_A=lora_A, lora_B=lora_B,
                           lora_scaling=lora_scaling, chunk_size=chunk_size).loss
