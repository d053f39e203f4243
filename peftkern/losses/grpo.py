"""GRPO and RLOO: policy-gradient losses with group baselines, over per-token log-probs, with the
formulas of TRL 1.16's ``GRPOTrainer`` and ``RLOOTrainer``, and the advantages they are fed.

GRPO (Shao et al. 2024, arXiv:2402.03300) per token t of completion i:

    r = exp(logp - old_logp)            (token level; sequence level (GSPO, Zheng et al. 2025,
                                         arXiv:2507.18071): exp of the sequence's mean log-ratio)
    l = -min(min(r, delta) A, clip(r, 1 - epsilon, 1 + epsilon_high) A)      (delta: INTELLECT-2)
      = -clip(r, max=epsilon_high).detach() A logp                          (cispo, MiniMax-M1)
    l += beta (exp(ref - logp) - (ref - logp) - 1)                          (the k3 KL; beta = 0: none)

and the loss types differ only in how the per-token terms are averaged: ``grpo`` per sequence then
over sequences, ``bnpo`` over the batch's tokens, ``dr_grpo`` over B x max_completion_length (Liu
et al. 2025, arXiv:2503.20783), ``dapo`` / ``cispo`` over ``num_items_in_batch`` tokens (the whole
generation batch: Yu et al. 2025, arXiv:2503.14476). ``top_entropy_quantile`` < 1 keeps the
policy term only on the highest-entropy tokens (Wang et al. 2025, arXiv:2506.01939).

RLOO (Ahmadian et al. 2024, arXiv:2402.14740) as TRL: one importance ratio per sequence from the
*summed* log-probs, the same clipped surrogate, mean over sequences; its KL enters the reward.

Every formula is written once, in :func:`grpo_terms` / :func:`rloo_terms`, as value *and* the
analytic gradient with respect to the log-probs (the fused losses form their gradients in the
forward pass, where autograd is not available); the gradient follows torch's autograd of TRL's code
exactly, ties included (``min`` splits the gradient in half where its arguments are equal, ``clamp``
passes it at its bounds). :func:`grpo_loss` / :func:`rloo_loss` wrap them for autograd.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from peftkern.losses._common import check_choice

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's advantages / (std + 1e-4)


class GRPOOutput(NamedTuple):
    """A GRPO / RLOO loss and what TRL logs beside it (each a detached 0-dim fp32 tensor, no host
    sync): the mean k3 KL over completion tokens (None when beta = 0) and the shares of completion
    tokens (sequences at sequence level) whose ratio was clipped below, above, or either, with an
    advantage of the sign that makes the clip bind. ``logps`` / ``entropy`` [B, T] (detached) come
    from the fused losses; ``cispo`` reports its one clip share as ``clip_ratio_high``."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    clip_ratio_low: torch.Tensor
    clip_ratio_high: torch.Tensor
    clip_ratio_region: torch.Tensor
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------

def _groups(op: str, rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[N] rewards -> [N / G, G] (the G completions of a prompt are consecutive, as TRL lays them out)."""
    if rewards.dim() != 1:
        raise ValueError(f"{op}: rewards must be [N] (G completions per prompt, consecutive), got shape "
                         f"{tuple(rewards.shape)}")
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 2:
        raise ValueError(f"{op}: num_generations must be an integer >= 2 (a group baseline needs at least two "
                         f"completions per prompt), got {num_generations!r}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{op}: {rewards.numel()} rewards are not a whole number of groups of "
                         f"num_generations={num_generations}")
    return rewards.float().view(-1, num_generations)


def nanstd(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Standard deviation with Bessel's correction over the non-NaN entries (NaN with fewer than two)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True).to(x.dtype)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = var.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's advantages [N]: each reward minus its group's mean, divided by the group's standard
    deviation + 1e-4 (``"group"``), the batch's (``"batch"``, PPO-Lite) or nothing (``"none"``,
    Dr. GRPO). A NaN reward (unscorable) is left out of its group's statistics and gets advantage 0."""
    op = "group_advantages"
    check_choice(op, "scale_rewards", scale_rewards, SCALE_REWARDS)
    grouped = _groups(op, rewards, num_generations)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(grouped) + STD_EPS)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool = False) -> torch.Tensor:
    """RLOO's advantages [N]: each reward minus the mean of the other completions of its prompt
    (leave-one-out; NaN rewards left out, and given 0); with ``normalize``, then standardized over the
    batch (mean 0, std 1, + 1e-4)."""
    grouped = _groups("rloo_advantages", rewards, num_generations)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(grouped.dtype)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


