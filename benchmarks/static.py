"""Static figures of an op's Triton kernels: registers, local-memory spills, shared memory and (sm_90)
wgmma, per launchable config and arch, from ``peftkern.kernels.compile_spec``.

Compiling for the GPU needs Triton with its interpreter off, and the bench session runs with
``TRITON_INTERPRET=1``, so the compile runs in a subprocess without it:
``python -m benchmarks.static peftkern.ops.lora [--limit N] [--arch sm_80,sm_90]`` prints JSON rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def kernel_reports(module: str, archs=("sm_80", "sm_90"), limit: int | None = None, timeout: float = 1800) -> list[dict]:
    """``KernelReport.as_dict()`` of every ``triton_kernel_specs()`` config of ``module`` (the first
    ``limit`` configs when given) for each arch, compiled in a subprocess with the interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.static", module, "--arch", ",".join(archs)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"static compile of {module} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def record_reports(record, reports: list[dict]) -> None:
    """One ``kind="static"`` row per kernel report (registers, spills, shared memory, wgmma, ok)
    through a bench file's ``record`` fixture."""
    for rep in reports:
        record(kind="static", case=f"{rep['kernel']} {rep['config']} {rep['arch']}", shape={},
               dtype=rep["config"].split()[0], metric="registers per thread", ours=rep["registers"], peer=None,
               peer_name=None, unit="registers", target=None, spill_bytes=rep["spill_bytes"],
               shared_bytes=rep["shared_bytes"], wgmma=rep["wgmma"], ok=rep["ok"], arch=rep["arch"],
               note=rep.get("error", ""))


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("module")
    parser.add_argument("--arch", default="sm_80,sm_90")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    import importlib

    from peftkern import kernels

    specs = importlib.import_module(args.module).triton_kernel_specs()
    if args.limit is not None:
        specs = specs[: args.limit]
    archs = [a for a in args.arch.split(",") if a]
    rows = [kernels.compile_spec(spec, arch).as_dict() for spec in specs for arch in archs]
    print(json.dumps(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
