"""Temperature scaling of a reward model (Guo et al. 2017, arXiv:1706.04599), its expected calibration
error and reliability plot, and the ``calibration.json`` a reward-model directory keeps.

A reward model's Bradley-Terry probability that a completion beats another is sigmoid(d / T), d the
difference of their scores. T is fitted on held-out pairs by minimising the negative log-likelihood
of the human preferences (the preferred completion winning); T > 1 softens an over-confident model,
T < 1 sharpens an under-confident one; the ranking never changes.

Calibration is measured as for a classifier: each pair's confidence is the probability of the
completion the model prefers, max(p, 1 - p) = sigmoid(|d| / T), and it is right when it prefers the
human's choice. ECE = sum over confidence bins of (share of pairs) x |accuracy - mean confidence|.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from peftkern.train.atomic import atomic_write_text
from peftkern.train.errors import ConfigError
from peftkern.train.plots import save_figure

CALIBRATION_FILE = "calibration.json"
T_RANGE = (1e-3, 1e3)


def _margins(margins) -> torch.Tensor:
    d = torch.as_tensor(margins, dtype=torch.float64).reshape(-1)
    if d.numel() == 0:
        raise ValueError("calibration needs at least one held-out pair")
    if not bool(torch.isfinite(d).all()):
        raise ValueError("calibration: the reward model gave a non-finite score difference")
    return d


def pair_nll(margins, temperature: float = 1.0) -> float:
    """Mean -log sigmoid(d / T) over the pairs (d = preferred score - other score)."""
    return float(F.softplus(-_margins(margins) / temperature).mean())


def fit_temperature(margins, iterations: int = 200) -> float:
    """The T in ``T_RANGE`` minimising :func:`pair_nll` (golden-section search on log T: the NLL is convex in
    1/T, so it has one minimum on the line; it sits at the range's end when every pair is right)."""
    d = _margins(margins)
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2

    def nll(log_t: float) -> float:
        return float(F.softplus(-d / math.exp(log_t)).mean())

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def reliability(margins, temperature: float = 1.0, bins: int = 10) -> list[dict]:
    """Per confidence bin over [0.5, 1] (equal widths): ``{"low", "high", "count", "confidence",
    "accuracy"}`` (the last two None for an empty bin). A tie (d = 0) has confidence 1/2 and counts
    half right."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    d = _margins(margins)
    confidence = torch.sigmoid(d.abs() / temperature)
    right = (d > 0).double() + 0.5 * (d == 0).double()
    index = ((confidence - 0.5) * 2 * bins).floor().clamp(0, bins - 1).long()
    rows = []
    for b in range(bins):
        sel = index == b
        n = int(sel.sum())
        rows.append({"low": 0.5 + 0.5 * b / bins, "high": 0.5 + 0.5 * (b + 1) / bins, "count": n,
                     "confidence": float(confidence[sel].mean()) if n else None,
                     "accuracy": float(right[sel].mean()) if n else None})
    return rows


def expected_calibration_error(margins, temperature: float = 1.0, bins: int = 10) -> float:
    """ECE of the pairs' confidences (see the module docstring)."""
    rows = reliability(margins, temperature, bins)
    total = sum(r["count"] for r in rows)
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def calibrate(margins, bins: int = 10) -> dict:
    """Fit T on ``margins`` and report ``{"temperature", "pairs", "accuracy", "nll_before", "nll_after",
    "ece_before", "ece_after", "bins"}`` (before: T = 1)."""
    d = _margins(margins)
    t = fit_temperature(d)
    return {"temperature": t, "pairs": int(d.numel()),
            "accuracy": float(((d > 0).double() + 0.5 * (d == 0).double()).mean()),
            "nll_before": pair_nll(d), "nll_after": pair_nll(d, t),
            "ece_before": expected_calibration_error(d, 1.0, bins), "ece_after": expected_calibration_error(d, t, bins),
            "bins": bins}


def plot_reliability(margins, temperature: float, png_path: str, bins: int = 10, title: str = "") -> str | None:
    """Reliability diagram (accuracy against confidence per bin, before and after scaling, with the
    diagonal and the pair counts) as a PNG; returns its path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(5, 5.6), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect calibration")
    for t, label, color in ((1.0, "raw (T = 1)", "tab:red"), (temperature, f"scaled (T = {temperature:.3g})",
                                                                 "tab:blue")):
        rows = [r for r in reliability(margins, t, bins) if r["count"]]
        ece = expected_calibration_error(margins, t, bins)
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", color=color,
                label=f"{label}: ECE {ece:.3f}")
        if t == temperature:
            all_rows = reliability(margins, t, bins)
            bar.bar([(r["low"] + r["high"]) / 2 for r in all_rows], [r["count"] for r in all_rows],
                    width=0.5 / bins * 0.9, color=color)
    ax.set_ylabel("accuracy (preferred completion wins)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "reward-model reliability on held-out pairs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    bar.set_xlabel("confidence max(p, 1 - p)")
    bar.set_ylabel("pairs")
    bar.set_xlim(0.5, 1.0)
    return save_figure(fig, png_path)


def read_temperature(model_dir: str) -> float:
    """The temperature in ``model_dir/calibration.json`` (1.0 when the model was never calibrated)."""
    path = os.path.join(model_dir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return 1.0
    try:
        with open(path, encoding="utf-8") as f:
            t = json.load(f)["temperature"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a calibration file written by 'peftkern rm-calibrate' ({exc}); delete it "
                          "or calibrate again") from None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ConfigError(f"{path}: temperature must be a finite number > 0, got {t!r}")
    return float(t)


def write_calibration(model_dir: str, record: dict) -> str:
    """Write ``record`` (with its ``temperature``) to ``model_dir/calibration.json`` atomically."""
    path = os.path.join(model_dir, CALIBRATION_FILE)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path
