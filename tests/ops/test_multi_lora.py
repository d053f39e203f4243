"""peftkern.ops.multi_lora_linear: many adapters in one batch, every face against the float64
reference (row i through adapter adapter_index[i] alone), forward and every gradient."""
import pytest
import torch

from peftkern import backend
from peftkern.ops.lora import dropout_keep_mask, lora_linear
from peftkern.ops.multi_lora import FACES, multi_lora_linear, segment_plan
from peftkern.reference.multi_lora import multi_lora_linear as reference
from tests.helpers import RTOL, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RUNNABLE_FACES = [f for f in FACES if backend.why_unavailable(f, DEVICE) is None]

# (rows, in, out, ranks per adapter, index pattern): ranks differ; "mixed" has base rows and an
# adapter with no rows; "per_seq" indexes sequences of x [4, 9, in]; "base" has no adapter rows.
CASES = [
    (64, 64, 64, (16, 16, 16, 16), "mixed"),
    (37, 45, 29, (7, 3, 5), "mixed"),
    (1, 3, 2, (1, 2), "mixed"),
    (0, 16, 8, (4, 2), "mixed"),
    (36, 70, 50, (130, 17), "per_seq"),
    (20, 24, 16, (3, 5), "base"),
]


def _index(m, n_adapters, pattern, lead):
    if pattern == "base":
        return torch.full(lead, -1, dtype=torch.long, device=DEVICE)
    if pattern == "per_seq":
        return torch.tensor([1, -1, 0, 1], device=DEVICE)[:lead[0]]
    idx = torch.randint(-1, n_adapters, lead, device=DEVICE)
    if n_adapters > 2:
        idx[idx == 1] = 2  # adapter 1 has no rows
    return idx


def _inputs(m, k, n, ranks, pattern, dtype):
    lead = (4, m // 4) if pattern == "per_seq" else (m,)
    e, rmax = len(ranks), max(ranks)
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype)
    a = (torch.randn(e, rmax, k, device=DEVICE) / k**0.5).to(dtype)
    bb = (torch.randn(e, n, rmax, device=DEVICE) / rmax**0.5).to(dtype)
    scalings = [1.7 / (i + 1) for i in range(e)]
    idx = _index(m, e, pattern, lead[:1] if pattern == "per_seq" else lead)
    return x, w, b, a, bb, scalings, list(ranks), idx


def _run(face, x, w, b, a, bb, scalings, ranks, idx, dy, dropout_p=0.0, grad_weight=False):
    x, a, bb = (t.detach().requires_grad_() for t in (x, a, bb))
    w = w.detach().requires_grad_(grad_weight)
    b = b.detach().requires_grad_(grad_weight)
    with backend.use(face):
        y = multi_lora_linear(x, w, b, a, bb, scalings, idx, ranks, dropout_p, training=True)
    y.backward(dy)
    grads = {"x": x.grad, "lora_A": a.grad, "lora_B": bb.grad}
    if grad_weight:
        grads.update(weight=w.grad, bias=b.grad)
    return y.detach(), grads


def _reference(x, w, b, a, bb, scalings, ranks, idx, dy, keep=None, dropout_p=0.0, dtype=torch.float64,
               grad_weight=False):
    x, a, bb = (t.detach().to(dtype).requires_grad_() for t in (x, a, bb))
    w = w.detach().to(dtype).requires_grad_(grad_weight)
    b = b.detach().to(dtype).requires_grad_(grad_weight)
    full = idx.reshape(*idx.shape, *([1] * (x.dim() - 1 - idx.dim()))).expand(x.shape[:-1])
    y = reference(x, w, b, a, bb, scalings, ranks, full, keep, dropout_p)
    y.backward(dy.to(dtype))
    grads = {"x": x.grad, "lora_A": a.grad, "lora_B": bb.grad}
    if grad_weight:
        grads.update(weight=w.grad, bias=b.grad)
    return y.detach(), grads


def _tolerance(dtype, own_error, face):
    interpreted_bf16 = face == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu"
    return max(RTOL[dtype] * (2.0 if interpreted_bf16 else 1.0), 2.0 * own_error)


def _compare(face, dtype, out, grads, ref, own):
    (ref_out, ref_grads), (own_out, own_grads) = ref, own
    for name, actual, expected, mine in [("y", out, ref_out, own_out)] + [
            (k, grads[k], ref_grads[k], own_grads[k]) for k in ref_grads]:
        assert actual.shape == expected.shape, f"{face} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == dtype, f"{face} {name}: dtype {actual.dtype} != {dtype}"
        err = rel_error(actual, expected)
        tol = _tolerance(dtype, rel_error(mine, expected), face)
        assert err <= tol, f"{face} {name} ({dtype}): relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("face", RUNNABLE_FACES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-r{'.'.join(map(str, c[3]))}-{c[4]}")
