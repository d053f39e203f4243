"""peftkern.ops.lora_linear: every available face against the float64 reference."""
import contextlib

import pytest
import torch

from peftkern import backend
from peftkern.ops import lora_linear
from peftkern.ops.lora import FACES, dropout_keep_mask
from peftkern.reference.lora import lora_linear as reference
from tests.helpers import RTOL, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RUNNABLE_FACES = [f for f in FACES if backend.why_unavailable(f, DEVICE) is None]

# (leading shape of x, in, out, rank): round, odd, tiny, empty batch, rank beyond one 64-wide chunk
SHAPES = [
    ((64,), 64, 64, 16),
    ((37,), 45, 29, 5),
    ((1,), 3, 2, 1),
    ((0,), 16, 8, 4),
    ((2, 9), 70, 50, 130),
]


def _inputs(lead, k, n, r, dtype, bias=True):
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    a = (torch.randn(r, k, device=DEVICE) / k**0.5).to(dtype)
    bb = (torch.randn(n, r, device=DEVICE) / r**0.5).to(dtype)
    return x, w, b, a, bb


def _tolerance(dtype, own_error, face="torch"):
    """docs/ARCHITECTURE.md: the dtype's tolerance, or at most twice torch's own error in that dtype.
    Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: twice the bf16
    tolerance there (tiny shapes whose output cancels showed 1.8e-2 against 1.6e-2)."""
    interpreted_bf16 = face == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu"
    return max(RTOL[dtype] * (2.0 if interpreted_bf16 else 1.0), 2.0 * own_error)


def _run(face, x, w, b, a, bb, scaling, dropout_p, training, dy, grad_weight=False):
    x = x.detach().requires_grad_()
    a = a.detach().requires_grad_()
    bb = bb.detach().requires_grad_()
    w = w.detach().requires_grad_(grad_weight)
    b = b.detach().requires_grad_(grad_weight) if b is not None else None
    with backend.use(face):
        y = lora_linear(x, w, b, a, bb, scaling, dropout_p, training)
    y.backward(dy)
    grads = {"x": x.grad, "lora_A": a.grad, "lora_B": bb.grad}
    if grad_weight:
        grads["weight"] = w.grad
        if b is not None:
            grads["bias"] = b.grad
    return y.detach(), grads


def _reference(x, w, b, a, bb, scaling, dy, keep=None, dropout_p=0.0, dtype=torch.float64, grad_weight=False):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, bb)]
    w_ = w.detach().to(dtype).requires_grad_(grad_weight)
    b_ = b.detach().to(dtype).requires_grad_(grad_weight) if b is not None else None
    y = reference(leaves[0], w_, b_, leaves[1], leaves[2], scaling, keep, dropout_p)
    y.backward(dy.to(dtype))
    grads = {"x": leaves[0].grad, "lora_A": leaves[1].grad, "lora_B": leaves[2].grad}
    if grad_weight:
        grads["weight"] = w_.grad
        if b_ is not None:
            grads["bias"] = b_.grad
    return y.detach(), grads


def _compare(face, dtype, out, grads, ref_out, ref_grads, own_out, own_grads):
    for name, actual, expected, own in [("y", out, ref_out, own_out)] + [
            (k, grads[k], ref_grads[k], own_grads[k]) for k in ref_grads]:
        assert actual.shape == expected.shape, f"{face} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == dtype, f"{face} {name}: dtype {actual.dtype} != {dtype}"
        err = rel_error(actual, expected)
        tol = _tolerance(dtype, rel_error(own, expected), face)
        assert err <= tol, f"{face} {name} ({dtype}): relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_forward_and_gradients_match_reference(face, dtype, shape, seed):
    lead, k, n, r = shape
    x, w, b, a, bb = _inputs(lead, k, n, r, dtype)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    out, grads = _run(face, x, w, b, a, bb, 1.7, 0.0, True, dy)
    ref_out, ref_grads = _reference(x, w, b, a, bb, 1.7, dy)
    own_out, own_grads = _reference(x, w, b, a, bb, 1.7, dy, dtype=dtype)
    _compare(face, dtype, out, grads, ref_out, ref_grads, own_out, own_grads)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_replays_the_faces_mask(face, dtype, seed):
    """With dropout the face draws a seed from torch's generator and its mask from the seed;
    replaying that mask in the reference must give the same output and gradients (the mask itself
    is never stored)."""
    lead, k, n, r, p = (3, 11), 40, 24, 6, 0.3
    x, w, b, a, bb = _inputs(lead, k, n, r, dtype)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    rng_state = torch.random.get_rng_state()
    out, grads = _run(face, x, w, b, a, bb, 0.5, p, True, dy)
    torch.random.set_rng_state(rng_state)  # the same draw again, through the registered op, shows the seed
    drop_seed = torch.ops.peftkern.lora_linear_fwd(x.reshape(-1, k), w, b, a, bb, 0.5, p, face)[2]
    keep = dropout_keep_mask(drop_seed, (33, k), p).view(*lead, k)
    kept = keep.float().mean().item()
    assert 0.5 < kept < 0.9, f"keep fraction {kept:.2f} is far from 1 - p = {1 - p}"
    ref_out, ref_grads = _reference(x, w, b, a, bb, 0.5, dy, keep, p)
    own_out, own_grads = _reference(x, w, b, a, bb, 0.5, dy, keep, p, dtype=dtype)
    _compare(face, dtype, out, grads, ref_out, ref_grads, own_out, own_grads)


