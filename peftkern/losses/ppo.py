"""PPO's per-token pieces with masks: clipped policy surrogate, clipped value loss, entropy bonus and
the KL penalty against a reference (k1 / k3 estimators). Schulman et al. 2017, arXiv:1707.06347."""
from __future__ import annotations

import torch

from peftkern.losses._common import check_choice, check_same_shape, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2):
    """Clipped surrogate (PPO paper, Eq. 7), per token then masked mean:
    max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)), ratio = exp(logps - old_logps).

    logps, old_logps, advantages, mask [B, T] (advantages [B] broadcast over T). -> (loss,
    clip_fraction, approx_kl) with approx_kl = masked mean of 0.5 (logps - old_logps)^2, detached.
    """
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logps)
    check_same_shape("ppo_policy_loss", logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float = 0.2):
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2).
    -> (loss, clip_fraction)."""
    check_same_shape("ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clip_fraction


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coefficient: float = 0.01) -> torch.Tensor:
    """-coefficient * masked mean of the per-token entropy: add it to the loss to reward exploration."""
    check_same_shape("entropy_bonus", entropy=entropy, mask=mask)
    return -coefficient * masked_mean(entropy, mask)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor | None = None,
               estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled tokens (Schulman, "Approximating KL
    divergence", 2020), 0 where mask is false. With log r = ref_logps - logps:
    k1 = -log r (unbiased), k2 = (log r)^2 / 2, k3 = (r - 1) - log r (unbiased, >= 0, low variance)."""
    check_choice("kl_penalty", "estimator", estimator, KL_ESTIMATORS)
    check_same_shape("kl_penalty", logps=logps, ref_logps=ref_logps, mask=mask)
    log_r = ref_logps - logps
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r ** 2
    else:
        kl = torch.expm1(log_r) - log_r
    return kl * mask.to(kl.dtype) if mask is not None else kl


def kl_penalized_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float = 0.05, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards for PPO: -kl_coef * KL estimate at every token, plus the sequence score [B]
    at each sequence's last unmasked token (Ziegler et al. 2019, arXiv:1909.08593). -> [B, T]."""
    rewards = -kl_coef * kl_penalty(logps, ref_logps, mask, estimator)
    lengths = mask.long().sum(-1)
    last = (lengths - 1).clamp(min=0)
    has_tokens = (lengths > 0).to(rewards.dtype)
    return rewards.scatter_add(-1, last.unsqueeze(-1), (scores.to(rewards.dtype) * has_tokens).unsqueeze(-1))
