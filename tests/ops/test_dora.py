"""peftkern.ops.dora_linear: every available face against the float64 reference (materializing
W + s B A), forward and every gradient; the factored row norm against the materialized one."""
import pytest
import torch

from peftkern import backend
from peftkern.ops.dora import (FACES, dora_from_base, dora_linear, dora_row_norm, dora_row_norm_from_rows,
                               weight_row_sq_norm)
from peftkern.ops.lora import dropout_keep_mask
from peftkern.reference.dora import dora_linear as reference
from peftkern.reference.dora import dora_weight_norm
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
NAMES = ("x", "lora_A", "lora_B", "magnitude", "bias")


def _inputs(lead, k, n, r, dtype, bias=True):
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    a = (torch.randn(r, k, device=DEVICE) / k**0.5).to(dtype)
    bb = (torch.randn(n, r, device=DEVICE) / r**0.5).to(dtype)
    m = torch.rand(n, device=DEVICE) + 0.5  # fp32 magnitude, as a trained adapter keeps it
    return x, w, b, a, bb, m


def _run(face, x, w, b, a, bb, m, scaling, dy, dropout_p=0.0, training=True, wsq=None):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, a, bb, m, b)]
    with backend.use(face):
        y = dora_linear(leaves[0], w, leaves[4], leaves[1], leaves[2], leaves[3], scaling, dropout_p, training, wsq)
    y.backward(dy)
    return y.detach(), {n: t.grad for n, t in zip(NAMES, leaves) if t is not None}


def _reference(x, w, b, a, bb, m, scaling, dy, keep=None, dropout_p=0.0, dtype=torch.float64):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, a, bb, m, b)]
    y = reference(leaves[0], w.to(dtype), leaves[4], leaves[1], leaves[2], leaves[3], scaling, keep, dropout_p)
    y.backward(dy.to(dtype))
    return y.detach(), {n: t.grad for n, t in zip(NAMES, leaves) if t is not None}


def _compare(face, dtype, out, grads, ref, own):
    (ref_out, ref_grads), (own_out, own_grads) = ref, own
    for name, actual, expected, own_t in [("y", out, ref_out, own_out)] + [
            (k, grads[k], ref_grads[k], own_grads[k]) for k in ref_grads]:
        assert actual.shape == expected.shape, f"{face} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        err = rel_error(actual, expected)
        # dm reads the pre-scale output back from the stored (rounded) output: one rounding more
        # than torch's own chain, which shows when a row has a single token.
        factor = 3.0 if name == "magnitude" else 2.0
        # The factored norm ||W||^2 + 2s<W, BA> + s^2||BA||^2 cancels where the plain one does not:
        # on tiny rows (K = 3, r = 1) fp32 loses a few more bits than 1e-5 allows (seen: 1.5e-5).
        floor = 5e-5 if dtype == torch.float32 else RTOL[dtype]
        tol = max(floor, factor * rel_error(own_t, expected))
        assert err <= tol, f"{face} {name} ({dtype}): relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0] + s[1:])))