@pytest.mark.skipif("triton" not in RUNNABLE_FACES, reason="needs the Triton face")
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_faces_draw_the_same_mask(p):
    """The kernels' hash and the torch face's are one mask: same seed, same elements dropped."""
    for value in (0, 12345, 2**31 + 7, 2**62 + 3):
        seed_t = torch.tensor([value], dtype=torch.int64, device=DEVICE)
        kernels = dropout_keep_mask(seed_t, (70, 45), p, "triton")
        torch_face = dropout_keep_mask(seed_t, (70, 45), p, "torch")
        assert torch.equal(kernels, torch_face), value
        assert abs(torch_face.float().mean().item() - (1 - p)) < 0.05


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_dropout_is_off_in_eval(face, seed):
    x, w, b, a, bb = _inputs((5,), 12, 7, 3, torch.float32)
    with backend.use(face):
        train_off = lora_linear(x, w, b, a, bb, 2.0, 0.5, training=False)
    torch.testing.assert_close(train_off, reference(x, w, b, a, bb, 2.0))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_weight_and_bias_gradients_when_they_require_grad(face, seed):
    x, w, b, a, bb = _inputs((19,), 23, 17, 4, torch.float32)
    dy = torch.randn(19, 17, device=DEVICE)
    out, grads = _run(face, x, w, b, a, bb, 0.9, 0.0, True, dy, grad_weight=True)
    ref_out, ref_grads = _reference(x, w, b, a, bb, 0.9, dy, grad_weight=True)
    own_out, own_grads = _reference(x, w, b, a, bb, 0.9, dy, dtype=torch.float32, grad_weight=True)
    _compare(face, torch.float32, out, grads, ref_out, ref_grads, own_out, own_grads)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_non_contiguous_inputs(face, seed):
    """x as a transposed view, W as a transposed view (GPT-2 Conv1D stores W as [in, out])."""
    k, n, r = 21, 13, 3
    x = torch.randn(k, 30, device=DEVICE).t()  # [30, k], strides (1, 30)
    w = (torch.randn(k, n, device=DEVICE) / k**0.5).t()  # [n, k] view of an [in, out] buffer
    a = torch.randn(r, k, device=DEVICE) / k**0.5
    bb = torch.randn(n, r, device=DEVICE)
    dy = torch.randn(30, n, device=DEVICE)
    assert not x.is_contiguous() and not w.is_contiguous()
    out, grads = _run(face, x, w, None, a, bb, 1.3, 0.0, True, dy)
    ref_out, ref_grads = _reference(x, w, None, a, bb, 1.3, dy)
    own_out, own_grads = _reference(x, w, None, a, bb, 1.3, dy, dtype=torch.float32)
    _compare(face, torch.float32, out, grads, ref_out, ref_grads, own_out, own_grads)


