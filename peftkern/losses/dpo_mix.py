"""The DPO loss as TRL 1.16's ``DPOTrainer`` computes it, from hidden states: several loss types at
once with weights (``loss_type=["sigmoid", "sft"]``, ``loss_weights``), TRL's ``sft`` (the chosen
completions' NLL, mean over their tokens) and ``sigmoid_norm`` (the sigmoid loss on log-ratios
divided by the completion lengths), ``ipo`` on length-averaged log-ratios, and LD-DPO's down-weighting
of the tokens past the shorter completion (``ld_alpha``, through per-token weights).

One pass over the vocabulary for the whole mixture: the registered unit loss ``dpo_mix`` (pairs)
forms every term's gradient in the forward pass; the batch-sorted types (``aot``, ``aot_unpaired``)
take the recompute path instead. The per-pair formulas are ``peftkern.losses.dpo.dpo_pair_losses``.

``dpo_mix`` (G = 2: chosen sequences, then rejected): tensors [ref [2U] (the reference's weighted
sequence log-probs), sft_weight (0-dim: weight of each chosen token's -logp), token weights [N] (or
[0]: all 1)]; scalars [beta, label_smoothing, discopop_tau, scale, w_1, ..., w_k]; variant: the k loss
types joined with commas.
"""
from __future__ import annotations

import torch

from peftkern.losses._common import check_choice
from peftkern.losses.dpo import DPO_LOSS_TYPES, SEPARABLE_DPO_LOSS_TYPES, check_dpo_args, dpo_losses, dpo_pair_losses
from peftkern.ops.logprob_units import UnitChunk, UnitGrads, register_unit_loss
from peftkern.ops.logprobs import fused_linear_logprobs, fused_unit_loss

DPO_TRAINER_LOSS_TYPES = DPO_LOSS_TYPES + ("sft", "sigmoid_norm")
LENGTH_AVERAGED = ("ipo", "sigmoid_norm")  # TRL divides their log-ratios by the completion lengths


def _pair_terms(chosen, rejected, n_chosen, n_rejected, beta, loss_type, eps, tau, with_grad):
    """One type's per-pair losses from the weighted log-ratios [U] (and d/d chosen, d/d rejected)."""
    if loss_type in LENGTH_AVERAGED:
        base = "ipo" if loss_type == "ipo" else "sigmoid"
        out = dpo_pair_losses(chosen / n_chosen, rejected / n_rejected, beta, base, 0.0, tau, with_grad)
        return (out[0], out[1] / n_chosen, out[2] / n_rejected) if with_grad else out
    return dpo_pair_losses(chosen, rejected, beta, loss_type, eps, tau, with_grad)


def dpo_mix_unit_loss(chunk: UnitChunk, tensors, scalars, variant) -> UnitGrads:
    ref, sft_weight, token_weight = tensors
    beta, eps, tau, scale, *weights = scalars
    w_tok = token_weight.index_select(0, chunk.pos) if token_weight.numel() else None
    s = chunk.sequence_sums(chunk.logp if w_tok is None else chunk.logp * w_tok)
    n = chunk.sequence_tokens().clamp(min=1.0)
    r = chunk.unit_slice(ref).to(s.dtype)
    value = s.new_zeros(())
    d = torch.zeros_like(s)
    for loss_type, w in zip(variant.split(","), weights):
        if loss_type == "sft":
            continue
        losses, d_c, d_r = _pair_terms(s[0] - r[0], s[1] - r[1], n[0], n[1], beta, loss_type, eps, tau, True)
        value = value + w * losses.sum()
        d = d + w * torch.stack([d_c, d_r])
    d_logp = chunk.per_token(d * scale)
    if w_tok is not None:
        d_logp = d_logp * w_tok
    value = value * scale
    chosen = (chunk.sequence < chunk.num_units).to(d_logp.dtype)
    value = value - sft_weight * torch.dot(chosen, chunk.logp)
    return UnitGrads(value, d_logp - sft_weight * chosen)


register_unit_loss("dpo_mix", dpo_mix_unit_loss)


def ld_token_weights(targets: torch.Tensor, ld_alpha: float, ignore_index: int = -100) -> torch.Tensor:
    """[2B, T] LD-DPO weights (Liu et al. 2024, arXiv:2409.06411): 1 on each completion's first
    min(chosen length, rejected length) tokens, ``ld_alpha`` on the rest, 0 off the completions."""
    mask = (targets != ignore_index).float()
    position = mask.cumsum(-1)
    lengths = mask.sum(-1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)[:, None]
    return mask * torch.where(position <= shared, 1.0, float(ld_alpha))


def check_mix(op: str, loss_types, loss_weights, beta: float, label_smoothing: float):
    """-> (types list, weights list, beta, eps) checked."""
    types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if not types:
        raise ValueError(f"{op}: loss_type is empty")
    for t in types:
        check_choice(op, "loss_type", t, DPO_TRAINER_LOSS_TYPES)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(types):
        raise ValueError(f"{op}: {len(weights)} loss_weights for {len(types)} loss types ({', '.join(types)})")
    dpo_types = [t for t in types if t in DPO_LOSS_TYPES] or ["sigmoid"]
    eps = 0.0
    for t in dpo_types:
        beta, eps = check_dpo_args(op, beta, t, label_smoothing)
    return types, weights, beta, eps


