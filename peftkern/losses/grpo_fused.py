"""GRPO and RLOO from hidden states: the output head, log-softmax and loss fused through
``peftkern.ops.logprobs.fused_unit_loss``, so no [tokens, V] logits are built and the gradients are
formed in the forward pass (three vocabulary GEMMs; the backward only scales them).

Registered unit losses (``peftkern.ops.logprob_units``), over a batch [B, T] flattened to N = B * T
positions:

* ``grpo`` (token-local: token-level importance sampling, chunks may cut sequences) and
  ``grpo_sequence`` (units = sequences: GSPO's sequence-level ratio): tensors [old [N] (or [0]: the
  current log-probs, detached), advantages [N] (each token's sequence's), weight [N] (the loss type's
  normalization), keep [N] (the entropy mask, or [0]), ref [N] (or [0] when beta = 0)]; scalars
  [epsilon_low, epsilon_high, delta (<= 0: none), beta]; variant: the loss type.
* ``rloo`` (units = sequences): tensors [old [B] (summed log-probs, or [0]), advantages [B],
  weight [B]]; scalars [epsilon_low, epsilon_high].

The formulas are :func:`peftkern.losses.grpo.grpo_terms` / ``rloo_terms``, the same code the
log-prob losses run.
"""
from __future__ import annotations

import torch

from peftkern.losses.grpo import (GRPOOutput, SequenceOps, check_grpo_args, grpo_metrics, grpo_terms,
                                  high_entropy_mask, rloo_clip_shares, rloo_terms, token_weights)
from peftkern.ops.logprob_units import UnitChunk, UnitGrads, register_unit_loss
from peftkern.ops.logprobs import fused_linear_logprob_stats, fused_linear_logprobs, fused_unit_loss


def _chunk_sequences(chunk: UnitChunk) -> SequenceOps:
    return SequenceOps(lambda x: chunk.sequence_sums(x).reshape(-1),
                       lambda s: chunk.per_token(s.reshape(chunk.group, -1)))


def grpo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    old, adv, weight, keep, ref = tensors
    eps_low, eps_high, delta, beta = scalars
    pos, scored = chunk.pos, chunk.scored
    level = "token" if chunk.u0 is None else "sequence"
    w = torch.where(scored, weight.index_select(0, pos), 0.0)
    value, d_logp = grpo_terms(
        chunk.logp, chunk.logp if old.numel() == 0 else old.index_select(0, pos), adv.index_select(0, pos), w,
        keep.index_select(0, pos) if keep.numel() else None, ref.index_select(0, pos) if beta else None,
        _chunk_sequences(chunk) if level == "sequence" else None, loss_type=variant, level=level,
        epsilon_low=eps_low, epsilon_high=eps_high, delta=delta if delta > 0 else None, beta=beta)
    return UnitGrads(value, d_logp)


def rloo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    old, adv, weight = tensors
    eps_low, eps_high = scalars
    seq = _chunk_sequences(chunk)
    old_seq = seq.sums(chunk.logp) if old.numel() == 0 else chunk.unit_slice(old).reshape(-1)
    value, d_logp = rloo_terms(chunk.logp, old_seq, chunk.unit_slice(adv).reshape(-1),
                               chunk.unit_slice(weight).reshape(-1), chunk.scored, seq, epsilon_low=eps_low,
                               epsilon_high=eps_high)
    return UnitGrads(value, d_logp)


register_unit_loss("grpo", grpo_unit_loss, token_local=True)
register_unit_loss("grpo_sequence", grpo_unit_loss)
register_unit_loss("rloo", rloo_unit_loss)


def _check_batch(op: str, hidden: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor, **per_token):
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    B, T = hidden.shape[:2]
    if tuple(targets.shape) != (B, T):
        raise ValueError(f"{op}: targets has shape {tuple(targets.shape)}, expected {(B, T)} (hidden's [B, T])")
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"{op}: advantages must be [B] (one per completion), B = {B}, got shape "
                         f"{tuple(advantages.shape)}")
    for name, t in per_token.items():
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {(B, T)}")
    return B, T, advantages.detach().float().to(hidden.device)


def _flat(t: torch.Tensor | None, device) -> torch.Tensor:
    return torch.empty(0, device=device) if t is None else t.detach().float().reshape(-1).to(device)


