"""LoRALinear without autograd (decoding, scoring): plain GEMMs, no registered op, the same output."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peftkern.nn import LoRALinear


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer(base, dtype, seed=0):
    torch.manual_seed(seed)
    module = LoRALinear.from_linear(copy.deepcopy(base), r=5, lora_alpha=7, init_lora_weights=False).to(dtype)
    module.update_layer("second", 3, 4.0, init_lora_weights=False)
    module.to(dtype)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapters", [["default"], ["default", "second"]])
def test_no_grad_path_equals_the_op(dtype, bias, adapters):
    torch.manual_seed(1)
    module = _layer(nn.Linear(37, 23, bias=bias), dtype)
    module.set_adapter(adapters)
    x = torch.randn(3, 11, 74, dtype=dtype)[..., ::2]  # odd sizes, non-contiguous
    with torch.enable_grad():
        want = module(x)
    with torch.no_grad():
        got = module(x)
    assert got.dtype == want.dtype and got.shape == (3, 11, 23)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), want.detach(), rtol=tol, atol=tol)


def test_no_grad_path_on_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    module = _layer(transformers.pytorch_utils.Conv1D(19, 13), torch.float32)
    x = torch.randn(4, 13)
    want = module(x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want.detach(), rtol=1e-5, atol=1e-5)


def test_no_grad_skips_the_registered_op_and_grad_keeps_it():
    module = _layer(nn.Linear(16, 8), torch.float32)
    x = torch.randn(5, 16)
    with torch.no_grad(), _OpNames() as seen:
        module(x)
    assert not any("peftkern" in n for n in seen.names), seen.names
    with _OpNames() as seen:
        module(x).sum().backward()
    assert any("peftkern.lora_linear_fwd" in n for n in seen.names), seen.names
    assert module.lora_A["default"].weight.grad is not None


def test_dropout_while_training_keeps_the_op():
    """Training mode with dropout under no_grad keeps the op's dropout (same masks as with grad)."""
    torch.manual_seed(3)
    module = LoRALinear.from_linear(nn.Linear(16, 8), r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    module.train()
    with torch.no_grad(), _OpNames() as seen:
        module(torch.randn(5, 16))
    assert any("peftkern" in n for n in seen.names)
