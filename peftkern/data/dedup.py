"""Exact and near duplicates: MinHash signatures over character shingles, LSH banding for candidate
pairs, then the exact Jaccard similarity of each candidate pair's shingle sets.

MinHash (Broder, 1997) estimates the Jaccard similarity |A & B| / |A | B| of two sets from the share
of equal entries in their signatures; banding the signature (b bands of r rows) makes a pair a
candidate when any band matches, with probability 1 - (1 - s^r)^b at similarity s. The bands are
chosen so that a pair at the threshold is a candidate with probability >= 0.995; each candidate's
similarity is then computed exactly, so what is reported (and where the threshold cuts) does not
depend on the estimate. numpy only: datasketch, the usual library, needs scipy.
"""
from __future__ import annotations

import re
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

_PRIME = (1 << 31) - 1  # Mersenne prime: a x + b < 2^62 for a, x, b < 2^31, no uint64 overflow
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower case, runs of whitespace as one space, stripped: what 'the same text' means here."""
    return _SPACE.sub(" ", text.lower()).strip()


def shingles(text: str, k: int = 5) -> frozenset[str]:
    """Character k-grams of the normalized text (the whole text when it is shorter than k)."""
    t = normalize_text(text)
    if len(t) <= k:
        return frozenset([t])
    return frozenset(t[i:i + k] for i in range(len(t) - k + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if (a or b) else 1.0


def choose_bands(num_perm: int, threshold: float, recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm and the most rows (fewest false candidates) such
    that a pair of similarity ``threshold`` is a candidate with probability >= ``recall``."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            best = (bands, rows)
    return best


class MinHasher:
    """``num_perm`` hash functions h(x) = (a x + b) mod p, p = 2^31 - 1, over the shingles' CRC-32 taken
    mod p; a in [1, p) and b in [0, p) drawn from ``seed``. ``signature(set)`` -> uint64 [num_perm]."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        rng = np.random.default_rng(seed)
        # a spans the whole field, so a x + b wraps mod p many times: a random-looking order of x. (A small
        # a against a large p would leave the order of x nearly intact and every hash the same minimum.)
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, items: frozenset[str]) -> np.ndarray:
        x = np.fromiter((zlib.crc32(s.encode("utf-8")) % _PRIME for s in items), dtype=np.uint64, count=len(items))
        if x.size == 0:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        return ((np.outer(x, self.a) + self.b) % np.uint64(_PRIME)).min(axis=0)


@dataclass
class Pair:
    """Two texts (indices into the lists given) and their exact Jaccard similarity."""
    i: int
    j: int
    similarity: float


def near_duplicate_pairs(texts: list[str], others: list[str] | None = None, threshold: float = 0.8,
                         k: int = 5, num_perm: int = 128, seed: int = 0) -> list[Pair]:
    """Pairs of exact Jaccard similarity >= ``threshold`` over ``k``-character shingles (identical
    texts included, at 1.0: callers set exact duplicates apart with :func:`exact_groups`).

    Without ``others``: pairs i < j within ``texts``. With ``others``: pairs (i in texts, j in others).
    Sorted by similarity, highest first.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    hasher = MinHasher(num_perm, seed)
    bands, rows = choose_bands(num_perm, threshold)
    left = [shingles(t, k) for t in texts]
    right = left if others is None else [shingles(t, k) for t in others]
    right_sigs = [hasher.signature(s) for s in right]
    left_sigs = right_sigs if others is None else [hasher.signature(s) for s in left]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for j, sig in enumerate(right_sigs):
        for b in range(bands):
            buckets[(b, sig[b * rows:(b + 1) * rows].tobytes())].append(j)
    candidates = set()
    for i, sig in enumerate(left_sigs):
        for b in range(bands):
            for j in buckets.get((b, sig[b * rows:(b + 1) * rows].tobytes()), ()):
                if others is not None or j > i:
                    candidates.add((i, j))
    pairs = [Pair(i, j, jaccard(left[i], right[j])) for i, j in candidates]
    return sorted((p for p in pairs if p.similarity >= threshold), key=lambda p: (-p.similarity, p.i, p.j))


def exact_groups(texts: list[str]) -> list[list[int]]:
    """Groups (of two or more indices) of texts equal after :func:`normalize_text`, in order of first use."""
    seen: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        seen.setdefault(normalize_text(t), []).append(i)
    return [g for g in seen.values() if len(g) > 1]
