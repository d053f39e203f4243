"""A stand-in for a CUDA machine on the CPU: torch.cuda's device state and a fake ``cuda.core``.

It models the two behaviours the CUDA paths must respect:
* the current device is per process state that torch's ``torch.cuda.device(i)`` guard sets and
  restores, and that ``cuda.core.Device.set_current`` would change behind torch's back;
* a ``cuda.core.Device`` is per thread: ``create_stream`` raises in a thread that never called
  ``set_current`` on it (cuda.core's "Device N is not yet initialized").
Kernels "run" on the host: the probe kernel writes 2x + 1 through the pointer it is given.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading

import pytest
import torch


class FakeTorchCuda:
    """Patches torch.cuda so code sees ``count`` GPUs, with a current device and streams."""

    def __init__(self, monkeypatch, count: int = 2, capturing: bool = False):
        self.current = 0
        self.count = count
        self.capturing = capturing
        self.entered: list[int] = []
        mp = monkeypatch
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: self.count)
        mp.setattr(torch.cuda, "current_device", lambda: self.current)
        mp.setattr(torch.cuda, "device", self.device)
        mp.setattr(torch.cuda, "current_stream", lambda index=None: FakeTorchStream(
            1000 + (self.current if index is None else _index(index))))
        mp.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)

    @contextlib.contextmanager
    def device(self, index):
        index = _index(index)
        before = self.current
        self.current = index
        self.entered.append(index)
        try:
            yield
        finally:
            self.current = before


def _index(device) -> int:
    if isinstance(device, torch.device):
        return device.index if device.index is not None else 0
    return int(device)


class FakeTorchStream:
    def __init__(self, handle: int):
        self.cuda_stream = handle


class FakeKernel:
    def __init__(self, module: "FakeModule", name: str):
        self.module = module
        self.name = name

    @property
    def attributes(self):
        return FakeAttributes(self.module)


class FakeAttributes:
    def __init__(self, module: "FakeModule"):
        self.module = module

    def __getitem__(self, device_index):
        self.module.core.attribute_devices.append(device_index)
        return self

    @property
    def num_regs(self):
        if self.module.no_code_for_gpu:
            raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU: no kernel image is available for execution on the device")
        return 8


class FakeModule:
    def __init__(self, core: "FakeCudaCore", origin: str, no_code_for_gpu: bool):
        self.core = core
        self.origin = origin
        self.no_code_for_gpu = no_code_for_gpu

    def get_kernel(self, name: str) -> FakeKernel:
        return FakeKernel(self, name)


class FakeCudaCore:
    """The parts of ``cuda.core`` that peftkern._cuda uses, with the per-thread Device rule."""

    def __init__(self, torch_cuda: FakeTorchCuda, fatbin_runs: bool = True, nvrtc_runs: bool = True):
        self.torch_cuda = torch_cuda
        self.fatbin_runs = fatbin_runs
        self.nvrtc_runs = nvrtc_runs
        self.loads: list[tuple[str, int]] = []  # (origin, torch's current device during the load)
        self.launches: list[dict] = []
        self.set_current_calls = 0
        self.attribute_devices: list[int] = []
        self._threads = threading.local()
        core = self

        class Device:
            def __init__(self, index: int = 0):
                self.index = index
                self.compute_capability = (9, 0)

            def set_current(self):
                core.set_current_calls += 1
                core.torch_cuda.current = self.index  # what cuCtxSetCurrent does to torch's device
                inited = getattr(core._threads, "inited", set())
                inited.add(self.index)
                core._threads.inited = inited

            def create_stream(self, obj=None):
                if self.index not in getattr(core._threads, "inited", set()):
                    raise RuntimeError(f"Device {self.index} is not yet initialized, perhaps you forgot to call "
                                       ".set_current() first?")
                return FakeStream(obj.__cuda_stream__()[1])

        class ObjectCode:
            @staticmethod
            def from_fatbin(path):
                core.loads.append(("fatbin", core.torch_cuda.current))
                return FakeModule(core, "fatbin", no_code_for_gpu=not core.fatbin_runs)

        class Program:
            def __init__(self, code, code_type, options=None):
                self.options = options

            def compile(self, target):
                core.loads.append(("nvrtc", core.torch_cuda.current))
                if not core.nvrtc_runs:
                    raise RuntimeError("NVRTC_ERROR_COMPILATION")
                return FakeModule(core, "nvrtc", no_code_for_gpu=False)

        class Stream:
            @staticmethod
            def from_handle(handle):
                return FakeStream(handle)

        self.Device = Device
        self.ObjectCode = ObjectCode
        self.Program = Program
        self.Stream = Stream

    @staticmethod
    def ProgramOptions(**kwargs):
        return kwargs

    @staticmethod
    def LaunchConfig(grid, block, shmem_size=0):
        return {"grid": grid, "block": block, "shmem_size": shmem_size}

    def launch(self, stream, config, kernel, *args):
        self.launches.append({"kernel": kernel.name, "module": kernel.module.origin, "stream": stream.handle,
                              "device": self.torch_cuda.current, "thread": threading.get_ident(),
                              "config": config})
        if kernel.name == "peftkern_probe":
            out, x = args
            ctypes.c_float.from_address(out.value).value = 2.0 * x.value + 1.0


class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def install(monkeypatch, count: int = 2, fatbin_runs: bool = True, nvrtc_runs: bool = True,
            capturing: bool = False):
    """Patch torch.cuda and peftkern._cuda for a fake machine; returns (torch_cuda, core)."""
    from peftkern import _cuda

    torch_cuda = FakeTorchCuda(monkeypatch, count=count, capturing=capturing)
    core = FakeCudaCore(torch_cuda, fatbin_runs=fatbin_runs, nvrtc_runs=nvrtc_runs)
    monkeypatch.setattr(_cuda, "_cuda_core", lambda: core)
    monkeypatch.setattr(_cuda, "fatbin_present", lambda: True)
    monkeypatch.setattr(_cuda, "csrc_present", lambda: True)
    real_full = torch.full

    def full_on_host(size, value, *, dtype=None, device=None, **kwargs):
        return real_full(size, value, dtype=dtype)  # the probe's output buffer, on the host here

    monkeypatch.setattr(torch, "full", full_on_host)
    reset_caches()
    monkeypatch.setattr(_cuda, "_modules", {})
    monkeypatch.setattr(_cuda, "_streams", {})
    return torch_cuda, core


def reset_caches() -> None:
    from peftkern import _cuda

    _cuda._probe.cache_clear()
    _cuda._kernel.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A factory: ``fake_gpu(count=2, fatbin_runs=True, nvrtc_runs=True, capturing=False)`` installs the
    fake machine and returns (torch_cuda, core); the probe caches are cleared after the test."""
    yield lambda **kwargs: install(monkeypatch, **kwargs)
    reset_caches()


