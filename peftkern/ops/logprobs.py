"""Per-token log-probs through the output head without building [tokens, V] logits.

logits = h W^T + b + u B^T with u = s * h A^T (a LoRA on the head; u is formed outside the op, so
autograd carries its gradient on to h and A), z = logits / T, and per token:
logp = z[target] - lse(z), entropy = lse - sum_j p_j z_j, mean_logp = mean_j z_j - lse.
Only the per-token lse (and entropy) is kept for the backward, which recomputes the logits and
forms the logit gradient G = dz/dlogits tile by tile:

    G = dlogp * (onehot - p) - dent * p * (z - lse + entropy) + dmean * (1/V - p),  scaled by 1/T

then dh = G W, dW = G^T h, db = sum_rows G, du = G B, dB = G^T u.

Two faces, one registered op each way:
* torch: the CPU face. Token chunks (only the rows whose target is not ignored, gathered), each a
  [chunk, V] fp32 block; the backward recomputes that block and turns it into G in place.
* triton: a forward kernel with an online log-sum-exp over vocabulary tiles (logit tiles live in
  registers only) and a backward kernel per (token tile, vocab tile) that recomputes its logit tile,
  forms G and adds G W and G^T h into fp32 dh and dW with atomics; tiles whose rows carry no
  gradient (ignored targets) are skipped whole.

``linear_logprobs_dot`` is the same computation for a fixed linear functional of the per-token
statistics (sum_i c_i logp_i + m_i mean_logp_i, e.g. SFT cross-entropy): the coefficients are known
in the forward, so the gradients are formed there (three GEMM passes on the CPU face instead of
four) and the backward only scales them.

File order (docs/ARCHITECTURE.md): Triton kernels, launchers, torch face, registered ops and autograd,
public entry points.
"""
from __future__ import annotations

import math

import torch

from peftkern import backend
from peftkern.ops import _checks
from peftkern.ops._triton import KernelSpec, tl, tl_dtype_name, triton

OP = "fused_linear_logprobs"
FACES = ("torch", "triton")

