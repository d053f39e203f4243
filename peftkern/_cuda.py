"""The CUDA C++ face: loads ``_kernels.fatbin`` (or compiles ``csrc/`` with NVRTC) and launches
its ``extern "C"`` kernels on torch's current stream through cuda-python (``cuda.core``).

Nothing here runs at import: the module is loaded on the first launch, and every failure to find
a GPU, the fatbin or cuda-python becomes a reason string from :func:`why_unavailable`, never an
exception at ``import peftkern``.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FATBIN_PATH = os.path.join(PACKAGE_DIR, "_kernels.fatbin")
CSRC_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")


def fatbin_present() -> bool:
    return os.path.exists(FATBIN_PATH)


def csrc_present() -> bool:
    return bool(glob.glob(os.path.join(CSRC_DIR, "**", "*.cu"), recursive=True))


@functools.lru_cache(maxsize=None)
def _cuda_core():
    try:
        import cuda.core as cuda_core  # cuda-python >= 13
    except ImportError:
        try:
            import cuda.core.experimental as cuda_core  # cuda-python 12.x
        except ImportError as exc:
            raise ImportError(f"cuda-python's cuda.core is not importable ({exc}); pip install cuda-python") from exc
    return cuda_core


def why_unavailable() -> str | None:
    """None if CUDA C++ kernels can be launched here, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        _cuda_core()
    except ImportError as exc:
        return str(exc)
    if not fatbin_present() and not csrc_present():
        return f"neither {FATBIN_PATH} (built by setup.py when nvcc is found) nor csrc/ for NVRTC is present"
    try:
        _module(torch.cuda.current_device())
    except Exception as exc:  # a broken build must read as 'unavailable', with the cause
        return f"loading the CUDA kernels failed: {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _module(device_index: int):
    cc = _cuda_core()
    device = cc.Device(device_index)
    device.set_current()
    if fatbin_present():
        return cc.ObjectCode.from_fatbin(FATBIN_PATH)
    sources = sorted(glob.glob(os.path.join(CSRC_DIR, "**", "*.cu"), recursive=True))
    unity = "".join(f'#include "{src}"\n' for src in sources)
    arch = "sm_" + "".join(str(v) for v in device.compute_capability)
    options = cc.ProgramOptions(arch=arch, std="c++17", include_path=[CSRC_DIR])
    return cc.Program(unity, code_type="c++", options=options).compile("cubin")


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, name: str):
    return _module(device_index).get_kernel(name)


class _TorchCurrentStream:
    """Hands torch's current stream to cuda.core through the __cuda_stream__ protocol."""

    def __init__(self, handle: int):
        self._handle = handle

    def __cuda_stream__(self):
        return (0, self._handle)


def pointer(tensor) -> ctypes.c_void_p:
    """A kernel argument for a tensor's data pointer."""
    return ctypes.c_void_p(tensor.data_ptr())


def launch(name: str, grid, block, *args, shared_bytes: int = 0, device_index: int | None = None) -> None:
    """Launch ``extern "C"`` kernel ``name`` on torch's current stream of ``device_index``.

    ``args`` are ctypes values (``pointer(t)``, ``ctypes.c_int64(n)``, ``ctypes.c_float(x)``) in the
    kernel's parameter order.
    """
    import torch

    cc = _cuda_core()
    if device_index is None:
        device_index = torch.cuda.current_device()
    kernel = _kernel(device_index, name)
    device = cc.Device(device_index)
    stream = device.create_stream(_TorchCurrentStream(torch.cuda.current_stream(device_index).cuda_stream))
    config = cc.LaunchConfig(grid=grid, block=block, shmem_size=shared_bytes)
    cc.launch(stream, config, kernel, *args)
