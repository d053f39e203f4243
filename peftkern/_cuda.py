"""The CUDA C++ face: loads ``_kernels.fatbin`` (or compiles ``csrc/`` with NVRTC) and launches
its ``extern "C"`` kernels on torch's current stream through cuda-python (``cuda.core``).

Nothing here runs at import: the module is loaded on the first launch or probe, and every failure
to find a GPU, the fatbin or cuda-python becomes a reason string from :func:`why_unavailable`,
never an exception at ``import peftkern``.

Device handling: every load and launch happens inside ``torch.cuda.device(index)`` for the
tensors' own device, which restores the caller's device afterwards; nothing here calls
``cuda.core.Device.set_current`` (it would change torch's current device behind its back), and
launches borrow torch's stream by handle (``Stream.from_handle``), so they work from any thread
(autograd's device threads included), not only the one that first touched the device.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FATBIN_PATH = os.path.join(PACKAGE_DIR, "_kernels.fatbin")
CSRC_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")
# csrc/common/probe.cu: out[0] = 2 x + 1, launched once per device to prove the module runs there.
PROBE_KERNEL = "peftkern_probe"

_load_lock = threading.Lock()
_modules: dict[int, object] = {}
_streams: dict[int, object] = {}


def fatbin_present() -> bool:
    return os.path.exists(FATBIN_PATH)


def csrc_present() -> bool:
    return bool(glob.glob(os.path.join(CSRC_DIR, "**", "*.cu"), recursive=True))


@functools.lru_cache(maxsize=None)
def _cuda_core():
    try:
        import cuda.core as cuda_core  # cuda-core >= 0.4 (cuda-python 13 installs it)
        cuda_core.ObjectCode  # an old cuda.core exposes its API under .experimental only
    except (ImportError, AttributeError):
        try:
            import cuda.core.experimental as cuda_core  # cuda-core 0.3.x
        except ImportError as exc:
            raise ImportError(f"cuda-python's cuda.core is not importable ({exc}); "
                              f"pip install {cuda_python_requirement()} cuda-core") from exc
    return cuda_core


def bindings_major() -> int | None:
    """The CUDA major version cuda-python's bindings were built for (12, 13), or None if absent."""
    try:
        import cuda.bindings

        return int(str(cuda.bindings.__version__).split(".")[0])
    except (ImportError, ValueError, AttributeError):
        return None


def torch_cuda_major() -> int | None:
    """The CUDA major version torch was built with, or None for a CPU build."""
    version = getattr(torch.version, "cuda", None)
    return int(version.split(".")[0]) if version else None


def cuda_python_requirement(major: int | None = None) -> str:
    """The cuda-python requirement matching CUDA ``major`` (default: torch's), as pip takes it."""
    major = torch_cuda_major() if major is None else major
    if major is None:
        return "cuda-python"
    return f"'cuda-python>={major}.0,<{major + 1}'"


def version_mismatch() -> str | None:
    """Why cuda-python's CUDA major differs from torch's, or None when they agree (or one is absent).

    Bindings for a newer CUDA major than the driver supports fail every call with
    ``cudaErrorInsufficientDriver``; torch's own CUDA major is one the driver runs.
    """
    ours, theirs = bindings_major(), torch_cuda_major()
    if ours is None or theirs is None or ours == theirs:
        return None
    return (f"cuda-python is built for CUDA {ours} but torch for CUDA {theirs}; "
            f"pip install {cuda_python_requirement(theirs)} to match the driver torch runs on")


def with_version_hint(reason: str) -> str:
    """``reason``, plus the cuda-python / torch CUDA major mismatch when there is one."""
    mismatch = version_mismatch()
    return f"{reason} ({mismatch})" if mismatch else reason