class FakeCudaRuntime:
    """The parts of ``cuda.bindings.runtime`` the pager calls, answering ``(error, *values)``.

    ``query_error`` makes every capability query fail with that error name (e.g.
    "cudaErrorInsufficientDriver", what cuda-python 13 answers on a CUDA 12 driver)."""

    class cudaError_t:
        class _Err:
            def __init__(self, name):
                self.name = name

            def __eq__(self, other):
                return isinstance(other, type(self)) and other.name == self.name

            def __hash__(self):
                return hash(self.name)

        cudaSuccess = _Err("cudaSuccess")

    class cudaDeviceAttr:
        cudaDevAttrManagedMemory = "ManagedMemory"
        cudaDevAttrConcurrentManagedAccess = "ConcurrentManagedAccess"

    class cudaMemoryAdvise:
        cudaMemAdviseSetPreferredLocation = "SetPreferredLocation"
        cudaMemAdviseUnsetPreferredLocation = "UnsetPreferredLocation"
        cudaMemAdviseSetAccessedBy = "SetAccessedBy"

    cudaCpuDeviceId = -1
    cudaMemAttachGlobal = 1

    def __init__(self, free: int = 8 << 30, total: int = 16 << 30, query_error: str | None = None,
                 concurrent: bool = True, prefetch_error: str | None = None):
        self.free = free
        self.total = total
        self.query_error = query_error
        self.concurrent = concurrent
        self.prefetch_error = prefetch_error
        self.calls: list[tuple] = []

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def _err(self, name):
        return (self.cudaError_t._Err(name),)

    def cudaGetErrorString(self, err):
        return self._ok(f"message of {err.name}".encode())

    def cudaDeviceGetAttribute(self, attr, index):
        self.calls.append(("attr", attr, index))
        if self.query_error:
            return self._err(self.query_error)
        return self._ok(1 if attr == "ManagedMemory" or self.concurrent else 0)

    def cudaMemGetInfo(self):
        self.calls.append(("meminfo",))
        return self._ok(self.free, self.total)

    def cudaStream_t(self, handle):
        return handle

    def cudaMemAdvise(self, ptr, nbytes, advice, where):
        self.calls.append(("advise", advice, where))
        return self._ok()

    def cudaMemPrefetchAsync(self, ptr, nbytes, where, *rest):
        self.calls.append(("prefetch", where))
        if self.prefetch_error:
            return self._err(self.prefetch_error)
        return self._ok()
