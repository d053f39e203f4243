"""Reference-free preference losses: SimPO and ORPO, over length-normalized sequence log-probs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkern.losses._common import check_positive, check_same_shape


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), Eq. 6, with TRL's (CPOTrainer, loss_type="simpo")
    label smoothing: m = beta * (chosen - rejected) - gamma, loss = -(1-e) log s(m) - e log s(-m).

    policy_*_logps [B]: average per-token log-probs of each completion. -> (loss (mean over pairs),
    chosen_rewards [B], rejected_rewards [B]) with rewards beta * logps, detached.
    """
    check_same_shape("simpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    beta = check_positive("simpo_loss", "beta", beta)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"simpo_loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    margin = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -F.logsigmoid(margin) * (1.0 - label_smoothing)
    if label_smoothing:
        losses = losses - F.logsigmoid(-margin) * label_smoothing
    return losses.mean(), beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    loss = -beta * F.logsigmoid(log_odds).mean()
    if chosen_nll_loss is not None:
        loss = chosen_nll_loss + loss
    return loss, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
