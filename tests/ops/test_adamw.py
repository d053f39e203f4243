"""peftkern.ops.adamw: every available face of the 32-bit and 8-bit step against the reference."""
import pytest
import torch

from peftkern import backend
from peftkern.ops import adamw as ops
from peftkern.reference import adamw as ref
from tests.helpers import RTOL, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RUNNABLE_FACES = [f for f in ops.FACES if backend.why_unavailable(f, DEVICE) is None]
# round, odd, one element, one block, a block and one, several blocks with a ragged tail
SIZES = [1, 255, 256, 257, 773, 1024]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


def _param_tol(dtype):
    # fp32: a few ulps from torch's CPU sqrt (not correctly rounded) carried through the update;
    # fp16/bf16: the same, seen after rounding to the parameter's dtype.
    return 1e-6 if dtype == torch.float32 else RTOL[dtype]


def _assert_states_close(actual, expected):
    """fp32 states: a few ulps of their inputs' scale (m = beta1 m + (1 - beta1) g may cancel, so
    an ulp-level difference can be large relative to m itself)."""
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-7)


def _inputs(n, dtype):
    p = torch.randn(n, device=DEVICE).to(dtype)
    g = torch.randn(n, device=DEVICE).to(dtype)
    m = torch.randn(n, device=DEVICE) * 0.1
    v = torch.rand(n, device=DEVICE) * 0.01 + 1e-4
    return p, g, m, v


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw32_matches_reference(face, dtype, n, seed):
    p0, g, m0, v0 = _inputs(n, dtype)
    step = 7
    p_ref, m_ref, v_ref = ref.adamw_update(p0, g, m0, v0, step, compute_dtype=torch.float64, **HYPER)
    p, m, v = p0.clone(), m0.clone(), v0.clone()
    with backend.use(face):
        ops.adamw_step(p, g, m, v, step=step, **HYPER)
    _assert_states_close(m, m_ref)
    _assert_states_close(v, v_ref)
    assert rel_error(p, p_ref.to(dtype)) <= _param_tol(dtype), f"seed {seed}"


def _quantized_states(n):
    m = torch.randn(n, device=DEVICE) * 0.1
    v = torch.rand(n, device=DEVICE) * 0.01
    mq, ma = ref.quantize_blockwise(m, ref.dynamic_map(True, DEVICE))
    vq, va = ref.quantize_blockwise(v, ref.dynamic_map(False, DEVICE))
    return mq, ma, vq, va


def _assert_codes_close(codes, expected, name):
    """Codes agree except where a state sits within an ulp of a midpoint: then one code apart."""
    diff = (codes.int() - expected.int()).abs()
    assert diff.max().item() <= 1, f"{name}: codes differ by {diff.max().item()}"
    assert (diff > 0).float().mean().item() <= 0.01, f"{name}: {(diff > 0).sum().item()} codes differ"