def test_forward_and_gradients_match_reference(face, dtype, shape, seed):
    lead, k, n, r = shape
    x, w, b, a, bb, m = _inputs(lead, k, n, r, dtype)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    out, grads = _run(face, x, w, b, a, bb, m, 1.7, dy)
    assert out.dtype == dtype and grads["magnitude"].dtype == m.dtype
    _compare(face, dtype, out, grads, _reference(x, w, b, a, bb, m, 1.7, dy),
             _reference(x, w, b, a, bb, m, 1.7, dy, dtype=dtype))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_without_bias_and_with_cached_weight_norm(face, dtype, seed):
    x, w, _, a, bb, m = _inputs((23,), 33, 18, 3, dtype, bias=False)
    m = m.to(dtype)
    dy = torch.randn(23, 18, device=DEVICE, dtype=dtype)
    out, grads = _run(face, x, w, None, a, bb, m, 0.6, dy, wsq=weight_row_sq_norm(w))
    _compare(face, dtype, out, grads, _reference(x, w, None, a, bb, m, 0.6, dy),
             _reference(x, w, None, a, bb, m, 0.6, dy, dtype=dtype))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dropout_replays_the_faces_mask(face, dtype, seed):
    """Dropout on the LoRA branch only, its mask drawn in the face from a seed: replaying that mask
    in the reference gives the same output and gradients."""
    lead, k, n, r, p = (3, 11), 40, 24, 6, 0.3
    x, w, b, a, bb, m = _inputs(lead, k, n, r, dtype)
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    rng_state = torch.random.get_rng_state()
    out, grads = _run(face, x, w, b, a, bb, m, 0.5, dy, dropout_p=p)
    torch.random.set_rng_state(rng_state)  # the same draw again, through the registered op, shows the seed
    drop_seed = torch.ops.peftkern.dora_linear_fwd(x.reshape(-1, k), w, b, a, bb, m, None, 0.5, p, face)[4]
    keep = dropout_keep_mask(drop_seed, (33, k), p).view(*lead, k)
    assert 0.5 < keep.float().mean().item() < 0.9
    _compare(face, dtype, out, grads, _reference(x, w, b, a, bb, m, 0.5, dy, keep, p),
             _reference(x, w, b, a, bb, m, 0.5, dy, keep, p, dtype=dtype))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_dropout_is_off_in_eval(face, seed):
    x, w, b, a, bb, m = _inputs((5,), 12, 7, 3, torch.float32)
    with backend.use(face):
        y = dora_linear(x, w, b, a, bb, m, 2.0, 0.5, training=False)
    torch.testing.assert_close(y, reference(x, w, b, a, bb, m, 2.0))


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_weight_gradient_and_transposed_views(face, seed):
    """W as a transposed view (GPT-2 Conv1D's [in, out] buffer) that requires grad; x transposed."""
    k, n, r = 21, 13, 3
    x = torch.randn(k, 30, device=DEVICE).t()
    w = (torch.randn(k, n, device=DEVICE) / k**0.5).t().requires_grad_()
    a = (torch.randn(r, k, device=DEVICE) / k**0.5).requires_grad_()
    bb = torch.randn(n, r, device=DEVICE).requires_grad_()
    m = (torch.rand(n, device=DEVICE) + 0.5).requires_grad_()
    with backend.use(face):
        dora_linear(x, w, None, a, bb, m, 1.3).square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (w, a, bb, m)]
    reference(x.double(), leaves[0], None, *leaves[1:3], leaves[3], 1.3).square().sum().backward()
    for name, ours, ref in zip(("weight", "lora_A", "lora_B", "magnitude"), (w, a, bb, m), leaves):
        assert rel_error(ours.grad, ref.grad) < 1e-5, name


# ---- the factored row norm -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 64, 16), (29, 45, 5), (50, 70, 130)], ids=str)
def test_factored_norm_matches_materialized(dtype, shape, seed):
    n, k, r = shape
    _, w, _, a, bb, _ = _inputs((1,), k, n, r, dtype)
    expected = dora_weight_norm(w.double(), a.double(), bb.double(), 0.8)
    own = dora_weight_norm(w, a, bb, 0.8)  # torch's own error, materializing in this dtype
    tol = max(RTOL[dtype], 2.0 * rel_error(own, expected))
    assert rel_error(dora_row_norm(w, a, bb, 0.8), expected) <= tol
    chunked = dora_row_norm_from_rows(lambda i, j: w[i:j], n, a.float(), bb.float(), 0.8, chunk_rows=7)
    assert rel_error(chunked, expected) <= tol


def test_factored_norm_when_the_adapter_nearly_cancels_w(seed):
    """W + s B A ~35x smaller than W: the factored sum subtracts terms ~1000x its size and loses
    that many ulps of fp32 (the documented price of never materializing W + s B A)."""
    n, k, r = 16, 32, 16
    bb = torch.randn(n, r, device=DEVICE)
    a = torch.randn(r, k, device=DEVICE)
    w = -(bb @ a) + 1e-1 * torch.randn(n, k, device=DEVICE)
    expected = dora_weight_norm(w.double(), a.double(), bb.double(), 1.0)
    assert rel_error(dora_row_norm(w, a, bb, 1.0), expected) < 1e-3


