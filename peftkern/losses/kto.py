"""KTO: unpaired preference loss with a batch estimate of KL(policy || reference)."""
from __future__ import annotations

import torch

from peftkern.losses._common import check_choice, check_positive, check_same_shape, sigmoid_slope

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The KTO reference point z0: mean over mismatched (prompt, completion) pairs of policy minus
    reference sequence log-probs, clamped at 0 and detached (KTO paper, Sec. 4.1; TRL)."""
    check_same_shape("kl_estimate", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros(())
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_example_losses(ratio: torch.Tensor, desirable: torch.Tensor, beta: float, kl, desirable_weight: float = 1.0,
                       undesirable_weight: float = 1.0, loss_type: str = "kto", with_grad: bool = False):
    """Weighted per-example KTO losses [B] from r = policy - reference sequence log-probs [B] and
    ``desirable`` [B] bool, with the reference point ``kl`` (z0, a constant); with ``with_grad`` also
    d loss / d r [B], written out for the fused loss.

    kto: desirable w_d (1 - s(beta (r - z0))), undesirable w_u (1 - s(beta (z0 - r)));
    apo_zero_unpaired: desirable w_d (1 - s(beta r)), undesirable w_u s(beta r)."""
    if loss_type == "kto":
        x_good, x_bad = beta * (ratio - kl), beta * (kl - ratio)
        good, bad = 1.0 - torch.sigmoid(x_good), 1.0 - torch.sigmoid(x_bad)
        d_good, d_bad = -beta * sigmoid_slope(x_good), beta * sigmoid_slope(x_bad)
    else:
        x = beta * ratio
        good, bad = 1.0 - torch.sigmoid(x), torch.sigmoid(x)
        d_good, d_bad = -beta * sigmoid_slope(x), beta * sigmoid_slope(x)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    if not with_grad:
        return losses
    return losses, torch.where(desirable, desirable_weight * d_good, undesirable_weight * d_bad)


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
    ratio = torch.cat([chosen, rejected])
    desirable = torch.arange(ratio.shape[0], device=ratio.device) < chosen.shape[0]
    losses = kto_example_losses(ratio, desirable, beta, kl, desirable_weight, undesirable_weight, loss_type)
    loss = losses.mean() if losses.numel() else losses.sum()
    return loss, beta * chosen.detach(), beta * rejected.detach(), kl
