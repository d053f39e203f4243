"""The anchored penalty (EWC / L2-SP) folded into the AdamW step: every face against the reference,
32- and 8-bit states, F = 1, fp32 F and 8-bit F; bad inputs."""
import pytest
import torch

from peftkern import backend
from peftkern.ops import adamw as ops
from peftkern.reference import adamw as ref
from tests.helpers import rel_error
from tests.ops.test_adamw import (DEVICE, DTYPES, HYPER, RUNNABLE_FACES, _assert_states_close, _check_8bit, _inputs,
                                  _param_tol, _quantized_states)

SIZES = [1, 257, 773, 1024]
MODES = ["l2sp", "fisher32", "fisher8"]
LAM = 0.7


def penalty_inputs(p0: torch.Tensor, mode: str):
    """(anchor near p0 in p0's dtype, F as the op takes it, F for the reference)."""
    n = p0.numel()
    anchor = (p0.float() + 0.3 * torch.randn(n, device=p0.device)).to(p0.dtype)
    if mode == "l2sp":
        return anchor, None, None
    # a Fisher spans decades: squared gradients of rarely and often used parameters
    f = torch.exp(torch.empty(n, device=p0.device).uniform_(-12.0, 1.0))
    if mode == "fisher32":
        return anchor, f, f
    codes, absmax = ref.quantize_blockwise(f, ref.dynamic_map(False, p0.device))
    return anchor, (codes, absmax), (codes, absmax)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw32_penalty_matches_reference(face, mode, dtype, n, seed):
    p0, g, m0, v0 = _inputs(n, dtype)
    anchor, fisher, fisher_ref = penalty_inputs(p0, mode)
    p_ref, m_ref, v_ref = ref.adamw_update(p0, g, m0, v0, 6, compute_dtype=torch.float64, anchor=anchor,
                                           fisher=fisher_ref, penalty=LAM, **HYPER)
    p, m, v = p0.clone(), m0.clone(), v0.clone()
    with backend.use(face):
        ops.adamw_step(p, g, m, v, step=6, anchor=anchor, fisher=fisher, penalty=LAM, **HYPER)
    _assert_states_close(m, m_ref)
    _assert_states_close(v, v_ref)
    assert rel_error(p, p_ref.to(dtype)) <= _param_tol(dtype), f"seed {seed}"


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_adamw8bit_penalty_matches_reference(face, mode, dtype, n, seed):
    p0, g, _, _ = _inputs(n, dtype)
    anchor, fisher, fisher_ref = penalty_inputs(p0, mode)
    states = _quantized_states(n)
    expected = ref.adamw8bit_update(p0, g, *states, 4, anchor=anchor, fisher=fisher_ref, penalty=LAM, **HYPER)
    out = [p0.clone()] + [t.clone() for t in states]
    with backend.use(face):
        ops.adamw8bit_step(out[0], g, *out[1:], step=4, anchor=anchor, fisher=fisher, penalty=LAM, **HYPER)
    _check_8bit(out, expected, dtype)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_penalty_moves_the_step_as_its_gradient_says(face, seed):
    """A zero loss gradient: the step follows lam * F * (p - anchor) alone, towards the anchor."""
    n = 300
    p0 = torch.randn(n, device=DEVICE)
    anchor = torch.zeros(n, device=DEVICE)
    m, v = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    p = p0.clone()
    with backend.use(face):
        ops.adamw_step(p, torch.zeros_like(p), m, v, step=1, lr=1e-2, anchor=anchor, penalty=2.0)
    torch.testing.assert_close(m, 0.1 * 2.0 * p0)  # (1 - beta1) * g
    assert bool(((p0 - p) * p0 > 0).all())  # every element moved towards 0


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_zero_lambda_is_the_plain_step(face, seed):
    n = 513
    p0, g, m0, v0 = _inputs(n, torch.float32)
    anchor, fisher, _ = penalty_inputs(p0, "fisher32")
    a, b = [p0.clone(), m0.clone(), v0.clone()], [p0.clone(), m0.clone(), v0.clone()]
    with backend.use(face):
        ops.adamw_step(a[0], g, a[1], a[2], step=2, anchor=anchor, fisher=fisher, penalty=0.0, **HYPER)
        ops.adamw_step(b[0], g, b[1], b[2], step=2, **HYPER)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("face", [f for f in ops.FACES])
def test_opcheck_with_penalty(face):
    if backend.why_unavailable(face, DEVICE) is not None:
        pytest.skip(backend.why_unavailable(face, DEVICE))
    n = 300
    p, g, m, v = _inputs(n, torch.float32)
    anchor, (codes, absmax), _ = penalty_inputs(p, "fisher8")
    f = torch.rand(n, device=DEVICE)
    torch.library.opcheck(torch.ops.peftkern.adamw_step.default,
                          (p, g, m, v, 2, 1e-3, 0.9, 0.999, 1e-8, 0.01, face, anchor, f, None, 0.5))
    mq, ma, vq, va = _quantized_states(n)
    torch.library.opcheck(torch.ops.peftkern.adamw8bit_step.default,
                          (p, g, mq, ma, vq, va, 2, 1e-3, 0.9, 0.999, 1e-8, 0.01, face, anchor, codes, absmax, 0.5))


def test_bad_penalty_inputs_raise_naming_them():
    p, g, m, v = _inputs(10, torch.float32)
    anchor = p.clone()
    with pytest.raises(ValueError, match="penalty .* must be >= 0, got -0.5"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor, penalty=-0.5)
    with pytest.raises(ValueError, match="penalty must be finite"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor, penalty=float("inf"))
    with pytest.raises(ValueError, match="Fisher was given without an anchor"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, fisher=torch.ones(10), penalty=1.0)
    with pytest.raises(TypeError, match="anchor has dtype torch.float16 but param has torch.float32"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor.half(), penalty=1.0)
    with pytest.raises(ValueError, match="anchor has shape \\(9,\\)"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor[:9], penalty=1.0)
    with pytest.raises(ValueError, match="fisher must be contiguous with 10 elements"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor, fisher=torch.ones(11), penalty=1.0)
    with pytest.raises(TypeError, match="fisher has dtype torch.float64"):
        ops.adamw_step(p, g, m, v, step=1, lr=1e-3, anchor=anchor, fisher=torch.ones(10, dtype=torch.float64),
                       penalty=1.0)
    mq, ma, vq, va = _quantized_states(10)
    with pytest.raises(ValueError, match="fisher absmax must be contiguous with 1 elements"):
        ops.adamw8bit_step(p, g, mq, ma, vq, va, step=1, lr=1e-3, anchor=anchor,
                           fisher=(torch.zeros(10, dtype=torch.uint8), torch.ones(3)), penalty=1.0)
    with pytest.raises(ValueError, match="pair \\(codes uint8, absmax fp32\\)"):
        ops.adamw8bit_step(p, g, mq, ma, vq, va, step=1, lr=1e-3, anchor=anchor, fisher=(torch.ones(10),),
                           penalty=1.0)
