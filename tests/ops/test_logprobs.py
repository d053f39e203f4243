"""fused_linear_logprobs and fused_unit_loss: every face against the float64 reference, values and
every gradient; the registered ops under opcheck and torch.compile; the faults a first GPU run
would hit (issue 25: the TF32 API, NaN from padding rows, device guards, host syncs, autocast)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from peftkern import backend, losses
from peftkern.ops import logprobs as lp_ops
from peftkern.ops.logprob_units import UnitGrads, register_unit_loss, unit_loss
from peftkern.ops.logprobs import (default_chunk_size, fused_linear_logprob_dot, fused_linear_logprob_stats,
                                   fused_linear_logprobs, fused_unit_loss)
from peftkern.reference import logprobs as ref
from tests.helpers import assert_close
from tests.losses._fused_checks import grads, leaves

NAMES = ("hidden", "weight", "bias", "lora_A", "lora_B")

FACES = [f for f in ("torch", "triton") if backend.available("cpu")[f]]
# (tokens shape, H, V, rank): odd, tiny, round, a vocabulary that is not a multiple of the 128-wide
# tile, a [batch, seq] token grid, and an empty batch.
SHAPES = [((37,), 24, 301, 3), ((1,), 16, 17, 1), ((64,), 32, 256, 8), ((2, 9), 20, 130, 2), ((0,), 16, 33, 2)]


def _inputs(lead, H, V, rank, bias, lora, ignore_every=4):
    h = torch.randn(*lead, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * 0.4
    b = torch.randn(V, dtype=torch.float64) if bias else None
    a = torch.randn(rank, H, dtype=torch.float64) * 0.4 if lora else None
    lb = torch.randn(V, rank, dtype=torch.float64) * 0.4 if lora else None
    t = torch.randint(0, V, lead)
    t.view(-1)[::ignore_every] = -100
    return h, w, b, a, lb, t


def _compare_grads(actual, expected, dtype, factor=1.0):
    for name, a, e in zip(("hidden", "weight", "bias", "lora_A", "lora_B"), actual, expected):
        if e is None:
            continue
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == dtype, f"{name} gradient is {a.dtype}"
        assert_close(a, e, dtype, f"d{name}", factor)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("lead,H,V,rank", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,lora,temperature", [(False, False, 1.0), (True, True, 0.7)])
def test_matches_reference(seed, face, lead, H, V, rank, dtype, bias, lora, temperature):
    tensors = _inputs(lead, H, V, rank, bias, lora)
    *params, t = tensors
    params = leaves(params, torch.float64)
    h, w, b, a, lb = params
    lp, ent = ref.linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True, lora_A=a, lora_B=lb,
                                  lora_scaling=0.5)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    expected = grads((lp * g_lp + ent * g_ent).sum(), params)

    mine = leaves(params, dtype)
    h2, w2, b2, a2, lb2 = mine
    with backend.use(face):
        lp2, ent2 = fused_linear_logprobs(h2, w2, t, bias=b2, temperature=temperature, return_entropy=True,
                                          lora_A=a2, lora_B=lb2, lora_scaling=0.5, chunk_size=8)
    assert lp2.dtype == torch.float32 and lp2.shape == t.shape
    # fp16 inputs: compare with the reference on the same fp16-rounded inputs
    if dtype != torch.float32:
        rounded = leaves([x.detach().to(dtype) if x is not None else None for x in params], torch.float64)
        hr, wr, br, ar, lbr = rounded
        lp, ent = ref.linear_logprobs(hr, wr, t, bias=br, temperature=temperature, return_entropy=True, lora_A=ar,
                                      lora_B=lbr, lora_scaling=0.5)
        expected = grads((lp * g_lp + ent * g_ent).sum(), rounded)
    if lp.numel() == 0:
        return
    assert_close(lp2, lp, dtype, "logp")
    assert_close(ent2, ent, dtype, "entropy")
    actual = grads((lp2 * g_lp.float() + ent2 * g_ent.float()).sum(), mine)
    _compare_grads(actual, expected, dtype)
    ignored = t == -100
    assert (lp2[ignored] == 0).all() and (ent2[ignored] == 0).all()
    assert (actual[0][ignored] == 0).all(), "ignored positions must get no gradient"


@pytest.mark.parametrize("face", FACES)
def test_logp_only_and_bf16(seed, face):
    dtype = torch.bfloat16 if face == "torch" else torch.float32
    *params, t = _inputs((21,), 40, 200, 2, True, False)
    params = leaves(params, torch.float64)
    expected_lp = ref.linear_logprobs(*params[:2], t, bias=params[2])
    expected = grads(expected_lp.sum(), params)
    mine = leaves(params, dtype)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2])
    assert_close(lp, expected_lp, dtype, "logp", factor=2.0)
    _compare_grads(grads(lp.sum(), mine), expected, dtype, factor=2.0)


@pytest.mark.parametrize("face", FACES)
def test_all_ignored_rows(seed, face):
    *params, t = _inputs((2, 7), 16, 70, 2, True, True)
    t[0] = -100  # a whole sequence ignored
    mine = leaves(params, torch.float32)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2], lora_A=mine[3], lora_B=mine[4])
    assert (lp[0] == 0).all()
    d = grads(lp.sum(), mine)
    assert (d[0][0] == 0).all()
    t.fill_(-100)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2], lora_A=mine[3], lora_B=mine[4])
    assert (lp == 0).all()
    for g in grads(lp.sum(), mine):
        assert (g == 0).all()


@pytest.mark.parametrize("face", FACES)
def test_mean_logp_and_dot(seed, face):
    *params, t = _inputs((29,), 24, 150, 3, True, True)
    params = leaves(params, torch.float64)
    h, w, b, a, lb = params
    c_logp, c_mean = torch.randn(29), torch.randn(29)
    lp = ref.linear_logprobs(h, w, t, bias=b, temperature=1.3, lora_A=a, lora_B=lb, lora_scaling=2.0)
    mean = ref.linear_mean_logprobs(h, w, t, bias=b, temperature=1.3, lora_A=a, lora_B=lb, lora_scaling=2.0)
    value = (lp * c_logp.double() + mean * c_mean.double()).sum()
    expected = grads(value, params)
    mine = leaves(params, torch.float32)
    kw = dict(bias=mine[2], temperature=1.3, lora_A=mine[3], lora_B=mine[4], lora_scaling=2.0, chunk_size=5)
    with backend.use(face):
        got = fused_linear_logprob_dot(mine[0], mine[1], t, c_logp, c_mean, **kw)
        _, _, mean2 = fused_linear_logprob_stats(mine[0], mine[1], t, mean_logp=True, **kw)
    assert_close(got, value.detach(), torch.float32, "value")
    assert_close(mean2, mean.detach(), torch.float32, "mean_logp")
    _compare_grads(grads(got * 3.0, mine), [3.0 * e for e in expected], torch.float32)


def test_frozen_weight_gets_no_gradient(seed):
    *params, t = _inputs((9,), 16, 40, 2, False, False)
    h = params[0].float().requires_grad_(True)
    w = params[1].float()
    lp = fused_linear_logprobs(h, w, t)
    (dh,) = torch.autograd.grad(lp.sum(), [h])
    assert dh.shape == h.shape and w.grad is None


def test_chunk_size_default_and_override(seed):
    assert default_chunk_size(4096, 32000, threads=1) == 512
    assert default_chunk_size(4096, 32000, threads=2) == 512
    assert default_chunk_size(5, 32000) == 5
    assert default_chunk_size(100000, 128256, threads=2) == 128
    assert default_chunk_size(100000, 128256, face="triton") == 2048
    # the workspace scales with the call: 1/8 of the tokens, at least 64 rows, at most the cap
    assert default_chunk_size(1024, 32000, threads=2) == 128
    assert default_chunk_size(300, 32000, threads=1) == 64
    assert default_chunk_size(100000, 32000, threads=1) == 512
    # a unit loss's chunk holds its largest unit when that fits the cap
    assert default_chunk_size(1024, 32000, threads=2, unit_tokens=512) == 512
    assert default_chunk_size(4096, 32000, threads=2, unit_tokens=1536) == 512
    *params, t = _inputs((33,), 16, 50, 2, False, False)
    h, w = params[0].float(), params[1].float()
    a = fused_linear_logprobs(h, w, t, chunk_size=1)
    b = fused_linear_logprobs(h, w, t, chunk_size=1000)
    assert_close(a, b, torch.float32, "chunked")


def test_bad_inputs_raise_clear_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, -100])
    with pytest.raises(ValueError, match="targets must be in"):
        fused_linear_logprobs(h, w, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(ValueError, match="expects H=8"):
        fused_linear_logprobs(torch.randn(4, 7), w, t)
    with pytest.raises(ValueError, match="targets has shape"):
        fused_linear_logprobs(h, w, t[:3])
    with pytest.raises(TypeError, match="dtypes differ"):
        fused_linear_logprobs(h, w.half(), t)
    with pytest.raises(TypeError, match="int64 or int32"):
        fused_linear_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        fused_linear_logprobs(h, w, t, lora_A=torch.randn(2, 8))
    with pytest.raises(ValueError, match="lora_B"):
        fused_linear_logprobs(h, w, t, lora_A=torch.randn(2, 8), lora_B=torch.randn(10, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(h, w, t, chunk_size=0)


def test_opcheck_registered_ops():
    h, w, b = torch.randn(6, 8), torch.randn(11, 8), torch.randn(11)
    t = torch.tensor([1, 2, -100, 4, 5, 10])
    for args in [(h, w, b, None, None, t, -100, 1.0, 4, True, True, "torch"),
                 (h.requires_grad_(), w.requires_grad_(), None, None, None, t, -100, 0.5, 2, False, False, "torch")]:
        torch.library.opcheck(torch.ops.peftkern.linear_logprobs_fwd, args)
    c = torch.randn(6)
    torch.library.opcheck(torch.ops.peftkern.linear_unit_loss,
                          (h, w, None, None, None, t, "linear", "", [c, c], [], [1, 1, 6], -100, 1.0, 4, False, True,
                           "torch", [True, True, False, False, False]))
    u, lb = torch.randn(6, 2), torch.randn(11, 2)
    pairs = torch.tensor([[1, 2, -100], [3, -100, 4], [5, 6, 7], [-100, -100, -100]]).reshape(-1)
    torch.library.opcheck(torch.ops.peftkern.linear_unit_loss,
                          (torch.randn(12, 8, requires_grad=True), w, b.requires_grad_(), torch.randn(12, 2, requires_grad=True),
                           lb.requires_grad_(), pairs, "dpo", "sigmoid",
                           [torch.randn(4)], [0.1, 0.0, 0.05, 0.0, 0.5], [2, 2, 3], -100, 0.8, 5, False, False,
                           "torch", [True, True, True, True, True]))
    h, w, b, lb = h.detach(), w.detach(), b.detach(), lb.detach()
    torch.library.opcheck(torch.ops.peftkern.linear_logprobs_bwd,
                          (h, w, b, u, lb, t, torch.randn(6), torch.randn(6), torch.randn(6), None, None, -100, 1.0, 4,
                           "torch", [True, True, True, True, True]))


# --- the extension point ----------------------------------------------------------------------

def _clipped_ratio_loss(chunk, tensors, scalars, variant):
    """A token-local loss shaped like GRPO's: -min(r A, clip(r, 1 - e, 1 + e) A) per token with
    r = exp(logp - old_logp), weighted per token (its mean over the batch's tokens)."""
    old, adv, weight = (t.index_select(0, chunk.pos) for t in tensors)
    (eps,) = scalars
    ratio = torch.exp(chunk.logp - old)
    clipped = ratio.clamp(1 - eps, 1 + eps)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    # d/dlogp: the unclipped branch is active where it is the smaller one, or where the clip is inactive
    unclipped = (ratio * adv <= clipped * adv) | ((ratio > 1 - eps) & (ratio < 1 + eps))
    d_logp = torch.where(unclipped, -adv * ratio, 0.0) * weight
    return UnitGrads((loss * weight).sum(), d_logp)


register_unit_loss("test_clipped_ratio", _clipped_ratio_loss, token_local=True)


def _sequence_margin_loss(chunk, tensors, scalars, variant):
    """A unit loss over single sequences: softplus(-mean logp) per sequence, summed."""
    s = chunk.sequence_sums(chunk.logp)
    n = chunk.sequence_tokens().clamp(min=1)
    mean = s / n
    return UnitGrads(F.softplus(-mean).sum(), chunk.per_token(-torch.sigmoid(-mean) / n))


register_unit_loss("test_sequence_margin", _sequence_margin_loss)


@pytest.mark.parametrize("face", FACES)
def test_a_registered_token_local_loss(seed, face):
    """A GRPO-shaped loss plugs in through register_unit_loss, no new kernel: value and gradients
    equal autograd through the reference log-probs, with chunks that cut sequences."""
    *params, t = _inputs((3, 7), 16, 60, 2, True, True)
    p64 = leaves(params, torch.float64)
    logp = ref.linear_logprobs(p64[0], p64[1], t, bias=p64[2], temperature=0.9, lora_A=p64[3], lora_B=p64[4],
                               lora_scaling=0.5)
    old = (logp.detach() + 0.3 * torch.randn_like(logp)).float()
    adv = torch.randn(3, 1).expand(3, 7).float()
    weight = (t != -100).float() / (t != -100).sum()
    ratio = torch.exp(logp - old.double())
    per = -torch.minimum(ratio * adv.double(), ratio.clamp(0.8, 1.2) * adv.double())
    expected = (per * weight.double()).sum()
    g_expected = grads(expected, p64)
    mine = leaves(params, torch.float32)
    with backend.use(face):
        out = fused_unit_loss(mine[0], mine[1], t, "test_clipped_ratio", tensors=[old.reshape(-1), adv.reshape(-1),
                              weight.reshape(-1)], scalars=[0.2], bias=mine[2], temperature=0.9, lora_A=mine[3],
                              lora_B=mine[4], lora_scaling=0.5, chunk_size=4)
    assert_close(out.loss, expected.detach(), torch.float32, "loss")
    assert_close(out.logp, logp.detach(), torch.float32, "logp")
    assert not out.logp.requires_grad
    _compare_grads(grads(out.loss, mine), g_expected, torch.float32)


@pytest.mark.parametrize("face", FACES)
def test_a_registered_unit_loss_with_split_units(seed, face):
    *params, t = _inputs((4, 6), 16, 50, 2, True, False)
    t[2] = -100  # an empty unit still has its loss (softplus(0))
    p64 = leaves(params, torch.float64)
    logp = ref.linear_logprobs(p64[0], p64[1], t, bias=p64[2])
    mask = t != -100
    mean = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
    expected = F.softplus(-mean).sum()
    g_expected = grads(expected, p64)
    mine = leaves(params, torch.float32)
    for chunk in (None, 3, 8):
        with backend.use(face):
            out = fused_unit_loss(mine[0], mine[1], t, "test_sequence_margin", bias=mine[2], chunk_size=chunk)
        assert_close(out.loss, expected.detach(), torch.float32, f"loss chunk={chunk}")
        _compare_grads(grads(out.loss, mine), g_expected, torch.float32)


def _entropy_bonus_loss(chunk, tensors, scalars, variant):
    """sum_i w_i (logp_i + c * entropy_i): a token-local loss that reads the entropy."""
    weight = tensors[0].index_select(0, chunk.pos)
    (c,) = scalars
    value = torch.dot(weight, chunk.logp) + c * torch.dot(weight, chunk.entropy)
    return UnitGrads(value, weight, c * weight)


register_unit_loss("test_entropy_bonus", _entropy_bonus_loss, token_local=True)


@pytest.mark.parametrize("face", FACES)
def test_a_registered_loss_reading_the_entropy(seed, face):
    *params, t = _inputs((2, 9), 16, 70, 2, True, True)
    p64 = leaves(params, torch.float64)
    lp, ent = ref.linear_logprobs(p64[0], p64[1], t, bias=p64[2], temperature=1.2, return_entropy=True,
                                  lora_A=p64[3], lora_B=p64[4], lora_scaling=0.5)
    weight = torch.randn(2, 9)
    expected = (weight.double() * (lp - 0.3 * ent)).sum()
    g_expected = grads(expected, p64)
    mine = leaves(params, torch.float32)
    with backend.use(face):
        out = fused_unit_loss(mine[0], mine[1], t, "test_entropy_bonus", tensors=[weight.reshape(-1)], scalars=[-0.3],
                              entropy=True, bias=mine[2], temperature=1.2, lora_A=mine[3], lora_B=mine[4],
                              lora_scaling=0.5, chunk_size=5)
    assert_close(out.loss, expected.detach(), torch.float32, "loss")
    assert_close(out.entropy, ent.detach(), torch.float32, "entropy")
    _compare_grads(grads(out.loss, mine), g_expected, torch.float32)


def test_unit_loss_errors():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="no unit loss 'nope'"):
        fused_unit_loss(h, w, t, "nope")
    with pytest.raises(ValueError, match=r"\[G \* U, T, H\]"):
        fused_unit_loss(h, w, t, "test_sequence_margin")
    with pytest.raises(ValueError, match="group"):
        fused_unit_loss(h.reshape(2, 2, 8), w, t.reshape(2, 2), "test_sequence_margin", group=0)
    with pytest.raises(ValueError, match="non-empty"):
        register_unit_loss("", _sequence_margin_loss)
    assert unit_loss("linear").token_local and not unit_loss("dpo").token_local


