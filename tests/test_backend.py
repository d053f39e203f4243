"""peftkern.backend: the face switch."""
import os
import subprocess
import sys

import pytest
import torch

from peftkern import backend


def test_default_is_auto_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("PEFTKERN_BACKEND", raising=False)
    assert backend.current() == "auto"
    assert backend.pick("op", ("torch", "triton"), "cpu") == "torch"


def test_use_nests_and_restores(monkeypatch):
    monkeypatch.delenv("PEFTKERN_BACKEND", raising=False)
    with backend.use("torch"):
        assert backend.current() == "torch"
        with backend.use("triton"):
            assert backend.current() == "triton"
        assert backend.current() == "torch"
    assert backend.current() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("PEFTKERN_BACKEND", "torch")
    assert backend.current() == "torch"
    monkeypatch.setenv("PEFTKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="PEFTKERN_BACKEND"):
        backend.current()


def test_unknown_face_is_rejected():
    with pytest.raises(ValueError, match="must be one of"):
        with backend.use("cudnn"):
            pass


def test_available_reports_every_face():
    faces = backend.available("cpu")
    assert set(faces) == {"torch", "triton", "cuda"} and faces["torch"] is True
    assert faces["cuda"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only messages")
def test_reasons_name_the_cause():
    assert "CUDA tensors" in backend.why_unavailable("cuda", "cpu")
    assert "no CUDA device" in backend.why_unavailable("cuda", "cuda")
    assert "no CUDA device" in backend.why_unavailable("triton", "cuda")


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None)\n"
            "from peftkern import backend\n"
            "print(backend.why_unavailable('triton', 'cpu'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "TRITON_INTERPRET=1" in out


def test_explicit_face_the_op_lacks():
    with backend.use("cuda"), pytest.raises(backend.BackendUnavailable, match="op has no 'cuda' face"):
        backend.pick("op", ("torch", "triton"), "cpu")


def test_explicit_face_that_cannot_run_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with backend.use("cuda"), pytest.raises(backend.BackendUnavailable, match="cannot run"):
        backend.pick("op", ("torch", "cuda"), "cpu")


# -- auto on a GPU where the CUDA C++ kernels cannot run (tests/fake_cuda.py) ----------------------

from tests.fake_cuda import fake_gpu  # noqa: E402,F401  (fixture)


def test_auto_falls_back_to_triton_when_the_cuda_kernels_do_not_load(fake_gpu, monkeypatch):
    monkeypatch.delenv("PEFTKERN_BACKEND", raising=False)
    fake_gpu(fatbin_runs=False, nvrtc_runs=False)  # e.g. sm_120 with a fatbin of sm_80/sm_90a cubins only
    assert backend.pick("op", ("torch", "triton", "cuda"), "cuda") == "triton"
    reason = backend.why_unavailable("cuda", "cuda")
    assert "do not run on cuda:0" in reason
    assert backend.available("cuda") == {"torch": True, "triton": True, "cuda": False}
    with backend.use("cuda"), pytest.raises(backend.BackendUnavailable, match="NO_BINARY_FOR_GPU"):
        backend.pick("op", ("torch", "triton", "cuda"), "cuda")


def test_auto_picks_cuda_where_the_probe_runs(fake_gpu, monkeypatch):
    monkeypatch.delenv("PEFTKERN_BACKEND", raising=False)
    _, core = fake_gpu(count=2)
    assert backend.pick("op", ("torch", "triton", "cuda"), "cuda", 1) == "cuda"
    assert core.launches[0]["kernel"] == "peftkern_probe" and core.launches[0]["device"] == 1