# fp32 elements per [chunk, V] block of the torch face: 8M elements = 32 MiB per block (256 tokens
# at V = 32000). Measured on the CPU: 128-token blocks cost ~15% more time than one full block, 256
# break even with the naive path (dW is re-read once per block).
CHUNK_ELEMENTS = 1 << 23


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, row_ok, col_ok, H, R,
                stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br, inv_temp,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = (h W^T + b + u B^T) / T for these rows and vocabulary columns, fp32."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & (ks[None, :] < H), other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(u_ptr + rows[:, None] * stride_un + rs[None, :] * stride_ur,
                        mask=row_ok[:, None] & (rs[None, :] < R), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_bv + rs[None, :] * stride_br,
                        mask=col_ok[:, None] & (rs[None, :] < R), other=0.0)
            acc = tl.dot(u, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _logprobs_fwd_kernel(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, tgt_ptr, logp_ptr, ent_ptr, mean_ptr, lse_ptr,
                         N, V, H, R, ignore_index,
                         stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                         inv_temp,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ENTROPY: tl.constexpr, MEAN: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per BLOCK_N tokens: online (max, sum of exp) over vocabulary tiles, the target's
    logit picked on the way; a block whose targets are all ignored computes nothing."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
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
            z = _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, row_ok, col_ok, H, R,
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
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, z_tgt - lse, 0.0), mask=row_ok)
    if ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, lse - pz / s, 0.0), mask=row_ok)
    if MEAN:
        tl.store(mean_ptr + rows, tl.where(valid, z_sum / V - lse, 0.0), mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr,
                         dmean_ptr, dh_ptr, dw_ptr, db_ptr, du_ptr, dlb_ptr,
                         N, V, H, R, ignore_index,
                         stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                         inv_temp,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ENTROPY: tl.constexpr, MEAN: tl.constexpr,
                         NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                         NEED_DU: tl.constexpr, NEED_DLB: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program per (BLOCK_N tokens, BLOCK_V vocabulary columns): recompute the logit tile, form
    G, then dh += G W, dW += G^T h (and the LoRA and bias terms) with fp32 atomics. The coefficient
    vectors are 0 on ignored rows, so a tile whose rows all have zero coefficients is skipped."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    dl = tl.load(dlogp_ptr + rows, mask=row_ok, other=0.0)
    dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    de = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if MEAN:
        dm = tl.load(dmean_ptr + rows, mask=row_ok, other=0.0)
    if ENTROPY:
        de = tl.load(dent_ptr + rows, mask=row_ok, other=0.0)
    live = (dl != 0.0) | (dm != 0.0) | (de != 0.0)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        z = _logit_tile(h_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, rows, cols, row_ok, col_ok, H, R,
                        stride_hn, stride_hk, stride_wv, stride_wk, stride_un, stride_ur, stride_bv, stride_br,
                        inv_temp, HAS_BIAS, HAS_LORA, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_R)
        p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
        g = -p * (dl + dm)[:, None]
        if ENTROPY:
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            g -= de[:, None] * p * (z - lse[:, None] + ent[:, None])
        if MEAN:
            g += tl.where(col_ok[None, :], dm[:, None] / V, 0.0)
        g += tl.where(cols[None, :] == tgt[:, None], dl[:, None], 0.0)
        g = tl.where(row_ok[:, None] & col_ok[None, :], g * inv_temp, 0.0)
        if NEED_DB:
            tl.atomic_add(db_ptr + cols, tl.sum(g, axis=0), mask=col_ok)
        gq = g.to(w_ptr.dtype.element_ty)
        if NEED_DH or NEED_DW:
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                if NEED_DH:
                    w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :],
                                  tl.dot(gq, w, input_precision=PRECISION), mask=row_ok[:, None] & k_ok[None, :])
                if NEED_DW:
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :],
                                  tl.dot(tl.trans(gq), h, input_precision=PRECISION),
                                  mask=col_ok[:, None] & k_ok[None, :])
        if HAS_LORA:
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + tl.arange(0, BLOCK_R)
                r_ok = rs < R
                if NEED_DU:
                    b = tl.load(b_ptr + cols[:, None] * stride_bv + rs[None, :] * stride_br,
                                mask=col_ok[:, None] & r_ok[None, :], other=0.0)
                    tl.atomic_add(du_ptr + rows[:, None] * R + rs[None, :],
                                  tl.dot(gq, b, input_precision=PRECISION), mask=row_ok[:, None] & r_ok[None, :])
                if NEED_DLB:
                    u = tl.load(u_ptr + rows[:, None] * stride_un + rs[None, :] * stride_ur,
                                mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                    tl.atomic_add(dlb_ptr + cols[:, None] * R + rs[None, :],
                                  tl.dot(tl.trans(gq), u, input_precision=PRECISION),
                                  mask=col_ok[:, None] & r_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _fwd_config(dtype: torch.dtype) -> dict:
    """Forward tiles (tokens x vocabulary columns x hidden step), chosen so that every variant
    compiles without register spills for sm_80 and sm_90 (``peftkern kernels``)."""
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_H": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}


def _bwd_config(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_H": 16, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "num_warps": 8, "num_stages": 2}


def _block_r(rank: int) -> int:
    """LoRA rank step: 16 (tl.dot's minimum); larger ranks loop, so one config serves every rank."""
    return 16


def _split(config: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}
    return {k: v for k, v in config.items() if k not in meta}, meta


def _lora_args(hidden, lora_u, lora_B):
    """(u, B, R, strides) with dummies standing in when there is no LoRA on the head."""
    if lora_u is None:
        return hidden, hidden, 0, (0, 0, 0, 0)
    return lora_u, lora_B, lora_u.shape[1], (lora_u.stride(0), lora_u.stride(1), lora_B.stride(0), lora_B.stride(1))


def _triton_forward(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, want_entropy,
                    want_mean):
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    ent = torch.empty(N if want_entropy else 0, **f32)
    mean = torch.empty(N if want_mean else 0, **f32)
    if N == 0:
        return logp, ent, mean, lse
    u, b, R, lora_strides = _lora_args(hidden, lora_u, lora_B)
    cfg, meta = _split(_fwd_config(hidden.dtype))
    _logprobs_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        hidden, weight, bias if bias is not None else hidden, u, b, targets, logp,
        ent if want_entropy else logp, mean if want_mean else logp, lse,
        N, V, H, R, ignore_index, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        *lora_strides, 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_LORA=lora_u is not None, ENTROPY=want_entropy, MEAN=want_mean,
        PRECISION=_precision(hidden.dtype), BLOCK_R=_block_r(R), **cfg, **meta)
    return logp, ent, mean, lse


def _triton_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean,
                     ignore_index, temperature, needs):
    N, H = hidden.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db, need_du, need_dlb = needs
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros((N, H) if need_dh else (0,), **f32)
    dw = torch.zeros((V, H) if need_dw else (0,), **f32)
    db = torch.zeros(V if need_db else 0, **f32)
    u, b, R, lora_strides = _lora_args(hidden, lora_u, lora_B)
    du = torch.zeros((N, R) if need_du else (0,), **f32)
    dlb = torch.zeros((V, R) if need_dlb else (0,), **f32)
    if N and V:
        cfg, meta = _split(_bwd_config(hidden.dtype))
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
        _logprobs_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, u, b, targets, lse,
            ent if d_ent is not None else lse, d_logp, d_ent if d_ent is not None else d_logp,
            d_mean if d_mean is not None else d_logp, dh, dw, db, du, dlb,
            N, V, H, R, ignore_index, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            *lora_strides, 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_LORA=lora_u is not None, ENTROPY=d_ent is not None,
            MEAN=d_mean is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, NEED_DU=need_du,
            NEED_DLB=need_dlb, PRECISION=_precision(hidden.dtype), BLOCK_R=_block_r(R), **cfg, **meta)
    return dh, dw, db, du, dlb