# ---------------------------------------------------------------------------------------------
# per-token terms with their gradients (one home for the formulas)
# ---------------------------------------------------------------------------------------------

class SequenceOps(NamedTuple):
    """How flat per-token values map to their sequences: ``sums(x [n]) -> [S]`` and
    ``expand(s [S]) -> [n]`` (each token gets its sequence's value)."""

    sums: Callable[[torch.Tensor], torch.Tensor]
    expand: Callable[[torch.Tensor], torch.Tensor]


def _min_weights(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d min(a, b) / d a as torch's autograd gives it: 1 where a < b, 1/2 where equal, 0 above."""
    return torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0)).to(a.dtype)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float,
                      delta: float | None = None):
    """PPO's clipped surrogate -min(min(r, delta) A, clip(r, 1 - e_low, 1 + e_high) A), elementwise
    (delta None: no upper cap on the unclipped branch) -> (loss, d loss / d r)."""
    capped = ratio if delta is None else ratio.clamp(max=delta)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    a, b = capped * advantages, clipped * advantages
    loss = -torch.minimum(a, b)
    w_a = _min_weights(a, b)
    pass_capped = torch.ones_like(ratio) if delta is None else (ratio <= delta).to(ratio.dtype)
    pass_clipped = ((ratio >= 1.0 - epsilon_low) & (ratio <= 1.0 + epsilon_high)).to(ratio.dtype)
    d_ratio = -advantages * (w_a * pass_capped + (1.0 - w_a) * pass_clipped)
    return loss, d_ratio


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor):
    """Schulman's k3 estimate of KL(pi || ref) per token, exp(ref - logp) - (ref - logp) - 1 (>= 0),
    -> (kl, d kl / d logp)."""
    diff = ref_logps - logps
    e = torch.exp(diff)
    return e - diff - 1.0, 1.0 - e


def grpo_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor,
               keep: torch.Tensor | None, ref_logp: torch.Tensor | None, seq: SequenceOps | None, *,
               loss_type: str, level: str, epsilon_low: float, epsilon_high: float, delta: float | None,
               beta: float):
    """The GRPO loss over flat tokens and its gradient: value = sum_t weight_t (keep_t l_t + beta kl_t).

    logp, old_logp, advantages (each token's sequence's advantage), weight (the loss type's
    normalization, 0 on tokens that carry no loss), keep (the entropy mask, None: all), ref_logp
    (None when beta = 0): each [n] fp32. ``seq``: the token -> sequence map (needed at sequence
    level). -> (value 0-dim, d value / d logp [n])."""
    live = weight != 0  # tokens that carry loss; the rest may hold anything (padding), never read
    log_ratio = torch.where(live, logp - old_logp, 0.0)
    if level == "sequence":
        counts = seq.sums(live.to(logp.dtype)).clamp(min=1.0)
        log_ratio = seq.expand(seq.sums(log_ratio) / counts)
    ratio = torch.exp(log_ratio)
    policy_w = weight if keep is None else weight * keep
    if loss_type == "cispo":
        coef = ratio.clamp(max=epsilon_high) * advantages
        value = -(policy_w * coef * logp).sum()
        d_logp = -policy_w * coef  # the ratio is detached in cispo: d/dlogp of the weighted log-prob only
    else:
        per_token, d_ratio = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high, delta)
        value = (policy_w * per_token).sum()
        d_log_ratio = policy_w * d_ratio * ratio
        if level == "sequence":  # the sequence's log-ratio is the mean of its tokens'
            d_logp = seq.expand(seq.sums(d_log_ratio) / counts) * live
        else:
            d_logp = d_log_ratio
    if beta:
        kl, d_kl = k3_kl(logp, torch.where(live, ref_logp, logp))
        value = value + beta * (weight * kl).sum()
        d_logp = d_logp + beta * weight * d_kl
    return value, d_logp