# --- compile ----------------------------------------------------------------------------------

def test_compiles_without_graph_break(seed):
    """torch.compile(fullgraph=True) traces through the fused losses and both registered ops."""
    h = torch.randn(4, 5, 16, requires_grad=True)
    w = torch.randn(30, 16, requires_grad=True)
    t = torch.randint(0, 30, (4, 5))
    t[:, :2] = -100
    refs = torch.randn(4) - 10

    def step(h, w):
        sft = losses.fused_sft_loss(h, w, t, label_smoothing=0.1)
        dpo = losses.fused_dpo_loss(h, w, t, refs[:2], refs[2:], beta=0.2)[0]
        simpo = losses.fused_simpo_loss(h, w, t)[0]
        orpo = losses.fused_orpo_loss(h, w, t)[0]
        logp = fused_linear_logprobs(h, w, t)
        return sft + dpo + simpo + orpo + logp.sum()

    eager = step(h, w)
    g_eager = torch.autograd.grad(eager, [h, w])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(h, w)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, [h, w]), g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- issue 25: what a first GPU run would hit ----------------------------------------------------

@pytest.fixture
def tf32_via_new_api():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = before


@pytest.mark.parametrize("face", FACES)
def test_new_tf32_api_does_not_raise(seed, face, tf32_via_new_api):
    """torch >= 2.9 raises on reading allow_tf32 once fp32_precision was set; the launchers read the
    precision through ops.launch.matmul_precision."""
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    with backend.use(face):
        fused_linear_logprobs(h, w, t).sum().backward()
        losses.fused_sft_loss(h, w, t).backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.skipif("triton" not in FACES, reason="needs Triton")
