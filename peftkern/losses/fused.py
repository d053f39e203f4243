"""The losses from hidden states: the output head and the log-softmax fused through
``peftkern.ops.logprobs``, so no [tokens, V] logits are built.

Every function takes hidden [..., H] and the head's weight [V, H] (bias [V], a LoRA on the head as
lora_A [r, H], lora_B [V, r], lora_scaling; :func:`head_parameters` reads them off a module) and
targets [...] already aligned with hidden (position t predicts targets[t]; ignore_index marks the
positions that carry no loss). Preference losses take hidden [2B, T, H] with the B chosen sequences
first, then the B rejected ones.

Losses that are a sum over independent units (SFT over tokens; DPO's separable types, SimPO, CPO,
ORPO over pairs; KTO over examples with its reference point given) form their gradients in the
forward pass (``fused_unit_loss``: three vocabulary GEMMs, the backward only scales them). The rest
(DPO's ``aot`` and ``aot_unpaired``, which sort over the batch) take the sequence log-probs through
``fused_linear_logprobs``, whose backward recomputes the logits.
"""
from __future__ import annotations

import torch
from torch import nn

import peftkern.losses.units  # noqa: F401  (registers the unit losses fused_unit_loss calls by name)
from peftkern.losses._common import check_choice, check_positive, sequence_logps
from peftkern.losses.dpo import SEPARABLE_DPO_LOSS_TYPES, check_dpo_args, dpo_loss
from peftkern.losses.kto import KTO_LOSS_TYPES
from peftkern.losses.preference import check_cpo_args, check_smoothing, cpo_rewards
from peftkern.losses.sft import REDUCTIONS, sft_loss
from peftkern.ops.logprobs import (fused_linear_logprob_dot, fused_linear_logprob_stats, fused_linear_logprobs,
                                   fused_unit_loss)


def head_parameters(head: nn.Module) -> dict:
    """{weight, bias, lora_A, lora_B, lora_scaling} of an output head: ``nn.Linear``, peftkern's
    ``LoRALinear`` or PEFT's LoRA ``Linear`` (one active, unmerged adapter). A LoRA on the head is
    never dropped silently: one that cannot be expressed (several active adapters, dropout while
    training, DoRA, a weight stored [in, out]) raises."""
    if isinstance(head, nn.Linear):
        return {"weight": head.weight, "bias": head.bias, "lora_A": None, "lora_B": None, "lora_scaling": 1.0}
    base = getattr(head, "base_layer", None)
    if base is None or not isinstance(base, nn.Linear) or not hasattr(head, "lora_A"):
        raise TypeError(f"head_parameters: expected nn.Linear or a LoRA-wrapped nn.Linear, got {type(head).__name__}")
    params = {"weight": base.weight, "bias": base.bias, "lora_A": None, "lora_B": None, "lora_scaling": 1.0}
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return params  # adapters off, or already folded into base.weight
    active = getattr(head, "active_adapters", None)
    active = [active] if isinstance(active, str) else list(active or [])
    active = [a for a in active if a in head.lora_A]
    if not active:
        return params
    if len(active) > 1:
        raise ValueError(f"head_parameters: {len(active)} active LoRA adapters on the head ({', '.join(active)}); "
                         "the fused loss takes one: merge the others or activate one")
    name = active[0]
    magnitudes = getattr(head, "lora_magnitude_vector", None) or {}
    if getattr(head, "use_dora", {}).get(name, False) or name in magnitudes:
        raise ValueError(f"head_parameters: adapter {name!r} on the output head is DoRA, whose per-row magnitude "
                         "the fused loss does not apply; leave the head out of target_modules, use a plain LoRA "
                         "there, or merge the adapter first")
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError("head_parameters: the output head stores its weight [in, out] (fan_in_fan_out); the fused "
                         "loss needs an nn.Linear head")
    dropout = head.lora_dropout[name] if name in getattr(head, "lora_dropout", {}) else None
    p = getattr(dropout, "p", 0.0)
    if head.training and p > 0.0:
        raise ValueError(f"head_parameters: adapter {name!r} on the head has dropout p={p} in training mode; "
                         "the fused loss has no dropout on the head: set lora_dropout=0 for the head")
    params.update(lora_A=head.lora_A[name].weight, lora_B=head.lora_B[name].weight,
                  lora_scaling=float(head.scaling[name]))
    return params