def triton_kernel_specs() -> list:
    """Every config the launchers above can launch (``peftkern kernels``): per dtype, with and
    without a LoRA on the head, the entropy and label-smoothing terms on (the heaviest variant of
    each; the rest only drop code)."""
    specs = []
    strides = ("stride_hn", "stride_hk", "stride_wv", "stride_wk", "stride_un", "stride_ur", "stride_bv", "stride_br")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = tl_dtype_name(dtype)
        precision = _precision(dtype)
        for lora in (False, True):
            block_r = 16
            common = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "bias_ptr": f"*{t}", "u_ptr": f"*{t}", "b_ptr": f"*{t}",
                      "tgt_ptr": "*i64"}
            scalars = {"N": "i32", "V": "i32", "H": "i32", "R": "i32", "ignore_index": "i32",
                       **{s: "i32" for s in strides}, "inv_temp": "fp32"}
            flags = {"HAS_BIAS": True, "HAS_LORA": lora, "ENTROPY": True, "MEAN": True, "PRECISION": precision,
                     "BLOCK_R": block_r}
            cfg, meta = _split(_fwd_config(dtype))
            specs.append(KernelSpec(
                _logprobs_fwd_kernel, f"{t} lora={int(lora)} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}",
                {**common, "logp_ptr": "*fp32", "ent_ptr": "*fp32", "mean_ptr": "*fp32", "lse_ptr": "*fp32",
                 **scalars}, {**flags, **cfg}, **meta))
            cfg, meta = _split(_bwd_config(dtype))
            specs.append(KernelSpec(
                _logprobs_bwd_kernel, f"{t} lora={int(lora)} {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}",
                {**common, "lse_ptr": "*fp32", "ent_ptr": "*fp32", "dlogp_ptr": "*fp32", "dent_ptr": "*fp32",
                 "dmean_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "du_ptr": "*fp32",
                 "dlb_ptr": "*fp32", **scalars},
                {**flags, "NEED_DH": True, "NEED_DW": True, "NEED_DB": True, "NEED_DU": lora, "NEED_DLB": lora,
                 **cfg}, **meta))
    return specs


