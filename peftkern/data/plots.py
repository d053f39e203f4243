"""PNGs of an inspect report and of a sweep's results (matplotlib, headless, written atomically)."""
from __future__ import annotations

import os


def _pyplot():
    """matplotlib's pyplot on the headless backend, or None when matplotlib is not installed (it is an
    optional extra: ``pip install peftkern[bench]`` or ``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _bars(ax, counts: list, title: str, top: int = 12) -> None:
    counts = counts[:top]
    if not counts:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    else:
        labels, values = zip(*counts)
        ax.barh(range(len(values))[::-1], values, color="tab:green")
        ax.set_yticks(range(len(values))[::-1], labels, fontsize=7)
    ax.set_title(title, fontsize=9)


def plot_inspection(report: dict, path: str) -> str:
    """Four panels: length histogram (train and eval), turns per record, category mix, most common
    verb-object pairs of the training instructions. Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=100)
    splits = [s for s in ("train", "eval") if s in report]
    ax = axes[0][0]
    for split, color in zip(splits, ("tab:blue", "tab:orange")):
        h = report[split]["length_histogram"]
        if h["counts"]:
            widths = [b - a for a, b in zip(h["edges"][:-1], h["edges"][1:])]
            ax.bar(h["edges"][:-1], h["counts"], width=widths, align="edge", alpha=0.6, label=split, color=color)
    ax.set_title(f"length ({report['train']['length_unit']})", fontsize=9)
    ax.set_ylabel("records")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ticks = set()
    width = 0.8 / len(splits)
    for k, (split, color) in enumerate(zip(splits, ("tab:blue", "tab:orange"))):
        turns = report[split]["turns_histogram"]
        if turns:
            xs, ys = zip(*turns)
            ticks.update(xs)
            ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], ys, width=width, label=split, color=color)
    ax.set_xticks(sorted(ticks))
    ax.set_title("turns per record (user + assistant)", fontsize=9)
    ax.legend(fontsize=8)
    _bars(axes[1][0], list(report["train"]["categories"].items()), "task / category mix (train)")
    _bars(axes[1][1], report["train"]["diversity"]["top_verb_object_pairs"], "top verb-object pairs (train)")
    return _save(fig, path)


def plot_sweep(rows: list[dict], metric: str, path: str, higher_is_better: bool) -> str:
    """The sweep's finished runs as points of ``metric`` (axis zoomed to their range), best at the top.
    Returns the path, or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    done = [r for r in rows if r.get("metric") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(done), 1) + 1.5), dpi=100)
    if done:
        labels = [r["label"] for r in done]
        values = [r["metric"] for r in done]
        ys = list(range(len(done)))[::-1]
        lo, hi = min(values), max(values)
        pad = 0.08 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.hlines(ys, lo - pad, values, color="tab:blue", alpha=0.35)
        ax.plot(values, ys, "o", color="tab:blue")
        ax.set_xlim(lo - pad, hi + 2 * pad)
        ax.set_yticks(ys, labels, fontsize=7)
        for y, v in zip(ys, values):
            ax.text(v, y, f"  {v:.4g}", va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(f"sweep: {len(done)} runs, best first", fontsize=9)
    return _save(fig, path)
