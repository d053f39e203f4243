"""peftkern._cuda: the CUDA C++ face is optional and lazy; the fatbin holds sm_80 and sm_90a."""
import ctypes
import glob
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from peftkern import _cuda


def test_import_does_not_touch_cuda():
    code = ("import sys, peftkern, peftkern.ops, peftkern.nn\n"
            "import torch\n"
            "print('cuda.core' in sys.modules, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_unavailable_without_gpu_says_why():
    assert _cuda.why_unavailable() == "no CUDA device is visible to torch"


def _nvcc():
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: no fatbin is built")
def test_fatbin_holds_every_arch():
    if not glob.glob(os.path.join(_cuda.CSRC_DIR, "**", "*.cu"), recursive=True):
        pytest.skip("no CUDA kernels in csrc/")
    if os.environ.get("PEFTKERN_BUILD_CUDA") == "0":
        pytest.skip("PEFTKERN_BUILD_CUDA=0")
    assert _cuda.fatbin_present(), f"nvcc is on this machine but {_cuda.FATBIN_PATH} was not built"
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump") or pytest.skip("no cuobjdump")
    listing = subprocess.run([cuobjdump, "-lelf", _cuda.FATBIN_PATH], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in listing and "sm_90a" in listing, listing


@pytest.mark.gpu
def test_cuda_face_loads_on_a_gpu():
    assert _cuda.why_unavailable() is None


# -- the probe, device handling and threads, on a fake CUDA machine (tests/fake_cuda.py) -----------

from tests.fake_cuda import fake_gpu  # noqa: E402,F401  (fixture)


def test_probe_loads_the_kernels_and_launches_once_per_device(fake_gpu):
    torch_cuda, core = fake_gpu(count=2)
    assert _cuda.why_unavailable() is None
    assert _cuda.why_unavailable(0) is None  # cached: no second load or launch
    assert core.loads == [("fatbin", 0)]
    assert [(l["kernel"], l["device"]) for l in core.launches] == [("peftkern_probe", 0)]
    assert 0 in core.attribute_devices  # a kernel attribute read for the device: the code is loaded there
    assert _cuda.why_unavailable(1) is None
    assert core.loads == [("fatbin", 0), ("fatbin", 1)]
    assert torch_cuda.current == 0


def test_fatbin_without_code_for_this_gpu_falls_back_to_nvrtc(fake_gpu):
    _, core = fake_gpu(fatbin_runs=False)
    assert _cuda.why_unavailable(0) is None
    assert [origin for origin, _ in core.loads] == ["fatbin", "nvrtc"]
    assert core.launches[-1]["module"] == "nvrtc"


def test_no_code_anywhere_is_a_reason_not_a_crash(fake_gpu):
    fake_gpu(fatbin_runs=False, nvrtc_runs=False)
    reason = _cuda.why_unavailable(0)
    assert "cuda:0" in reason and "NO_BINARY_FOR_GPU" in reason and "NVRTC_ERROR_COMPILATION" in reason


def test_probe_under_graph_capture_loads_but_does_not_launch(fake_gpu):
    _, core = fake_gpu(capturing=True)
    assert _cuda.why_unavailable(0) is None
    assert core.loads and core.launches == []


def test_loading_for_another_device_leaves_the_current_device(fake_gpu):
    torch_cuda, core = fake_gpu(count=2)
    _cuda._module(1)
    assert core.loads == [("fatbin", 1)]  # loaded with device 1 current ...
    assert torch_cuda.current == 0  # ... and the caller's device restored
    assert core.set_current_calls == 0


def test_launch_enters_the_tensors_device_and_restores_the_callers(fake_gpu):
    torch_cuda, core = fake_gpu(count=2)
    _cuda.launch("peftkern_adamw32_step_f32", (4, 1, 1), (256, 1, 1), ctypes.c_int64(3), device_index=1)
    launch = core.launches[-1]
    assert launch["device"] == 1 and launch["stream"] == 1001  # device 1's current torch stream
    assert torch_cuda.current == 0


def test_launch_from_a_thread_that_never_set_the_device(fake_gpu):
    """autograd runs CUDA backward passes on its own device threads; a launch there must work."""
    torch_cuda, core = fake_gpu(count=1)
    _cuda.launch("peftkern_probe_warmup", (1, 1, 1), (1, 1, 1), device_index=0)  # main thread first
    errors = []

    def worker():
        try:
            _cuda.launch("peftkern_adamw32_step_f32", (1, 1, 1), (32, 1, 1), ctypes.c_int64(1), device_index=0)
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == []
    assert core.launches[-1]["thread"] != core.launches[0]["thread"]


def test_version_mismatch_names_the_pip_requirement(monkeypatch):
    monkeypatch.setattr(_cuda, "bindings_major", lambda: 13)
    monkeypatch.setattr(_cuda, "torch_cuda_major", lambda: 12)
    hint = _cuda.with_version_hint("cudaErrorInsufficientDriver")
    assert "CUDA 13" in hint and "CUDA 12" in hint and "'cuda-python>=12.0,<13'" in hint
    monkeypatch.setattr(_cuda, "bindings_major", lambda: 12)
    assert _cuda.with_version_hint("x") == "x"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: no fatbin is built")
def test_fatbin_embeds_ptx_for_newer_gpus():
    if not _cuda.fatbin_present():
        pytest.skip("no fatbin built")
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump") or pytest.skip("no cuobjdump")
    listing = subprocess.run([cuobjdump, "-lptx", _cuda.FATBIN_PATH], capture_output=True, text=True, check=True).stdout
    assert "sm_90.ptx" in listing, listing
    symbols = subprocess.run([cuobjdump, "-symbols", _cuda.FATBIN_PATH], capture_output=True, text=True).stdout
    assert _cuda.PROBE_KERNEL in symbols
