"""The CUDA C++ math of the AdamW step (csrc/optim/adamw_math.cuh), compiled for the CPU by the host
twin and composed as csrc/optim/adamw.cu composes it, against peftkern.reference.adamw."""
import numpy as np
import pytest
import torch

from peftkern.ops.adamw import StepScalars
from peftkern.reference import adamw as ref
from tests.helpers import RTOL, rel_error

_host = pytest.importorskip("peftkern._host")
if not hasattr(_host, "adamw8bit_penalty_step"):
    pytest.skip("peftkern._host was built without csrc/optim (reinstall peftkern)", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 255, 256, 257, 773, 4099]
HYPER = dict(lr=2e-3, beta1=0.9, beta2=0.995, eps=1e-8, weight_decay=0.1)


def _to_host(t):
    """fp32 as float32, fp16/bf16 as their uint16 bit patterns (what the kernels see)."""
    t = t.contiguous()
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy().view(np.uint16)


def _from_host(a, dtype):
    return torch.from_numpy(a) if dtype == torch.float32 else torch.from_numpy(a.view(np.int16)).view(dtype)


def _dtype_name(dtype):
    return str(dtype).split(".")[1]


def _param_tol(dtype):
    return 1e-6 if dtype == torch.float32 else RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw32_math(dtype, n, seed):
    p0, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    m0, v0 = torch.randn(n) * 0.1, torch.rand(n) * 0.01
    scalars = list(StepScalars.make(5, **HYPER).as_tuple())
    p, m, v = _host.adamw32_step(_to_host(p0), _to_host(g), m0.numpy(), v0.numpy(), _dtype_name(dtype), scalars)
    p_ref, m_ref, v_ref = ref.adamw_update(p0, g, m0, v0, 5, compute_dtype=torch.float64, **HYPER)
    torch.testing.assert_close(torch.from_numpy(m), m_ref.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.from_numpy(v), v_ref.float(), rtol=1e-5, atol=1e-7)
    assert rel_error(_from_host(p, dtype), p_ref.to(dtype)) <= _param_tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw8bit_math(dtype, n, seed):
    p0, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    signed, unsigned = ref.dynamic_map(True), ref.dynamic_map(False)
    mq, ma = ref.quantize_blockwise(torch.randn(n) * 0.1, signed)
    vq, va = ref.quantize_blockwise(torch.rand(n) * 0.01, unsigned)
    scalars = list(StepScalars.make(3, **HYPER).as_tuple())
    out = _host.adamw8bit_step(_to_host(p0), _to_host(g), mq.numpy(), ma.numpy(), vq.numpy(), va.numpy(),
                               signed.numpy(), unsigned.numpy(), _dtype_name(dtype), scalars)
    _check_8bit(out, ref.adamw8bit_update(p0, g, mq, ma, vq, va, 3, **HYPER), dtype)


