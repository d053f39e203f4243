"""setup.py's install-time choices: the cuda-python pin and the fatbin's cubins and PTX."""
import importlib.util
import os

import pytest

_SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("peftkern_setup", _SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not __main__: defines the helpers, runs no build
    return module


@pytest.mark.parametrize("torch_major, driver_major, expected", [
    (12, 13, "cuda-python>=12.6,<13"),  # torch built for CUDA 12: its bindings, whatever the driver
    (13, 13, "cuda-python>=13.0,<14"),
    (None, 12, "cuda-python>=12.6,<13"),  # torch not importable in an isolated build: the driver decides
    (None, 14, "cuda-python>=13.0,<14"),  # a newer driver runs the newest bindings we support
    (None, None, "cuda-python>=12.6"),  # a CPU-only machine: never called, left open
])
def test_cuda_python_follows_torch_then_the_driver(setup_py, torch_major, driver_major, expected):
    got = setup_py.cuda_python_requirement({}, torch_major=lambda: torch_major, driver_major=lambda: driver_major)
    assert got == expected


def test_cuda_python_major_by_hand(setup_py):
    req = setup_py.cuda_python_requirement({"PEFTKERN_CUDA_MAJOR": "12"}, torch_major=lambda: 13,
                                           driver_major=lambda: 13)
    assert req == "cuda-python>=12.6,<13"
    with pytest.raises(ValueError, match="PEFTKERN_CUDA_MAJOR must be one of"):
        setup_py.cuda_python_requirement({"PEFTKERN_CUDA_MAJOR": "11"})


def test_fatbin_gencode_has_cubins_and_forward_compatible_ptx(setup_py):
    flags = setup_py.gencode_flags(["80", "90a"], ["90"])
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
                     "-gencode", "arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError, match="only on that exact GPU"):
        setup_py.gencode_flags(["80"], ["90a"])


def test_runtime_dependencies_are_declared_in_setup_py(setup_py):
    names = {d.split(">")[0].split(";")[0].strip() for d in setup_py.BASE_DEPENDENCIES}
    assert {"torch", "triton", "transformers", "safetensors", "cuda-core"} <= names
