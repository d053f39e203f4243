"""Build peftkern's compiled parts; both are optional and import never depends on them.

* ``peftkern._host``: a pybind11 module (g++) that compiles the ``__host__ __device__`` math
  headers of ``csrc/`` for the CPU, so tests can hold the CUDA math against ``peftkern.reference``.
  Every ``csrc/**/*_host.cpp`` is linked in and registers its own functions.
* ``peftkern/_kernels.fatbin``: every ``csrc/**/*.cu`` built by nvcc into one fatbin
  (sm_80 and sm_90a by default; ``PEFTKERN_CUDA_ARCHS="80;90a"``), when nvcc is found or
  ``PEFTKERN_BUILD_CUDA=1``; ``PEFTKERN_BUILD_CUDA=0`` skips it. It is launched from Python through
  cuda-python, so it never links against torch's CUDA and serves every torch version.
"""
import glob
import os
import shutil
import subprocess
import tempfile

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


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
        archs = [a.strip() for a in os.environ.get("PEFTKERN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";") if a.strip()]
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
            for arch in archs:
                cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            print("peftkern: " + " ".join(cmd))
            subprocess.check_call(cmd)
        os.replace(target + ".tmp", target)


host_sources = [os.path.relpath(p, HERE) for p in
                sorted(glob.glob(os.path.join(CSRC, "**", "*_host.cpp"), recursive=True))]

setup(
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
