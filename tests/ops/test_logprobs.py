"""fused_linear_logprobs: every face against the float64 reference, values and every gradient."""
import pytest
import torch

from peftkern import backend
from peftkern.ops.logprobs import (default_chunk_size, fused_linear_logprob_dot, fused_linear_logprob_stats,
                                   fused_linear_logprobs)
from peftkern.reference import logprobs as ref
from tests.helpers import assert_close

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


def _leaves(tensors, dtype):
    return [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in tensors]


def _grads(out, tensors):
    live = [x for x in tensors if x is not None]
    got = iter(torch.autograd.grad(out, live, allow_unused=True))
    return [None if x is None else next(got) for x in tensors]


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
    params = _leaves(params, torch.float64)
    h, w, b, a, lb = params
    lp, ent = ref.linear_logprobs(h, w, t, bias=b, temperature=temperature, return_entropy=True, lora_A=a, lora_B=lb,
                                  lora_scaling=0.5)
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    expected = _grads((lp * g_lp + ent * g_ent).sum(), params)

    mine = _leaves(params, dtype)
    h2, w2, b2, a2, lb2 = mine
    with backend.use(face):
        lp2, ent2 = fused_linear_logprobs(h2, w2, t, bias=b2, temperature=temperature, return_entropy=True,
                                          lora_A=a2, lora_B=lb2, lora_scaling=0.5, chunk_size=8)
    assert lp2.dtype == torch.float32 and lp2.shape == t.shape
    # fp16 inputs: compare with the reference on the same fp16-rounded inputs
    if dtype != torch.float32:
        rounded = _leaves([x.detach().to(dtype) if x is not None else None for x in params], torch.float64)
        hr, wr, br, ar, lbr = rounded
        lp, ent = ref.linear_logprobs(hr, wr, t, bias=br, temperature=temperature, return_entropy=True, lora_A=ar,
                                      lora_B=lbr, lora_scaling=0.5)
        expected = _grads((lp * g_lp + ent * g_ent).sum(), rounded)
    if lp.numel() == 0:
        return
    assert_close(lp2, lp, dtype, "logp")
    assert_close(ent2, ent, dtype, "entropy")
    actual = _grads((lp2 * g_lp.float() + ent2 * g_ent.float()).sum(), mine)
    _compare_grads(actual, expected, dtype)
    ignored = t == -100
    assert (lp2[ignored] == 0).all() and (ent2[ignored] == 0).all()
    assert (actual[0][ignored] == 0).all(), "ignored positions must get no gradient"


@pytest.mark.parametrize("face", FACES)
def test_logp_only_and_bf16(seed, face):
    dtype = torch.bfloat16 if face == "torch" else torch.float32
    *params, t = _inputs((21,), 40, 200, 2, True, False)
    params = _leaves(params, torch.float64)
    expected_lp = ref.linear_logprobs(*params[:2], t, bias=params[2])
    expected = _grads(expected_lp.sum(), params)
    mine = _leaves(params, dtype)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2])
    assert_close(lp, expected_lp, dtype, "logp", factor=2.0)
    _compare_grads(_grads(lp.sum(), mine), expected, dtype, factor=2.0)


@pytest.mark.parametrize("face", FACES)
def test_all_ignored_rows(seed, face):
    *params, t = _inputs((2, 7), 16, 70, 2, True, True)
    t[0] = -100  # a whole sequence ignored
    mine = _leaves(params, torch.float32)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2], lora_A=mine[3], lora_B=mine[4])
    assert (lp[0] == 0).all()
    grads = _grads(lp.sum(), mine)
    assert (grads[0][0] == 0).all()
    t.fill_(-100)
    with backend.use(face):
        lp = fused_linear_logprobs(mine[0], mine[1], t, bias=mine[2], lora_A=mine[3], lora_B=mine[4])
    assert (lp == 0).all()
    for g in _grads(lp.sum(), mine):
        assert (g == 0).all()


@pytest.mark.parametrize("face", FACES)
def test_mean_logp_and_dot(seed, face):
    *params, t = _inputs((29,), 24, 150, 3, True, True)
    params = _leaves(params, torch.float64)
    h, w, b, a, lb = params
    c_logp, c_mean = torch.randn(29), torch.randn(29)
    lp = ref.linear_logprobs(h, w, t, bias=b, temperature=1.3, lora_A=a, lora_B=lb, lora_scaling=2.0)
    mean = ref.linear_mean_logprobs(h, w, t, bias=b, temperature=1.3, lora_A=a, lora_B=lb, lora_scaling=2.0)
    value = (lp * c_logp.double() + mean * c_mean.double()).sum()
    expected = _grads(value, params)
    mine = _leaves(params, torch.float32)
    kw = dict(bias=mine[2], temperature=1.3, lora_A=mine[3], lora_B=mine[4], lora_scaling=2.0, chunk_size=5)
    with backend.use(face):
        got = fused_linear_logprob_dot(mine[0], mine[1], t, c_logp, c_mean, **kw)
        _, _, mean2 = fused_linear_logprob_stats(mine[0], mine[1], t, mean_logp=True, **kw)
    assert_close(got, value.detach(), torch.float32, "value")
    assert_close(mean2, mean.detach(), torch.float32, "mean_logp")
    _compare_grads(_grads(got * 3.0, mine), [3.0 * e for e in expected], torch.float32)


def test_frozen_weight_gets_no_gradient(seed):
    *params, t = _inputs((9,), 16, 40, 2, False, False)
    h = params[0].float().requires_grad_(True)
    w = params[1].float()
    lp = fused_linear_logprobs(h, w, t)
    (dh,) = torch.autograd.grad(lp.sum(), [h])
    assert dh.shape == h.shape and w.grad is None


def test_chunk_size_default_and_override(seed):
    assert default_chunk_size(4096, 32000) == 256
    assert default_chunk_size(5, 32000) == 5
    assert default_chunk_size(100000, 128256) == 64
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
    torch.library.opcheck(torch.ops.peftkern.linear_logprobs_dot,
                          (h, w, None, None, None, t, c, c, -100, 1.0, 4, "torch", [True, True, False, False, False]))
