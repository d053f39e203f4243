"""The losses from hidden states: the output head and the log-softmax fused through
``peftkern.ops.fused_linear_logprobs``, so no [tokens, V] logits are built.

Every function takes hidden [..., H] and the head's weight [V, H] (bias [V], a LoRA on the head as
lora_A [r, H], lora_B [V, r], lora_scaling; :func:`head_parameters` reads them off a module) and
targets [...] already aligned with hidden (position t predicts targets[t]; ignore_index marks the
positions that carry no loss). Preference losses take hidden [2B, T, H] with the B chosen sequences
first, then the B rejected ones.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.losses._common import check_choice, sequence_logps
from peftkern.losses.dpo import dpo_loss
from peftkern.losses.kto import kto_loss
from peftkern.losses.preference import orpo_loss, simpo_loss
from peftkern.losses.sft import REDUCTIONS, sft_loss
from peftkern.ops.logprobs import fused_linear_logprob_dot, fused_linear_logprob_stats, fused_linear_logprobs


def head_parameters(head: nn.Module) -> dict:
    """{weight, bias, lora_A, lora_B, lora_scaling} of an output head: ``nn.Linear``, peftkern's
    ``LoRALinear`` or PEFT's LoRA ``Linear`` (one active, unmerged adapter). A LoRA on the head is
    never dropped silently: one that cannot be expressed (several active adapters, dropout while
    training, DoRA) raises."""
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
    if getattr(head, "use_dora", {}).get(name, False):
        raise ValueError(f"head_parameters: adapter {name!r} on the head is DoRA, which the fused loss does not take")
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
    sequence's non-ignored positions of log p(target)."""
    if hidden.dim() != 3:
        raise ValueError(f"fused_sequence_logps: hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    logp = fused_linear_logprobs(hidden, weight, targets, ignore_index, bias, temperature,
                                 **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    return sequence_logps(logp, targets != ignore_index, average)


def _split_pairs(op, hidden):
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{op}: hidden must be [2B, T, H] (B chosen, then B rejected), got {tuple(hidden.shape)}")


def fused_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                   beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                   ignore_index: int = -100, bias: torch.Tensor | None = None, temperature: float = 1.0, *,
                   ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                   ref_bias: torch.Tensor | None = None, average_log_prob: bool | None = None,
                   discopop_tau: float = 0.05, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                   chunk_size: int | None = None):
    """:func:`peftkern.losses.dpo_loss` from the policy's hidden states [2B, T, H] (chosen first).

    The reference log-probs come precomputed (ref_chosen_logps, ref_rejected_logps [B], e.g. from a
    :class:`peftkern.losses.RefLogpCache`) or are computed here without gradients from
    ``ref_hidden`` and ``ref_weight`` (``ref_bias``). Sequence log-probs are sums over the
    non-ignored positions, or means when ``average_log_prob`` (default: only for ``ipo``, as TRL).
    -> (loss, chosen_rewards [B], rejected_rewards [B]).
    """
    _split_pairs("fused_dpo_loss", hidden)
    average = loss_type == "ipo" if average_log_prob is None else average_log_prob
    logps = fused_sequence_logps(hidden, weight, targets, ignore_index, bias, temperature, average,
                                 lora_A=lora_A, lora_B=lora_B, lora_scaling=lora_scaling, chunk_size=chunk_size)
    chosen, rejected = logps.chunk(2)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("fused_dpo_loss: give ref_chosen_logps and ref_rejected_logps, or ref_hidden and "
                             "ref_weight to compute them")
        with torch.no_grad():
            ref = fused_sequence_logps(ref_hidden, ref_weight, targets, ignore_index, ref_bias, temperature, average,
                                       chunk_size=chunk_size)
        ref_chosen_logps, ref_rejected_logps = ref.chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen_logps.to(chosen.dtype), ref_rejected_logps.to(chosen.dtype), beta,
                    loss_type, label_smoothing, discopop_tau=discopop_tau)


def fused_simpo_loss(hidden, weight, targets, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                     ignore_index: int = -100, bias=None, temperature: float = 1.0, *, lora_A=None, lora_B=None,
                     lora_scaling: float = 1.0, chunk_size=None):
    """:func:`peftkern.losses.simpo_loss` from hidden states [2B, T, H] (average log-probs)."""
    _split_pairs("fused_simpo_loss", hidden)
    logps = fused_sequence_logps(hidden, weight, targets, ignore_index, bias, temperature, True,
                                 lora_A=lora_A, lora_B=lora_B, lora_scaling=lora_scaling, chunk_size=chunk_size)
    chosen, rejected = logps.chunk(2)
    return simpo_loss(chosen, rejected, beta, gamma, label_smoothing)


def fused_orpo_loss(hidden, weight, targets, beta: float = 0.1, ignore_index: int = -100, bias=None,
                    temperature: float = 1.0, *, lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                    chunk_size=None):
    """:func:`peftkern.losses.orpo_loss` from hidden states [2B, T, H]: the chosen completions' NLL
    (mean over their tokens) plus beta times the odds-ratio term on average log-probs."""
    _split_pairs("fused_orpo_loss", hidden)
    logp = fused_linear_logprobs(hidden, weight, targets, ignore_index, bias, temperature,
                                 **_lora_kw(lora_A, lora_B, lora_scaling, chunk_size))
    mask = targets != ignore_index
    chosen, rejected = sequence_logps(logp, mask, average=True).chunk(2)
    half = hidden.shape[0] // 2
    nll = sft_loss(logp[:half], mask[:half])
    return orpo_loss(chosen, rejected, beta, chosen_nll_loss=nll)


def fused_kto_loss(hidden, weight, targets, preference_labels: torch.Tensor, ref_logps: torch.Tensor,
                   kl: torch.Tensor | float | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, ignore_index: int = -100, bias=None, temperature: float = 1.0, *,
                   lora_A=None, lora_B=None, lora_scaling: float = 1.0, chunk_size=None):
    """:func:`peftkern.losses.kto_loss` from hidden states [B, T, H]: preference_labels [B] (True:
    desirable), ref_logps [B] the reference sequence log-probs, kl the reference point z0 (from
    :func:`peftkern.losses.kl_estimate` on mismatched pairs; None or 0: none).
    -> (loss, chosen_rewards, rejected_rewards, kl)."""
    logps = fused_sequence_logps(hidden, weight, targets, ignore_index, bias, temperature,
                                 lora_A=lora_A, lora_B=lora_B, lora_scaling=lora_scaling, chunk_size=chunk_size)
    labels = preference_labels.to(device=logps.device, dtype=torch.bool)
    ref_logps = ref_logps.to(logps.dtype)
    return kto_loss(logps[labels], logps[~labels], None, ref_logps[labels], ref_logps[~labels], None, beta,
                    desirable_weight, undesirable_weight, "kto", kl=kl)
