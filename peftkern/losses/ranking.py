"""Reward-model losses over K ranked completions of one prompt: Plackett-Luce (listwise) and all-pairs
Bradley-Terry. Both take scores already in rank order (best first); :func:`ranked_scores` puts a
model's scores into that order from a ranking.

For K = 2 both are the Bradley-Terry pair loss softplus(s_2 - s_1) = -log sigmoid(s_1 - s_2) (the
same floating-point operations, so the two agree bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkern.losses._common import check_choice

RANK_LOSSES = ("bradley_terry", "plackett_luce")
REDUCTIONS = ("mean", "sum", "none")
_FAR = -1e30  # stands for -inf at padded places (a true -inf makes NaN gradients through logcumsumexp)


def ranked_scores(scores: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """scores [B, K] in the completions' order, ranking [B, K] long (completion indices, best first; any
    value at padded places) -> scores [B, K] best first: ``scores[b, ranking[b, i]]``."""
    if scores.shape != ranking.shape:
        raise ValueError(f"ranked_scores: scores {tuple(scores.shape)} and ranking {tuple(ranking.shape)} must have "
                         "one shape [B, K]")
    return scores.gather(-1, ranking.clamp(0, scores.shape[-1] - 1))


def _checked(op: str, scores: torch.Tensor, mask: torch.Tensor | None, margin, reduction: str):
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"{op}: scores must be [B, K] with K >= 2 completions per list, got {tuple(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    elif mask.shape != scores.shape:
        raise ValueError(f"{op}: mask {tuple(mask.shape)} must have the scores' shape {tuple(scores.shape)}")
    mask = mask.bool()
    counts = mask.sum(-1)
    if scores.shape[0] and int(counts.min()) < 2:
        raise ValueError(f"{op}: every list needs at least 2 ranked completions; list {int(counts.argmin())} has "
                         f"{int(counts.min())}")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(f"{op}: mask must be true on a prefix of each row (padding at the end of the ranking)")
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if margin is None:
        margin = torch.zeros((), dtype=scores.dtype, device=scores.device)
    margin = torch.as_tensor(margin, dtype=scores.dtype, device=scores.device)
    if margin.dim() == 1:
        if margin.shape[0] != scores.shape[0]:
            raise ValueError(f"{op}: margin has {margin.shape[0]} values for {scores.shape[0]} lists")
        margin = margin[:, None]
    return scores, mask, margin


def _reduce(per_list: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_list
    return per_list.sum() if reduction == "sum" else per_list.mean()


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None,
                       margin: torch.Tensor | float | None = None, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of each ranking under the Plackett-Luce model (Plackett 1975; Luce 1959;
    the listwise loss of ListMLE, Xia et al. 2008):

        sum_{i < n-1} log sum_{j >= i} exp(s_j) - s_i  =  sum_i softplus(logsumexp_{j > i} s_j - s_i + m)

    with m = 0 (``margin`` m per list: the preferred completion must win by m at every stage; for K = 2
    this is the margin of the Bradley-Terry loss).

    scores [B, K], best first; mask [B, K] bool, true on each row's first n >= 2 places (None: all);
    margin [B] or a number. -> mean over lists (``reduction``: "mean" | "sum" | "none" -> [B]); fp32 for
    16-bit scores.
    """
    scores, mask, margin = _checked("plackett_luce_loss", scores, mask, margin, reduction)
    filled = scores.masked_fill(~mask, _FAR)
    # rest[:, i] = logsumexp of the places after i (the last place's "rest" is empty: _FAR)
    suffix = torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)
    rest = torch.cat([suffix[:, 1:], torch.full_like(suffix[:, :1], _FAR)], dim=-1)
    stage = mask.clone()
    stage[torch.arange(mask.shape[0], device=mask.device), mask.sum(-1) - 1] = False  # the last place has no stage
    terms = F.softplus(torch.where(stage, rest - scores + margin, torch.zeros_like(scores)))
    return _reduce((terms * stage).sum(-1), reduction)


def all_pairs_bradley_terry_loss(scores: torch.Tensor, mask: torch.Tensor | None = None,
                                 margin: torch.Tensor | float | None = None,
                                 reduction: str = "mean") -> torch.Tensor:
    """Bradley-Terry over every pair a ranking implies, averaged per list (InstructGPT, Ouyang et al.
    2022, arXiv:2203.02155, Eq. 1: 1 / C(n, 2) times the sum over pairs i ranked above j of
    -log sigmoid(s_i - s_j - m)), written softplus(s_j - s_i + m).

    scores [B, K], best first; mask [B, K] as in :func:`plackett_luce_loss`; margin [B] or a number.
    -> mean over lists (``reduction``: "mean" | "sum" | "none" -> [B]).
    """
    scores, mask, margin = _checked("all_pairs_bradley_terry_loss", scores, mask, margin, reduction)
    k = scores.shape[1]
    above = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1)  # [i, j]: place i above place j
    pairs = above & mask[:, :, None] & mask[:, None, :]
    diff = scores[:, None, :] - scores[:, :, None] + margin[..., None]  # [b, i, j] = s_j - s_i + m
    terms = F.softplus(torch.where(pairs, diff, torch.zeros_like(diff)))
    n = mask.sum(-1).to(scores.dtype)
    return _reduce((terms * pairs).sum((-2, -1)) / (n * (n - 1) / 2), reduction)


def rank_loss(scores: torch.Tensor, mask: torch.Tensor | None = None, margin: torch.Tensor | float | None = None,
              loss_type: str = "bradley_terry", reduction: str = "mean") -> torch.Tensor:
    """:func:`all_pairs_bradley_terry_loss` or :func:`plackett_luce_loss` by name (``RANK_LOSSES``)."""
    check_choice("rank_loss", "loss_type", loss_type, RANK_LOSSES)
    fn = plackett_luce_loss if loss_type == "plackett_luce" else all_pairs_bradley_terry_loss
    return fn(scores, mask, margin, reduction)


def pairwise_accuracy(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: the share of each list's implied pairs (i above j) whose scores agree (s_i > s_j; a tie
    counts 1/2). scores [B, K] best first, mask as above."""
    scores, mask, _ = _checked("pairwise_accuracy", scores, mask, None, "none")
    k = scores.shape[1]
    pairs = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1) & mask[:, :, None] & mask[:, None, :]
    diff = scores[:, :, None] - scores[:, None, :]
    right = (diff > 0).to(scores.dtype) + 0.5 * (diff == 0).to(scores.dtype)
    n = mask.sum(-1).to(scores.dtype)
    return (right * pairs).sum((-2, -1)) / (n * (n - 1) / 2)