# ---------------------------------------------------------------------------------------------
# torch face
# ---------------------------------------------------------------------------------------------

def default_chunk_size(num_tokens: int, vocab: int) -> int:
    """Tokens per [chunk, V] fp32 block of the torch face: about CHUNK_ELEMENTS elements (32 MiB),
    a power of two between 16 and 4096, never more than the tokens there are."""
    chunk = 1 << max(4, min(12, int(math.log2(max(1, CHUNK_ELEMENTS // max(vocab, 1))))))
    return max(1, min(chunk, num_tokens))


def _fp32(t):
    return None if t is None else (t if t.dtype == torch.float32 else t.float())


class _Head:
    """The head's tensors in fp32 (converted once per call), and the logit block for some rows."""

    def __init__(self, hidden, weight, bias, lora_u, lora_B, temperature):
        self.hidden, self.lora_u = hidden, lora_u
        self.w, self.b, self.lb = _fp32(weight), _fp32(bias), _fp32(lora_B)
        self.inv_temp = 1.0 / temperature

    def rows(self, rows):
        """(h, u) of these rows in fp32: views for a slice, gathered copies for an index tensor."""
        if isinstance(rows, slice):
            h = _fp32(self.hidden[rows])
            u = _fp32(self.lora_u[rows]) if self.lora_u is not None else None
        else:
            h = self.hidden.index_select(0, rows).float()
            u = self.lora_u.index_select(0, rows).float() if self.lora_u is not None else None
        return h, u

    def logits(self, h, u):
        z = torch.addmm(self.b, h, self.w.t()) if self.b is not None else h @ self.w.t()
        if u is not None:
            z.addmm_(u, self.lb.t())
        if self.inv_temp != 1.0:
            z.mul_(self.inv_temp)
        return z


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


def _log_softmax_stats(z, tgt):
    """z [C, V] -> (log p [C, V] (a new block; z may be dropped), lse [C], log p(target) [C])."""
    log_p = torch.log_softmax(z, dim=1)
    logp_t = log_p.gather(1, tgt.unsqueeze(1)).squeeze(1)
    lse = z.gather(1, tgt.unsqueeze(1)).squeeze(1) - logp_t
    return log_p, lse, logp_t


def _torch_forward(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk,
                   want_entropy, want_mean):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, lse = torch.zeros(N, **f32), torch.zeros(N, **f32)
    ent = torch.zeros(N if want_entropy else 0, **f32)
    mean = torch.zeros(N if want_mean else 0, **f32)
    head = _Head(hidden, weight, bias, lora_u, lora_B, temperature)
    for rows in _row_blocks(targets, ignore_index, chunk):
        log_p, lse_c, logp_c = _log_softmax_stats(head.logits(*head.rows(rows)), targets[rows])
        _put(lse, rows, lse_c)
        _put(logp, rows, logp_c)
        if want_mean:
            _put(mean, rows, log_p.mean(1))
        if want_entropy:
            _put(ent, rows, -torch.linalg.vecdot(torch.exp(log_p), log_p))
    return logp, ent, mean, lse


def _logit_grad_(log_p, tgt, d_logp, d_ent, ent, d_mean, inv_temp):
    """Turn log p [C, V] into G = dL/dlogits in place (formula in the module docstring)."""
    V = log_p.shape[1]
    coef = d_logp + d_mean if d_mean is not None else d_logp
    if d_ent is not None:
        p = torch.exp(log_p)
        # G = -p * (dlogp + dmean + dent * (log p + H))
        g = log_p.add_(ent.unsqueeze(1)).mul_(d_ent.unsqueeze(1)).add_(coef.unsqueeze(1)).mul_(p).neg_()
    else:
        g = log_p.exp_().mul_(coef.neg().unsqueeze(1))
    g.scatter_add_(1, tgt.unsqueeze(1), d_logp.unsqueeze(1))
    if d_mean is not None:
        g.add_(d_mean.unsqueeze(1) / V)
    if inv_temp != 1.0:
        g.mul_(inv_temp)
    return g


def _grad_buffers(hidden, weight, bias, lora_u, lora_B, needs):
    need_dh, need_dw, need_db, need_du, need_dlb = needs
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return [torch.zeros(hidden.shape if need_dh else (0,), **f32),
            torch.zeros(weight.shape if need_dw else (0,), **f32),
            torch.zeros(weight.shape[0] if need_db else 0, **f32),
            torch.zeros(lora_u.shape if need_du else (0,), **f32),
            torch.zeros(lora_B.shape if need_dlb else (0,), **f32)]


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


def _torch_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean,
                    ignore_index, temperature, chunk, needs):
    grads = _grad_buffers(hidden, weight, bias, lora_u, lora_B, needs)
    head = _Head(hidden, weight, bias, lora_u, lora_B, temperature)
    for rows in _row_blocks(targets, ignore_index, chunk):
        h, u = head.rows(rows)
        log_p = head.logits(h, u).sub_(lse[rows].unsqueeze(1))
        g = _logit_grad_(log_p, targets[rows], d_logp[rows], None if d_ent is None else d_ent[rows],
                         None if d_ent is None else ent[rows], None if d_mean is None else d_mean[rows],
                         head.inv_temp)
        _accumulate(grads, head, rows, g, h, u, needs)
    return grads


def _torch_dot(hidden, weight, bias, lora_u, lora_B, targets, c_logp, c_mean, ignore_index, temperature, chunk,
               needs):
    """sum_i c_logp_i logp_i + c_mean_i mean_logp_i and its gradients, one pass over the logits."""
    grads = _grad_buffers(hidden, weight, bias, lora_u, lora_B, needs)
    head = _Head(hidden, weight, bias, lora_u, lora_B, temperature)
    value = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows in _row_blocks(targets, ignore_index, chunk):
        h, u = head.rows(rows)
        tgt, cl = targets[rows], c_logp[rows]
        log_p, _, logp_c = _log_softmax_stats(head.logits(h, u), tgt)
        value += torch.dot(cl, logp_c)
        cm = None
        if c_mean is not None:
            cm = c_mean[rows]
            value += torch.dot(cm, log_p.mean(1))
        g = _logit_grad_(log_p, tgt, cl, None, None, cm, head.inv_temp)
        _accumulate(grads, head, rows, g, h, u, needs)
    return [value] + grads


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
    if face == "triton":
        return _triton_forward(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature,
                               want_entropy, want_mean)
    return _torch_forward(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk,
                          want_entropy, want_mean)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, lora_u, lora_B, targets, ignore_index, temperature, chunk, want_entropy, want_mean,
      face):
    n, ne, nm = _stat_shapes(hidden, want_entropy, want_mean)
    new = lambda k: hidden.new_empty(k, dtype=torch.float32)  # noqa: E731
    return new(n), new(ne), new(nm), new(n)


@torch.library.custom_op("peftkern::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, targets: torch.Tensor,
                        lse: torch.Tensor, ent: torch.Tensor, d_logp: torch.Tensor, d_ent: torch.Tensor | None,
                        d_mean: torch.Tensor | None, ignore_index: int, temperature: float, chunk: int, face: str,
                        needs: list[bool]) -> list[torch.Tensor]:
    """-> [dh [N, H], dW [V, H], db [V], du [N, r], dB [V, r]] in fp32, each [0] when not needed."""
    if face == "triton":
        return list(_triton_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent,
                                     d_mean, ignore_index, temperature, needs))
    return _torch_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, ent, d_logp, d_ent, d_mean,
                           ignore_index, temperature, chunk, needs)


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


@torch.library.custom_op("peftkern::linear_logprobs_dot", mutates_args=())
def linear_logprobs_dot(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_u: torch.Tensor | None, lora_B: torch.Tensor | None, targets: torch.Tensor,
                        c_logp: torch.Tensor, c_mean: torch.Tensor | None, ignore_index: int, temperature: float,
                        chunk: int, face: str, needs: list[bool]) -> list[torch.Tensor]:
    """-> [value (fp32 scalar) = sum_i c_logp_i logp_i + c_mean_i mean_logp_i, then its gradients
    dh, dW, db, du, dB (in their inputs' dtypes, [0] when not needed)], all computed in this one call."""
    if face == "triton":
        logp, _, mean, lse = _triton_forward(hidden, weight, bias, lora_u, lora_B, targets, ignore_index,
                                             temperature, False, c_mean is not None)
        value = (c_logp * logp).sum()
        if c_mean is not None:
            value = value + (c_mean * mean).sum()
        grads = _triton_backward(hidden, weight, bias, lora_u, lora_B, targets, lse, None, c_logp, None, c_mean,
                                 ignore_index, temperature, needs)
    else:
        value, *grads = _torch_dot(hidden, weight, bias, lora_u, lora_B, targets, c_logp, c_mean, ignore_index,
                                   temperature, chunk, needs)
    # cast now: the fp32 buffers are freed at once, and only input-dtype gradients wait for the backward
    inputs = (hidden, weight, bias, lora_u, lora_B)
    return [value] + [g.to(t.dtype) if t is not None else g for g, t in zip(grads, inputs)]


@linear_logprobs_dot.register_fake
def _(hidden, weight, bias, lora_u, lora_B, targets, c_logp, c_mean, ignore_index, temperature, chunk, face, needs):
    grads = _fake_grads(hidden, weight, lora_u, lora_B, needs)
    inputs = (hidden, weight, bias, lora_u, lora_B)
    return [hidden.new_empty((), dtype=torch.float32)] + [g.to(t.dtype) if t is not None else g
                                                         for g, t in zip(grads, inputs)]


def _dot_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zero tensors


def _dot_backward(ctx, grads_out):
    d_value = grads_out[0]
    grads = [None if (g.numel() == 0 or d_value is None) else g * d_value.to(g.dtype) for g in ctx.saved_tensors]
    return (*grads,) + (None,) * 8


linear_logprobs_dot.register_autograd(_dot_backward, setup_context=_dot_setup)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------

def _check(hidden, weight, targets, bias, temperature, lora_A, lora_B, lora_scaling, chunk_size):
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    if bias is not None:
        _checks.check_float("bias", bias)
    _checks.check_same(OP, {"hidden": hidden, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B},
                       dtype=hidden.dtype)
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


def _check_targets(targets, ignore_index, vocab):
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"{OP}: targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")