def fused_dpo_mix_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                       loss_type="sigmoid", loss_weights=None, label_smoothing: float = 0.0, ignore_index: int = -100,
                       bias: torch.Tensor | None = None, temperature: float = 1.0, *,
                       token_weights: torch.Tensor | None = None, discopop_tau: float = 0.05,
                       reduction: str = "mean", lora_A=None, lora_B=None, lora_scaling: float = 1.0,
                       chunk_size: int | None = None):
    """TRL's DPO loss (every type of ``DPO_TRAINER_LOSS_TYPES``, one or a weighted list) from hidden
    states [2B, T, H] (chosen rows first).

    ref_*_logps [B]: the reference's sequence log-probs, summed with the same ``token_weights`` (LD-DPO;
    None: plain sums). Sequence log-probs are weighted sums of token log-probs; ``ipo`` and
    ``sigmoid_norm`` divide the log-ratios by the completion lengths; ``sft`` is the chosen tokens' mean
    NLL. ``reduction``: "mean" over pairs (TRL's) or "sum" (the sft term then counts B times).
    -> (loss, chosen_rewards [B], rejected_rewards [B]): rewards beta (policy - reference), detached.
    """
    op = "fused_dpo_mix_loss"
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"{op}: hidden must be [2B, T, H] (B chosen, then B rejected), got {tuple(hidden.shape)}")
    check_choice(op, "reduction", reduction, ("mean", "sum"))
    types, weights, beta, eps = check_mix(op, loss_type, loss_weights, beta, label_smoothing)
    pairs = hidden.shape[0] // 2
    scale = 1.0 / max(pairs, 1) if reduction == "mean" else 1.0
    mask = targets != ignore_index
    ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().float()
    if token_weights is not None:
        token_weights = token_weights.detach().float()
        if tuple(token_weights.shape) != tuple(targets.shape):
            raise ValueError(f"{op}: token_weights has shape {tuple(token_weights.shape)}, expected "
                             f"{tuple(targets.shape)}")
    sft = sum(w for t, w in zip(types, weights) if t == "sft")
    chosen_tokens = mask[:pairs].sum().clamp(min=1).float()
    sft_weight = sft * pairs * scale / chosen_tokens  # w_sft x (token mean) x (B x scale)
    head = dict(ignore_index=ignore_index, bias=bias, temperature=temperature, lora_A=lora_A, lora_B=lora_B,
                lora_scaling=lora_scaling, chunk_size=chunk_size)
    if all(t in SEPARABLE_DPO_LOSS_TYPES + ("sft", "sigmoid_norm") for t in types):
        out = fused_unit_loss(hidden, weight, targets, "dpo_mix",
                              tensors=[ref, sft_weight.to(hidden.device),
                                       torch.empty(0, device=hidden.device) if token_weights is None
                                       else token_weights.reshape(-1)],
                              scalars=[beta, eps, float(discopop_tau), scale, *weights], variant=",".join(types),
                              group=2, **head)
        loss, token = out.loss, out.logp
    else:  # batch-sorted types: sequence log-probs through the op whose backward recomputes the logits
        token = fused_linear_logprobs(hidden, weight, targets, **head)
        loss = _mix_from_token_logps(token, mask, ref, types, weights, beta, eps, discopop_tau, token_weights) * \
            (pairs * scale)
    seq = _weighted(token.detach(), mask, token_weights)
    rewards = beta * (seq - ref)
    return loss, rewards[:pairs], rewards[pairs:]


def _weighted(token: torch.Tensor, mask: torch.Tensor, token_weights) -> torch.Tensor:
    w = mask.to(token.dtype) if token_weights is None else token_weights.to(token.dtype)
    return (token * w).sum(-1)


def _mix_from_token_logps(token, mask, ref, types, weights, beta, eps, tau, token_weights):
    """The mixture's mean loss from differentiable token log-probs [2B, T] (the recompute path)."""
    pairs = token.shape[0] // 2
    seq = _weighted(token, mask, token_weights)
    n = mask.sum(-1).clamp(min=1).to(seq.dtype)
    chosen, rejected = seq[:pairs] - ref[:pairs], seq[pairs:] - ref[pairs:]
    loss = seq.new_zeros(())
    for loss_type, w in zip(types, weights):
        if loss_type == "sft":
            term = -(token[:pairs] * mask[:pairs]).sum() / mask[:pairs].sum().clamp(min=1)
        elif loss_type in ("aot", "aot_unpaired"):
            term = dpo_losses(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:], beta, loss_type, eps, tau).mean()
        else:
            term = _pair_terms(chosen, rejected, n[:pairs], n[pairs:], beta, loss_type, eps, tau, False).mean()
        loss = loss + w * term
    return loss