def rloo_terms(logp: torch.Tensor, old_seq_logp: torch.Tensor, advantages: torch.Tensor, weight: torch.Tensor,
               scored: torch.Tensor, seq: SequenceOps, *, epsilon_low: float, epsilon_high: float):
    """RLOO's loss over flat tokens and its gradient: value = sum_s weight_s l_s with one ratio per
    sequence, exp(sum of its log-probs - old_seq_logp_s), and TRL's clipped surrogate l_s.
    logp, scored [n]; old_seq_logp, advantages, weight [S]. -> (value, d value / d logp [n])."""
    mask = scored.to(logp.dtype)
    ratio = torch.exp(seq.sums(logp * mask) - old_seq_logp)
    per_seq, d_ratio = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)
    return (weight * per_seq).sum(), seq.expand(weight * d_ratio * ratio) * mask


# ---------------------------------------------------------------------------------------------
# checks and the loss types' token weights
# ---------------------------------------------------------------------------------------------

def check_grpo_args(op: str, loss_type: str, level: str, epsilon: float, epsilon_high: float | None,
                    delta: float | None, beta: float, top_entropy_quantile: float = 1.0):
    """-> (epsilon_low, epsilon_high, delta, beta) as floats, after checking them."""
    check_choice(op, "loss_type", loss_type, GRPO_LOSS_TYPES)
    check_choice(op, "importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    values = {"epsilon": epsilon, "epsilon_high": epsilon if epsilon_high is None else epsilon_high, "beta": beta,
              "top_entropy_quantile": top_entropy_quantile}
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    eps_low, eps_high = float(values["epsilon"]), float(values["epsilon_high"])
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"{op}: epsilon and epsilon_high must be >= 0, got {eps_low} and {eps_high}")
    if beta < 0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta}")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"{op}: top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if delta is not None:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 0:
            raise ValueError(f"{op}: delta must be a finite number > 0 (or None), got {delta!r}")
        delta = float(delta)
    return eps_low, eps_high, delta, float(beta)


def token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None,
                  num_items_in_batch=None, op: str = "grpo_loss", dtype=torch.float32) -> torch.Tensor:
    """[B, T] ``dtype``: each completion token's share in the loss type's average (0 off the mask).

    grpo: 1 / (B * tokens of its sequence); bnpo: 1 / tokens of the batch; dr_grpo: 1 / (B *
    max_completion_length); dapo, cispo: 1 / num_items_in_batch (default: the batch's tokens)."""
    m = mask.to(dtype)
    B = m.shape[0]
    if loss_type == "grpo":
        return m / (B * m.sum(-1, keepdim=True).clamp(min=1.0))
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None or int(max_completion_length) < 1:
            raise ValueError(f"{op}: loss_type 'dr_grpo' divides by max_completion_length: give it (a positive "
                             f"int), got {max_completion_length!r}")
        return m / (B * int(max_completion_length))
    count = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=dtype,
                                                                       device=m.device)
    return m / count.clamp(min=1.0)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """[B, T] bool: the completion tokens whose entropy is at or above the (1 - q) quantile of the
    completion tokens' entropies (q = top_entropy_quantile; all of them at q = 1)."""
    m = mask.bool()
    if top_entropy_quantile >= 1.0:
        return m
    values = entropies.detach().float()[m]
    if values.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    # compared in the entropies' own precision (at least fp32), as TRL does: a float64 entropy that the
    # fp32 threshold was rounded from must not flip to the other side
    return ((entropies.detach() * m.to(torch.float32)) >= threshold) & m


