"""NF4Linear under ``model.to(dtype)`` / ``.half()``: the quantization statistics stay fp32, as
bitsandbytes keeps its QuantState (issue 28, item 12)."""
import pytest
import torch
from torch import nn

from peftkern.nn import NF4Linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_casting_the_model_keeps_the_statistics(double_quant, cast, seed):
    model = nn.Sequential(NF4Linear.from_linear(nn.Linear(128, 64), double_quant=double_quant))
    layer = model[0]
    reference = layer.dequantize(torch.float32)
    dtype = torch.bfloat16 if cast == "to_bf16" else torch.float16
    model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    assert layer.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    if double_quant:
        assert layer.nested_absmax.dtype == torch.float32 and layer.nested_code.dtype == torch.float32
    assert layer.bias.dtype == dtype  # the bias follows the model, as in bitsandbytes
    assert torch.equal(layer.dequantize(torch.float32), reference)
    x = torch.randn(3, 128).to(dtype)
    y = model(x)
    assert y.dtype == dtype
    expected = (x.float() @ reference.t() + layer.bias.float())
    assert ((y.float() - expected).norm() / expected.norm()).item() < 1e-2
