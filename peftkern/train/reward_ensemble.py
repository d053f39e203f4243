"""A reward model as the RL trainers call it: N score heads over one body (N = 1: a plain reward model;
N > 1: an ensemble from ``peftkern rm --ensemble N``; with ``--ensemble-adapters`` head h reads the LM
run with its own adapter h), the heads' scores divided by the calibration
temperature and combined into one reward (mean, min, or mean - lambda x std), with the heads'
disagreement (their standard deviation) as an uncertainty other code can call.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.nn.mixed_batch import row_adapters
from peftkern.train.errors import ConfigError

AGGREGATES = ("mean", "min", "mean_minus_std")
ENSEMBLE_FILE = "ensemble.json"  # a reward model of N adapters: their names, in head order


def scores_by_adapter(scorer: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      adapters: list[str]) -> torch.Tensor:
    """[B, N]: member h's score = head h over the LM run with adapter ``adapters[h]`` alone. The rows are
    repeated once per member in one forward (``peftkern.nn.mixed_batch.row_adapters``: each layer runs
    its rows' adapter), so the base weights are read once. ``scorer``: an ``LMWithHeads`` over a
    PeftKernModel holding the adapters (all active), with a score head of N outputs."""
    n, b = len(adapters), input_ids.shape[0]
    with row_adapters([name for name in adapters for _ in range(b)]):
        scores = scorer(input_ids.repeat(n, 1), attention_mask.repeat(n, 1))["scores"].reshape(n, b, n)
    return scores.diagonal(dim1=0, dim2=2)  # [b, n]: block h, column h


def disagreement(member_scores: torch.Tensor) -> torch.Tensor:
    """[B]: the standard deviation over the heads (population: divided by N) of ``member_scores`` [B, N];
    0 for one head."""
    return member_scores.float().std(dim=-1, correction=0)


def aggregate(member_scores: torch.Tensor, how: str = "mean", std_coef: float = 1.0) -> torch.Tensor:
    """[B] reward from the heads' scores [B, N]: their ``mean``, ``min``, or ``mean_minus_std``
    (mean - std_coef x :func:`disagreement`, a pessimistic reward that keeps a policy away from what
    the heads disagree on; Coste et al. 2023, arXiv:2310.02743)."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate: unknown {how!r}; choose one of {', '.join(AGGREGATES)}")
    scores = member_scores.float()
    if how == "min":
        return scores.min(dim=-1).values
    mean = scores.mean(dim=-1)
    return mean - std_coef * disagreement(scores) if how == "mean_minus_std" else mean


class RewardModel(nn.Module):
    """``forward(input_ids [B, T], attention_mask [B, T])`` (right padding) -> ``{"scores": [B] the
    aggregated reward, "member_scores": [B, N], "disagreement": [B]}``, all fp32 and divided by
    ``temperature``. ``scorer``: an ``LMWithHeads`` whose score head has N outputs."""

    def __init__(self, scorer: nn.Module, temperature: float = 1.0, how: str = "mean", std_coef: float = 1.0,
                 where: str = "reward model", adapters: list[str] | None = None):
        super().__init__()
        if how not in AGGREGATES:
            raise ConfigError(f"--reward-aggregate {how!r}: choose one of {', '.join(AGGREGATES)}")
        if not temperature > 0:
            raise ConfigError(f"{where}: calibration temperature must be > 0, got {temperature}")
        self.scorer = scorer
        self.heads = scorer.score_head.out_features
        if self.heads == 1 and how != "mean":
            raise ConfigError(f"--reward-aggregate {how}: {where} has one head, so there is nothing to combine; "
                              "train an ensemble with 'peftkern rm --ensemble N'")
        self.temperature, self.how, self.std_coef = float(temperature), how, float(std_coef)
        self.adapters = list(adapters) if adapters else None  # N adapters, one per head

    @property
    def lm(self) -> nn.Module:
        return self.scorer.lm

    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, N] fp32: each head's score over the temperature."""
        if self.adapters:
            return scores_by_adapter(self.scorer, input_ids, attention_mask, self.adapters).float() / self.temperature
        scores = self.scorer(input_ids, attention_mask)["scores"].float()
        return scores.reshape(scores.shape[0], self.heads) / self.temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        members = self.member_scores(input_ids, attention_mask)
        return {"scores": aggregate(members, self.how, self.std_coef), "member_scores": members,
                "disagreement": disagreement(members)}

    @torch.no_grad()
    def uncertainty(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B]: how much the heads disagree on each sequence (:func:`disagreement`; 0 for one head)."""
        return disagreement(self.member_scores(input_ids, attention_mask))
