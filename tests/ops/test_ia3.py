"""peftkern.ops.ia3_linear: every available face against the float64 reference, both placements
of the scale (output, feed-forward input), forward and every gradient."""
import pytest
import torch

from peftkern import backend
from peftkern.ops.ia3 import FACES, ia3_linear
from peftkern.reference.ia3 import ia3_linear as reference
from tests.helpers import RTOL, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RUNNABLE_FACES = [f for f in FACES if backend.why_unavailable(f, DEVICE) is None]

# (leading shape of x, in, out): round, odd, tiny, empty batch, 3-D and several N / K tiles
SHAPES = [((64,), 64, 64), ((37,), 45, 29), ((1,), 3, 2), ((0,), 16, 8), ((3,), 5, 0), ((2, 9), 150, 70)]


def _inputs(lead, k, n, dtype, feedforward, bias=True, scale_dtype=None):
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    scale = (1.0 + 0.5 * torch.randn(k if feedforward else n, device=DEVICE)).to(scale_dtype or dtype)
    return x, w, b, scale


def _run(face, x, w, b, scale, feedforward, dy, grad_weight=False, grad_x=True, grad_scale=True):
    x = x.detach().requires_grad_(grad_x)
    scale = scale.detach().requires_grad_(grad_scale)
    w = w.detach().requires_grad_(grad_weight)
    b = b.detach().requires_grad_(grad_weight) if b is not None else None
    with backend.use(face):
        y = ia3_linear(x, w, b, scale, feedforward)
    y.backward(dy)
    grads = {}
    if grad_x:
        grads["x"] = x.grad
    if grad_scale:
        grads["scale"] = scale.grad
    if grad_weight:
        grads["weight"] = w.grad
        if b is not None:
            grads["bias"] = b.grad
    return y.detach(), grads


def _reference(x, w, b, scale, feedforward, dy, dtype=torch.float64, grad_weight=False):
    x_ = x.detach().to(dtype).requires_grad_()
    s_ = scale.detach().to(dtype).requires_grad_()
    w_ = w.detach().to(dtype).requires_grad_(grad_weight)
    b_ = b.detach().to(dtype).requires_grad_(grad_weight) if b is not None else None
    y = reference(x_, w_, b_, s_, feedforward)
    y.backward(dy.to(dtype))
    grads = {"x": x_.grad, "scale": s_.grad}
    if grad_weight:
        grads["weight"] = w_.grad
        if b_ is not None:
            grads["bias"] = b_.grad
    return y.detach(), grads