# ---- composed path (a base computed elsewhere, e.g. NF4) -------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_dora_from_base_matches_reference(dropout_p, seed):
    x, w, b, a, bb, m = _inputs((4, 5), 19, 11, 3, torch.float32)
    x.requires_grad_()
    leaves = [t.detach().requires_grad_() for t in (a, bb, m, b)]
    norm = dora_weight_norm(w, a, bb, 0.7)
    rng_state = torch.random.get_rng_state()
    base = x @ w.t()
    y = dora_from_base(base, x, leaves[3], leaves[0], leaves[1], leaves[2], norm, 0.7, dropout_p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    keep = None
    if dropout_p:
        torch.random.set_rng_state(rng_state)
        drop_seed = torch.empty(1, dtype=torch.int64).random_()  # the draw dora_from_base made
        keep = dropout_keep_mask(drop_seed, (20, 19), dropout_p).view(4, 5, 19)
    ref_x = x.detach().double().requires_grad_()
    ref = [t.detach().double().requires_grad_() for t in (a, bb, m, b)]
    y_ref = reference(ref_x, w.double(), ref[3], ref[0], ref[1], ref[2], 0.7, keep, dropout_p)
    y_ref.backward(dy.double())
    assert rel_error(y, y_ref) < 1e-5
    assert rel_error(x.grad, ref_x.grad) < 1e-5
    for name, ours, theirs in zip(("lora_A", "lora_B", "magnitude", "bias"), leaves, ref):
        assert rel_error(ours.grad, theirs.grad) < 1e-5, name


def test_zero_magnitude_entry_gives_finite_gradients():
    """A magnitude entry of exactly 0 erases the pre-scale output from y: its gradient is 0 and
    every other gradient stays right (documented limitation)."""
    torch.manual_seed(0)
    x, w, b, a, bb, m = _inputs((7,), 9, 5, 2, torch.float32)
    m[2] = 0.0
    dy = torch.randn(7, 5)
    for face in RUNNABLE_FACES:
        out, grads = _run(face, x, w, b, a, bb, m, 1.0, dy)
        _, ref_grads = _reference(x, w, b, a, bb, m, 1.0, dy)
        assert grads["magnitude"][2] == 0.0
        keep = torch.arange(5) != 2
        assert rel_error(grads["magnitude"][keep], ref_grads["magnitude"][keep]) < 1e-5
        assert rel_error(grads["lora_A"], ref_grads["lora_A"]) < 1e-5


# ---- bad input -------------------------------------------------------------------------------

def _good():
    x, w, b, a, bb, m = _inputs((4,), 8, 6, 2, torch.float32)
    return {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb, "magnitude": m, "scaling": 1.0,
            "dropout_p": 0.0}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(x=torch.randn(4, 9)), r"x has 9 features"),
    (lambda t: t.update(lora_A=torch.randn(2, 7)), r"lora_A has shape \(2, 7\), expected \(2, 8\)"),
    (lambda t: t.update(lora_B=torch.randn(6, 3)), r"lora_B has shape \(6, 3\), expected \(6, 2\)"),
    (lambda t: t.update(magnitude=torch.randn(5)), r"magnitude has shape \(5,\), expected \(6,\)"),
    (lambda t: t.update(magnitude=torch.ones(6, dtype=torch.int64)), r"magnitude has dtype torch.int64"),
    (lambda t: t.update(bias=torch.randn(5)), r"bias has shape \(5,\), expected \(6,\)"),
    (lambda t: t.update(weight=torch.randn(6, 8, dtype=torch.float16)), r"dtypes differ .* weight is torch.float16"),
    (lambda t: t.update(magnitude=torch.randn(6, device="meta")), r"different devices"),
    (lambda t: t.update(scaling=float("inf")), r"scaling must be finite"),
    (lambda t: t.update(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    (lambda t: t.update(weight_sq_norm=torch.ones(6, dtype=torch.float16)), r"weight_sq_norm has dtype"),
    (lambda t: t.update(weight_sq_norm=torch.ones(5)), r"weight_sq_norm has shape \(5,\)"),
])
def test_bad_input_is_named(mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        dora_linear(**args)


def test_unavailable_face_says_why():
    with backend.use("cuda"), pytest.raises(backend.BackendUnavailable, match="has no 'cuda' face"):
        dora_linear(**_good())


# ---- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_opcheck(face, seed):
    x, w, b, a, bb, m = _inputs((6,), 10, 7, 3, torch.float32)
    for t in (a, bb, m):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.peftkern.dora_linear_fwd, (x, w, b, a, bb, m, None, 1.5, 0.0, face))


