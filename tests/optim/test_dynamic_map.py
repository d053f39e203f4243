"""bitsandbytes' dynamic 8-bit maps and blockwise quantization of optimizer states, against the
installed bitsandbytes."""
import pytest
import torch

from peftkern.reference import adamw as ref

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes(signed):
    ours = ref.dynamic_map(signed)
    theirs = bnb_functional.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[1:] >= ours[:-1])
    assert ours.max().item() == 1.0 and (ours.min().item() < 0) == signed


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000])
def test_quantization_matches_bitsandbytes(signed, n, seed):
    """Same absmax and dequantization; codes equal except where bitsandbytes' CPU search picks a
    farther neighbour (it is approximate, ours is the exact nearest code)."""
    x = torch.randn(n) if signed else torch.rand(n) * 1e-3
    code = ref.dynamic_map(signed)
    codes, absmax = ref.quantize_blockwise(x, code)
    codes_bnb, qstate = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(absmax, qstate.absmax)
    normed = x / absmax.repeat_interleave(256)[:n]
    ours_dist = (code[codes.long()] - normed).abs()
    theirs_dist = (code[codes_bnb.long()] - normed).abs()
    assert torch.all(ours_dist <= theirs_dist)
    assert (codes != codes_bnb).float().mean().item() <= 0.03
    assert torch.equal(ref.dequantize_blockwise(codes, absmax, code),
                       bnb_functional.dequantize_blockwise(codes, qstate))


def test_all_zero_block_keeps_zero():
    x = torch.zeros(300)
    x[280] = 0.5
    for signed in (True, False):
        code = ref.dynamic_map(signed)
        codes, absmax = ref.quantize_blockwise(x, code)
        assert absmax[0].item() == 0.0
        assert torch.equal(ref.dequantize_blockwise(codes, absmax, code), x)
