"""The preference and RL objectives the trainers call, as *sums* over a micro-batch's units (pairs,
examples, tokens) so the loop can normalise by the units of the whole step.

Each uses ``peftkern.losses`` (whose functions return means; they are scaled back to sums here) and
falls back to the same formula written out (TRL's definitions) on a build without that package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _losses_package():
    try:
        import peftkern.losses as losses
    except ImportError:
        return None
    return losses


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Policy / reference sequence log-probs of chosen and rejected [B] ->
    (per-pair losses [B], chosen_rewards [B], rejected_rewards [B]); rewards = beta (policy - reference),
    detached. ``loss_type``: any of ``peftkern.losses.DPO_LOSS_TYPES``."""
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    lib = _losses_package()
    if lib is not None:
        losses = lib.dpo_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        return losses, chosen_rewards, rejected_rewards
    if loss_type != "sigmoid":
        raise ValueError(f"loss_type {loss_type!r} needs peftkern.losses; without it only 'sigmoid' runs")
    margin = beta * ((pc - rc) - (pr - rr))
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    return losses, chosen_rewards, rejected_rewards


def reward_loss_sum(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry: sum over pairs of -log sigmoid(r_chosen - r_rejected - margin)."""
    lib = _losses_package()
    if lib is not None:
        return lib.reward_model_loss(chosen, rejected, margin=margin) * chosen.shape[0]
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(diff).sum()


def kto_loss_sum(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
                 beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO summed over examples: policy / reference completion log-probs [B], desirable [B] bool, kl the
    reference point z0 (detached, >= 0). Desirable: w_d (1 - s(beta (r - z0))); undesirable:
    w_u (1 - s(beta (z0 - r))), r = policy - reference."""
    lib = _losses_package()
    if lib is not None:
        loss = lib.kto_loss(policy[desirable], policy[~desirable], None, reference[desirable], reference[~desirable],
                            None, beta=beta, desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight, kl=kl)[0]
        return loss * policy.shape[0]
    ratio = policy - reference
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad).sum()


def ppo_loss_sums(logps, old_logps, values, old_values, advantages, returns, mask, cliprange: float,
                  cliprange_value: float):
    """Clipped PPO policy loss and clipped value loss (0.5 max of squared errors), each summed over the
    masked tokens [B, T]; returns (policy_loss, value_loss, clipped_token_count)."""
    lib = _losses_package()
    count = mask.float().sum()
    if lib is not None:
        pg, clip_fraction, _ = lib.ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=cliprange)
        vf, _ = lib.ppo_value_loss(values, old_values, returns, mask, clip_range_value=cliprange_value)
        return pg * count, vf * count, clip_fraction * count
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    m = mask.float()
    return (torch.maximum(unclipped, clipped) * m).sum(), (vf * m).sum(), ((clipped > unclipped).float() * m).sum()


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last True in ``mask`` [B, T] (0 for an all-False row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def kl_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
               kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef (logps - ref_logps) on every masked token, plus the score [B]
    on each row's last masked token. The mask may start anywhere in the row (responses after prompts);
    ``peftkern.losses.kl_penalized_rewards`` expects response-only rows, hence the score placed here."""
    lib = _losses_package()
    if lib is not None:
        rewards = -kl_coef * lib.kl_penalty(logps, ref_logps, mask)
    else:
        rewards = -kl_coef * (logps - ref_logps) * mask
    return rewards.scatter_add(-1, last_true_index(mask)[:, None], scores[:, None].to(rewards.dtype))
