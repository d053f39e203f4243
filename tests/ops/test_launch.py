"""The shared launch helpers: torch's fp32 matmul precision read through either API, device guard."""
import contextlib

import pytest
import torch

from peftkern.ops.launch import device_guard, matmul_precision


@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    glob = torch.backends.fp32_precision
    yield
    torch.backends.fp32_precision = glob
    matmul.fp32_precision = before


def test_sixteen_bit_is_always_tensor_core():
    assert matmul_precision(torch.float16) == "tf32"
    assert matmul_precision(torch.bfloat16) == "tf32"


def test_new_api_set_does_not_raise_and_is_followed(restore_precision):
    # torch >= 2.9: reading allow_tf32 after the new API was set raises; the helper must not read it.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 - shows the trap the helper avoids
    assert matmul_precision(torch.float32) == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert matmul_precision(torch.float32) == "ieee"


def test_global_setting_when_matmul_defers(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert matmul_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "none"
    assert matmul_precision(torch.float32) == "ieee"


def test_device_guard_is_a_no_op_on_cpu():
    guard = device_guard(torch.zeros(2))
    assert isinstance(guard, contextlib.nullcontext)
    with guard:
        pass
