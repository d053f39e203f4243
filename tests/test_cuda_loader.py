"""peftkern._cuda: the CUDA C++ face is optional and lazy; the fatbin holds sm_80 and sm_90a."""
import glob
import os
import shutil
import subprocess
import sys

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