def test_input_without_grad_still_trains_the_adapter(seed):
    """The first layer's input needs no gradient: dA and dB must still come out right."""
    for face in RUNNABLE_FACES:
        x, w, b, a, bb = _inputs((9,), 10, 6, 2, torch.float32)
        a.requires_grad_()
        bb.requires_grad_()
        with backend.use(face):
            lora_linear(x, w, b, a, bb, 1.0).square().sum().backward()
        a_ref = a.detach().double().requires_grad_()
        b_ref = bb.detach().double().requires_grad_()
        reference(x.double(), w.double(), b.double(), a_ref, b_ref, 1.0).square().sum().backward()
        assert rel_error(a.grad, a_ref.grad) < 1e-5 and rel_error(bb.grad, b_ref.grad) < 1e-5, face


# ---- bad input -------------------------------------------------------------------------------

def _good():
    return _inputs((4,), 8, 6, 2, torch.float32)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(x=torch.randn(4, 9)), r"x has 9 features .* expects in=8"),
    (lambda t: t.update(lora_A=torch.randn(2, 7)), r"lora_A has shape \(2, 7\), expected \(2, 8\)"),
    (lambda t: t.update(lora_B=torch.randn(6, 3)), r"lora_B has shape \(6, 3\), expected \(6, 2\)"),
    (lambda t: t.update(bias=torch.randn(5)), r"bias has shape \(5,\), expected \(6,\)"),
    (lambda t: t.update(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), r"rank r >= 1"),
    (lambda t: t.update(weight=torch.randn(6, 8, dtype=torch.float64)), r"weight has dtype torch.float64"),
    (lambda t: t.update(lora_B=torch.randn(6, 2, dtype=torch.float16)), r"dtypes differ .* lora_B is torch.float16"),
    (lambda t: t.update(weight=torch.randn(6, 8, device="meta")), r"different devices"),
    (lambda t: t.update(scaling=float("nan")), r"scaling must be finite"),
    (lambda t: t.update(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    (lambda t: t.update(x=torch.randint(0, 3, (4, 8))), r"x has dtype torch.int64"),
])
def test_bad_input_is_named(mutate, message):
    x, w, b, a, bb = _good()
    args = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb, "scaling": 1.0, "dropout_p": 0.0}
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        lora_linear(**args)


def test_unavailable_face_says_why():
    x, w, b, a, bb = _good()
    with backend.use("cuda"), pytest.raises(backend.BackendUnavailable, match="has no 'cuda' face"):
        lora_linear(x, w, b, a, bb, 1.0)


# ---- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_opcheck(face, seed):
    x, w, b, a, bb = _inputs((6,), 10, 7, 3, torch.float32)
    a.requires_grad_()
    bb.requires_grad_()
    x.requires_grad_()
    seed_t = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.peftkern.lora_linear_fwd.default, (x, w, b, a, bb, 1.5, 0.0, face))
    dy = torch.randn(6, 7, device=DEVICE)
    u = torch.randn(6, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.peftkern.lora_linear_bwd.default,
                          (dy, x.detach(), w, a.detach(), bb.detach(), u, 1.5, 0.0, seed_t, face, True))


def test_compiles_without_graph_break(seed):
    x, w, b, a, bb = _inputs((3, 5), 16, 8, 4, torch.float32)
    a.requires_grad_()
    bb.requires_grad_()

    def step(x, a, bb):
        return lora_linear(x, w, b, a, bb, 2.0, 0.1, True).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, a, bb)
    loss.backward()
    assert torch.isfinite(loss) and a.grad is not None and bb.grad is not None
    eager = reference(x, w, b, a, bb, 2.0)  # dropout differs; the no-dropout path must agree exactly
    compiled_eval = torch.compile(lambda x: lora_linear(x, w, b, a, bb, 2.0), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled_eval(x), eager.detach(), rtol=1e-5, atol=1e-5)


# ---- forward-mode AD and torch.func (issue 28, item 9) ------------------------------------------

