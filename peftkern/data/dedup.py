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


class _ShingleHashes:
    """Every text's shingles as 64-bit hashes, flat (``flat[offsets[t]:offsets[t + 1]]``, unique per
    text): exact Jaccard similarities of one text against many at once, with numpy."""

    def __init__(self, sets: list[frozenset]):
        # hash() of str is stable within a process, which is all this needs (nothing is stored).
        arrays = [np.fromiter((hash(x) for x in s), dtype=np.int64, count=len(s)) for s in sets]
        self.sizes = np.array([len(a) for a in arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)

    def of(self, t: int) -> np.ndarray:
        return self.flat[self.offsets[t]:self.offsets[t + 1]]

    def jaccard_many(self, mine: np.ndarray, others: np.ndarray) -> np.ndarray:
        """Jaccard similarity of the hash set ``mine`` with each text in ``others`` (indices), float64."""
        lengths = self.sizes[others]
        starts = self.offsets[others]
        segment = np.repeat(np.arange(len(others)), lengths)
        index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        inter = np.bincount(segment, weights=np.isin(self.flat[index], mine), minlength=len(others))
        union = len(mine) + lengths - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _band_keys(sigs: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """[n, bands] uint64: each band of each signature folded into one number (wrapping arithmetic)."""
    mult = np.random.default_rng(seed + 1).integers(1, 1 << 62, size=rows, dtype=np.uint64) | np.uint64(1)
    banded = sigs[:, :bands * rows].reshape(len(sigs), bands, rows)
    with np.errstate(over="ignore"):
        return (banded * mult).sum(axis=2, dtype=np.uint64)


def near_duplicate_pairs(texts: list[str], others: list[str] | None = None, threshold: float = 0.8,
                         k: int = 5, num_perm: int = 128, seed: int = 0, exclude=None) -> list[Pair]:
    """For each text, its most similar match of exact Jaccard similarity >= ``threshold`` over ``k``-character
    shingles, if it has one: at most one pair per text, so the output stays linear in the input.

    Without ``others``: matches among the earlier texts (``j < i``: the pair says "i near-duplicates j").
    With ``others``: matches in ``others`` (``j`` indexes ``others``). ``exclude(i, j)`` -> True skips a
    candidate. Ties go to the lowest ``j``. Sorted by i.

    Cost: candidates come from LSH buckets; each is first screened by the share of equal MinHash values
    (a pair at the threshold fails this screen with probability < 1e-5 at 128 permutations), and the
    survivors' shingle sets are compared exactly, all of a text's candidates in one numpy pass.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    hasher = MinHasher(num_perm, seed)
    bands, rows = choose_bands(num_perm, threshold)
    screen = max(0.0, threshold - 4.5 * (threshold * (1 - threshold) / num_perm) ** 0.5 - 1e-9)
    left_sets = [shingles(t, k) for t in texts]
    right_sets = left_sets if others is None else [shingles(t, k) for t in others]

    def signatures(sets):
        return np.stack([hasher.signature(s) for s in sets]) if sets else np.zeros((0, num_perm), np.uint64)

    right_sigs = signatures(right_sets)
    left_sigs = right_sigs if others is None else signatures(left_sets)
    right_keys = _band_keys(right_sigs, bands, rows, seed)
    left_keys = right_keys if others is None else _band_keys(left_sigs, bands, rows, seed)
    right_hashes = _ShingleHashes(right_sets)
    left_hashes = right_hashes if others is None else _ShingleHashes(left_sets)
    buckets: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(bands)]
    if others is not None:
        for j, row in enumerate(right_keys.tolist()):
            for b, key in enumerate(row):
                buckets[b][key].append(j)
    pairs = []
    for i, row in enumerate(left_keys.tolist()):
        found = [buckets[b][key] for b, key in enumerate(row) if key in buckets[b]]
        cand = np.unique(np.fromiter((j for f in found for j in f), dtype=np.int64)) if found else None
        if others is None:  # the earlier texts only: i joins the buckets after its own lookup
            for b, key in enumerate(row):
                buckets[b][key].append(i)
        if cand is None:
            continue
        cand = cand[(right_sigs[cand] == left_sigs[i]).mean(axis=1) >= screen]
        if exclude is not None and len(cand):
            cand = cand[[not exclude(i, int(j)) for j in cand]]
        if not len(cand):
            continue
        sims = right_hashes.jaccard_many(left_hashes.of(i), cand)
        best = int(np.argmax(sims))  # the first maximum: the lowest j among ties
        if sims[best] >= threshold:
            pairs.append(Pair(i, int(cand[best]), float(sims[best])))
    return pairs


def exact_groups(texts: list[str]) -> list[list[int]]:
    """Groups (of two or more indices) of texts equal after :func:`normalize_text`, in order of first use."""
    seen: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        seen.setdefault(normalize_text(t), []).append(i)
    return [g for g in seen.values() if len(g) > 1]
