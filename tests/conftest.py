"""Test setup: Triton runs in its CPU interpreter when there is no GPU, with bf16 dots widened.

TRITON_INTERPRET must be set before any peftkern op module is imported (``triton.jit`` picks the
interpreter when the kernel is defined), hence at the top of this file.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _widen_bf16_dots():
    """The interpreter keeps bf16 as uint16 bit patterns, so its tl.dot on bf16 multiplies integers.
    Widen bf16 operands to fp32 (exact) before the product."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return
    original = InterpreterBuilder.create_dot
    if getattr(original, "_peftkern_bf16", False):
        return

    def widen(handle):
        if handle.get_element_ty() == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.get_element_ty() == tl.bfloat16 or b.get_element_ty() == tl.bfloat16:
            out = np.matmul(widen(a), widen(b), dtype=np.float32).astype(d.data.dtype) + d.data
            return TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._peftkern_bf16 = True
    InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _widen_bf16_dots()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """Fresh random inputs per test run, reproducible from the printed seed on failure."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