def _f64(*ts):
    return tuple(t.detach().double() if t is not None else None for t in ts)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_mode_ad_matches_reference(face, dropout_p, seed):
    """jvp through every differentiable argument, with the op's own dropout mask (tangents used to
    come back as zeros)."""
    x, w, b, a, bb = _inputs((7,), 12, 9, 3, torch.float32)
    tx, tw, tb, ta, tbb = (torch.randn_like(t) for t in (x, w, b, a, bb))
    rng_state = torch.random.get_rng_state()
    with backend.use(face):
        y, dy = torch.func.jvp(lambda *p: lora_linear(*p, 0.8, dropout_p, True), (x, w, b, a, bb),
                               (tx, tw, tb, ta, tbb))
    keep = None
    if dropout_p:
        torch.random.set_rng_state(rng_state)
        drop_seed = torch.ops.peftkern.lora_linear_fwd(x, w, b, a, bb, 0.8, dropout_p, face)[2]
        keep = dropout_keep_mask(drop_seed, x.shape, dropout_p)
    y_ref, dy_ref = torch.func.jvp(lambda *p: reference(*p, 0.8, keep, dropout_p), _f64(x, w, b, a, bb),
                                   _f64(tx, tw, tb, ta, tbb))
    assert rel_error(y, y_ref) < 1e-5
    assert dy.abs().sum() > 0 and rel_error(dy, dy_ref) < 1e-5


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_forward_ad_api_and_jacfwd(face, seed):
    import torch.autograd.forward_ad as fwAD

    x, w, b, a, bb = _inputs((4,), 6, 5, 2, torch.float32)
    tx = torch.randn_like(x)
    with backend.use(face):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(lora_linear(fwAD.make_dual(x, tx), w, b, a, bb, 1.3)).tangent
        jac = torch.func.jacfwd(lambda x: lora_linear(x, w, b, a, bb, 1.3))(x)
    _, expected = torch.func.jvp(lambda x: reference(x, *_f64(w, b, a, bb), 1.3), _f64(x), _f64(tx))
    assert tangent is not None and rel_error(tangent, expected) < 1e-5
    jac_ref = torch.func.jacfwd(lambda x: reference(x, *_f64(w, b, a, bb), 1.3))(x.double())
    assert rel_error(jac, jac_ref) < 1e-5


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_functorch_reverse_transforms(face, seed):
    """torch.func.grad and jacrev used to fail with an error about setup_context from torch's internals."""
    x, w, b, a, bb = _inputs((3,), 5, 4, 2, torch.float32)
    with backend.use(face):
        grads = torch.func.grad(lambda a, bb: lora_linear(x, w, b, a, bb, 0.7).square().sum(), argnums=(0, 1))(a, bb)
        jac = torch.func.jacrev(lambda x: lora_linear(x, w, b, a, bb, 0.7))(x)
    expected = torch.func.grad(lambda a, bb: reference(*_f64(x, w, b), a, bb, 0.7).square().sum(),
                               argnums=(0, 1))(*_f64(a, bb))
    for got, want in zip(grads, expected):
        assert rel_error(got, want) < 1e-5
    assert rel_error(jac, torch.func.jacrev(lambda x: reference(x, *_f64(w, b, a, bb), 0.7))(x.double())) < 1e-5


# ---- autocast (issue 28, item 14) ---------------------------------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_autocast_casts_the_inputs_as_linear_does(face, seed):
    x, w, b, a, bb = _inputs((6,), 16, 8, 4, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    with backend.use(face), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 2.0)
        linear = torch.nn.functional.linear(x, w, b)
    assert y.dtype == linear.dtype == torch.bfloat16
    expected = reference(*[t.to(torch.bfloat16).double() for t in (x, w, b, a, bb)], 2.0)
    assert rel_error(y, expected) < RTOL[torch.bfloat16]
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32


# ---- torch.compile with dynamic shapes (issue 28, item 15) --------------------------------------

