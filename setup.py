"""Build peftkern's compiled parts; both are optional and import never depends on them.

* ``peftkern._host``: a pybind11 module (g++) that compiles the ``__host__ __device__`` math
  headers of ``csrc/`` for the CPU, so tests can hold the CUDA math against ``peftkern.reference``.
  Every ``csrc/**/*_host.cpp`` is linked in and registers its own functions.
* ``peftkern/_kernels.fatbin``: every ``csrc/**/*.cu`` built by nvcc into one fatbin
  (sm_80 and sm_90a cubins by default, ``PEFTKERN_CUDA_ARCHS="80;90a"``, plus compute_90 PTX,
  ``PEFTKERN_CUDA_PTX="90"``, which the driver compiles for GPUs newer than the cubins: sm_100,
  sm_120, ...), when nvcc is found or ``PEFTKERN_BUILD_CUDA=1``; ``PEFTKERN_BUILD_CUDA=0`` skips
  it. It is launched from Python through cuda-python, so it never links against torch's CUDA and
  serves every torch version.

The cuda-python requirement is chosen here, at install time (``dependencies`` is dynamic in
pyproject.toml): cuda-python's bindings for CUDA 13 fail every call with
``cudaErrorInsufficientDriver`` on a driver that only runs CUDA 12, so the requirement is pinned to
the CUDA major of the torch installed in the build environment (``torch.version.cuda``), else of
the driver (``cuDriverGetVersion`` from libcuda), else left open (CPU-only machines, where it is
never called). ``PEFTKERN_CUDA_MAJOR=12|13`` chooses by hand.
"""
import ctypes
import glob
import os
import re
import shutil
import subprocess
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

# Runtime dependencies (pyproject.toml declares them dynamic because of the cuda-python pin).
BASE_DEPENDENCIES = [
    "torch>=2.5",
    "triton>=3.1; platform_system == 'Linux'",
    "transformers>=4.45",
    "safetensors>=0.4",
    "cuda-core>=0.3",
    "numpy",
    "tqdm",
    "pyyaml",
]
CUDA_MAJORS = (12, 13)  # the majors cuda-python publishes bindings for that cuda.core supports


def _torch_cuda_major():
    try:
        import torch
    except Exception:  # not in this (isolated) build environment
        return None
    version = getattr(torch.version, "cuda", None)
    return int(version.split(".")[0]) if version else None


def _driver_cuda_major():
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000


def cuda_python_requirement(environ=os.environ, torch_major=_torch_cuda_major, driver_major=_driver_cuda_major):
    """'cuda-python>=M.0,<M+1' for the CUDA major M of torch, else of the driver; unpinned if neither is known."""
    chosen = environ.get("PEFTKERN_CUDA_MAJOR", "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) not in CUDA_MAJORS:
            raise ValueError(f"PEFTKERN_CUDA_MAJOR must be one of {CUDA_MAJORS}, got {chosen!r}")
        major = int(chosen)
    else:
        major = torch_major() or driver_major()
        if major is not None:
            major = min(max(major, CUDA_MAJORS[0]), CUDA_MAJORS[-1])
    if major is None:
        return "cuda-python>=12.6"
    return f"cuda-python>={major}.0,<{major + 1}" if major > 12 else "cuda-python>=12.6,<13"


def gencode_flags(archs, ptx_archs):
    """nvcc -gencode flags: a cubin per entry of ``archs`` ("80", "90a"), PTX per ``ptx_archs`` ("90")."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for arch in ptx_archs:
        if re.search(r"[af]$", arch):
            raise ValueError(f"PTX for {arch!r} would run only on that exact GPU; embed PTX of a plain arch (e.g. 90)")
        flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def _arch_list(name, default):
    return [a.strip() for a in os.environ.get(name, default).replace(",", ";").split(";") if a.strip()]


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class BuildExtWithFatbin(build_ext):
    def run(self):
        super().run()
        self._build_fatbin()

    def _build_fatbin(self):
        wanted = os.environ.get("PEFTKERN_BUILD_CUDA", "")
        if wanted == "0":
            print("peftkern: PEFTKERN_BUILD_CUDA=0, not building the CUDA fatbin")
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            if wanted == "1":
                raise RuntimeError("PEFTKERN_BUILD_CUDA=1 but nvcc was not found (PATH, CUDA_HOME)")
            print("peftkern: nvcc not found; the CUDA face will compile csrc/ with NVRTC on first use")
            return
        sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
        if not sources:
            return
        archs = _arch_list("PEFTKERN_CUDA_ARCHS", "80;90a")
        ptx_archs = _arch_list("PEFTKERN_CUDA_PTX", "90")
        out_dir = os.path.join(HERE, "peftkern") if self.inplace else os.path.join(self.build_lib, "peftkern")
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, "_kernels.fatbin")
        # nvcc takes one source per fatbin, so a unity file includes every kernel file.
        with tempfile.TemporaryDirectory() as tmp:
            unity = os.path.join(tmp, "peftkern_kernels.cu")
            with open(unity, "w") as f:
                for src in sources:
                    f.write(f'#include "{src}"\n')
            cmd = [nvcc, "-fatbin", "-O3", "-std=c++17", f"-I{CSRC}", "-o", target + ".tmp", unity]
            cmd += gencode_flags(archs, ptx_archs)
            print("peftkern: " + " ".join(cmd))
            subprocess.check_call(cmd)
        os.replace(target + ".tmp", target)


host_sources = [os.path.relpath(p, HERE) for p in
                sorted(glob.glob(os.path.join(CSRC, "**", "*_host.cpp"), recursive=True))]

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for the helpers
    setup(
        install_requires=BASE_DEPENDENCIES + [cuda_python_requirement()],
        ext_modules=[
            Pybind11Extension(
                "peftkern._host",
                ["csrc/host_twin.cpp"] + host_sources,
                include_dirs=["csrc"],
                cxx_std=17,
                extra_compile_args=["-O2"],
            )
        ],
        cmdclass={"build_ext": BuildExtWithFatbin},
    )
