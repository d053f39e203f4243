"""ROUGE-L (Lin, 2004) between two texts, as rouge-score computes it without stemming, and a pool of
texts to test new ones against (Self-Instruct's novelty filter).

Tokens: lower case, every run of characters other than a-z and 0-9 is a separator (rouge-score's
default tokenizer). With L the length of the longest common subsequence of the token lists of
lengths m and n: precision L / n, recall L / m, F = 2PR / (P + R) = 2L / (m + n); 0 when either
text has no token. The LCS length comes from the bit-parallel recurrence of Allison and Dix (1986)
(one big-integer add per token of the second text), so testing a text against a pool of thousands
stays fast in pure Python.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _match_masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def _lcs_from_masks(masks: dict[str, int], n: int, other: list[str]) -> int:
    full = (1 << n) - 1
    v = full
    for t in other:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return n - bin(v).count("1")


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists."""
    return _lcs_from_masks(_match_masks(a), len(a), b) if a else 0


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F-measure of two texts (symmetric), in [0, 1]."""
    a, b = rouge_tokens(reference), rouge_tokens(candidate)
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


@dataclass
class Nearest:
    """The highest ROUGE-L of a text against a pool and which pool entry gave it (-1: empty pool)."""
    score: float
    index: int


class RougePool:
    """Texts to compare new ones with; ``nearest(text)`` is the best ROUGE-L F over the pool."""

    def __init__(self, texts=()):
        self.texts: list[str] = []
        self._entries: list[tuple[dict[str, int], int]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        self.texts.append(text)
        self._entries.append((_match_masks(toks), len(toks)))

    def nearest(self, text: str) -> Nearest:
        toks = rouge_tokens(text)
        best = Nearest(0.0, -1)
        if not toks:
            return best
        for idx, (masks, n) in enumerate(self._entries):
            if n == 0:
                continue
            score = 2 * _lcs_from_masks(masks, n, toks) / (n + len(toks))
            if score > best.score or best.index < 0:
                best = Nearest(score, idx)
        return best
