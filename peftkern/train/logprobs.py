"""Per-token log-probs of the labels straight from hidden states, never building [tokens, V] logits.

The trainers call :func:`token_logprobs`; it runs peftkern's fused op
(``peftkern.ops.logprobs.fused_linear_logprobs``) when that op is importable, else a chunked torch
path that recomputes each chunk's logits in the backward (so memory stays at one chunk of logits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
_CHUNK_TOKENS = 1024


def _fused_op():
    try:
        from peftkern.ops.logprobs import fused_linear_logprobs
    except Exception:  # the op module is optional: a build without it trains on the chunked path
        return None
    return fused_linear_logprobs


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor):
    logits = F.linear(h, weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.clamp_min(0)[:, None])[:, 0] - lse
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs * logits).sum(-1)
    skip = targets == IGNORE_INDEX
    return torch.where(skip, torch.zeros_like(logp), logp), torch.where(skip, torch.zeros_like(entropy), entropy)


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias=None,
                     chunk: int = _CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], targets [N] int64 -> (logp [N], entropy [N]) fp32, 0 where target == -100."""
    logps, ents = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, en = checkpoint(_chunk_logprobs, h, weight, bias, t, use_reentrant=False)
        else:
            lp, en = _chunk_logprobs(h, weight, bias, t)
        logps.append(lp)
        ents.append(en)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(ents)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None, return_entropy: bool = False, *, lora_A=None, lora_B=None,
                   lora_scaling: float = 1.0):
    """hidden [B, T, H] (any float dtype), weight [V, H], targets [B, T] int64 (-100: skip) ->
    log p(targets) [B, T] fp32 with 0 at skipped positions (and, with ``return_entropy``, the entropy
    of each position's next-token distribution [B, T], 0 at skipped positions). A LoRA on the head
    (lora_A [r, H], lora_B [V, r], lora_scaling) is applied and trained."""
    shape = targets.shape
    h2d, t1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # Only rows with a target go through the head: prompts and padding cost nothing.
    rows = (t1d != IGNORE_INDEX).nonzero()[:, 0]
    out = torch.zeros(t1d.shape[0], dtype=torch.float32, device=hidden.device)
    if rows.numel() == 0:
        zero = out.view(shape) + hidden.sum() * 0.0
        return (zero, zero) if return_entropy else zero
    h_sel, t_sel = h2d.index_select(0, rows), t1d.index_select(0, rows)
    fused = _fused_op()
    if fused is not None:
        got = fused(h_sel, weight, t_sel, IGNORE_INDEX, bias, return_entropy=return_entropy, lora_A=lora_A,
                    lora_B=lora_B, lora_scaling=lora_scaling)
        logp, ent = got if return_entropy else (got, None)
    else:
        if lora_A is not None:
            raise ValueError("a LoRA on the output head needs peftkern.ops.logprobs, which this build lacks")
        logp, ent = chunked_logprobs(h_sel, weight, t_sel, bias)
    logp = out.index_put((rows,), logp.float()).view(shape)
    if not return_entropy:
        return logp
    return logp, out.index_put((rows,), ent.float()).view(shape)
