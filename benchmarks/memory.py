"""Peak memory of one step, two ways.

* :func:`peak_rss`: a fresh process (forked from a server that only imported) builds the step (``builder(**kwargs)``
  returns a zero-argument callable), runs it once to warm up, then takes a baseline (VmRSS), resets
  the kernel's high-water mark (``/proc/self/clear_refs``, "5") and runs the step again: the figure is
  VmHWM minus the baseline. Without a resettable high-water mark it falls back to ``ru_maxrss`` over
  the RSS before the first step. The process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed
  blocks go back to the OS and peaks repeat from run to run (docs/BENCHMARKS.md).
* :func:`live_peak`: in this process, the peak bytes of tensor storages allocated while ``fn()`` runs
  (a ``TorchDispatchMode`` that tracks each new storage until it is freed). Tensors that existed
  before (weights, inputs) do not count.
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import resource
import weakref

import torch
from torch.utils._pytree import tree_flatten

from benchmarks.traffic import OpenCustomOps

MMAP_THRESHOLD = "65536"


# ---------------------------------------------------------------------------------------------
# fresh subprocess, RSS
# ---------------------------------------------------------------------------------------------

def peak_rss(target: str, kwargs: dict | None = None, preload=(), timeout: float = 600) -> dict:
    """Extra RSS (bytes) of one step of ``target`` ("module:builder", called with ``kwargs``) over a
    warm baseline, measured in a fresh process. Returns {"extra_bytes", "baseline_bytes", "method"}.

    The process is forked from a fork server that has imported torch, ``target``'s module and
    ``preload`` (e.g. the peer package) and run nothing (multiprocessing's "forkserver"), so each
    case starts fresh without paying the imports again; the server and its children run with
    ``MALLOC_MMAP_THRESHOLD_=65536``. The server starts at the first call, with that call's modules.
    """
    kwargs = dict(kwargs or {})
    ctx = _fork_server([target.partition(":")[0], *preload])
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(target, kwargs, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"memory measurement of {target} {kwargs} took more than {timeout} s")
        result = parent.recv()
    except EOFError:
        result = {"error": f"the measuring process died (exit code {proc.exitcode})"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if "error" in result:
        raise RuntimeError(f"memory measurement of {target} {kwargs} failed: {result['error']}")
    return result


_PRELOADED: set = set()


def _fork_server(modules):
    """The forkserver context, started once with MALLOC_MMAP_THRESHOLD_ set and torch and ``modules``
    preloaded (a module first asked for later is imported by each child)."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    if not _PRELOADED:
        _PRELOADED.update({"torch", *modules})
        ctx.set_forkserver_preload(sorted(_PRELOADED))
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_")
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return ctx


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


def _child(target: str, kwargs: dict, conn) -> None:
    """The fresh process: build the step, measure it, send the result back."""
    try:
        if os.environ.get("PEFTKERN_BENCH_THREADS"):
            torch.set_num_threads(int(os.environ["PEFTKERN_BENCH_THREADS"]))
        torch.manual_seed(0)
        module_name, _, attr = target.partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        step = builder(**kwargs)
        gc.collect()
        conn.send(measure_in_this_process(step))
    except BaseException as exc:  # reported to the parent, which raises with it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


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


def warm_live_peaks_mib(steps: dict) -> dict:
    """``{name: MiB}``: each step run once to warm up, then its :func:`live_peak`."""
    out = {}
    for name, step in steps.items():
        step()
        out[name] = live_peak(step) / 2.0 ** 20
    return out