def test_opcheck_from_base(seed):
    x, w, b, a, bb, m = _inputs((6,), 10, 7, 3, torch.float32)
    for t in (a, bb, m):
        t.requires_grad_()
    base = (x @ w.t()).requires_grad_()
    norm = dora_weight_norm(w, a, bb, 1.5).detach()
    seed_t = torch.zeros(1, dtype=torch.int64)
    torch.library.opcheck(torch.ops.peftkern.dora_from_base_fwd, (base, x, b, a, bb, m, norm, 1.5, 0.0, seed_t))


def test_dora_from_base_with_dropout_never_syncs_with_the_host(seed, monkeypatch):
    """The dropout mask is drawn on the tensors' device from a seed tensor: no .item() (a host
    sync per call on a GPU) in the forward or the backward (issue 25, item 6)."""
    x, w, b, a, bb, m = _inputs((4, 5), 19, 11, 3, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, a, bb, m)]
    norm = dora_weight_norm(w, a, bb, 0.7)
    calls = []
    original = torch.Tensor.item

    def item(self):
        calls.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    y = dora_from_base(leaves[0] @ w.t(), leaves[0], b, leaves[1], leaves[2], leaves[3], norm, 0.7, 0.25,
                       training=True)
    y.square().sum().backward()
    assert not calls, f".item() called on {calls}"


# ---- forward-mode AD, autocast, argument types (issue 28, items 9, 14, 18) ----------------------

def _f64(*ts):
    return tuple(t.detach().double() if t is not None else None for t in ts)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_forward_mode_ad_matches_reference(face, seed):
    x, w, b, a, bb, m = _inputs((7,), 12, 9, 3, torch.float32)
    primals = (x, w, b, a, bb, m)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with backend.use(face):
        y, dy = torch.func.jvp(lambda *p: dora_linear(*p, 0.8), primals, tangents)
        jac = torch.func.jacrev(lambda m: dora_linear(x, w, b, a, bb, m, 0.8))(m)
    y_ref, dy_ref = torch.func.jvp(lambda *p: reference(*p, 0.8), _f64(*primals), _f64(*tangents))
    assert rel_error(y, y_ref) < 5e-5 and dy.abs().sum() > 0 and rel_error(dy, dy_ref) < 5e-5
    jac_ref = torch.func.jacrev(lambda m: reference(*_f64(x, w, b, a, bb), m, 0.8))(m.double())
    assert rel_error(jac, jac_ref) < 5e-5


def test_dora_from_base_forward_mode(seed):
    x, w, b, a, bb, m = _inputs((4, 5), 19, 11, 3, torch.float32)
    norm = dora_weight_norm(w, a, bb, 0.7)
    tx, ta, tm = torch.randn_like(x), torch.randn_like(a), torch.randn_like(m)
    _, dy = torch.func.jvp(lambda x, a, m: dora_from_base(x @ w.t(), x, b, a, bb, m, norm, 0.7), (x, a, m),
                           (tx, ta, tm))
    _, dy_ref = torch.func.jvp(lambda x, a, m: reference(x, *_f64(w, b), a, bb.double(), m, 0.7), _f64(x, a, m),
                               _f64(tx, ta, tm))
    assert rel_error(dy, dy_ref) < 1e-5


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_autocast_casts_the_inputs_as_linear_does(face, seed):
    x, w, b, a, bb, m = _inputs((6,), 16, 8, 4, torch.float32)
    with backend.use(face), torch.autocast("cpu", dtype=torch.bfloat16):
        y = dora_linear(x, w, b, a, bb, m, 2.0)
    assert y.dtype == torch.bfloat16
    expected = reference(*[t.to(torch.bfloat16).double() for t in (x, w, b, a, bb)], m.double(), 2.0)
    assert rel_error(y, expected) < 2 * RTOL[torch.bfloat16]


@pytest.mark.parametrize("bad", ["2", None, True])
def test_scaling_must_be_a_real_number(bad):
    args = _good()
    args["scaling"] = bad
    with pytest.raises(TypeError, match="scaling must be a real number"):
        dora_linear(**args)