def test_compiles_with_dynamic_shapes_and_a_traced_scaling(seed):
    x, w, b, a, bb = _inputs((5, 3), 16, 8, 4, torch.float32)
    a.requires_grad_()

    def step(x, scaling):
        return lora_linear(x, w, b, a, bb, scaling)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for lead, scaling in (((5, 3), 2.0), ((7,), 0.5), ((2, 2, 2), 1.25)):
        x = torch.randn(*lead, 16)
        y = compiled(x, scaling)
        torch.testing.assert_close(y, reference(x, w, b, a, bb, scaling), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert a.grad is not None


# ---- 16-bit range and argument types (issue 28, item 18) ----------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_fp16_rank_r_activation_holds_where_the_scaled_one_would_overflow(face, seed):
    """|s x A^T| > 65504 >= |x A^T|: the Triton face used to keep u = s x A^T in fp16 (inf), while
    the torch face keeps u unscaled; both must give the finite reference."""
    k, n, r, s = 16, 8, 2, 8.0
    x = torch.full((3, k), 60.0, dtype=torch.float16)
    w = torch.zeros(n, k, dtype=torch.float16)
    a = torch.full((r, k), 40.0, dtype=torch.float16)  # x A^T = 38400: fits; s x A^T = 307200 does not
    bb = torch.full((n, r), 1e-2, dtype=torch.float16)
    with backend.use(face):
        y = lora_linear(x, w, None, a, bb, s)
    expected = reference(*_f64(x, w), None, *_f64(a, bb), s)
    assert torch.isfinite(y).all() and rel_error(y, expected) < RTOL[torch.float16]


@pytest.mark.parametrize("bad, error", [("2", TypeError), (True, TypeError), (None, TypeError),
                                        (float("inf"), ValueError), (torch.ones(2), TypeError)])
def test_scaling_must_be_a_real_number(bad, error):
    x, w, b, a, bb = _good()
    with pytest.raises(error, match="scaling"):
        lora_linear(x, w, b, a, bb, bad)
    with pytest.raises(error, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, bad)


# ---- launches on the tensors' own device (issue 25, item 5) -------------------------------------

def test_device_guard_takes_tensors_and_device_objects():
    from peftkern.ops.launch import device_guard

    guard = device_guard(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert device_guard("cuda:3").idx == 3
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(device_guard(torch.zeros(1, device="meta")), contextlib.nullcontext)


@pytest.mark.skipif("triton" not in RUNNABLE_FACES, reason="needs the Triton face")
def test_every_triton_launch_enters_the_inputs_device(monkeypatch, seed):
    from peftkern.ops import dora, launch, lora, nf4
    from peftkern.quant import quantize_nf4

    entered = []

    def recording_guard(where):
        entered.append(torch.device(where.device if isinstance(where, torch.Tensor) else where))
        return launch.device_guard(where)

    for module in (lora, dora, nf4):
        monkeypatch.setattr(module, "device_guard", recording_guard)
    x, w, b, a, bb = _inputs((20,), 32, 16, 4, torch.float32)
    x.requires_grad_()
    with backend.use("triton"):
        lora_linear(x, w, b, a, bb, 1.0).sum().backward()
        assert len(entered) == 2  # forward and backward launches
        dora.dora_linear(x, w, b, a, bb, torch.rand(16) + 0.5, 1.0).sum().backward()
        assert len(entered) == 4
        nf4.nf4_linear(x, quantize_nf4(w), b, a, bb, 1.0).sum().backward()
        assert len(entered) == 6
    assert all(d == x.device for d in entered)


# ---- torch >= 2.9's fp32 precision API (issue 25, item 1) ----------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_fp32_after_the_new_precision_api_is_set(face, setting, seed):
    """Reading torch.backends.cuda.matmul.allow_tf32 raises once fp32_precision was set: the Triton
    face used to read it on every fp32 call."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = setting
        x, w, b, a, bb = _inputs((9,), 20, 12, 3, torch.float32)
        with backend.use(face):
            y = lora_linear(x, w, b, a, bb, 1.5)
    finally:
        matmul.fp32_precision = before
    assert rel_error(y, reference(*_f64(x, w, b, a, bb), 1.5)) < (1e-3 if setting == "tf32" else 1e-5)


def test_lora_module_compiles_with_dynamic_shapes(seed):
    from peftkern.nn import LoRALinear

    layer = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for lead in ((3,), (5, 2), (11,)):
        x = torch.randn(*lead, 16)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    compiled(torch.randn(6, 16)).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("scaling", [0.0, 1e-30, 3e25, -0.75])
def test_any_finite_scaling(face, scaling, seed):
    """The kernels apply s as (acc / s + u B^T) * s; scalings outside [2^-64, 2^64] (and 0) take
    the torch path, and every finite one gives the reference."""
    x, w, b, a, bb = _inputs((10,), 12, 7, 3, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    dy = torch.randn(10, 7)
    with backend.use(face):
        y = lora_linear(x, w, b, a, bb, scaling)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, a)]
    y_ref = reference(leaves[0], *_f64(w, b), leaves[1], bb.double(), scaling)
    y_ref.backward(dy.double())
    assert rel_error(y, y_ref) < 1e-5 and rel_error(x.grad, leaves[0].grad) < 1e-5
    assert rel_error(a.grad, leaves[1].grad) < 1e-5 or scaling == 0.0 and not a.grad.any()
