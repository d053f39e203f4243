"""The pipeline's plot: each chosen metric per round (matplotlib, headless)."""
from __future__ import annotations

from peftkern.train.plots import save_figure


def plot_rounds(rounds: list[dict], metrics: list[str], png_path: str) -> str | None:
    """One line per metric over rounds 0..N; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    xs = [r["round"] for r in rounds]
    for name in metrics:
        ys = [r["metrics"].get(name) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=name)
    ax.set_xlabel("round (0: the starting policy)")
    ax.set_xticks(xs)
    ax.set_ylabel("metric")
    ax.set_title("alignment pipeline: held-out metrics per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, png_path)
