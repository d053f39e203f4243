"""``peftkern bench``: runs ``benchmarks/bench_<op>.py`` with pytest (and pytest-benchmark) in a fresh
process, so ``TRITON_INTERPRET=1`` (no GPU) is set before peftkern is imported there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def available_ops() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def command(ops=None, quick: bool = False, out=None, progress: bool = True, threads: int | None = None,
            extra=()) -> list[str]:
    names = available_ops()
    ops = list(ops or names)
    unknown = [op for op in ops if op not in names]
    if unknown:
        raise ValueError(f"no benchmark cases for {', '.join(unknown)}: there is no benchmarks/bench_<op>.py "
                         f"for them (ops with cases: {', '.join(names) or 'none'})")
    cmd = [sys.executable, "-m", "pytest", *[str(HERE / f"bench_{op}.py") for op in ops],
           "--rootdir", str(REPO), "-q", "-rfEs", "--benchmark-columns=median,iqr,rounds"]
    if quick:
        cmd.append("--bench-quick")
    if out:
        cmd += ["--bench-out", str(Path(out).resolve())]
    if progress:
        cmd.append("--bench-progress")
    if threads is not None:
        cmd.append(f"--bench-threads={threads}")
    return cmd + list(extra)


def main(ops=None, quick: bool = False, out=None, progress: bool = True, threads: int | None = None,
         extra=()) -> int:
    try:
        cmd = command(ops, quick, out, progress, threads, extra)
    except ValueError as exc:
        print(f"peftkern bench: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return subprocess.call(cmd, cwd=REPO, env=env)
