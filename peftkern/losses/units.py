"""The preference losses as per-unit losses of ``peftkern.ops.logprobs.fused_unit_loss``: each reads a
chunk's token log-probs, forms its sequence log-probs, calls the per-pair (or per-example) formula
of ``dpo.py`` / ``preference.py`` / ``kto.py`` with its analytic derivatives, and hands back
d value / d logp per token. The fused losses in ``fused.py`` call them by name.

Registered here (tensors, scalars, variant as ``fused_unit_loss`` passes them; layout [G, U, T]):

* ``dpo`` (pairs, G = 2): tensors [ref [2U] (chosen, then rejected)]; scalars [beta, label_smoothing,
  discopop_tau, average (1: length-normalized log-probs), scale]; variant: a separable DPO loss type.
* ``simpo`` (pairs): scalars [beta, gamma, label_smoothing, scale].
* ``cpo`` (pairs): tensors [nll_weight (0-dim)]; scalars [beta, label_smoothing, simpo_gamma, alpha,
  average, scale]; variant: a CPO loss type; each chosen token also carries -nll_weight * logp (the
  NLL term: nll_weight = cpo_alpha / chosen tokens of the batch).
* ``orpo`` (pairs): tensors [nll_weight (0-dim): 1 / chosen tokens]; scalars [beta, scale].
* ``kto`` (sequences, G = 1): tensors [ref [U], desirable [U] (0/1), kl (0-dim, the reference point
  z0)]; scalars [beta, desirable_weight, undesirable_weight, scale]; variant: a KTO loss type.

``scale`` multiplies the sum over units (1/U for the mean). Data-dependent constants travel as
0-dim tensors, so no host sync is needed to build the call.
"""
from __future__ import annotations

import torch

from peftkern.losses.dpo import dpo_pair_losses
from peftkern.losses.kto import kto_example_losses
from peftkern.losses.preference import cpo_pair_losses, orpo_pair_losses, simpo_pair_losses
from peftkern.ops.logprob_units import UnitChunk, UnitGrads, register_unit_loss


def _sequence_logps(chunk: UnitChunk, average: bool):
    """([G, Uc] sequence log-probs, [G, Uc] divisor of each sequence's tokens' gradient)."""
    sums = chunk.sequence_sums(chunk.logp)
    if not average:
        return sums, torch.ones_like(sums)
    count = chunk.sequence_tokens().clamp(min=1.0)
    return sums / count, count


def _pair_result(chunk, losses, d_c, d_r, divisor, scale, nll_weight=None) -> UnitGrads:
    alpha = torch.stack([d_c, d_r]) * scale / divisor
    d_logp = chunk.per_token(alpha)
    value = losses.sum() * scale
    if nll_weight is not None:
        chosen = (chunk.sequence < chunk.num_units).to(d_logp.dtype)  # the first sequence of each pair
        d_logp = d_logp - nll_weight * chosen
        value = value - nll_weight * torch.dot(chosen, chunk.logp)
    return UnitGrads(value, d_logp)


def dpo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    beta, eps, tau, average, scale = scalars
    s, divisor = _sequence_logps(chunk, bool(average))
    ref = chunk.unit_slice(tensors[0]).to(s.dtype)
    losses, d_c, d_r = dpo_pair_losses(s[0] - ref[0], s[1] - ref[1], beta, variant, eps, tau, with_grad=True)
    return _pair_result(chunk, losses, d_c, d_r, divisor, scale)


def simpo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    beta, gamma, eps, scale = scalars
    s, divisor = _sequence_logps(chunk, True)
    losses, d_c, d_r = simpo_pair_losses(s[0], s[1], beta, gamma, eps, with_grad=True)
    return _pair_result(chunk, losses, d_c, d_r, divisor, scale)


def cpo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    beta, eps, gamma, alpha, average, scale = scalars
    s, divisor = _sequence_logps(chunk, bool(average))
    losses, d_c, d_r = cpo_pair_losses(s[0], s[1], beta, variant, eps, gamma, alpha, with_grad=True)
    return _pair_result(chunk, losses, d_c, d_r, divisor, scale, tensors[0])


def orpo_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    beta, scale = scalars
    s, divisor = _sequence_logps(chunk, True)
    losses, d_c, d_r = orpo_pair_losses(s[0], s[1], beta, with_grad=True)
    return _pair_result(chunk, losses, d_c, d_r, divisor, scale, tensors[0])


def kto_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    beta, desirable_weight, undesirable_weight, scale = scalars
    kl = tensors[2]
    s = chunk.sequence_sums(chunk.logp)[0]
    ref = chunk.unit_slice(tensors[0])[0].to(s.dtype)
    desirable = chunk.unit_slice(tensors[1])[0] > 0.5
    losses, d_ratio = kto_example_losses(s - ref, desirable, beta, kl, desirable_weight, undesirable_weight, variant,
                                         with_grad=True)
    return UnitGrads(losses.sum() * scale, chunk.per_token((d_ratio * scale)[None, :]))


register_unit_loss("dpo", dpo_unit_loss)
register_unit_loss("simpo", simpo_unit_loss)
register_unit_loss("cpo", cpo_unit_loss)
register_unit_loss("orpo", orpo_unit_loss)
register_unit_loss("kto", kto_unit_loss)