def test_forward_and_gradients_match_reference(face, dtype, case, seed):
    x, w, b, a, bb, scalings, ranks, idx = _inputs(*case, dtype)
    dy = torch.randn(*x.shape[:-1], w.shape[0], device=DEVICE, dtype=dtype)
    out, grads = _run(face, x, w, b, a, bb, scalings, ranks, idx, dy)
    ref = _reference(x, w, b, a, bb, scalings, ranks, idx, dy)
    own = _reference(x, w, b, a, bb, scalings, ranks, idx, dy, dtype=dtype)
    _compare(face, dtype, out, grads, ref, own)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_each_adapter_learns_from_its_own_rows_only(face, seed):
    """Padded ranks and adapters without rows get exactly zero gradient; the padding's values are
    never read; and each row equals lora_linear through its own adapter (the base alone for -1)."""
    x, w, b, a, bb, scalings, ranks, idx = _inputs(37, 45, 29, (7, 3, 5), "mixed", torch.float32)
    garbage_a, garbage_b = a.clone(), bb.clone()
    for e, r in enumerate(ranks):
        garbage_a[e, r:] = float("nan")
        garbage_b[e, :, r:] = float("nan")
    dy = torch.randn(37, 29, device=DEVICE)
    out, grads = _run(face, x, w, b, garbage_a, garbage_b, scalings, ranks, idx, dy)
    for e, r in enumerate(ranks):
        assert torch.all(grads["lora_A"][e, r:] == 0) and torch.all(grads["lora_B"][e, :, r:] == 0), e
    assert torch.all(grads["lora_A"][1] == 0) and torch.all(grads["lora_B"][1] == 0)  # adapter 1: no rows
    for e in (-1, 0, 2):
        rows = (idx == e).nonzero().flatten()
        if e < 0:
            single = x[rows] @ w.t() + b
        else:
            single = lora_linear(x[rows], w, b, a[e, :ranks[e]], bb[e, :, :ranks[e]], scalings[e])
        torch.testing.assert_close(out[rows], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_dropout_replays_the_hash_mask(face, seed):
    """The mask is the LoRA op's hash on the original row numbers: replayed in the reference, the
    output and every gradient agree."""
    p = 0.3
    x, w, b, a, bb, scalings, ranks, idx = _inputs(33, 40, 24, (6, 4), "mixed", torch.float32)
    dy = torch.randn(33, 24, device=DEVICE)
    rng = torch.random.get_rng_state()
    out, grads = _run(face, x, w, b, a, bb, scalings, ranks, idx, dy, dropout_p=p)
    torch.random.set_rng_state(rng)
    drop_seed = torch.ops.peftkern.multi_lora_fwd(x, w, b, a, bb, idx, scalings, ranks, p, face)[2]
    keep = dropout_keep_mask(drop_seed, (33, 40), p)
    ref = _reference(x, w, b, a, bb, scalings, ranks, idx, dy, keep, p)
    own = _reference(x, w, b, a, bb, scalings, ranks, idx, dy, keep, p, dtype=torch.float32)
    _compare(face, torch.float32, out, grads, ref, own)


@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_weight_and_bias_gradients_when_they_require_grad(face, seed):
    x, w, b, a, bb, scalings, ranks, idx = _inputs(19, 23, 17, (4, 2), "mixed", torch.float32)
    dy = torch.randn(19, 17, device=DEVICE)
    out, grads = _run(face, x, w, b, a, bb, scalings, ranks, idx, dy, grad_weight=True)
    ref = _reference(x, w, b, a, bb, scalings, ranks, idx, dy, grad_weight=True)
    own = _reference(x, w, b, a, bb, scalings, ranks, idx, dy, dtype=torch.float32, grad_weight=True)
    _compare(face, torch.float32, out, grads, ref, own)


def test_segment_plan_covers_every_row_once():
    idx = torch.tensor([2, -1, 0, 2, 2, -1, 0, 2, 2, 2, 2])
    perm, tiles = segment_plan(idx, 4, 4)
    assert tiles.shape == (3 + 4 + 1, 3)
    seen = []
    for start, count, adapter in tiles.tolist():
        rows = perm[start:start + count].tolist()
        assert all(int(idx[r]) == adapter for r in rows), (start, count, adapter)
        seen += rows
    assert sorted(seen) == list(range(11))
    assert [t for t in tiles.tolist() if t[1] > 0] == [[0, 2, -1], [2, 2, 0], [4, 4, 2], [8, 3, 2]]


# ---- bad input -------------------------------------------------------------------------------

def _good():
    x, w, b, a, bb, scalings, ranks, idx = _inputs(4, 8, 6, (2, 2), "mixed", torch.float32)
    return {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bb, "scalings": scalings,
            "adapter_index": idx, "ranks": ranks}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(adapter_index=torch.tensor([0, 1, 2, -1])), r"adapter_index holds 2; .* \[-1, 2\)"),
    (lambda t: t.update(adapter_index=torch.tensor([0, -2, 1, -1])), r"adapter_index holds -2"),
    (lambda t: t.update(adapter_index=torch.zeros(5, dtype=torch.long)), r"adapter_index has shape \(5,\)"),
    (lambda t: t.update(adapter_index=torch.zeros(4)), r"adapter_index must be an integer tensor"),
    (lambda t: t.update(adapter_index=[0, 0, 0, 0]), r"adapter_index must be an integer tensor, got list"),
    (lambda t: t.update(scalings=[1.0]), r"scalings has 1 entries but lora_A stacks 2"),
    (lambda t: t.update(ranks=[2, 3]), r"ranks\[1\] = 3"),
    (lambda t: t.update(ranks=[2]), r"ranks has 1 entries"),
    (lambda t: t.update(lora_A=torch.randn(2, 8)), r"lora_A must be a stack \[E, r, in\]"),
    (lambda t: t.update(lora_B=torch.randn(3, 6, 2)), r"lora_B has shape \(3, 6, 2\), expected \(2, 6, 2\)"),
    (lambda t: t.update(x=torch.randn(4, 9)), r"x has 9 features"),
    (lambda t: t.update(scalings=[1.0, float("inf")]), r"scalings\[1\] must be finite"),
])
def test_bad_input_is_named(mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        multi_lora_linear(**args)


# ---- torch.library integration ---------------------------------------------------------------

@pytest.mark.parametrize("face", RUNNABLE_FACES)
def test_opcheck(face, seed):
    x, w, b, a, bb, scalings, ranks, idx = _inputs(6, 10, 7, (3, 2), "mixed", torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    torch.library.opcheck(torch.ops.peftkern.multi_lora_fwd.default, (x, w, b, a, bb, idx, scalings, ranks, 0.0, face))
    dy = torch.randn(6, 7, device=DEVICE)
    u = torch.randn(6, 3, device=DEVICE)
    seed_t = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.peftkern.multi_lora_bwd.default,
                          (dy, x.detach(), w, a.detach(), bb.detach(), u, idx, scalings, ranks, 0.0, seed_t, face,
                           True))


def test_compiles_without_graph_break(seed):
    x, w, b, a, bb, scalings, ranks, idx = _inputs(12, 16, 8, (4, 2, 3), "mixed", torch.float32)
    a.requires_grad_()
    bb.requires_grad_()

    def step(x, a, bb, idx):
        return multi_lora_linear(x, w, b, a, bb, scalings, idx, ranks).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, a, bb, idx)
    loss.backward()
    a_ref, b_ref = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    expected = reference(x.double(), w.double(), b.double(), a_ref, b_ref, scalings, ranks, idx).square().mean()
    expected.backward()
    assert rel_error(loss.detach(), expected) < 1e-6
    assert rel_error(a.grad, a_ref.grad) < 1e-5 and rel_error(bb.grad, b_ref.grad) < 1e-5


def test_one_plan_per_index_and_a_changed_index_gets_a_new_one(seed, monkeypatch):
    """Layers of one model call share the index: its row expansion and sort are made once; an
    in-place change of the index is never served a stale plan."""
    x, w, b, a, bb, scalings, ranks, idx = _inputs(36, 16, 12, (3, 2), "per_seq", torch.float32)
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *args, **kw: sorts.append(1) or argsort(*args, **kw))
    with backend.use("torch"):
        first = multi_lora_linear(x, w, b, a, bb, scalings, idx, ranks)
        again = multi_lora_linear(x, w, b, a, bb, scalings, idx, ranks)
        assert len(sorts) == 1 and torch.equal(first, again)
        idx[0] = -1 if idx[0] != -1 else 0
        changed = multi_lora_linear(x, w, b, a, bb, scalings, idx, ranks)
    assert len(sorts) == 2
    full = idx[:, None].expand(4, 9)
    torch.testing.assert_close(changed, reference(x, w, b, a, bb, scalings, ranks, full), rtol=1e-5, atol=1e-5)