def _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A, lora_B, lora_scaling, chunk_size):
    """Checks, then the flat operands: (hidden [N, H], targets [N] int64, u [N, r] or None, face, chunk,
    bias (contiguous))."""
    _check(hidden, weight, targets, bias, temperature, lora_A, lora_B, lora_scaling, chunk_size)
    _check_targets(targets, ignore_index, weight.shape[0])
    face = backend.pick(OP, FACES, hidden.device.type)
    h2d = hidden.reshape(-1, hidden.shape[-1])
    if face == "triton" or not h2d.is_contiguous():
        h2d = h2d.contiguous()
    t1d = targets.reshape(-1).long().contiguous()
    u = None
    if lora_A is not None:
        u = (h2d @ lora_A.t()) * float(lora_scaling)
    chunk = chunk_size or default_chunk_size(h2d.shape[0], weight.shape[0])
    if bias is not None:
        bias = bias.contiguous()
    return h2d, t1d, u, face, chunk, bias


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                          *, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                          lora_scaling: float = 1.0, chunk_size: int | None = None):
    """Per-token log p(target) under softmax((hidden W^T + b + s (hidden A^T) B^T) / temperature),
    without building the [tokens, V] logits.

    hidden [..., H] (fp32, fp16 or bf16), weight [V, H], targets [...] int64 (ignore_index marks
    positions to skip), bias [V] or None, lora_A [r, H] and lora_B [V, r] with lora_scaling s for a
    LoRA on the head (None: no LoRA). Returns logp [...] fp32 (0 at ignored positions), and with
    ``return_entropy`` also the entropy of each position's distribution [...] fp32 (0 at ignored
    positions). Gradients flow to hidden, weight, bias, lora_A and lora_B (through both outputs);
    ignored positions get none. Accumulation is fp32 whatever the input dtype. ``chunk_size``
    overrides the tokens per block of the torch face (default: :func:`default_chunk_size`).
    """
    h2d, t1d, u, face, chunk, bias = _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A,
                                              lora_B, lora_scaling, chunk_size)
    logp, ent, _, _ = torch.ops.peftkern.linear_logprobs_fwd(
        h2d, weight, bias, u, lora_B if u is not None else None, t1d, int(ignore_index), float(temperature),
        int(chunk), bool(return_entropy), False, face)
    lead = hidden.shape[:-1]
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def fused_linear_logprob_stats(hidden, weight, targets, ignore_index=-100, bias=None, temperature=1.0, *,
                               entropy=False, mean_logp=False, lora_A=None, lora_B=None, lora_scaling=1.0,
                               chunk_size=None):
    """(logp, entropy or None, mean_logp or None), each [...] fp32: :func:`fused_linear_logprobs`
    plus the vocabulary mean of log p (the label-smoothing term) when ``mean_logp``."""
    h2d, t1d, u, face, chunk, bias = _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A,
                                              lora_B, lora_scaling, chunk_size)
    logp, ent, mean, _ = torch.ops.peftkern.linear_logprobs_fwd(
        h2d, weight, bias, u, lora_B if u is not None else None, t1d, int(ignore_index), float(temperature),
        int(chunk), bool(entropy), bool(mean_logp), face)
    lead = hidden.shape[:-1]
    return logp.view(lead), (ent.view(lead) if entropy else None), (mean.view(lead) if mean_logp else None)


