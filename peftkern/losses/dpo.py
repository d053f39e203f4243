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

from peftkern.losses._common import check_choice, check_positive, check_same_shape

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop")


def _sigmoid_smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log s(x) - e log s(-x): the cDPO loss (Mitchell 2023, "A note on DPO with noisy
    preferences"), which is the plain DPO loss at e = 0."""
    loss = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-logits) * label_smoothing
    return loss


def dpo_losses(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05) -> torch.Tensor:
    """The per-pair losses [B] of :func:`dpo_loss` (see there), before the mean."""
    op = "dpo_loss"
    check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    check_same_shape(op, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                     ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    beta = check_positive(op, "beta", beta)
    eps = float(label_smoothing)
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"{op}: label_smoothing must be in [0, 0.5) for 'robust', got {eps}")
    if loss_type == "exo_pair" and not 0.0 < eps < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in (0, 1) for 'exo_pair' (the EXO paper uses 1e-3), got {eps}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {eps}")

    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen - rejected)

    if loss_type == "sigmoid":  # DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7; cDPO smoothing
        return _sigmoid_smoothed(margin, eps)
    if loss_type == "hinge":  # SLiC, Zhao et al. 2023 (arXiv:2305.10425)
        return torch.relu(1.0 - margin)
    if loss_type == "ipo":  # IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17; length-normalized inputs
        return ((chosen - rejected) - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":  # EXO, Ji et al. 2024 (arXiv:2402.00856), Eq. 16, K = 2
        return (torch.sigmoid(margin) * (F.logsigmoid(margin) - math.log1p(-eps))
                + torch.sigmoid(-margin) * (F.logsigmoid(-margin) - math.log(eps)))
    if loss_type == "nca_pair":  # NCA, Chen et al. 2024 (arXiv:2402.05369)
        return (-F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen)
                - 0.5 * F.logsigmoid(-beta * rejected))
    if loss_type == "robust":  # Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409), Eq. 8
        return (-(1.0 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1.0 - 2.0 * eps)
    if loss_type == "bco_pair":  # BCO, Jung et al. 2024 (arXiv:2404.04656), paired form
        return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected)
    if loss_type == "sppo_hard":  # SPPO, Wu et al. 2024 (arXiv:2405.00675), Eq. 4.7 with hard P in {0, 1}
        return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    if loss_type == "aot":  # AOT, Melnyk et al. 2024 (arXiv:2406.05882): sorted over the batch, paired
        delta = (torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values)
        return _sigmoid_smoothed(beta * delta, eps)
    if loss_type == "aot_unpaired":  # AOT, unpaired form
        delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
        return _sigmoid_smoothed(beta * delta, eps)
    if loss_type == "apo_zero":  # APO, D'Oosterlinck et al. 2024 (arXiv:2408.06266), Eq. 7
        return (1.0 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected)
    if loss_type == "apo_down":  # APO, Eq. 8
        return torch.sigmoid(beta * chosen) + (1.0 - torch.sigmoid(margin))
    # discopop: DiscoPOP, Chris Lu et al. 2024 (arXiv:2406.08414), Eq. 5
    mix = torch.sigmoid(margin / check_positive(op, "discopop_tau", discopop_tau))
    return -F.logsigmoid(margin) * (1.0 - mix) + torch.exp(-margin) * mix


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
