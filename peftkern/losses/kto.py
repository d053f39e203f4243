"""KTO: unpaired preference loss with a batch estimate of KL(policy || reference)."""
from __future__ import annotations

import torch

from peftkern.losses._common import check_choice, check_positive, check_same_shape

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The KTO reference point z0: mean over mismatched (prompt, completion) pairs of policy minus
    reference sequence log-probs, clamped at 0 and detached (KTO paper, Sec. 4.1; TRL)."""
    check_same_shape("kl_estimate", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros(())
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             policy_kl_logps: torch.Tensor | None, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, ref_kl_logps: torch.Tensor | None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto", *,
             kl: torch.Tensor | float | None = None):
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), Eq. 7, as TRL's KTOTrainer computes it.

    policy/ref_chosen_logps [Bc] (desirable examples), policy/ref_rejected_logps [Br] (undesirable),
    policy/ref_kl_logps [Bk] (completions paired with other prompts, for z0; None for
    ``apo_zero_unpaired`` or to use z0 = 0). With r = policy - ref:
    desirable loss 1 - s(beta (r - z0)), undesirable loss 1 - s(beta (z0 - r)), weighted by
    desirable_weight / undesirable_weight, then the mean over all Bc + Br examples.
    ``kl`` gives z0 directly instead (a number or scalar tensor, used as a constant).
    ``apo_zero_unpaired``: APO-zero (arXiv:2408.06266) unpaired: 1 - s(beta r) and s(beta r).

    -> (loss, chosen_rewards [Bc], rejected_rewards [Br], kl) with rewards beta * r, detached.
    """
    op = "kto_loss"
    check_choice(op, "loss_type", loss_type, KTO_LOSS_TYPES)
    beta = check_positive(op, "beta", beta)
    check_same_shape(op, policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    check_same_shape(op, policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError(f"{op}: give both policy_kl_logps and ref_kl_logps or neither")
    if kl is not None:
        kl = torch.as_tensor(kl, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device).detach()
    elif policy_kl_logps is not None and loss_type == "kto":
        kl = kl_estimate(policy_kl_logps, ref_kl_logps)
    else:
        kl = policy_chosen_logps.new_zeros(())
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if loss_type == "kto":
        chosen_losses = 1.0 - torch.sigmoid(beta * (chosen - kl))
        rejected_losses = 1.0 - torch.sigmoid(beta * (kl - rejected))
    else:
        chosen_losses = 1.0 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    loss = losses.mean() if losses.numel() else losses.sum()
    return loss, beta * chosen.detach(), beta * rejected.detach(), kl
