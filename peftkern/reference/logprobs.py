"""Per-token log-probabilities through an output head, defined plainly: the full [tokens, V] logits
are built, so this is the definition the chunked faces are tested against, never a fast path.

logits = hidden W^T + b + s * (hidden A^T) B^T   (the LoRA term only when A and B are given)
z      = logits / temperature, in fp32 (float64 when hidden is float64)
logp   = log_softmax(z)[target],  entropy = -sum_j p_j log p_j,  mean_logp = mean_j log p_j
Ignored positions (target == ignore_index) give 0 for every statistic.
"""
from __future__ import annotations

import torch


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                lora_scaling: float = 1.0) -> torch.Tensor:
    """hidden [..., H], weight [V, H], bias [V], lora_A [r, H], lora_B [V, r] -> logits [..., V]
    in hidden's dtype."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if lora_A is not None:
        logits = logits + lora_scaling * ((hidden @ lora_A.t()) @ lora_B.t())
    return logits


def logprob_stats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V], targets [...] (int) -> (logp, entropy, mean_logp), each [...] in fp32
    (float64 for float64 logits), 0 where targets == ignore_index."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(work) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1).long()).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    mean_logp = log_p.mean(-1)
    zero = torch.zeros((), dtype=work, device=logits.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero), torch.where(valid, mean_logp, zero)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False,
                    lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                    lora_scaling: float = 1.0):
    """The definition of ``peftkern.ops.fused_linear_logprobs``: logp [...] (and entropy [...])."""
    logp, entropy, _ = logprob_stats(head_logits(hidden, weight, bias, lora_A, lora_B, lora_scaling), targets,
                                     ignore_index, temperature)
    return (logp, entropy) if return_entropy else logp


def linear_mean_logprobs(hidden, weight, targets, ignore_index=-100, bias=None, temperature=1.0,
                         lora_A=None, lora_B=None, lora_scaling=1.0) -> torch.Tensor:
    """mean over the vocabulary of log p (the label-smoothing term), 0 at ignored positions."""
    return logprob_stats(head_logits(hidden, weight, bias, lora_A, lora_B, lora_scaling), targets,
                         ignore_index, temperature)[2]