def grpo_metrics(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                 advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, level: str,
                 epsilon_low: float, epsilon_high: float, delta: float | None, beta: float):
    """(kl, clip_ratio_low, clip_ratio_high, clip_ratio_region) as TRL logs them, from detached
    [B, T] log-probs and [B] advantages (see :class:`GRPOOutput`)."""
    with torch.no_grad():
        m = mask.float()
        count = m.sum().clamp(min=1.0)
        log_ratio = (logps.float() - old_logps.float()) * m
        if level == "sequence":
            ratio = torch.exp(log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
        else:
            ratio = torch.exp(log_ratio)
        adv = advantages.float()[:, None]

        def share(flags):
            if level == "sequence":  # one value per sequence, as TRL's global_masked_mean at (B, 1)
                return flags.float().mean() if flags.numel() else flags.new_zeros((), dtype=torch.float32)
            return (flags.float() * m).sum() / count

        kl = None
        if beta:
            kl = (k3_kl(logps.float(), ref_logps.float())[0] * m).sum() / count
        if loss_type == "cispo":
            high = share((ratio > epsilon_high) & (adv > 0))
            return kl, torch.zeros_like(high), high, high
        if delta is not None:
            ratio = ratio.clamp(max=delta)
        low = (ratio < 1.0 - epsilon_low) & (adv < 0)
        high = (ratio > 1.0 + epsilon_high) & (adv > 0)
        return kl, share(low), share(high), share(low | high)


# ---------------------------------------------------------------------------------------------
# the losses over log-probs
# ---------------------------------------------------------------------------------------------

def row_sequences(B: int, T: int, device) -> SequenceOps:
    """The sequence map of a flattened [B, T] grid."""
    index = torch.arange(B, device=device).repeat_interleave(T)
    return SequenceOps(lambda x: x.new_zeros(B).index_add_(0, index, x), lambda s: s.index_select(0, index))


class _FormedGrad(torch.autograd.Function):
    """A value whose gradient with respect to ``x`` was formed with it: backward scales it."""

    @staticmethod
    def forward(ctx, x, value, d_x):
        ctx.save_for_backward(d_x)
        return value

    @staticmethod
    def backward(ctx, grad):
        (d_x,) = ctx.saved_tensors
        return (grad * d_x).to(d_x.dtype), None, None


def with_formed_grad(x: torch.Tensor, value: torch.Tensor, d_x: torch.Tensor) -> torch.Tensor:
    """``value`` (detached) made differentiable in ``x`` with the given gradient ``d_x`` (same shape)."""
    return _FormedGrad.apply(x, value.detach(), d_x.detach().reshape(x.shape).to(x.dtype))


def _check_bt(op: str, mask: torch.Tensor, **tensors):
    if mask.dim() != 2:
        raise ValueError(f"{op}: mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} (mask's [B, T])")


def _check_advantages(op: str, advantages: torch.Tensor, B: int) -> torch.Tensor:
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"{op}: advantages must be [B] (one per completion), B = {B}, got shape "
                         f"{tuple(advantages.shape)}")
    if advantages.device.type != "meta" and not bool(torch.isfinite(advantages).all()):
        raise ValueError(f"{op}: advantages are not all finite")
    return advantages.detach()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, *, delta: float | None = None,
              importance_sampling_level: str = "token", max_completion_length: int | None = None,
              num_items_in_batch=None, entropies: torch.Tensor | None = None,
              top_entropy_quantile: float = 1.0) -> GRPOOutput:
    """The GRPO loss of TRL 1.16's ``GRPOTrainer`` (one process, one micro-batch per step) over
    per-token log-probs.

    logps [B, T] (differentiable; B completions, G per prompt), old_logps [B, T] (the sampling
    policy's; None: ``logps`` detached, as TRL when the rollout is used once), ref_logps [B, T] (the
    reference's; only read when beta > 0), advantages [B], mask [B, T] (the completion tokens).
    ``loss_type``: grpo | bnpo | dr_grpo (needs ``max_completion_length``) | dapo | cispo (epsilon_high is
    then the ratio cap, 5.0 in ScaleRL). ``epsilon_high``: the upper clip (default: epsilon).
    ``delta``: cap of the unclipped ratio (two-sided clipping). ``importance_sampling_level``:
    "token" or "sequence" (GSPO). ``num_items_in_batch``: dapo/cispo's token count (default: the
    batch's). ``entropies`` [B, T] with ``top_entropy_quantile`` < 1: the policy term only on the
    highest-entropy tokens (the KL term everywhere). -> :class:`GRPOOutput`.
    """
    op = "grpo_loss"
    eps_low, eps_high, delta, beta = check_grpo_args(op, loss_type, importance_sampling_level, epsilon, epsilon_high,
                                                     delta, beta, top_entropy_quantile)
    old_logps = logps.detach() if old_logps is None else old_logps
    if beta and ref_logps is None:
        raise ValueError(f"{op}: beta = {beta} needs ref_logps (the reference's token log-probs)")
    if top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError(f"{op}: top_entropy_quantile < 1 needs the per-token entropies")
    _check_bt(op, mask, logps=logps, old_logps=old_logps, ref_logps=ref_logps if beta else None,
              entropies=entropies if top_entropy_quantile < 1.0 else None)
    B, T = mask.shape
    adv = _check_advantages(op, advantages, B)
    dt = torch.promote_types(logps.dtype, torch.float32)  # fp32 or better, as TRL's fp32 log-probs
    weight = token_weights(mask, loss_type, max_completion_length, num_items_in_batch, op, dt)
    keep = high_entropy_mask(entropies, mask, top_entropy_quantile) if top_entropy_quantile < 1.0 else None
    flat = logps.detach().to(dt).reshape(-1)
    value, d_logp = grpo_terms(flat, old_logps.detach().to(dt).reshape(-1), adv.to(dt).repeat_interleave(T),
                               weight.reshape(-1), None if keep is None else keep.to(dt).reshape(-1),
                               ref_logps.detach().to(dt).reshape(-1) if beta else None,
                               row_sequences(B, T, flat.device), loss_type=loss_type, level=importance_sampling_level,
                               epsilon_low=eps_low, epsilon_high=eps_high, delta=delta, beta=beta)
    loss = with_formed_grad(logps, value, d_logp) if logps.requires_grad else value
    metrics = grpo_metrics(logps.detach(), old_logps, ref_logps, adv, mask, loss_type=loss_type,
                           level=importance_sampling_level, epsilon_low=eps_low, epsilon_high=eps_high, delta=delta,
                           beta=beta)
    return GRPOOutput(loss, *metrics)


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None) -> GRPOOutput:
    """The loss of TRL 1.16's ``RLOOTrainer``: one ratio per completion from its summed log-probs,
    r = exp(sum_t logps - old), the clipped surrogate with its advantage, mean over completions.

    logps [B, T] (differentiable), old_logps [B] (the sampling policy's summed completion
    log-probs; None: ``logps`` detached), advantages [B], mask [B, T]. The KL to the reference is
    not here: RLOO subtracts it from the reward (see ``peftkern rloo``). -> :class:`GRPOOutput`
    (kl None; clip shares over sequences)."""
    op = "rloo_loss"
    eps_low, eps_high, _, _ = check_grpo_args(op, "grpo", "sequence", epsilon, epsilon_high, None, 0.0)
    _check_bt(op, mask, logps=logps)
    B, T = mask.shape
    adv = _check_advantages(op, advantages, B)
    dt = torch.promote_types(logps.dtype, torch.float32)
    seq_logps = (logps.detach().to(dt) * mask.to(dt)).sum(-1)
    old = seq_logps if old_logps is None else old_logps.detach().to(dt).reshape(B)
    flat = logps.detach().to(dt).reshape(-1)
    value, d_logp = rloo_terms(flat, old, adv.to(dt), torch.full((B,), 1.0 / max(B, 1), dtype=dt, device=flat.device),
                               mask.reshape(-1).bool(), row_sequences(B, T, flat.device), epsilon_low=eps_low,
                               epsilon_high=eps_high)
    loss = with_formed_grad(logps, value, d_logp) if logps.requires_grad else value
    return GRPOOutput(loss, None, *rloo_clip_shares(seq_logps, old, adv, eps_low, eps_high))


def rloo_clip_shares(seq_logps: torch.Tensor, old_seq_logps: torch.Tensor, advantages: torch.Tensor,
                     epsilon_low: float, epsilon_high: float):
    """(low, high, region) shares of sequences whose RLOO ratio is clipped (TRL's metrics)."""
    with torch.no_grad():
        ratio = torch.exp(seq_logps.float() - old_seq_logps.float())
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        n = max(ratio.numel(), 1)
        return low.float().sum() / n, high.float().sum() / n, (low | high).float().sum() / n
