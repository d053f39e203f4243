"""The anchored penalty (EWC / L2-SP) in PagedAdamW equals AdamW on loss + lam/2 sum F (p - p*)^2 by
autograd: 32-bit to 1e-6 relative over 20 steps, 8-bit within the 8-bit optimizer's own tolerance;
every face; checkpoints; bad input."""
import io

import pytest
import torch

from peftkern import backend
from peftkern.optim import PagedAdamW
from peftkern.reference import adamw as ref
from tests.optim.test_paged_adamw import _rel, _rel_delta

STEPS = 20
LAM = 3.0
FACES = [f for f in ("torch", "triton", "cuda") if backend.why_unavailable(f, "cpu") is None]


# (in, hidden, out): the 8-bit runs use the small model, with 8-bit states for both weights (>= 512
# elements, ragged last blocks), since the Triton 8-bit kernel is slow in the CPU interpreter.
SIZES = {"big": (48, 96, 37), "small": (24, 40, 19)}
MIN_8BIT = 512


def _model(seed, size="big"):
    torch.manual_seed(seed)
    d_in, hidden, d_out = SIZES[size]
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_out))


def _batches(seed, size="big"):
    gen = torch.Generator().manual_seed(seed + 1)
    d_in, _, d_out = SIZES[size]
    return torch.randn(STEPS, 16, d_in, generator=gen), torch.randn(STEPS, 16, d_out, generator=gen)


def _anchors_and_fisher(model, seed, with_fisher: bool, log_f_max: float = 1.0):
    """Anchors away from the start (so the penalty pulls from the first step) and a Fisher over
    many decades (up to e^log_f_max), per parameter."""
    gen = torch.Generator().manual_seed(seed + 2)
    anchors, fishers = [], []
    for p in model.parameters():
        anchors.append(p.detach() + 0.05 * torch.randn(p.shape, generator=gen))
        f = torch.exp(torch.empty(p.shape).uniform_(-9.0, log_f_max, generator=gen)) if with_fisher else None
        fishers.append(f)
    return anchors, fishers


def _autograd_run(seed, with_fisher, log_f_max=1.0, lam=LAM, make_opt=None, size="big"):
    """AdamW (torch's, or ``make_opt(params)``) on loss + lam/2 sum F (p - anchor)^2, the penalty
    computed by autograd."""
    model = _model(seed, size)
    anchors, fishers = _anchors_and_fisher(model, seed, with_fisher, log_f_max)
    opt = (make_opt or (lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.05)))(model.parameters())
    xs, ys = _batches(seed, size)
    for i in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs[i]), ys[i])
        for p, a, f in zip(model.parameters(), anchors, fishers):
            sq = (p - a) ** 2
            loss = loss + lam / 2 * (sq * f if f is not None else sq).sum()
        loss.backward()
        opt.step()
    return model


def _fused_run(seed, with_fisher, face, bits=32, fisher_bits=32, resume_at=None, log_f_max=1.0, lam=LAM,
               size="big"):
    model = _model(seed, size)
    anchors, fishers = _anchors_and_fisher(model, seed, with_fisher, log_f_max)

    def make(m):
        opt = PagedAdamW(m.parameters(), lr=3e-3, weight_decay=0.05, optim_bits=bits, paged=False,
                         min_8bit_size=MIN_8BIT, anchor_lambda=lam)
        for p, a, f in zip(m.parameters(), anchors, fishers):
            opt.set_anchor(p, a, f, fisher_bits=fisher_bits)
        return opt

    opt = make(model)
    xs, ys = _batches(seed, size)
    with backend.use(face):
        for i in range(STEPS):
            if i == resume_at:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                model = _model(seed + 100, size)
                model.load_state_dict(saved["model"])
                opt = PagedAdamW(model.parameters(), lr=1.0, optim_bits=bits, paged=False, min_8bit_size=MIN_8BIT)
                opt.load_state_dict(saved["opt"])  # anchors, Fisher and lambda come from the checkpoint
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xs[i]), ys[i]).backward()
            opt.step()
    return model, opt


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("with_fisher", [True, False], ids=["ewc", "l2sp"])
def test_fused_penalty_equals_autograd_penalty_32bit(face, with_fisher, seed):
    expected = _autograd_run(seed, with_fisher)
    ours, _ = _fused_run(seed, with_fisher, face)
    assert _rel(ours, expected) <= 1e-6
    assert _rel_delta(ours, expected, _model(seed)) <= 1e-5
    plain = _autograd_run(seed, with_fisher=False) if with_fisher else None
    if plain is not None:  # the penalty changed the path: the check above is not vacuous
        assert _rel_delta(ours, plain, _model(seed)) > 1e-2


def _adamw8bit(params):
    return PagedAdamW(params, lr=3e-3, weight_decay=0.05, optim_bits=8, paged=False, min_8bit_size=MIN_8BIT)


