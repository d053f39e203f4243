"""Tables of evaluation results: one column per model / adapter setting, one row per metric, and
for side-by-side runs the change against the first column marked better or worse."""
from __future__ import annotations

from peftkern.evaluation.runners import better_of


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def _judge(metric: str, base: float, value: float) -> str:
    better = better_of(metric)
    if value == base:
        return "="
    if isinstance(better, bool):
        return "better" if (value > base) == better else "worse"
    return "better" if abs(value - better) < abs(base - better) else "worse"


def rows(columns: dict[str, dict], detail: bool = False) -> list[tuple[str, str, list]]:
    """(suite, metric, [value per column]) in a stable order; breakdowns (``metric/part``) only with
    ``detail``."""
    out, seen = [], []
    for result in columns.values():
        for suite, r in result["suites"].items():
            for metric in r["metrics"]:
                if (detail or "/" not in metric) and (suite, metric) not in seen:
                    seen.append((suite, metric))
    for suite, metric in seen:
        out.append((suite, metric, [c["suites"].get(suite, {}).get("metrics", {}).get(metric)
                                    for c in columns.values()]))
    return out


def format_table(columns: dict[str, dict], markdown: bool = False, detail: bool = False) -> str:
    """A plain-text (or Markdown) table; with two or more columns, each later column shows its change
    against the first ("+0.250 better")."""
    labels = list(columns)
    header = ["suite", "metric"] + labels
    body = []
    for suite, metric, values in rows(columns, detail):
        cells = [suite, metric, _fmt(values[0])]
        for v in values[1:]:
            if v is None or values[0] is None:
                cells.append(_fmt(v))
            else:
                cells.append(f"{_fmt(v)} ({v - values[0]:+.3f} {_judge(metric, values[0], v)})")
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in body])
