"""Logits processors for sampling: repetition penalty, temperature, top-k, top-p (nucleus), min-p.

Each is a ``transformers.LogitsProcessor``: called as ``processor(input_ids [B, T] long, scores [B, V]
float32) -> scores [B, V]``, so it also works inside transformers' own ``generate``
(``logits_processor=[...]``). Removed tokens get ``-inf``. The definitions follow the papers and match
transformers' processors of the same names number for number (tested), so the same seed samples the
same tokens here and there.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from peftkern.generate.settings import DecodingSettings


class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty (Keskar et al., 2019): the score of every token already present in ``input_ids``
    is divided by ``penalty`` when positive and multiplied by it when negative. ``ignore_first``
    [B] (optional) skips each row's first positions: the left padding of a batched prompt."""

    def __init__(self, penalty: float, ignore_first: torch.Tensor | None = None):
        if not penalty > 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.ignore_first = ignore_first

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        ids = input_ids
        if self.ignore_first is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)
            ids = ids.masked_fill(positions[None, :] < self.ignore_first.to(ids.device)[:, None], vocab)
        seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
        seen.scatter_(1, ids.clamp(max=vocab), True)
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen[:, :vocab], penalized, scores)


class Temperature(LogitsProcessor):
    """scores / temperature."""

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK(LogitsProcessor):
    """Keep the ``k`` highest scores of each row (ties with the k-th kept too)."""

    def __init__(self, k: int):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        self.k = k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP(LogitsProcessor):
    """Nucleus sampling (Holtzman et al., 2020): keep the smallest set of most likely tokens whose
    probability reaches ``p``. Walking up from the least likely token, a token is dropped while the
    mass accumulated so far (itself included) stays <= 1 - p; the most likely token always stays."""

    def __init__(self, p: float):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        ascending, order = torch.sort(scores, dim=-1, descending=False)
        mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = mass_below <= (1.0 - self.p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        return scores.masked_fill(drop, float("-inf"))


class MinP(LogitsProcessor):
    """Min-p sampling (Nguyen et al., 2024): drop tokens whose probability is below ``min_p`` times the
    most likely token's probability (the most likely token always stays)."""

    def __init__(self, min_p: float):
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
        self.min_p = float(min_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        floor = self.min_p * probs.amax(dim=-1, keepdim=True)
        return scores.masked_fill(probs < floor, float("-inf"))


def build_processors(settings: DecodingSettings, extra=(), pad_lengths: torch.Tensor | None = None) -> list:
    """The processors ``settings`` asks for, in transformers' order: repetition penalty, then ``extra``
    (constraints, guidance), then, when sampling, temperature, top-k, top-p, min-p.

    ``pad_lengths`` [B]: left-padding length of each prompt row (not counted by the repetition penalty)."""
    out = []
    if settings.repetition_penalty != 1.0:
        out.append(RepetitionPenalty(settings.repetition_penalty, pad_lengths))
    out.extend(extra)
    if settings.do_sample:
        if settings.temperature != 1.0:
            out.append(Temperature(settings.temperature))
        if settings.top_k > 0:
            out.append(TopK(settings.top_k))
        if settings.top_p < 1.0:
            out.append(TopP(settings.top_p))
        if settings.min_p > 0.0:
            out.append(MinP(settings.min_p))
    return out


def apply_processors(processors, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
    for p in processors:
        scores = p(input_ids, scores)
    return scores