@pytest.mark.parametrize("face", FACES)
def test_fused_penalty_8bit_equals_the_8bit_optimizer_on_the_autograd_penalty(face, seed):
    """Folding changes nothing but the gradient's last bit: the same 8-bit optimizer stepping on
    loss + penalty by autograd follows the same path (a state on a code midpoint may round the
    other way, hence not bit for bit)."""
    expected = _autograd_run(seed, with_fisher=True, make_opt=_adamw8bit, size="small")
    ours, opt = _fused_run(seed, True, face, bits=8, size="small")
    assert _rel(ours, expected) <= 1e-3
    assert _rel_delta(ours, expected, _model(seed, "small")) <= 3e-3
    assert all("exp_avg_codes" in opt.state[layer.weight] for layer in (ours[0], ours[2]))


@pytest.mark.parametrize("face, fisher_bits", [(f, b) for f in FACES for b in (32, 8) if f == "torch" or b == 8])
def test_fused_penalty_8bit_states_within_the_8bit_tolerance(face, fisher_bits, seed):
    """8-bit moments (and optionally an 8-bit Fisher) against torch's fp32 AdamW on the autograd
    penalty: the 8-bit optimizer's bounds (tests/optim/test_paged_adamw.py), for a Fisher as
    squared gradients give it (lam * F <= 0.14). A stiffer penalty (lam * F up to 8) makes every
    8-bit optimizer oscillate about the anchor and departs from fp32 by up to 9% of the distance
    travelled, with or without the folding (the test above)."""
    expected = _autograd_run(seed, with_fisher=True, log_f_max=-2.0, lam=1.0, size="small")
    ours, opt = _fused_run(seed, True, face, bits=8, fisher_bits=fisher_bits, log_f_max=-2.0, lam=1.0, size="small")
    assert _rel(ours, expected) <= 2e-2
    assert _rel_delta(ours, expected, _model(seed, "small")) <= 3e-2
    weight = ours[0].weight
    assert opt.state[weight]["exp_avg_codes"].dtype == torch.uint8
    assert ("anchor_fisher_codes" in opt.state[weight]) == (fisher_bits == 8)


@pytest.mark.parametrize("bits", [32, 8])
def test_resume_keeps_anchor_fisher_and_lambda(bits, seed):
    straight, _ = _fused_run(seed, True, "torch", bits=bits, fisher_bits=8, size="small")
    resumed, opt = _fused_run(seed, True, "torch", bits=bits, fisher_bits=8, resume_at=9, size="small")
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["anchor_lambda"] == LAM


def test_anchor_defaults_to_the_value_now_and_zero_lambda_is_plain():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 7))
    opt = PagedAdamW([p], paged=False)
    opt.set_anchor(p)
    assert torch.equal(opt.state[p]["anchor"], p.detach())
    q = torch.nn.Parameter(p.detach().clone())
    plain = PagedAdamW([q], paged=False)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        opt.step()
        plain.step()
    assert torch.equal(p, q)  # anchor_lambda = 0: the anchor is kept but costs nothing
    opt.clear_anchor(p)
    assert "anchor" not in opt.state[p]


def test_eight_bit_fisher_is_the_blockwise_codes():
    p = torch.nn.Parameter(torch.randn(1000))
    f = torch.rand(1000) * 1e-3
    opt = PagedAdamW([p], paged=False, anchor_lambda=1.0)
    opt.set_anchor(p, fisher=f, fisher_bits=8)
    codes, absmax = ref.quantize_blockwise(f, ref.dynamic_map(False))
    assert torch.equal(opt.state[p]["anchor_fisher_codes"], codes) and torch.equal(opt.state[p]["anchor_fisher_absmax"],
                                                                                   absmax)


def test_bad_input_names_the_problem():
    p = torch.nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match="anchor_lambda .* must be a finite number >= 0, got -1.0"):
        PagedAdamW([p], anchor_lambda=-1.0)
    opt = PagedAdamW([p], paged=False, anchor_lambda=1.0)
    with pytest.raises(ValueError, match="anchor must be a tensor of the parameter's shape \\(4, 5\\), got \\(5, 4\\)"):
        opt.set_anchor(p, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="fisher must be a tensor of the parameter's shape"):
        opt.set_anchor(p, fisher=torch.ones(20))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        opt.set_anchor(p, fisher=-torch.ones(4, 5))
    with pytest.raises(ValueError, match="fisher_bits must be 32 or 8"):
        opt.set_anchor(p, fisher=torch.ones(4, 5), fisher_bits=4)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_anchor(torch.nn.Parameter(torch.randn(3)))
    with pytest.raises(ValueError, match="anchor_lambda"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "anchor_lambda": float("nan")})
