"""The preference and RL objectives the trainers call, as *sums* over a micro-batch's units (pairs,
examples, tokens) so the loop can normalise by the units of the whole step.

Each uses ``peftkern.losses`` (whose functions return means; they are scaled back to sums here) and
falls back to the same formula written out (TRL's definitions) on a build without that package.

The ``*_head_loss`` builders give ``LMWithHeads.forward(..., head_loss=...)`` a fused loss from the
last hidden states: the gradients are formed in the forward pass (three vocabulary GEMMs, no
[tokens, V] logits), which is how the SFT, DPO and KTO trainers compute their losses.
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


# ---------------------------------------------------------------------------------------------
# fused losses from hidden states, for LMWithHeads.forward(head_loss=...)
# ---------------------------------------------------------------------------------------------

def _fused_losses():
    lib = _losses_package()
    if lib is None:
        raise ValueError("the trainers' fused losses need peftkern.losses, which this build lacks")
    return lib


def sft_head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: dict) -> torch.Tensor:
    """Sum over labelled tokens of -log p(target): hidden [B, T, H], targets [B, T] (-100: skip)."""
    return _fused_losses().fused_sft_loss(hidden, targets=targets, reduction="sum", **head)


def dpo_head_loss(ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0):
    """A head loss over hidden [2B, T, H] (chosen rows first) with the reference sequence log-probs
    [B] given -> (sum of the per-pair losses, chosen_rewards [B], rejected_rewards [B], policy sequence
    log-probs [2B], detached). Sequence log-probs are sums over the labelled tokens for every loss type
    (the reference cache holds sums)."""
    lib = _fused_losses()

    def head_loss(hidden, targets, head):
        loss, chosen_rewards, rejected_rewards = lib.fused_dpo_loss(
            hidden, targets=targets, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, beta=beta,
            loss_type=loss_type, label_smoothing=label_smoothing, average_log_prob=False, reduction="sum", **head)
        seq = torch.cat([chosen_rewards / beta + ref_chosen.float(), rejected_rewards / beta + ref_rejected.float()])
        return loss, chosen_rewards, rejected_rewards, seq
    return head_loss


def kto_head_loss(ref: torch.Tensor, ref_kl: torch.Tensor, desirable: torch.Tensor, beta: float,
                  desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """A head loss over hidden [2B, T, H] (B examples, then their B mismatched KL pairs) with reference
    log-probs ref, ref_kl [B] -> (KTO summed over the examples, rewards beta (policy - reference) of
    the desirable [Bd] and undesirable [Bu] examples, the reference point z0). z0 = max(0, mean(policy -
    reference) over the KL pairs) is detached, so those rows go through the head without gradients."""
    lib = _fused_losses()

    def head_loss(hidden, targets, head):
        b = ref.shape[0]
        weight, bias = head["weight"], head["bias"]
        lora = {k: head[k] for k in ("lora_A", "lora_B", "lora_scaling")}
        with torch.no_grad():
            kl_seq = lib.fused_sequence_logps(hidden[b:], weight, targets[b:], bias=bias, **lora)
        kl = (kl_seq - ref_kl.float()).mean().clamp_min(0)
        loss, good, bad, _ = lib.fused_kto_loss(hidden[:b], weight, targets[:b], desirable, ref, kl=kl, beta=beta,
                                                desirable_weight=desirable_weight,
                                                undesirable_weight=undesirable_weight, bias=bias, reduction="sum",
                                                **lora)
        return loss, good, bad, kl
    return head_loss