def _lora_kw(lora_A, lora_B, lora_scaling, chunk_size):
    return {"lora_A": lora_A, "lora_B": lora_B, "lora_scaling": lora_scaling, "chunk_size": chunk_size}


def fused_sft_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                   reduction: str = "mean", label_smoothing: float = 0.0, bias: torch.Tensor | None = None,
                   temperature: float = 1.0, *, num_items_in_batch=None, lora_A=None, lora_B=None,
                   lora_scaling: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of softmax(hidden W^T + b) against targets, equal to
    ``F.cross_entropy(logits, targets, ignore_index=..., reduction=..., label_smoothing=...)``.

    "mean" and "sum" form the gradients in the forward pass (the loss is linear in the per-token
    log-probs), "none" returns per-token losses [...] fp32. -> fp32 scalar (mean, sum)."""
    check_choice("fused_sft_loss", "reduction", reduction, REDUCTIONS)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fused_sft_loss: label_smoothing must be in [0, 1], got {label_smoothing}")
    kw = _lora_kw(lora_A, lora_B, lora_scaling, chunk_size)
    if reduction == "none":
        logp, _, mean = fused_linear_logprob_stats(hidden, weight, targets, ignore_index, bias, temperature,
                                                   mean_logp=label_smoothing > 0, **kw)
        return sft_loss(logp, targets != ignore_index, "none", label_smoothing, mean)
    valid = (targets != ignore_index).float()
    if reduction == "mean":
        count = valid.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=torch.float32)
        valid = valid / count.clamp(min=1).to(valid.device)
    c_mean = -label_smoothing * valid if label_smoothing else None
    return fused_linear_logprob_dot(hidden, weight, targets, -(1.0 - label_smoothing) * valid, c_mean, ignore_index,
                                    bias, temperature, **kw)


def fused_sequence_logps(hidden, weight, targets, ignore_index=-100, bias=None, temperature=1.0, average=False, *,
                         lora_A=None, lora_B=None, lora_scaling=1.0, chunk_size=None) -> torch.Tensor:
    """hidden [B, T, H], targets [B, T] -> [B] fp32: the sum (mean when ``average``) over each
    sequence's non-ignored positions of log p(target). Differentiable (the backward recomputes the
    logits); for a loss over these, the fused losses below are one GEMM cheaper."""
    if hidden.dim() != 3:
        raise ValueError(f"fused_sequence_logps: hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    logp = fused_linear_logprobs(hidden, weight, targets, ignore_index, bias, temperature,
                                 **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    return sequence_logps(logp, targets != ignore_index, average)


def _split_pairs(op, hidden):
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{op}: hidden must be [2B, T, H] (B chosen, then B rejected), got {tuple(hidden.shape)}")
    return hidden.shape[0] // 2


def _mean_scale(op: str, reduction: str, units: int) -> float:
    check_choice(op, "reduction", reduction, ("mean", "sum"))
    return 1.0 / max(units, 1) if reduction == "mean" else 1.0


def _pair_logps(out, targets, ignore_index, average):
    """(chosen, rejected) sequence log-probs [B] from a fused loss's detached token log-probs."""
    return sequence_logps(out.logp, targets != ignore_index, average).chunk(2)