def _check_8bit(out, expected, dtype):
    """The host twin's (param bits, m codes, m absmax, v codes, v absmax) against the reference's."""
    p, mq_h, ma_h, vq_h, va_h = [_from_host(out[0], dtype)] + [torch.from_numpy(a) for a in out[1:]]
    p_ref, mq_ref, ma_ref, vq_ref, va_ref = expected
    assert rel_error(p, p_ref.to(dtype)) <= _param_tol(dtype)
    torch.testing.assert_close(ma_h, ma_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(va_h, va_ref, rtol=1e-5, atol=1e-7)
    for codes, expected_codes in ((mq_h, mq_ref), (vq_h, vq_ref)):
        diff = (codes.int() - expected_codes.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_reference_exactly(signed, seed):
    x = torch.randn(4099) if signed else torch.rand(4099)
    x[300:556] = 0.0  # one all-zero block
    code = ref.dynamic_map(signed)
    codes, absmax = _host.optim_quantize_blockwise(x.numpy(), code.numpy())
    codes_ref, absmax_ref = ref.quantize_blockwise(x, code)
    assert torch.equal(torch.from_numpy(codes), codes_ref)
    assert torch.equal(torch.from_numpy(absmax), absmax_ref)
    back = _host.optim_dequantize_blockwise(codes, absmax, code.numpy())
    assert torch.equal(torch.from_numpy(back), ref.dequantize_blockwise(codes_ref, absmax_ref, code))


def test_bad_arguments_raise():
    x = np.zeros(10, dtype=np.float32)
    with pytest.raises(ValueError, match="scalars must hold 8 values"):
        _host.adamw32_step(x, x, x, x, "float32", [0.9])
    with pytest.raises(ValueError, match="dtype must be"):
        _host.adamw32_step(x, x, x, x, "float64", [0.0] * 8)
    with pytest.raises(ValueError, match="exp_avg has 5 elements, expected 10"):
        _host.adamw32_step(x, x, x[:5], x, "float32", [0.0] * 8)
    with pytest.raises(ValueError, match="map has 3 elements"):
        _host.optim_quantize_blockwise(x, np.zeros(3, dtype=np.float32))


# -- the anchored penalty (EWC / L2-SP), as adamw.cu's *_penalty_* kernels compose it ------------

def _penalty(p0, mode):
    from tests.ops.test_adamw_penalty import penalty_inputs

    anchor, fisher, fisher_ref = penalty_inputs(p0, mode)
    if mode == "l2sp":
        host_f = dict(fisher=None, fisher_codes=None, fisher_absmax=None)
    elif mode == "fisher32":
        host_f = dict(fisher=fisher.numpy(), fisher_codes=None, fisher_absmax=None)
    else:
        host_f = dict(fisher=None, fisher_codes=fisher[0].numpy(), fisher_absmax=fisher[1].numpy())
    return anchor, host_f, fisher_ref


@pytest.mark.parametrize("mode", ["l2sp", "fisher32", "fisher8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw32_penalty_math(mode, dtype, n, seed):
    p0, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    m0, v0 = torch.randn(n) * 0.1, torch.rand(n) * 0.01
    anchor, host_f, fisher_ref = _penalty(p0, mode)
    scalars = list(StepScalars.make(5, **HYPER).as_tuple())
    p, m, v = _host.adamw32_penalty_step(_to_host(p0), _to_host(g), m0.numpy(), v0.numpy(), _to_host(anchor),
                                         host_f["fisher"], host_f["fisher_codes"], host_f["fisher_absmax"],
                                         ref.dynamic_map(False).numpy(), 0.7, _dtype_name(dtype), scalars)
    p_ref, m_ref, v_ref = ref.adamw_update(p0, g, m0, v0, 5, compute_dtype=torch.float64, anchor=anchor,
                                           fisher=fisher_ref, penalty=0.7, **HYPER)
    torch.testing.assert_close(torch.from_numpy(m), m_ref.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.from_numpy(v), v_ref.float(), rtol=1e-5, atol=1e-7)
    assert rel_error(_from_host(p, dtype), p_ref.to(dtype)) <= _param_tol(dtype)


@pytest.mark.parametrize("mode", ["l2sp", "fisher32", "fisher8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw8bit_penalty_math(mode, dtype, seed):
    n = 773
    p0, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    anchor, host_f, fisher_ref = _penalty(p0, mode)
    signed, unsigned = ref.dynamic_map(True), ref.dynamic_map(False)
    mq, ma = ref.quantize_blockwise(torch.randn(n) * 0.1, signed)
    vq, va = ref.quantize_blockwise(torch.rand(n) * 0.01, unsigned)
    scalars = list(StepScalars.make(3, **HYPER).as_tuple())
    out = _host.adamw8bit_penalty_step(_to_host(p0), _to_host(g), mq.numpy(), ma.numpy(), vq.numpy(), va.numpy(),
                                       signed.numpy(), unsigned.numpy(), _to_host(anchor), host_f["fisher"],
                                       host_f["fisher_codes"], host_f["fisher_absmax"], 0.7, _dtype_name(dtype),
                                       scalars)
    _check_8bit(out, ref.adamw8bit_update(p0, g, mq, ma, vq, va, 3, anchor=anchor, fisher=fisher_ref, penalty=0.7,
                                          **HYPER), dtype)


def test_penalty_bad_arguments_raise():
    x = np.zeros(10, dtype=np.float32)
    umap = ref.dynamic_map(False).numpy()
    with pytest.raises(ValueError, match="anchor has 9 elements, expected 10"):
        _host.adamw32_penalty_step(x, x, x, x, x[:9], None, None, None, umap, 1.0, "float32", [0.0] * 8)
    with pytest.raises(ValueError, match="fisher_codes need fisher_absmax"):
        _host.adamw32_penalty_step(x, x, x, x, x, None, np.zeros(10, dtype=np.uint8), None, umap, 1.0, "float32",
                                   [0.0] * 8)
    with pytest.raises(ValueError, match="not both"):
        _host.adamw32_penalty_step(x, x, x, x, x, x, np.zeros(10, dtype=np.uint8), np.ones(1, dtype=np.float32),
                                   umap, 1.0, "float32", [0.0] * 8)