def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                    old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                    loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
                    beta: float = 0.0, ignore_index: int = -100, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, *, delta: float | None = None,
                    importance_sampling_level: str = "token", max_completion_length: int | None = None,
                    num_items_in_batch=None, top_entropy_quantile: float = 1.0,
                    entropies: torch.Tensor | None = None, return_entropy: bool = False,
                    ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                    ref_bias: torch.Tensor | None = None, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                    chunk_size: int | None = None) -> GRPOOutput:
    """:func:`peftkern.losses.grpo_loss` from the policy's hidden states, without [tokens, V] logits.

    hidden [B, T, H] (position t predicts targets[t]), weight [V, H], targets [B, T] (ignore_index on
    prompt and padding positions: the completion mask is ``targets != ignore_index``), advantages
    [B]; old_logps, ref_logps [B, T] fp32 as in ``grpo_loss`` (old None: the current log-probs; with
    beta > 0 the reference log-probs are given, or computed here without gradients from
    ``ref_hidden`` / ``ref_weight`` / ``ref_bias``; with beta = 0 nothing of the reference is read).
    ``temperature`` divides the logits (TRL scores at the sampling temperature). Bias, a LoRA on the
    head and ``chunk_size`` as :func:`peftkern.ops.fused_linear_logprobs`.

    ``top_entropy_quantile`` < 1 needs the per-token entropies: given as ``entropies`` [B, T], or
    computed first in a statistics pass without gradients (one more vocabulary GEMM).
    ``return_entropy`` also returns each completion token's entropy (from the same pass as the loss).
    -> :class:`GRPOOutput` with ``logps`` [B, T] (detached; 0 off the mask) and ``entropy``.
    """
    op = "fused_grpo_loss"
    eps_low, eps_high, delta, beta = check_grpo_args(op, loss_type, importance_sampling_level, epsilon, epsilon_high,
                                                     delta, beta, top_entropy_quantile)
    B, T, adv = _check_batch(op, hidden, targets, advantages, old_logps=old_logps,
                             ref_logps=ref_logps if beta else None, entropies=entropies)
    device = hidden.device
    mask = targets != ignore_index
    head = dict(ignore_index=ignore_index, bias=bias, temperature=temperature, lora_A=lora_A, lora_B=lora_B,
                lora_scaling=lora_scaling, chunk_size=chunk_size)
    if beta and ref_logps is None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{op}: beta = {beta} needs ref_logps, or ref_hidden and ref_weight to compute them")
        with torch.no_grad():
            ref_logps = fused_linear_logprobs(ref_hidden, ref_weight, targets, ignore_index, ref_bias, temperature,
                                              chunk_size=chunk_size)
    keep = None
    if top_entropy_quantile < 1.0:
        if entropies is None:
            with torch.no_grad():
                entropies = fused_linear_logprob_stats(hidden, weight, targets, entropy=True, **head)[1]
        keep = high_entropy_mask(entropies, mask, top_entropy_quantile).float()
    w = token_weights(mask, loss_type, max_completion_length, num_items_in_batch, op)
    sequence = importance_sampling_level == "sequence"
    out = fused_unit_loss(hidden, weight, targets, "grpo_sequence" if sequence else "grpo",
                          tensors=[_flat(old_logps, device), adv.repeat_interleave(T), w.reshape(-1),
                                   _flat(keep, device), _flat(ref_logps if beta else None, device)],
                          scalars=[eps_low, eps_high, delta or 0.0, beta], variant=loss_type, group=1,
                          entropy=return_entropy, **head)
    logps = out.logp.view(B, T)
    metrics = grpo_metrics(logps, logps if old_logps is None else old_logps, ref_logps, adv, mask,
                           loss_type=loss_type, level=importance_sampling_level, epsilon_low=eps_low,
                           epsilon_high=eps_high, delta=delta, beta=beta)
    return GRPOOutput(out.loss, *metrics, logps=logps,
                      entropy=out.entropy.view(B, T) if return_entropy else None)


def fused_rloo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                    old_logps: torch.Tensor | None = None, epsilon: float = 0.2, epsilon_high: float | None = None,
                    ignore_index: int = -100, bias: torch.Tensor | None = None, temperature: float = 1.0, *,
                    scale: float | None = None, return_entropy: bool = False, lora_A=None, lora_B=None,
                    lora_scaling: float = 1.0, chunk_size: int | None = None) -> GRPOOutput:
    """:func:`peftkern.losses.rloo_loss` from hidden states [B, T, H]: old_logps [B] the summed
    completion log-probs of the sampling policy (None: the current ones), advantages [B]. ``scale``
    multiplies the sum over completions (default 1 / B: the mean). -> :class:`GRPOOutput`."""
    op = "fused_rloo_loss"
    eps_low, eps_high, _, _ = check_grpo_args(op, "grpo", "sequence", epsilon, epsilon_high, None, 0.0)
    B, T, adv = _check_batch(op, hidden, targets, advantages)
    if old_logps is not None and tuple(old_logps.shape) != (B,):
        raise ValueError(f"{op}: old_logps must be [B] (summed completion log-probs), got {tuple(old_logps.shape)}")
    device = hidden.device
    w = torch.full((B,), 1.0 / max(B, 1) if scale is None else float(scale), device=device)
    out = fused_unit_loss(hidden, weight, targets, "rloo", tensors=[_flat(old_logps, device), adv, w],
                          scalars=[eps_low, eps_high], group=1, ignore_index=ignore_index, bias=bias,
                          temperature=temperature, entropy=return_entropy, lora_A=lora_A, lora_B=lora_B,
                          lora_scaling=lora_scaling, chunk_size=chunk_size)
    logps = out.logp.view(B, T)
    seq = logps.sum(-1)
    old = seq if old_logps is None else old_logps.detach().float().to(device)
    return GRPOOutput(out.loss, None, *rloo_clip_shares(seq, old, adv, eps_low, eps_high), logps=logps,
                      entropy=out.entropy.view(B, T) if return_entropy else None)
