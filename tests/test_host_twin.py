"""peftkern._host: the CUDA math headers compiled for the CPU, against torch."""
import numpy as np
import pytest
import torch

host = pytest.importorskip("peftkern._host", reason="host twin not built")


def _samples():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([
        torch.randn(20000, generator=gen) * torch.logspace(-12, 12, 20000),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 3e-8, 2.98e-8,
                      float("inf"), float("-inf"), 3.4e38, 1.17e-38, 1e-45]),
        # exact halfway points of bf16 (ties to even either way)
        (torch.arange(1, 2000, dtype=torch.int32) << 16 | 0x8000).view(torch.float32),
    ])
    return values


@pytest.mark.parametrize("dtype, to_bits, from_bits", [
    (torch.bfloat16, "float_to_bf16_bits", "bf16_bits_to_float"),
    (torch.float16, "float_to_fp16_bits", "fp16_bits_to_float"),
])
def test_conversions_match_torch_bit_for_bit(dtype, to_bits, from_bits):
    values = _samples()
    ours = getattr(host, to_bits)(values.numpy())
    theirs = values.to(dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs), f"{int((ours != theirs).sum())} conversions differ"
    back = getattr(host, from_bits)(ours)
    assert np.array_equal(back, values.to(dtype).float().numpy())


def test_nan_stays_nan():
    nan = np.array([float("nan")], dtype=np.float32)
    assert np.isnan(host.bf16_bits_to_float(host.float_to_bf16_bits(nan)))[0]
    assert np.isnan(host.fp16_bits_to_float(host.float_to_fp16_bits(nan)))[0]
