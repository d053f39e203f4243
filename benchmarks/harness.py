"""The parts every bench file shares: quick mode, result rows, the interleaved timer.

Rows are plain dicts with the keys of :data:`ROW_KEYS` (plus ``target``, ``met``, ``note`` and any
extra fields); ``ratio = ours / peer``. ``target`` is a string such as ``"<= 0.80"`` on the ratio.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import time
from typing import Callable

ROW_KEYS = ("op", "case", "shape", "dtype", "kind", "metric", "ours", "peer", "peer_name", "ratio", "unit")
KINDS = ("measured-cpu", "modeled-h100", "static", "measured-gpu")
QUICK_ENV = "PEFTKERN_BENCH_QUICK"
THREADS_ENV = "PEFTKERN_BENCH_THREADS"
SHARED_ENV = "PEFTKERN_BENCH_SHARED"


def is_quick() -> bool:
    """True under ``peftkern bench --quick`` (tiny shapes, few rounds: checks the harness, not speed)."""
    return os.environ.get(QUICK_ENV, "0") not in ("", "0")


def is_shared() -> bool:
    """True with ``PEFTKERN_BENCH_SHARED=1``: a heavily shared CPU, where cases that give one give
    smaller token counts (same vocab and hidden) so the side-by-side run fits; rows carry the shape."""
    return os.environ.get(SHARED_ENV, "0") not in ("", "0")


def pick(full, quick, shared=None):
    """``quick`` under --quick, ``shared`` (when given) on a shared machine, else ``full`` (for
    parametrize lists and round counts)."""
    if is_quick():
        return quick
    if shared is not None and is_shared():
        return shared
    return full


def target_met(target: str | None, ratio: float | None) -> bool | None:
    """Whether ``ratio`` meets ``target`` ("<= 0.80", ">= 2", "< 1"); None when either is missing."""
    if not target or ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return None
    match = re.fullmatch(r"\s*(<=|>=|<|>)\s*([0-9.eE+-]+)\s*x?\s*", target)
    if not match:
        raise ValueError(f"target must look like '<= 0.80', got {target!r}")
    op, bound = match.group(1), float(match.group(2))
    return {"<=": ratio <= bound, ">=": ratio >= bound, "<": ratio < bound, ">": ratio > bound}[op]


def make_row(op: str, *, kind: str, case: str, shape: dict, dtype: str, metric: str, ours, peer, peer_name,
             unit: str, target: str | None = None, note: str = "", **extra) -> dict:
    """One result row; checks the kind and computes ratio and met."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ratio = None
    if ours is not None and peer not in (None, 0):
        ratio = float(ours) / float(peer)
    row = {"op": op, "case": case, "shape": dict(shape), "dtype": str(dtype).replace("torch.", ""), "kind": kind,
           "metric": metric, "ours": ours, "peer": peer, "peer_name": peer_name, "ratio": ratio, "unit": unit,
           "target": target, "met": target_met(target, ratio), "note": note}
    row.update(extra)
    return row


def median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def spread(samples: list[float]) -> float:
    """Interquartile range over median: the run's noise, reported beside each timing."""
    if len(samples) < 4:
        return float("nan")
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / statistics.median(samples)


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                benchmark=None) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed round by round: every round runs each contender
    once (the order of the others alternates), so drift on a shared machine hits all alike.

    With pytest-benchmark's ``benchmark`` fixture, the first contender is timed by
    ``benchmark.pedantic`` and the others run in its per-round ``setup``: pytest-benchmark's report
    then holds the first contender's statistics. Every contender is also timed here with
    ``perf_counter``; those samples are what the medians come from.
    """
    names = list(contenders)
    first, others = names[0], names[1:]
    samples: dict[str, list[float]] = {name: [] for name in names}
    counter = [0]

    def timed(name):
        start = time.perf_counter()
        contenders[name]()
        samples[name].append(time.perf_counter() - start)

    def setup():
        order = others if counter[0] % 2 == 0 else others[::-1]
        counter[0] += 1
        for name in order:
            timed(name)

    total = rounds + warmup
    if benchmark is not None and not getattr(benchmark, "disabled", False):
        benchmark.pedantic(lambda: timed(first), setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    while len(samples[first]) < total:  # no pytest-benchmark, or it ran fewer rounds (disabled)
        setup()
        timed(first)
    return {name: s[-rounds:] for name, s in samples.items()}
