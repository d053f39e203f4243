"""The DPO family: losses over sequence log-probs of a policy and a frozen reference.

Every loss type follows TRL's ``DPOTrainer`` formulas (trl 1.16), with the conservative (cDPO)
label smoothing of the sigmoid loss as TRL defined it before 1.0. Inputs are per-sequence log-probs
[B] (summed over the completion tokens; length-normalized for ``ipo``, as TRL does), outputs the
mean loss over pairs and the detached implicit rewards beta * (policy - reference).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from peftkern.losses._common import (check_choice, check_positive, check_same_shape, sigmoid_slope, smoothed_logsigmoid,
                                     smoothed_logsigmoid_grad)

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop")


SEPARABLE_DPO_LOSS_TYPES = tuple(t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired"))
"""The loss types whose per-pair loss depends on that pair alone (aot and aot_unpaired sort over the
batch), so a fused loss can form their gradients in the forward pass."""


def check_dpo_args(op: str, beta: float, loss_type: str, label_smoothing: float) -> tuple[float, float]:
    """(beta, label_smoothing) checked for ``loss_type``."""
    check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    beta = check_positive(op, "beta", beta)
    eps = float(label_smoothing)
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5) for 'robust', got {eps}")
    if loss_type == "exo_pair" and not 0.0 < eps < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in (0, 1) for 'exo_pair' (the EXO paper uses 1e-3), got {eps}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {eps}")
    return beta, eps


def dpo_pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, loss_type: str,
                    label_smoothing: float = 0.0, discopop_tau: float = 0.05, with_grad: bool = False):
    """Per-pair losses [B] of the separable DPO loss types from the log-ratios chosen = policy -
    reference (chosen sequences) and rejected = policy - reference (rejected ones), each [B]; with
    ``with_grad`` also (d loss / d chosen, d loss / d rejected), each [B], written out
    analytically (the fused losses form gradients in the forward pass). Arguments are not checked
    here (see :func:`check_dpo_args`)."""
    eps = label_smoothing
    m = beta * (chosen - rejected)
    d_m = d_c = d_r = None  # d loss / d m (then d_c = beta d_m, d_r = -beta d_m), or d_c and d_r
    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7; cDPO smoothing
        loss = smoothed_logsigmoid(m, eps)
        d_m = smoothed_logsigmoid_grad(m, eps) if with_grad else None
    elif loss_type == "hinge":  # SLiC, Zhao et al. 2023 (arXiv:2305.10425)
        loss = torch.relu(1.0 - m)
        d_m = -(m < 1.0).to(m.dtype) if with_grad else None
    elif loss_type == "ipo":  # IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17; length-normalized inputs
        gap = (chosen - rejected) - 1.0 / (2.0 * beta)
        loss = gap ** 2
        d_c, d_r = 2.0 * gap, -2.0 * gap
    elif loss_type == "exo_pair":  # EXO, Ji et al. 2024 (arXiv:2402.00856), Eq. 16, K = 2
        pos = F.logsigmoid(m) - math.log1p(-eps)
        neg = F.logsigmoid(-m) - math.log(eps)
        loss = torch.sigmoid(m) * pos + torch.sigmoid(-m) * neg
        d_m = sigmoid_slope(m) * (pos - neg) if with_grad else None
    elif loss_type == "nca_pair":  # NCA, Chen et al. 2024 (arXiv:2402.05369)
        loss = -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
        d_c = beta * (-torch.sigmoid(-beta * chosen) + 0.5 * torch.sigmoid(beta * chosen))
        d_r = 0.5 * beta * torch.sigmoid(beta * rejected)
    elif loss_type == "robust":  # Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409), Eq. 8
        loss = (-(1.0 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1.0 - 2.0 * eps)
        d_m = (-(1.0 - eps) * torch.sigmoid(-m) - eps * torch.sigmoid(m)) / (1.0 - 2.0 * eps)
    elif loss_type == "bco_pair":  # BCO, Jung et al. 2024 (arXiv:2404.04656), paired form
        loss = -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
        d_c, d_r = -beta * torch.sigmoid(-beta * chosen), beta * torch.sigmoid(beta * rejected)
    elif loss_type == "sppo_hard":  # SPPO, Wu et al. 2024 (arXiv:2405.00675), Eq. 4.7 with hard P in {0, 1}
        loss = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
        d_c, d_r = 2.0 * (chosen - 0.5 / beta), 2.0 * (rejected + 0.5 / beta)
    elif loss_type == "apo_zero":  # APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266), Eq. 7
        loss = (1.0 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
        d_c, d_r = -beta * sigmoid_slope(beta * chosen), beta * sigmoid_slope(beta * rejected)
    elif loss_type == "apo_down":  # APO, Eq. 8
        loss = torch.sigmoid(beta * chosen) + (1.0 - torch.sigmoid(m))
        d_c = beta * sigmoid_slope(beta * chosen) - beta * sigmoid_slope(m)
        d_r = beta * sigmoid_slope(m)
    elif loss_type == "discopop":  # DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414), Eq. 5
        mix = torch.sigmoid(m / discopop_tau)
        loss = -F.logsigmoid(m) * (1.0 - mix) + torch.exp(-m) * mix
        if with_grad:
            d_mix = sigmoid_slope(m / discopop_tau) / discopop_tau
            d_m = (-torch.sigmoid(-m) * (1.0 - mix) + F.logsigmoid(m) * d_mix - torch.exp(-m) * mix
                   + torch.exp(-m) * d_mix)
    else:
        raise ValueError(f"dpo_pair_losses: loss_type {loss_type!r} is not separable per pair "
                         f"(choose one of {', '.join(SEPARABLE_DPO_LOSS_TYPES)})")
    if not with_grad:
        return loss
    if d_m is not None:
        d_c, d_r = beta * d_m, -beta * d_m
    return loss, d_c, d_r


def dpo_losses(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """The per-pair losses [B] of :func:`dpo_loss` (see there), before the mean."""
    op = "dpo_loss"
    check_same_shape(op, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                     ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta, eps = check_dpo_args(op, beta, loss_type, label_smoothing)
    if loss_type == "discopop":
        discopop_tau = check_positive(op, "discopop_tau", discopop_tau)
    if loss_type == "aot":  # AOT, Melnyk et al. 2024 (arXiv:2406.05882): sorted over the batch, paired
        delta = (torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values)
        return smoothed_logsigmoid(beta * delta, eps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if loss_type == "aot_unpaired":  # AOT, unpaired form
        delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
        return smoothed_logsigmoid(beta * delta, eps)
    return dpo_pair_losses(chosen, rejected, beta, loss_type, eps, discopop_tau)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, *, discopop_tau: float = 0.05):
    """DPO-family loss over sequence log-probs, each [B] (any float dtype; computed in it).

    -> (loss (scalar, mean over pairs), chosen_rewards [B], rejected_rewards [B]) where the rewards
    are beta * (policy - reference), detached. ``loss_type`` is one of ``DPO_LOSS_TYPES``:

    * ``sigmoid``: DPO, Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; with ``label_smoothing`` e the
      conservative cDPO loss -(1-e) log s(m) - e log s(-m) (Mitchell 2023).
    * ``ipo``: Azar et al. 2023, arXiv:2310.12036, Eq. 17 (pass length-normalized log-probs, as TRL).
    * ``hinge``: SLiC, Zhao et al. 2023, arXiv:2305.10425.  ``robust``: Chowdhury et al. 2024,
      arXiv:2403.00409 (label_smoothing = flip rate in [0, 0.5)).  ``exo_pair``: Ji et al. 2024,
      arXiv:2402.00856 (label_smoothing = epsilon > 0).  ``nca_pair``: Chen et al. 2024,
      arXiv:2402.05369.  ``bco_pair``: Jung et al. 2024, arXiv:2404.04656.  ``sppo_hard``: Wu et al.
      2024, arXiv:2405.00675.  ``aot`` / ``aot_unpaired``: Melnyk et al. 2024, arXiv:2406.05882.
      ``apo_zero`` / ``apo_down``: D'Oosterlinck et al. 2024, arXiv:2408.06266.  ``discopop``:
      Lu et al. 2024, arXiv:2406.08414 (``discopop_tau``).
    """
    losses = dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                        loss_type, label_smoothing, discopop_tau)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