def _check_8bit(out, expected, dtype):
    p, mq, ma, vq, va = out
    p_ref, mq_ref, ma_ref, vq_ref, va_ref = expected
    assert rel_error(p, p_ref.to(dtype)) <= _param_tol(dtype)
    _assert_states_close(ma, ma_ref)
    _assert_states_close(va, va_ref)
    _assert_codes_close(mq, mq_ref, "m codes")
    _assert_codes_close(vq, vq_ref, "v codes")
    pairs = ((mq, ma, mq_ref, ma_ref, True), (vq, va, vq_ref, va_ref, False))
    for codes, absmax, codes_ref, absmax_ref, signed in pairs:
        code = ref.dynamic_map(signed, DEVICE)
        assert rel_error(ref.dequantize_blockwise(codes, absmax, code),
                         ref.dequantize_blockwise(codes_ref, absmax_ref, code)) <= 5e-3


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw8bit_matches_reference(face, dtype, n, seed):
    p0, g, _, _ = _inputs(n, dtype)
    states = _quantized_states(n)
    step = 4
    expected = ref.adamw8bit_update(p0, g, *states, step, **HYPER)
    out = [p0.clone()] + [t.clone() for t in states]
    with backend.use(face):
        ops.adamw8bit_step(out[0], g, *out[1:], step=step, **HYPER)
    _check_8bit(out, expected, dtype)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_adamw8bit_first_step_from_zero_state(face, seed):
    n = 600
    p0, g, _, _ = _inputs(n, torch.float32)
    blocks = -(-n // ref.BLOCKSIZE)
    zeros = [torch.zeros(n, dtype=torch.uint8, device=DEVICE), torch.zeros(blocks, device=DEVICE),
             torch.zeros(n, dtype=torch.uint8, device=DEVICE), torch.zeros(blocks, device=DEVICE)]
    expected = ref.adamw8bit_update(p0, g, *zeros, 1, **HYPER)
    out = [p0.clone()] + [t.clone() for t in zeros]
    with backend.use(face):
        ops.adamw8bit_step(out[0], g, *out[1:], step=1, **HYPER)
    _check_8bit(out, expected, torch.float32)
    # the first step moves every element by about lr (m / sqrt(v) = sign(g) after bias correction)
    moved = (p0 * (1 - HYPER["lr"] * HYPER["weight_decay"]) - out[0]).abs()
    assert torch.allclose(moved, torch.full_like(moved, HYPER["lr"]), rtol=1e-3)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_zero_gradient_block_and_empty_tensor(face):
    n = 300
    p0 = torch.randn(n, device=DEVICE)
    g = torch.zeros(n, device=DEVICE)
    states = _quantized_states(n)
    states[0][:256] = ref.quantize_blockwise(torch.zeros(256), ref.dynamic_map(True))[0].to(DEVICE)
    states[1][0] = 0.0
    expected = ref.adamw8bit_update(p0, g, *states, 3, **HYPER)
    out = [p0.clone()] + [t.clone() for t in states]
    with backend.use(face):
        ops.adamw8bit_step(out[0], g, *out[1:], step=3, **HYPER)
        _check_8bit(out, expected, torch.float32)
        empty = torch.zeros(0, device=DEVICE)
        ops.adamw_step(empty, empty.clone(), empty.clone(), empty.clone(), step=1, lr=1e-3)


@pytest.mark.parametrize("face", ops.FACES)
def test_opcheck(face):
    if backend.why_unavailable(face, DEVICE) is not None:
        pytest.skip(backend.why_unavailable(face, DEVICE))
    n = 300
    p, g, m, v = _inputs(n, torch.float32)
    torch.library.opcheck(torch.ops.peftkern.adamw_step.default, (p, g, m, v, 2, 1e-3, 0.9, 0.999, 1e-8, 0.01, face))
    mq, ma, vq, va = _quantized_states(n)
    torch.library.opcheck(torch.ops.peftkern.adamw8bit_step.default,
                          (p, g, mq, ma, vq, va, 2, 1e-3, 0.9, 0.999, 1e-8, 0.01, face))


def test_bad_inputs_raise_before_any_kernel():
    p, g, m, v = _inputs(10, torch.float32)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        ops.adamw_step(p, g, m, v, step=0, lr=1e-3)
    with pytest.raises(ValueError, match="beta1 must be in"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, beta1=1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ops.adamw_step(p, g, m, v, step=1, lr=-1.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, eps=float("nan"))
    with pytest.raises(TypeError, match="grad has dtype torch.float16 but param has torch.float32"):
        ops.adamw_step(p, g.half(), m, v, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="exp_avg has dtype torch.float16"):
        ops.adamw_step(p, g, m.half(), v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous with 10 elements"):
        ops.adamw_step(p, g, m, v[:5], step=1, lr=1e-3)
    with pytest.raises(ValueError, match="grad has shape"):
        ops.adamw_step(p, g[:9], m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="param must be contiguous"):
        ops.adamw_step(torch.randn(4, 5, device=DEVICE).t(), torch.randn(5, 4, device=DEVICE),
                       torch.zeros(20, device=DEVICE), torch.zeros(20, device=DEVICE), step=1, lr=1e-3)
    with pytest.raises(TypeError, match="param has dtype torch.float64"):
        ops.adamw_step(p.double(), g.double(), m, v, step=1, lr=1e-3)
    mq, ma, vq, va = _quantized_states(10)
    with pytest.raises(ValueError, match="m_absmax must be contiguous with 1 elements"):
        ops.adamw8bit_step(p, g, mq, torch.zeros(2, device=DEVICE), vq, va, step=1, lr=1e-3)
    with pytest.raises(TypeError, match="v_codes has dtype torch.int8"):
        ops.adamw8bit_step(p, g, mq, ma, vq.to(torch.int8), va, step=1, lr=1e-3)
    with pytest.raises(backend.BackendUnavailable):
        with backend.use("cuda" if DEVICE == "cpu" else "torch"):
            if DEVICE == "cpu":
                ops.adamw_step(p, g, m, v, step=1, lr=1e-3)
            else:
                raise backend.BackendUnavailable("only checked without a GPU")


@pytest.mark.parametrize("signed", [True, False])
def test_torch_face_code_tables_equal_binary_search(signed, seed):
    """The torch face's bucket tables give exactly the reference's nearest codes, midpoints and
    their float neighbours included."""
    code = ref.dynamic_map(signed)
    mid = ref.map_midpoints(code)
    xs = torch.cat([torch.rand(20000) * (2 if signed else 1) - (1 if signed else 0),
                    mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
                    torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-8, -1e-8])])
    if not signed:
        xs = xs.abs()
    got = ops._nearest_codes(xs.clone(), ops._code_tables(signed, torch.device("cpu")))
    assert torch.equal(got, torch.searchsorted(mid, xs, out_int32=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_face_loops_over_more_blocks_than_its_grid(dtype):
    """More quantization blocks than the 8-bit kernel's grid (8192 CUDA blocks), ragged tail."""
    if backend.why_unavailable("cuda", "cuda") is not None:
        pytest.skip(backend.why_unavailable("cuda", "cuda"))
    n = ops._CUDA_MAX_GRID_8BIT * ref.BLOCKSIZE * 2 + 37
    p0, g, _, _ = _inputs(n, dtype)
    states = _quantized_states(n)
    expected = ref.adamw8bit_update(p0, g, *states, 5, **HYPER)
    out = [p0.clone()] + [t.clone() for t in states]
    with backend.use("cuda"):
        ops.adamw8bit_step(out[0], g, *out[1:], step=5, **HYPER)
    _check_8bit(out, expected, dtype)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_subnormal_states_quantize_like_the_reference(face, seed):
    """A block whose states are all subnormal floats still scales by its own absmax."""
    n = 256
    p0 = torch.randn(n, device=DEVICE)
    # |g| in [0.5, 1.5] x 1e-19: v = (1 - beta2) g^2 in [2.5e-42, 2.3e-41], fp32's subnormal range with 11 to
    # 14 bits left. A randn gradient there (CI seed failed: codes 7 apart) has entries near 0 whose v is a few
    # subnormal ulps, too coarse for the codes to agree (at 1e-21 for every entry: 27 of 300 seeds failed).
    g = (0.5 + torch.rand(n, device=DEVICE)) * torch.randn(n, device=DEVICE).sign() * 1e-19
    zeros = [torch.zeros(n, dtype=torch.uint8, device=DEVICE), torch.zeros(1, device=DEVICE),
             torch.zeros(n, dtype=torch.uint8, device=DEVICE), torch.zeros(1, device=DEVICE)]
    hyper = dict(HYPER, weight_decay=0.0)
    expected = ref.adamw8bit_update(p0, g, *zeros, 1, **hyper)
    out = [p0.clone()] + [t.clone() for t in zeros]
    with backend.use(face):
        ops.adamw8bit_step(out[0], g, *out[1:], step=1, **hyper)
    assert 0.0 < expected[4].item() < 1.17e-38
    _assert_codes_close(out[3], expected[3], "v codes")
    assert torch.equal(out[4], expected[4])