def _compare(label, dtype, out, grads, ref, own, scale_dtype=None):
    (ref_out, ref_grads), (own_out, own_grads) = ref, own
    for name, actual, expected, mine in [("y", out, ref_out, own_out)] + [
            (k, grads[k], ref_grads[k], own_grads[k]) for k in grads]:
        assert actual.shape == expected.shape, f"{label} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        want = (scale_dtype or dtype) if name == "scale" else dtype
        assert actual.dtype == want, f"{label} {name}: dtype {actual.dtype} != {want}"
        err = rel_error(actual, expected)
        tol = max(RTOL[dtype], 2.0 * rel_error(mine, expected))
        assert err <= tol, f"{label} {name} ({dtype}): relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_forward_and_gradients_match_reference(face, feedforward, dtype, shape, seed):
    lead, k, n = shape
    x, w, b, scale = _inputs(lead, k, n, dtype, feedforward)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    out, grads = _run(face, x, w, b, scale, feedforward, dy)
    _compare(f"{face} ff={feedforward}", dtype, out, grads, _reference(x, w, b, scale, feedforward, dy),
             _reference(x, w, b, scale, feedforward, dy, dtype=dtype))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_weight_bias_gradients_and_an_fp32_scale_on_bf16(face, feedforward, seed):
    x, w, b, scale = _inputs((19,), 23, 17, torch.float32, feedforward)
    dy = torch.randn(19, 17, device=DEVICE)
    out, grads = _run(face, x, w, b, scale, feedforward, dy, grad_weight=True)
    _compare(face, torch.float32, out, grads, _reference(x, w, b, scale, feedforward, dy, grad_weight=True),
             _reference(x, w, b, scale, feedforward, dy, dtype=torch.float32, grad_weight=True))
    # PEFT keeps the vector in fp32 beside a 16-bit model: the scale's dtype may differ from x's
    x, w, b, scale = _inputs((7, 3), 40, 24, torch.bfloat16, feedforward, scale_dtype=torch.float32)
    dy = torch.randn(7, 3, 24, device=DEVICE, dtype=torch.bfloat16)
    out, grads = _run(face, x, w, b, scale, feedforward, dy)
    _compare(face, torch.bfloat16, out, grads, _reference(x, w, b, scale, feedforward, dy),
             _reference(x, w, b, scale, feedforward, dy, dtype=torch.bfloat16), scale_dtype=torch.float32)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_only_the_scale_or_only_x_needs_a_gradient(face, feedforward, seed):
    x, w, b, scale = _inputs((33,), 70, 90, torch.float32, feedforward)
    dy = torch.randn(33, 90, device=DEVICE)
    ref = _reference(x, w, b, scale, feedforward, dy)
    own = _reference(x, w, b, scale, feedforward, dy, dtype=torch.float32)
    for grad_x, grad_scale in ((False, True), (True, False)):
        out, grads = _run(face, x, w, b, scale, feedforward, dy, grad_x=grad_x, grad_scale=grad_scale)
        _compare(f"{face} x={grad_x}", torch.float32, out, grads, ref, own)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_non_contiguous_inputs_and_zero_entries_of_the_scale(face, feedforward, seed):
    """x and W as transposed views (GPT-2 Conv1D stores W [in, out]); a scale entry of exactly 0
    still gets its gradient (the unscaled output is kept, not recovered from y / l)."""
    k, n = 21, 13
    x = torch.randn(k, 30, device=DEVICE).t()
    w = (torch.randn(k, n, device=DEVICE) / k**0.5).t()
    scale = torch.randn(k if feedforward else n, device=DEVICE)
    scale[3] = 0.0
    dy = torch.randn(30, n, device=DEVICE)
    # Make the zeroed entry's gradient large by construction (a random one can be near 0 and then a
    # kernel that returns 0 there would pass): it is sum over rows of dy * (unscaled output) at entry 3.
    with torch.no_grad():
        if feedforward:
            x[:, 3] = (dy @ w)[:, 3]
        else:
            dy[:, 3] = (x @ w.t())[:, 3]
    out, grads = _run(face, x, w, None, scale, feedforward, dy)
    ref = _reference(x, w, None, scale, feedforward, dy)
    _compare(face, torch.float32, out, grads, ref, _reference(x, w, None, scale, feedforward, dy, torch.float32))
    assert ref[1]["scale"][3].abs() > 0.1 * ref[1]["scale"].abs().max()


def test_bad_input_is_named():
    x, w, b, scale = _inputs((4,), 8, 6, torch.float32, False)
    cases = [
        (dict(scale=torch.randn(8)), r"scale has shape \(8,\), expected \(6,\) \(\[out\]: scales the output\)"),
        (dict(scale=torch.randn(6), feedforward=True), r"scale has shape \(6,\), expected \(8,\) \(\[in\]"),
        (dict(scale=torch.randn(6, 1)), r"scale has shape \(6, 1\)"),
        (dict(x=torch.randn(4, 9)), r"x has 9 features"),
        (dict(bias=torch.randn(5)), r"bias has shape \(5,\)"),
        (dict(weight=w.half()), r"dtypes differ .* weight is torch.float16"),
        (dict(scale=torch.randint(0, 2, (6,))), r"scale has dtype torch.int64"),
        (dict(feedforward="no"), r"feedforward must be a bool"),
    ]
    for change, message in cases:
        args = dict(x=x, weight=w, bias=b, scale=scale, feedforward=False)
        args.update(change)
        with pytest.raises((ValueError, TypeError), match=message):
            ia3_linear(**args)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_opcheck(face, feedforward, seed):
    x, w, b, scale = _inputs((6,), 10, 7, torch.float32, feedforward)
    x.requires_grad_()
    scale.requires_grad_()
    torch.library.opcheck(torch.ops.peftkern.ia3_linear_fwd.default, (x, w, b, scale, feedforward, True, face))
    dy = torch.randn(6, 7, device=DEVICE)
    z = torch.randn(6, 7, device=DEVICE) if not feedforward else torch.empty(0, device=DEVICE)
    torch.library.opcheck(torch.ops.peftkern.ia3_linear_bwd.default,
                          (dy, x.detach(), z, w, scale.detach(), feedforward, True, True, face))


@pytest.mark.parametrize("feedforward", [False, True], ids=["out_scale", "in_scale"])
def test_compiles_without_graph_break(feedforward, seed):
    x, w, b, scale = _inputs((3, 5), 16, 8, torch.float32, feedforward)
    scale.requires_grad_()

    def step(x, scale):
        return ia3_linear(x, w, b, scale, feedforward).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, scale)
    loss.backward()
    s_ref = scale.detach().double().requires_grad_()
    reference(x.double(), w.double(), b.double(), s_ref, feedforward).square().mean().backward()
    assert rel_error(scale.grad, s_ref.grad) < 1e-5
