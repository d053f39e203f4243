"""Reference-free preference losses: SimPO, ORPO and CPO, over sequence log-probs of the policy.

Each per-pair formula lives in one function that can also return its derivatives with respect to
the chosen and rejected log-probs, written out (``with_grad``), for the fused losses that form
their gradients in the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkern.losses._common import (check_choice, check_positive, check_same_shape, smoothed_logsigmoid,
                                     smoothed_logsigmoid_grad)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def check_smoothing(op: str, label_smoothing: float) -> float:
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")
    return label_smoothing


def simpo_pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
                      label_smoothing: float = 0.0, with_grad: bool = False):
    """Per-pair SimPO losses [B] from average log-probs (and d/d chosen, d/d rejected with ``with_grad``)."""
    margin = beta * (chosen - rejected) - gamma
    losses = smoothed_logsigmoid(margin, label_smoothing)
    if not with_grad:
        return losses
    d_margin = smoothed_logsigmoid_grad(margin, label_smoothing)
    return losses, beta * d_margin, -beta * d_margin


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), Eq. 6, with TRL's (CPOTrainer, loss_type="simpo")
    label smoothing: m = beta * (chosen - rejected) - gamma, loss = -(1-e) log s(m) - e log s(-m).

    policy_*_logps [B]: average per-token log-probs of each completion. -> (loss (mean over pairs),
    chosen_rewards [B], rejected_rewards [B]) with rewards beta * logps, detached.
    """
    check_same_shape("simpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    beta = check_positive("simpo_loss", "beta", beta)
    label_smoothing = check_smoothing("simpo_loss", label_smoothing)
    losses = simpo_pair_losses(policy_chosen_logps, policy_rejected_logps, beta, gamma, label_smoothing)
    return losses.mean(), beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, with_grad: bool = False):
    """Per-pair ORPO odds-ratio losses -beta log s(log odds(chosen) - log odds(rejected)) [B] from average
    log-probs (< 0), odds(y) = p / (1 - p) (and d/d chosen, d/d rejected with ``with_grad``)."""
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    if not with_grad:
        return losses
    d_odds = -beta * torch.sigmoid(-log_odds)
    # d log_odds / d a = 1 + e^a / (1 - e^a) = -1 / expm1(a) for the chosen a, its negative for the rejected
    return losses, d_odds * (-1.0 / torch.expm1(chosen)), d_odds * (1.0 / torch.expm1(rejected))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 0.1,
              chosen_nll_loss: torch.Tensor | None = None):
    """ORPO, Hong et al. 2024 (arXiv:2403.07691), Eqs. 4-7: the odds-ratio term
    L_OR = -log s(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p), weighted by beta and
    added to the chosen completions' NLL (SFT) loss when ``chosen_nll_loss`` is given (TRL's ORPOTrainer).

    policy_*_logps [B]: average per-token log-probs (< 0). -> (loss, chosen_rewards [B],
    rejected_rewards [B]) with rewards beta * logps, detached.
    """
    check_same_shape("orpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    beta = check_positive("orpo_loss", "beta", beta)
    loss = orpo_pair_losses(policy_chosen_logps.float(), policy_rejected_logps.float(), beta).mean()
    if chosen_nll_loss is not None:
        loss = chosen_nll_loss + loss
    return loss, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def check_cpo_args(op: str, beta: float, loss_type: str, label_smoothing: float) -> tuple[float, float]:
    check_choice(op, "loss_type", loss_type, CPO_LOSS_TYPES)
    return check_positive(op, "beta", beta), check_smoothing(op, label_smoothing)


def cpo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """The CPO reward of sequence log-probs: the log-probs themselves, or AlphaPO's
    (1 - p^-alpha) / alpha = -expm1(-alpha logp) / alpha when alpha != 0 (Gupta et al. 2025,
    arXiv:2501.03884), as TRL's CPOTrainer."""
    return logps if alpha == 0.0 else -torch.expm1(-alpha * logps) / alpha


def cpo_pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, alpha: float = 0.0,
                    with_grad: bool = False):
    """Per-pair CPO losses [B] (TRL 1.16's CPOTrainer.cpo_loss) from sequence log-probs (summed for
    sigmoid / hinge, averaged for ipo / simpo, as TRL), and with ``with_grad`` d/d chosen, d/d rejected."""
    logits = cpo_rewards(chosen, alpha) - cpo_rewards(rejected, alpha)
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = smoothed_logsigmoid(beta * logits, label_smoothing)
        d_logits = beta * smoothed_logsigmoid_grad(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
        d_logits = -beta * (beta * logits < 1.0).to(logits.dtype)
    else:  # ipo
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
        d_logits = 2.0 * (logits - 1.0 / (2.0 * beta))
    if not with_grad:
        return losses
    d_reward_c = torch.ones_like(chosen) if alpha == 0.0 else torch.exp(-alpha * chosen)
    d_reward_r = torch.ones_like(rejected) if alpha == 0.0 else torch.exp(-alpha * rejected)
    return losses, d_logits * d_reward_c, -d_logits * d_reward_r


def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, *, simpo_gamma: float = 0.5,
             alpha: float = 0.0, chosen_nll_loss: torch.Tensor | None = None, cpo_alpha: float = 1.0):
    """CPO, Xu et al. 2024 (arXiv:2401.08417), Eq. 3, as TRL's CPOTrainer: a reference-free preference
    loss (``loss_type`` sigmoid with cDPO ``label_smoothing``, hinge, ipo, or simpo with
    ``simpo_gamma``; AlphaPO rewards with ``alpha`` != 0), mean over pairs, plus ``cpo_alpha`` times
    the chosen completions' NLL when ``chosen_nll_loss`` is given.

    policy_*_logps [B]: summed log-probs for sigmoid / hinge, average log-probs for ipo / simpo
    (TRL's choice). -> (loss, chosen_rewards [B], rejected_rewards [B]) with rewards beta times the
    (AlphaPO) reward, detached.
    """
    op = "cpo_loss"
    check_same_shape(op, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    beta, label_smoothing = check_cpo_args(op, beta, loss_type, label_smoothing)
    losses = cpo_pair_losses(policy_chosen_logps, policy_rejected_logps, beta, loss_type, label_smoothing, simpo_gamma,
                             float(alpha))
    loss = losses.mean()
    if chosen_nll_loss is not None:
        loss = loss + cpo_alpha * chosen_nll_loss
    return (loss, beta * cpo_rewards(policy_chosen_logps, float(alpha)).detach(),
            beta * cpo_rewards(policy_rejected_logps, float(alpha)).detach())
