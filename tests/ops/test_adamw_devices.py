"""AdamW launches on a model spread over GPUs: each launch enters its tensor's device (given as a
torch.device with an index) and leaves the caller's current device as it was. Run on a fake
2-GPU machine (tests/fake_cuda.py): torch.cuda's device state and cuda.core are stand-ins."""
import ctypes

import pytest
import torch

from peftkern.ops import adamw as ops
from peftkern.reference import adamw as ref
from tests.fake_cuda import fake_gpu  # noqa: F401  (fixture)


class FakeCudaTensor:
    """Host memory posing as a tensor on torch.device('cuda', index)."""

    def __init__(self, t: torch.Tensor, index: int):
        self.t, self.dtype, self.is_cuda = t, t.dtype, True
        self.device = torch.device("cuda", index)

    def numel(self):
        return self.t.numel()

    def data_ptr(self):
        return self.t.data_ptr()


class RecordingKernel:
    """Stands for a @triton.jit kernel: ``kernel[grid](...)`` records the current device."""

    def __init__(self, torch_cuda):
        self.torch_cuda, self.calls = torch_cuda, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append({"device": self.torch_cuda.current, "grid": grid, "kwargs": kwargs})
        return run


@pytest.fixture
def two_gpus(fake_gpu, monkeypatch):
    torch_cuda, core = fake_gpu(count=2)
    maps = tuple(t for t in (ref.dynamic_map(True), ref.dynamic_map(False)))
    maps = maps + (ref.map_midpoints(maps[0]), ref.map_midpoints(maps[1]))
    monkeypatch.setattr(ops, "_maps", lambda device: maps)
    return torch_cuda, core


def _tensors(n, index, dtype=torch.float32):
    return [FakeCudaTensor(torch.zeros(n, dtype=d), index) for d in (dtype, dtype, torch.float32, torch.float32)]


@pytest.mark.parametrize("index", [0, 1])
def test_triton_launch_enters_the_parameters_device(two_gpus, monkeypatch, index):
    torch_cuda, _ = two_gpus
    kernel32, kernel8 = RecordingKernel(torch_cuda), RecordingKernel(torch_cuda)
    monkeypatch.setattr(ops, "_adamw32_kernel", kernel32)
    monkeypatch.setattr(ops, "_adamw8bit_kernel", kernel8)
    scalars = ops.StepScalars.make(1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    p, g, m, v = _tensors(2048, index)
    ops._triton_adamw32(p, g, m, v, scalars)
    codes = FakeCudaTensor(torch.zeros(2048, dtype=torch.uint8), index)
    absmax = FakeCudaTensor(torch.zeros(8), index)
    ops._triton_adamw8bit(p, g, codes, absmax, codes, absmax, scalars)
    assert kernel32.calls[0]["device"] == index and kernel8.calls[0]["device"] == index
    assert torch_cuda.current == 0  # the caller's device, restored
    assert torch_cuda.entered == [index, index]


@pytest.mark.parametrize("penalty", [False, True])
def test_cuda_launch_enters_the_parameters_device(two_gpus, penalty):
    torch_cuda, core = two_gpus
    scalars = ops.StepScalars.make(1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    p, g, m, v = _tensors(300, 1, torch.bfloat16)
    pen = ops.Penalty(FakeCudaTensor(torch.zeros(300, dtype=torch.bfloat16), 1), None, None, 0.5) if penalty else None
    ops._cuda_adamw32(p, g, m, v, scalars, pen)
    launch = core.launches[-1]
    expected = "peftkern_adamw32_penalty_step_bf16" if penalty else "peftkern_adamw32_step_bf16"
    assert launch["kernel"] == expected
    assert launch["device"] == 1 and launch["stream"] == 1001 and torch_cuda.current == 0


def test_8bit_cuda_penalty_arguments_follow_the_kernel_signature(two_gpus):
    """peftkern_adamw8bit_penalty_step_*: p, g, mq, mabs, vq, vabs, smap, umap, anchor, fisher,
    fisher_codes, fisher_absmax, lam, n, 8 scalars; absent F pointers are null."""
    _, core = two_gpus
    received = []
    core_launch = core.launch

    def keep_args(stream, config, kernel, *args):
        received.append(args)
        core_launch(stream, config, kernel, *args)

    core.launch = keep_args
    scalars = ops.StepScalars.make(1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    p, g = _tensors(300, 0)[:2]
    codes = FakeCudaTensor(torch.zeros(300, dtype=torch.uint8), 0)
    absmax = FakeCudaTensor(torch.zeros(2), 0)
    anchor = FakeCudaTensor(torch.zeros(300), 0)
    ops._cuda_adamw8bit(p, g, codes, absmax, codes, absmax, scalars, ops.Penalty(anchor, codes, absmax, 0.25))
    args = received[-1]
    assert len(args) == 8 + 4 + 1 + 1 + 8
    assert args[8].value == anchor.data_ptr() and args[9].value is None  # no fp32 F
    assert args[10].value == codes.data_ptr() and args[11].value == absmax.data_ptr()
    assert isinstance(args[12], ctypes.c_float) and args[12].value == 0.25
    assert isinstance(args[13], ctypes.c_int64) and args[13].value == 300


def test_every_adamw_launch_names_a_kernel_in_the_fatbin(two_gpus):
    """The names the launchers build (dtype suffix, penalty variant) are entry points of the fatbin."""
    import os
    import re
    import shutil
    import subprocess

    from peftkern import _cuda

    if not _cuda.fatbin_present():
        pytest.skip("no fatbin built")
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        pytest.skip("no cuobjdump")
    symbols = set(re.findall(r"STO_ENTRY\s+(\S+)",
                             subprocess.run([tool, "-symbols", _cuda.FATBIN_PATH], capture_output=True,
                                            text=True).stdout))
    _, core = two_gpus
    scalars = ops.StepScalars.make(1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    for dtype in ops.PARAM_DTYPES:
        p, g, m, v = _tensors(300, 0, dtype)
        codes = FakeCudaTensor(torch.zeros(300, dtype=torch.uint8), 0)
        absmax = FakeCudaTensor(torch.zeros(2), 0)
        anchor = FakeCudaTensor(torch.zeros(300, dtype=dtype), 0)
        for pen in (None, ops.Penalty(anchor, None, None, 1.0), ops.Penalty(anchor, m, None, 1.0),
                    ops.Penalty(anchor, codes, absmax, 1.0)):
            ops._cuda_adamw32(p, g, m, v, scalars, pen)
            ops._cuda_adamw8bit(p, g, codes, absmax, codes, absmax, scalars, pen)
    launched = {launch["kernel"] for launch in core.launches}
    assert len(launched) == 12 and launched <= symbols, sorted(launched - symbols)
    assert {s for s in symbols if "adamw" in s} == launched  # and every AdamW kernel is launched by some call