def fused_linear_logprob_dot(hidden, weight, targets, c_logp, c_mean=None, ignore_index=-100, bias=None,
                             temperature=1.0, *, lora_A=None, lora_B=None, lora_scaling=1.0, chunk_size=None):
    """sum_i c_logp[i] logp[i] + c_mean[i] mean_logp[i] as an fp32 scalar, with the gradients formed in
    the forward pass (the coefficients are constants: c_logp, c_mean [...] like targets)."""
    h2d, t1d, u, face, chunk, bias = _prepare(hidden, weight, targets, ignore_index, bias, temperature, lora_A,
                                              lora_B, lora_scaling, chunk_size)
    grad_on = torch.is_grad_enabled()
    lb = lora_B if u is not None else None
    needs = [grad_on and t is not None and t.requires_grad for t in (h2d, weight, bias, u, lb)]
    valid = t1d != ignore_index
    c_logp = torch.where(valid, c_logp.reshape(-1).detach().float(), 0.0).contiguous()
    if c_mean is not None:
        c_mean = torch.where(valid, c_mean.reshape(-1).detach().float(), 0.0).contiguous()
    out = torch.ops.peftkern.linear_logprobs_dot(h2d, weight, bias, u, lb, t1d, c_logp, c_mean, int(ignore_index),
                                                 float(temperature), int(chunk), face, needs)
    return out[0]
