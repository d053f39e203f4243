#!/usr/bin/env python
"""The first-GPU check: one command that runs everything only a GPU can show, in under 8 minutes,
and writes one JSON report (``make gpu-check``; docs/gpu-check.md).

    python scripts/gpu_check.py [--quick] [--out benchmarks/results] [--only faces,cuda_graph]

Sections, in this order (each in its own process, with its own time limit, inside an overall
budget; a section that fails, crashes or runs out of time is recorded as such and the next one
still runs):

  environment   versions, driver, GPUs, which faces run (the CUDA C++ probe per device), fatbin contents
  cuda_kernels  one real launch of every CUDA C++ kernel, against the reference; every kernel in the
                fatbin must have been launched
  faces         every op's faces against the float64 reference on CUDA tensors, fp32 / fp16 / bf16
                (the Triton log-prob kernels included), the padded-batch NaN case, AdamW with EWC
  cuda_graph    CUDA-graph capture and replay of a LoRA and a QLoRA training step
  multi_gpu     layers on cuda:0 and cuda:1 (and transformers + accelerate device_map), when two GPUs exist
  gpu_tests     the gpu-marked tests (pytest -m gpu)
  benchmarks    measured-GPU rows (CUDA events) for LoRA, DoRA, NF4 and the SFT loss beside the
                committed modeled-H100 rows

Without a GPU it says so and exits 0 (``--device cpu`` runs the sections that can run on the CPU,
the Triton faces in the interpreter: a dry run of the check itself). ``--selftest`` runs
stand-in sections (pass, fail, crash, hang) through the same machinery, for the tests.
Exit status: 0 when every section is ok or skipped, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ORDER = ("environment", "cuda_kernels", "faces", "cuda_graph", "multi_gpu", "gpu_tests", "benchmarks")
# seconds per section: (full, quick); the overall budget caps each one
LIMITS = {"environment": (60, 45), "cuda_kernels": (120, 90), "faces": (240, 150), "cuda_graph": (90, 60),
          "multi_gpu": (90, 60), "gpu_tests": (300, 150), "benchmarks": (180, 90)}
BUDGET_S = {False: 450.0, True: 300.0}  # the whole check, inside the 8 minutes asked for
SELFTEST = ("selftest_ok", "selftest_fail", "selftest_crash", "selftest_hang")
DEADLINE_ENV = "PEFTKERN_GPU_CHECK_DEADLINE"


# -- one section, in a child process --------------------------------------------------------------

def _selftest_section(name: str) -> dict:
    if name == "selftest_ok":
        return {"status": "ok", "results": [{"name": "passes", "ok": True}]}
    if name == "selftest_fail":
        return {"status": "failed", "results": [{"name": "fails", "ok": False, "error": "AssertionError: 1 != 2"}]}
    if name == "selftest_crash":
        os._exit(3)  # like a segfault in a kernel: no JSON written
    time.sleep(3600)  # selftest_hang
    return {}


def run_section_here(name: str, device: str, quick: bool, result_file: str) -> int:
    """The child: run one section and write its dict as JSON to ``result_file``."""
    if name in SELFTEST:
        out = _selftest_section(name)
    else:
        if device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before peftkern's op modules load
        sys.path.insert(0, HERE)
        import torch

        import gpu_check_sections as sections

        dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        out = sections.SECTIONS[name](dev, quick)
    with open(result_file, "w") as f:
        json.dump(out, f, default=str)
    return 0


def run_section(name: str, device: str, quick: bool, timeout: float) -> dict:
    """Run section ``name`` in a fresh process (its own CUDA context, Triton cache shared) under
    ``timeout`` seconds; the process group is killed on timeout, so its own children die too."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="peftkern-gpu-check-") as tmp:
        result_file = os.path.join(tmp, "section.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--run-section", name, "--device", device,
               "--result-file", result_file] + (["--quick"] if quick else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
        env[DEADLINE_ENV] = str(start + timeout)
        if device == "cuda":
            env.pop("TRITON_INTERPRET", None)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            return {"status": "timeout", "seconds": round(time.time() - start, 1),
                    "reason": f"ran past its {timeout:.0f} s limit", "output_tail": _tail(output)}
        seconds = round(time.time() - start, 1)
        if not os.path.exists(result_file):
            return {"status": "error", "seconds": seconds,
                    "reason": f"the section's process exited with status {proc.returncode} and no result",
                    "output_tail": _tail(output)}
        with open(result_file) as f:
            result = json.load(f)
    result["seconds"] = seconds
    if result.get("status") not in ("ok", "skipped"):
        result.setdefault("output_tail", _tail(output))
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(output, limit: int = 4000) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else (output or "")
    return text[-limit:]


# -- the whole check ------------------------------------------------------------------------------

def plan(names, quick: bool) -> list[tuple[str, float]]:
    """(section, its own limit in seconds) in run order."""
    return [(n, float(LIMITS.get(n, (60, 30))[1 if quick else 0])) for n in names]


def run_check(names, device: str, quick: bool, budget: float) -> dict:
    """Every section in ``names`` within ``budget`` seconds; the report dict."""
    started = time.time()
    report = {"schema": 1, "tool": "scripts/gpu_check.py", "started_utc": _dt.datetime.now(_dt.timezone.utc)
              .strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": quick, "device": device, "budget_s": budget,
              "sections": {}}
    for name, limit in plan(names, quick):
        left = budget - (time.time() - started)
        if left < 5.0:
            report["sections"][name] = {"status": "skipped", "reason": "the check's time budget is spent"}
            continue
        print(f"gpu-check: {name} (limit {min(limit, left):.0f} s) ...", flush=True)
        result = run_section(name, device, quick, min(limit, left))
        report["sections"][name] = result
        print(f"gpu-check: {name}: {result['status']} in {result.get('seconds', 0):.0f} s"
              + (f" ({result['reason']})" if result.get("reason") else ""), flush=True)
    report["duration_s"] = round(time.time() - started, 1)
    report["summary"] = summarize(report)
    env = report["sections"].get("environment", {}).get("info", {})
    report["gpu"] = (env.get("devices") or [{}])[0].get("name") if env else None
    return report


def summarize(report: dict) -> dict:
    counts: dict[str, int] = {}
    failed_cases = []
    for name, section in report["sections"].items():
        counts[section["status"]] = counts.get(section["status"], 0) + 1
        for r in section.get("results", []):
            if not r.get("ok", True):
                labels = " ".join(str(r[k]) for k in ("face", "dtype") if r.get(k))
                failed_cases.append(f"{name}: {r.get('name')}" + (f" [{labels}]" if labels else ""))
    ok = all(s["status"] in ("ok", "skipped") for s in report["sections"].values())
    return {"ok": ok, "sections": counts, "failed_cases": failed_cases}


def report_path(out_dir: str, report: dict) -> str:
    gpu = report.get("gpu") or report["device"]
    slug = re.sub(r"[^a-z0-9]+", "-", str(gpu).lower()).strip("-") or "unknown"
    date = report["started_utc"][:10]
    suffix = "-quick" if report["quick"] else ""
    return os.path.join(out_dir, f"{date}-{slug}-gpu-check{suffix}.json")


def write_report(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = report_path(out_dir, report)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def gpu_count() -> tuple[int, str]:
    """(CUDA devices visible to torch, why none), asked in a child process (this one never
    initialises CUDA)."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return 0, "asking torch for the GPUs took over 2 minutes"
    if out.returncode != 0:
        return 0, f"{sys.executable} cannot import torch ({_tail(out.stderr, 300).strip().splitlines()[-1:]})"
    try:
        count = int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0, f"unexpected answer from torch: {out.stdout!r}"
    return count, "" if count else "no CUDA device is visible to torch"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, fewer variants (about 5 minutes)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                        help="folder for <date>-<gpu>-gpu-check.json (default: benchmarks/results)")
    parser.add_argument("--only", default=None, help=f"comma-separated sections (default: all: {', '.join(ORDER)})")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default: "
                        f"{BUDGET_S[False]:.0f}, --quick {BUDGET_S[True]:.0f})")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run of the check's logic on CPU tensors (Triton in its interpreter)")
    parser.add_argument("--selftest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_section:
        return run_section_here(args.run_section, args.device, args.quick, args.result_file)
    if args.selftest:
        names = list(SELFTEST)
    elif args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ORDER]
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {', '.join(ORDER)}")
    else:
        names = list(ORDER)
    if args.device == "cuda" and not args.selftest:
        count, why = gpu_count()
        if count == 0:
            print(f"gpu-check: {why}; nothing to check here (run it on a machine with a GPU, in the Python that "
                  "has its torch: make gpu-check GPU_PYTHON=...; --device cpu dry-runs the check's own logic)")
            return 0
    budget = args.budget if args.budget is not None else BUDGET_S[args.quick]
    report = run_check(names, args.device, args.quick, budget)
    path = write_report(report, args.out)
    summary = report["summary"]
    print(f"gpu-check: {'OK' if summary['ok'] else 'FAILED'} in {report['duration_s']:.0f} s; "
          f"sections {summary['sections']}; report {path}")
    for line in summary["failed_cases"][:40]:
        print(f"  failed: {line}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