def fused_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                   beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                   ignore_index: int = -100, bias: torch.Tensor | None = None, temperature: float = 1.0, *,
                   ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                   ref_bias: torch.Tensor | None = None, average_log_prob: bool | None = None,
                   discopop_tau: float = 0.05, reduction: str = "mean", lora_A=None, lora_B=None,
                   lora_scaling: float = 1.0, chunk_size: int | None = None):
    """:func:`peftkern.losses.dpo_loss` from the policy's hidden states [2B, T, H] (chosen first).

    The reference log-probs come precomputed (ref_chosen_logps, ref_rejected_logps [B], e.g. from a
    :class:`peftkern.losses.RefLogpCache`) or are computed here without gradients from
    ``ref_hidden`` and ``ref_weight`` (``ref_bias``). Sequence log-probs are sums over the
    non-ignored positions, or means when ``average_log_prob`` (default: only for ``ipo``, as TRL).
    ``reduction``: "mean" over pairs (as ``dpo_loss``) or "sum". Gradients are formed in the forward
    pass for every loss type but ``aot`` / ``aot_unpaired`` (batch-sorted: recomputed in the backward).
    -> (loss, chosen_rewards [B], rejected_rewards [B]).
    """
    op = "fused_dpo_loss"
    pairs = _split_pairs(op, hidden)
    beta, eps = check_dpo_args(op, beta, loss_type, label_smoothing)
    scale = _mean_scale(op, reduction, pairs)
    average = loss_type == "ipo" if average_log_prob is None else bool(average_log_prob)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{op}: give ref_chosen_logps and ref_rejected_logps, or ref_hidden and ref_weight to "
                             "compute them")
        with torch.no_grad():
            ref = fused_sequence_logps(ref_hidden, ref_weight, targets, ignore_index, ref_bias, temperature, average,
                                       chunk_size=chunk_size)
        ref_chosen_logps, ref_rejected_logps = ref.chunk(2)
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
    lora = _lora_kw(lora_A, lora_B, lora_scaling, chunk_size)
    if loss_type not in SEPARABLE_DPO_LOSS_TYPES:
        logps = fused_sequence_logps(hidden, weight, targets, ignore_index, bias, temperature, average, **lora)
        chosen, rejected = logps.chunk(2)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps,
                                                          beta, loss_type, eps, discopop_tau=discopop_tau)
        return (loss if reduction == "mean" else loss * pairs), chosen_rewards, rejected_rewards
    if loss_type == "discopop":
        discopop_tau = check_positive(op, "discopop_tau", discopop_tau)
    out = fused_unit_loss(hidden, weight, targets, "dpo", tensors=[torch.cat([ref_chosen_logps, ref_rejected_logps])],
                          scalars=[beta, eps, discopop_tau, float(average), scale], variant=loss_type, group=2,
                          ignore_index=ignore_index, bias=bias, temperature=temperature, **lora)
    chosen, rejected = _pair_logps(out, targets, ignore_index, average)
    return out.loss, beta * (chosen - ref_chosen_logps), beta * (rejected - ref_rejected_logps)