def why_unavailable(device_index: int | None = None) -> str | None:
    """None if CUDA C++ kernels load and run on ``device_index`` (default: torch's current device),
    else why not. The first call per device loads the kernels and launches a probe kernel; the
    answer is cached."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        _cuda_core()
    except ImportError as exc:
        return str(exc)
    if not fatbin_present() and not csrc_present():
        return f"neither {FATBIN_PATH} (built by setup.py when nvcc is found) nor csrc/ for NVRTC is present"
    if device_index is None:
        device_index = torch.cuda.current_device()
    return _probe(int(device_index))


@functools.lru_cache(maxsize=None)
def _probe(device_index: int) -> str | None:
    try:
        _module(device_index)
        # A launch and a synchronizing read cannot run inside CUDA-graph capture; the load above
        # already proved the device has code for these kernels.
        if not torch.cuda.is_current_stream_capturing():
            _launch_probe(device_index)
    except Exception as exc:  # a broken build, an old driver, an unsupported GPU: unavailable, with the cause
        return with_version_hint(f"the CUDA kernels do not run on cuda:{device_index}: {type(exc).__name__}: {exc}")
    return None


def _launch_probe(device_index: int) -> None:
    out = torch.full((1,), float("nan"), dtype=torch.float32, device=torch.device("cuda", device_index))
    launch(PROBE_KERNEL, (1, 1, 1), (1, 1, 1), pointer(out), ctypes.c_float(3.0), device_index=device_index)
    value = out.item()
    if value != 7.0:
        raise RuntimeError(f"the probe kernel wrote {value}, expected 7.0")


def _on_device(device_index: int):
    """torch's device guard: ``device_index`` current inside, the caller's device restored after."""
    return torch.cuda.device(device_index)


def _module(device_index: int):
    """The kernels' module loaded for ``device_index``: the fatbin, else NVRTC from csrc/ (cached)."""
    module = _modules.get(device_index)
    if module is not None:
        return module
    with _load_lock:
        module = _modules.get(device_index)
        if module is None:
            with _on_device(device_index):
                module = _load(device_index)
            _modules[device_index] = module
    return module


def _load(device_index: int):
    cc = _cuda_core()
    failures = []
    if fatbin_present():
        try:
            return _checked(cc.ObjectCode.from_fatbin(FATBIN_PATH), device_index)
        except Exception as exc:
            failures.append(f"the fatbin {FATBIN_PATH}: {type(exc).__name__}: {exc}")
    if csrc_present():
        try:
            return _checked(_compile_with_nvrtc(cc, device_index), device_index)
        except Exception as exc:
            failures.append(f"NVRTC from {CSRC_DIR}: {type(exc).__name__}: {exc}")
    if not failures:
        failures.append("neither the fatbin nor csrc/ is present")
    raise RuntimeError("; ".join(failures))


def _compile_with_nvrtc(cc, device_index: int):
    sources = sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*.cu"), recursive=True))
    unity = "".join(f'#include "{src}"\n' for src in sources)
    major, minor = tuple(cc.Device(device_index).compute_capability)[:2]
    options = cc.ProgramOptions(arch=f"sm_{major}{minor}", std="c++17", include_path=[CSRC_DIR])
    return cc.Program(unity, code_type="c++", options=options).compile("cubin")


def _checked(module, device_index: int):
    """``module`` once its probe kernel is loaded for the device: reading a kernel attribute for a
    device loads the code for it, so a fatbin with no cubin or PTX for this GPU (or a driver too
    old for them) fails here instead of at the first real launch."""
    attributes = module.get_kernel(PROBE_KERNEL).attributes
    try:
        attributes = attributes[device_index]  # cuda.core >= 0.4: per-device view
    except TypeError:
        pass
    regs = attributes.num_regs
    if callable(regs):  # cuda.core 0.3: methods taking the device
        regs = regs(device_index)
    if int(regs) <= 0:
        raise RuntimeError(f"the probe kernel reports {regs} registers")
    return module


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, name: str):
    return _module(device_index).get_kernel(name)


class _TorchStream:
    """Hands a torch stream to cuda.core through the ``__cuda_stream__`` protocol."""

    def __init__(self, handle: int):
        self._handle = handle

    def __cuda_stream__(self):
        return (0, self._handle)


def _borrowed_stream(cc, handle: int):
    """A cuda.core Stream borrowing torch's stream ``handle``: no device initialisation, no
    ``create_stream``, so it works in any thread. Cached per handle."""
    stream = _streams.get(handle)
    if stream is None:
        from_handle = getattr(cc.Stream, "from_handle", None)
        stream = from_handle(handle) if from_handle is not None else _TorchStream(handle)
        _streams[handle] = stream
    return stream


def pointer(tensor) -> ctypes.c_void_p:
    """A kernel argument for a tensor's data pointer."""
    return ctypes.c_void_p(tensor.data_ptr())


def launch(name: str, grid, block, *args, shared_bytes: int = 0, device_index: int | None = None) -> None:
    """Launch ``extern "C"`` kernel ``name`` on torch's current stream of ``device_index`` (default:
    the current device), with that device current during the launch and the caller's restored after.

    ``args`` are ctypes values (``pointer(t)``, ``ctypes.c_int64(n)``, ``ctypes.c_float(x)``) in the
    kernel's parameter order.
    """
    cc = _cuda_core()
    if device_index is None:
        device_index = torch.cuda.current_device()
    with _on_device(device_index):
        kernel = _kernel(device_index, name)
        stream = _borrowed_stream(cc, torch.cuda.current_stream(device_index).cuda_stream)
        config = cc.LaunchConfig(grid=grid, block=block, shmem_size=shared_bytes)
        cc.launch(stream, config, kernel, *args)
