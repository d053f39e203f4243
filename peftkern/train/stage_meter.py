"""Time and peak memory of one stage of a run (the demo prints them per stage).

Peak memory is the process's peak resident set over the stage on Linux (the kernel's high-water mark
``VmHWM``, reset at the start of the stage through ``/proc/self/clear_refs``), and the peak of
allocated CUDA memory on a GPU. Where the high-water mark cannot be reset (another OS, a kernel that
refuses), the figure is the process's peak since it started and ``peak_rss_since_start`` says so.
"""
from __future__ import annotations

import resource
import sys
import time

import torch


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_since_start_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class StageMeter:
    """``with StageMeter() as m: ...`` then ``m.result()``: {"seconds", "peak_rss_mb", "peak_cuda_mb"?,
    "peak_rss_since_start"?}."""

    def __enter__(self) -> "StageMeter":
        self.reset = _reset_hwm() and _read_hwm_bytes() is not None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak_rss = _read_hwm_bytes() if self.reset else _peak_since_start_bytes()
        self.peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def result(self) -> dict:
        out = {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if not self.reset:
            out["peak_rss_since_start"] = True
        if self.peak_cuda is not None:
            out["peak_cuda_mb"] = round(self.peak_cuda / 2**20, 1)
        return out


def tensor_bytes(tensors) -> int:
    """Bytes held by an iterable of tensors (each storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an optimizer's state (moments, quantization statistics), not of the parameters."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (NF4 codes and statistics included)."""
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))
