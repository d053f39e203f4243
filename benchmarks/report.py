"""Writes the results of a run: ``<date>-<device>[-quick].json`` (rows + run metadata), ``.md``
(tables per op and kind, with versions) and ``<date>-<device>[-quick]-<op>.png`` (ratio plots).

A run of some ops replaces those ops' rows in the day's files and keeps every other op's rows, so
each op's cases can be rerun on their own. Files are written atomically (temp + os.replace).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.traffic import H100_SXM

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("peftkern", "torch", "triton", "peft", "transformers", "bitsandbytes", "trl", "liger-kernel", "numpy",
            "pytest-benchmark")


def device_name() -> str:
    """'cpu', or the GPU's name as a slug ('nvidia-h100-80gb-hbm3')."""
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return "cpu"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(quick: bool) -> dict:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": versions,
        "quick": quick,
        "model": H100_SXM.describe(),
        "git": _git_state(),
    }


def _git_state() -> dict | None:
    """The checkout's commit and the files that differ from it (the figures are of the working tree)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "peftkern", "csrc"],
                               cwd=repo, capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": sorted(line[3:] for line in dirty if line.strip())}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(value):
    """JSON-safe: NaN/inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write(rows: list[dict], out_dir=None, quick: bool = False, ops=None, meta: dict | None = None) -> list[Path]:
    """Merges ``rows`` into the day's results (replacing the rows of ``ops``) and writes JSON, Markdown
    and one plot per op. Returns the paths written."""
    out = Path(out_dir) if out_dir else RESULTS
    meta = meta or run_metadata(quick)
    stem = f"{meta['date']}-{meta['device']}{'-quick' if quick else ''}"
    json_path = out / f"{stem}.json"
    ops = set(ops or {row["op"] for row in rows})
    kept, runs = [], {}
    if json_path.exists():
        previous = json.loads(json_path.read_text())
        kept = [row for row in previous.get("rows", []) if row["op"] not in ops]
        runs = {op: m for op, m in previous.get("runs", {}).items() if op not in ops}
    for op in ops:
        runs[op] = meta
    document = _clean({"meta": meta, "runs": runs, "rows": kept + list(rows)})
    _atomic_write(json_path, (json.dumps(document, indent=1) + "\n").encode())
    md_path = out / f"{stem}.md"
    _atomic_write(md_path, markdown(document).encode())
    paths = [json_path, md_path]
    for op in sorted({row["op"] for row in document["rows"]}):
        png = plot(document, op, out / f"{stem}-{op}.png")
        if png is not None:
            paths.append(png)
    return paths


def _fmt(value, digits=4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    return str(value)


def _met(row) -> str:
    met = row.get("met")
    if met is None:
        return ""
    return "met" if met else "**missed**"


def markdown(document: dict) -> str:
    meta = document["meta"]
    lines = [f"# peftkern benchmarks, {meta['date']}, {meta['device']}{' (quick: harness check only)' if meta['quick'] else ''}",
             ""]
    for op, run in sorted(document.get("runs", {}).items()):
        versions = ", ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
        lines.append(f"- **{op}** run {run['time_utc']} on {run['cpu']} ({run['cpu_count']} cores, "
                     f"{run['torch_threads']} torch threads, load {_load(run)}), GPU: {run['gpu'] or 'none'}; "
                     f"{versions}; git {_git_line(run)}")
    lines += ["", f"Modeled figures: {meta['model']}. ratio = ours / peer; `target` is on the ratio.", ""]
    rows = document["rows"]
    for op in sorted({r["op"] for r in rows}):
        lines += [f"## {op}", ""]
        for kind in harness.KINDS:
            part = [r for r in rows if r["op"] == op and r["kind"] == kind]
            if not part:
                continue
            lines += [f"### {kind}", ""]
            if kind == "static":
                lines += ["| kernel, config, arch | registers | spill bytes | shared bytes | wgmma | ok |",
                          "|---|---|---|---|---|---|"]
                for r in part:
                    lines.append(f"| {r['case']} | {_fmt(r['ours'])} | {_fmt(r.get('spill_bytes'))} | "
                                 f"{_fmt(r.get('shared_bytes'))} | {_fmt(r.get('wgmma'))} | {_fmt(r.get('ok'))} |")
            else:
                lines += ["| case | dtype | metric | ours | peer | ratio | target | | note |",
                          "|---|---|---|---|---|---|---|---|---|"]
                for r in part:
                    lines.append(f"| {r['case']} | {r['dtype']} | {r['metric']} | {_fmt(r['ours'])} {r['unit']} | "
                                 f"{_fmt(r['peer'])} {r['unit']} ({r['peer_name']}) | {_fmt(r['ratio'], 3)}x | "
                                 f"{r.get('target') or ''} | {_met(r)} | {r.get('note', '')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _git_line(run) -> str:
    git = run.get("git")
    if not git:
        return "?"
    modified = f" + uncommitted changes to {', '.join(git['modified'])}" if git["modified"] else ""
    return git["commit"][:10] + modified


def _load(run) -> str:
    load = run.get("load_average")
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def plot(document: dict, op: str, path: Path):
    """Horizontal bars of every ratio of ``op`` (one panel per kind), the target marked."""
    rows = [r for r in document["rows"] if r["op"] == op and r.get("ratio") is not None and r["kind"] != "static"]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in harness.KINDS if any(r["kind"] == k for r in rows)]
    heights = [max(1.5, 0.32 * sum(r["kind"] == k for r in rows) + 0.8) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(13, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, kind in zip(axes[:, 0], kinds):
        part = [r for r in rows if r["kind"] == kind]
        labels = [f"{r['metric']} vs {str(r['peer_name']).split()[0]}: {r['case'].removeprefix('fwd+bwd ')}"
                  for r in part]
        colors = ["tab:green" if r.get("met") else ("tab:red" if r.get("met") is False else "tab:blue") for r in part]
        y = range(len(part))
        ax.barh(list(y), [r["ratio"] for r in part], color=colors)
        for i, r in enumerate(part):
            bound = _bound(r.get("target"))
            if bound is not None:
                ax.plot([bound, bound], [i - 0.4, i + 0.4], color="black", linewidth=2)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ratio ours / peer (black tick: target; green met, red missed)")
        ax.set_title(f"{op}: {kind}" + (" (modeled)" if kind.startswith("modeled") else " (measured)"), fontsize=9)
    fig.tight_layout()
    longest = max(len(f"{r['metric']} vs {r['peer_name']}: {r['case']}") for r in rows)
    fig.subplots_adjust(left=min(0.6, 0.0062 * longest + 0.02), right=0.98)  # room for the long case labels
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        tmp = f.name
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _bound(target):
    if not target:
        return None
    match = re.search(r"([0-9.]+)", target)
    return float(match.group(1)) if match else None
