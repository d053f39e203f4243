"""Peak memory of one step, two ways.

* :func:`peak_rss`: a fresh subprocess imports everything, builds the step (``builder(**kwargs)``
  returns a zero-argument callable), runs it once to warm up, then takes a baseline (VmRSS), resets
  the kernel's high-water mark (``/proc/self/clear_refs``, "5") and runs the step again: the figure is
  VmHWM minus the baseline. Without a resettable high-water mark it falls back to ``ru_maxrss`` over
  the RSS before the first step. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks
  go back to the OS and peaks repeat from run to run (BENCHMARKS.md).
* :func:`live_peak`: in this process, the peak bytes of tensor storages allocated while ``fn()`` runs
  (a ``TorchDispatchMode`` that tracks each new storage until it is freed). Tensors that existed
  before (weights, inputs) do not count.

Run as a module for the subprocess side: ``python -m benchmarks.memory module:builder '{json kwargs}'``.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten

from benchmarks.traffic import OpenCustomOps

REPO = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "65536"


# ---------------------------------------------------------------------------------------------
# fresh subprocess, RSS
# ---------------------------------------------------------------------------------------------

def peak_rss(target: str, timeout: float = 600, **kwargs) -> dict:
    """Extra RSS (bytes) of one step of ``target`` ("module:builder") over a warm baseline, measured
    in a fresh Python process. Returns {"extra_bytes", "baseline_bytes", "method"}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", target, json.dumps(kwargs)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory subprocess for {target} {kwargs} failed (rc={proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_in_this_process(step) -> dict:
    """The child's side: warm-up step, baseline, reset, measured step."""
    rss_before = _status_kib("VmRSS")
    if rss_before is not None and _reset_high_water_mark():
        step()
        gc.collect()
        baseline = _status_kib("VmRSS")
        _reset_high_water_mark()
        step()
        peak = _status_kib("VmHWM")
        return {"extra_bytes": (peak - baseline) * 1024, "baseline_bytes": baseline * 1024,
                "method": "VmHWM - VmRSS after a warm-up step (clear_refs reset)"}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_bytes": (peak - baseline) * 1024, "baseline_bytes": baseline * 1024,
            "method": "ru_maxrss over the peak before the step (no warm-up)"}


def _child(target: str, kwargs_json: str) -> None:
    module_name, _, attr = target.partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    step = builder(**json.loads(kwargs_json))
    gc.collect()
    print(json.dumps(measure_in_this_process(step)), flush=True)


# ---------------------------------------------------------------------------------------------
# in process, live tensor bytes
# ---------------------------------------------------------------------------------------------

class LiveTensorBytes(OpenCustomOps):
    """Tracks storages created by ops while active: ``live`` bytes now, ``peak`` the most at once."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}

    def handle(self, func, args, kwargs, out):
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._tracked or storage.nbytes() == 0:
                continue  # a view of, or a write into, memory that already existed
            self._tracked[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.live -= self._tracked.pop(key, 0)


def live_peak(fn) -> int:
    """Peak bytes of tensor storages allocated (and still alive at once) while ``fn()`` runs."""
    gc.collect()
    tracker = LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.memory module:builder '{json kwargs}'")
    torch.manual_seed(0)
    if os.environ.get("PEFTKERN_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["PEFTKERN_BENCH_THREADS"]))
    _child(sys.argv[1], sys.argv[2])