def fused_simpo_loss(hidden, weight, targets, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                     ignore_index: int = -100, bias=None, temperature: float = 1.0, *, reduction: str = "mean",
                     lora_A=None, lora_B=None, lora_scaling: float = 1.0, chunk_size=None):
    """:func:`peftkern.losses.simpo_loss` from hidden states [2B, T, H] (average log-probs), gradients
    formed in the forward pass. -> (loss, chosen_rewards [B], rejected_rewards [B])."""
    op = "fused_simpo_loss"
    pairs = _split_pairs(op, hidden)
    beta = check_positive(op, "beta", beta)
    eps = check_smoothing(op, label_smoothing)
    out = fused_unit_loss(hidden, weight, targets, "simpo",
                          scalars=[beta, float(gamma), eps, _mean_scale(op, reduction, pairs)], group=2,
                          ignore_index=ignore_index, bias=bias, temperature=temperature,
                          **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    chosen, rejected = _pair_logps(out, targets, ignore_index, True)
    return out.loss, beta * chosen, beta * rejected


def _chosen_token_weight(targets, ignore_index, pairs: int, weight: float) -> torch.Tensor:
    """weight / (scored tokens of the chosen sequences), a 0-dim fp32 tensor (no host sync)."""
    count = (targets[:pairs] != ignore_index).sum().clamp(min=1).float()
    return weight / count


def fused_orpo_loss(hidden, weight, targets, beta: float = 0.1, ignore_index: int = -100, bias=None,
                    temperature: float = 1.0, *, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                    chunk_size=None):
    """:func:`peftkern.losses.orpo_loss` from hidden states [2B, T, H]: the chosen completions' NLL
    (mean over their tokens) plus beta times the odds-ratio term on average log-probs, gradients
    formed in the forward pass. -> (loss, chosen_rewards [B], rejected_rewards [B])."""
    op = "fused_orpo_loss"
    pairs = _split_pairs(op, hidden)
    beta = check_positive(op, "beta", beta)
    out = fused_unit_loss(hidden, weight, targets, "orpo",
                          tensors=[_chosen_token_weight(targets, ignore_index, pairs, 1.0)],
                          scalars=[beta, 1.0 / max(pairs, 1)], group=2, ignore_index=ignore_index, bias=bias,
                          temperature=temperature, **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    chosen, rejected = _pair_logps(out, targets, ignore_index, True)
    return out.loss, beta * chosen, beta * rejected


def fused_cpo_loss(hidden, weight, targets, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, ignore_index: int = -100, bias=None, temperature: float = 1.0, *,
                   simpo_gamma: float = 0.5, alpha: float = 0.0, cpo_alpha: float = 1.0,
                   average_log_prob: bool | None = None, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                   chunk_size=None):
    """:func:`peftkern.losses.cpo_loss` from hidden states [2B, T, H]: the pair loss (sequence
    log-probs summed, or averaged for ipo / simpo as TRL, or as ``average_log_prob`` says) plus
    ``cpo_alpha`` times the chosen completions' NLL (mean over their tokens), gradients formed in the
    forward pass. -> (loss, chosen_rewards [B], rejected_rewards [B])."""
    op = "fused_cpo_loss"
    pairs = _split_pairs(op, hidden)
    beta, eps = check_cpo_args(op, beta, loss_type, label_smoothing)
    average = loss_type in ("ipo", "simpo") if average_log_prob is None else bool(average_log_prob)
    out = fused_unit_loss(hidden, weight, targets, "cpo",
                          tensors=[_chosen_token_weight(targets, ignore_index, pairs, float(cpo_alpha))],
                          scalars=[beta, eps, float(simpo_gamma), float(alpha), float(average), 1.0 / max(pairs, 1)],
                          variant=loss_type, group=2, ignore_index=ignore_index, bias=bias, temperature=temperature,
                          **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    chosen, rejected = _pair_logps(out, targets, ignore_index, average)
    return out.loss, beta * cpo_rewards(chosen, float(alpha)), beta * cpo_rewards(rejected, float(alpha))


def fused_kto_loss(hidden, weight, targets, preference_labels: torch.Tensor, ref_logps: torch.Tensor,
                   kl: torch.Tensor | float | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, ignore_index: int = -100, bias=None, temperature: float = 1.0, *,
                   loss_type: str = "kto", reduction: str = "mean", lora_A=None, lora_B=None,
                   lora_scaling: float = 1.0, chunk_size=None):
    """:func:`peftkern.losses.kto_loss` from hidden states [B, T, H]: preference_labels [B] (True:
    desirable), ref_logps [B] the reference sequence log-probs, kl the reference point z0 (from
    :func:`peftkern.losses.kl_estimate` on mismatched pairs; a constant; None or 0: none).
    Gradients formed in the forward pass. ``reduction``: "mean" over examples or "sum".
    -> (loss, chosen_rewards [Bc], rejected_rewards [Br], kl)."""
    op = "fused_kto_loss"
    check_choice(op, "loss_type", loss_type, KTO_LOSS_TYPES)
    beta = check_positive(op, "beta", beta)
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    n = hidden.shape[0]
    labels = preference_labels.to(device=hidden.device, dtype=torch.bool)
    if labels.shape != (n,) or ref_logps.shape != (n,):
        raise ValueError(f"{op}: preference_labels {tuple(labels.shape)} and ref_logps {tuple(ref_logps.shape)} "
                         f"must be [B] with B = {n}")
    z0 = torch.as_tensor(0.0 if kl is None else kl, dtype=torch.float32, device=hidden.device).detach()
    if loss_type != "kto":
        z0 = torch.zeros_like(z0)
    ref = ref_logps.detach().float()
    out = fused_unit_loss(hidden, weight, targets, "kto", tensors=[ref, labels.float(), z0],
                          scalars=[beta, float(desirable_weight), float(undesirable_weight),
                                   _mean_scale(op, reduction, n)], variant=loss_type, group=1,
                          ignore_index=ignore_index, bias=bias, temperature=temperature,
                          **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    rewards = beta * (sequence_logps(out.logp, targets != ignore_index) - ref)
    return out.loss, rewards[labels], rewards[~labels], z0