def test_padding_row_with_a_large_logit_gives_no_nan(seed):
    """An ignored (padding) row whose logit exceeds ~88.7 must not turn exp(z - lse) * 0 into NaN in
    dW, db or dB: the softmax-gradient kernel masks by the live rows."""
    h = torch.randn(4, 6, 8)
    w = torch.randn(20, 8) * 0.3
    t = torch.randint(0, 20, (4, 6))
    t[:, :2] = -100
    t[1, 3:] = -100
    h[1, 4] = w[3] * 500.0  # a padding row with a logit of ~500 * |w_3|^2
    assert (h[1, 4] @ w.t()).max() > 100.0
    refs = torch.randn(4) - 10
    b = torch.randn(20)
    a, lb = torch.randn(2, 8) * 0.1, torch.randn(20, 2) * 0.1
    for name, call in [
        ("fused_sft_loss", lambda *p: losses.fused_sft_loss(p[0], p[1], t, bias=p[2], lora_A=p[3], lora_B=p[4])),
        ("fused_dpo_loss", lambda *p: losses.fused_dpo_loss(p[0], p[1], t, refs[:2], refs[2:], bias=p[2], lora_A=p[3],
                                                            lora_B=p[4])[0]),
        ("recompute path", lambda *p: fused_linear_logprobs(p[0], p[1], t, bias=p[2], lora_A=p[3],
                                                            lora_B=p[4]).sum()),
    ]:
        params = [x.clone().requires_grad_(True) for x in (h, w, b, a, lb)]
        with backend.use("triton"):
            call(*params).backward()
        for label, x in zip(NAMES, params):
            assert torch.isfinite(x.grad).all(), f"{name}: NaN or inf in d{label}"


def test_every_triton_launch_enters_the_tensors_device(seed, monkeypatch):
    """Each launch runs inside ops.launch.device_guard(hidden), so a model spread over several GPUs
    launches on the right device and stream."""
    if "triton" not in FACES:
        pytest.skip("needs Triton")
    entered = []

    def guard(tensor):
        entered.append(tensor.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(lp_ops, "device_guard", guard)
    h, w = torch.randn(2, 4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (2, 4))
    refs = torch.randn(2)
    with backend.use("triton"):
        losses.fused_dpo_loss(h, w, t, refs[:1], refs[1:])[0].backward()
        fused_linear_logprobs(h, w, t).sum().backward()
    # unit loss: logits + gradient (with products); recompute path: stats, then logits + gradient
    assert len(entered) >= 5 and all(d == h.device for d in entered)


@contextlib.contextmanager
def _host_syncs():
    """Record every call that reads a tensor's value on the host."""
    names = ("__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    calls = []

    def spy(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            return saved[name](self, *args, **kwargs)
        return call

    for n in names:
        setattr(torch.Tensor, n, spy(n))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@pytest.mark.skipif("triton" not in FACES, reason="needs Triton")
def test_no_host_sync_per_call_on_the_triton_face(seed, monkeypatch):
    """The Triton face plans its chunks from shapes and checks targets with an asynchronous device
    assert off the CPU: no host read per call (here the CPU's check is swapped for the device one)."""
    h, w = torch.randn(4, 5, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (4, 5))
    t[:, :2] = -100
    refs = torch.randn(4)
    with backend.use("triton"):
        losses.fused_dpo_loss(h, w, t, refs[:2], refs[2:])  # compile-free warm-up of every kernel
        real_check = lp_ops._check_targets_in_range
        monkeypatch.setattr(lp_ops, "_check_targets_in_range",
                            lambda targets, ignore_index, vocab: real_check(targets.to("meta"), ignore_index, vocab))
        with _host_syncs() as calls:
            loss = losses.fused_dpo_loss(h, w, t, refs[:2], refs[2:])[0]
            loss.backward()
            fused_linear_logprobs(h, w, t).sum().backward()
            losses.fused_sft_loss(h, w, t).backward()
    assert calls == [], f"host syncs: {calls}"


def test_target_check_off_the_cpu_does_not_sync():
    targets = torch.randint(0, 5, (8,), device="meta")
    with _host_syncs() as calls:
        lp_ops._check_targets_in_range(targets, -100, 5)
    assert calls == []


@pytest.mark.parametrize("face", FACES)
def test_head_runs_in_the_autocast_dtype(seed, face):
    """Under autocast the head's GEMMs take the autocast dtype (tensor cores on a GPU), as F.linear
    would, and fp32 parameters still get fp32 gradients."""
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    seen = []
    real = lp_ops._make_head

    def spy(face_, hidden, *rest):
        seen.append(hidden.dtype)
        return real(face_, hidden, *rest)

    with backend.use(face), torch.autocast("cpu", dtype=torch.bfloat16):
        lp_ops._make_head = spy
        try:
            loss = losses.fused_sft_loss(h, w, t)
        finally:
            lp_ops._make_head = real
    loss.backward()
    assert seen == [torch.bfloat16]
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    expected = F.cross_entropy(h.detach().bfloat16().float() @ w.detach().bfloat16().float().t(), t)
    assert_close(loss, expected, torch.bfloat16, "autocast loss")
