"""Fused losses whose gradients are formed in the forward pass, against the float64 definition: the
full logits, log-softmax, sequence log-probs and the plain loss function, differentiated by
autograd. Every loss type, both faces, ignored prompt positions, an empty sequence, temperature,
a bias and a LoRA on the head, chunks that hold several units and units split over several
chunks, and gradient accumulation."""
import pytest
import torch

from peftkern import backend, losses
from peftkern.losses.preference import orpo_pair_losses
from peftkern.reference import logprobs as ref
from tests.helpers import assert_close
from tests.losses._fused_checks import (FACES, NAMES, check_against_float64, grads, head_kw, leaves,
                                         token_logps)

SMOOTHING = {"robust": 0.2, "exo_pair": 1e-3, "sigmoid": 0.1}


def _batch(pairs=3, T=6, H=16, V=40, prompt=2, group=2, empty=True, head_extras=True):
    """float64 leaves (hidden [group * pairs, T, H], weight, bias, lora_A, lora_B) and targets."""
    n = group * pairs
    hidden = torch.randn(n, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) * 0.4
    bias = torch.randn(V, dtype=torch.float64) * 0.5 if head_extras else None
    lora_A = torch.randn(3, H, dtype=torch.float64) * 0.4 if head_extras else None
    lora_B = torch.randn(V, 3, dtype=torch.float64) * 0.4 if head_extras else None
    targets = torch.randint(0, V, (n, T))
    targets[:, :prompt] = -100
    targets[0, -1] = -100
    if empty:
        targets[n - 1] = -100  # the last sequence has no scored token
    return [hidden, weight, bias, lora_A, lora_B], targets


def _check(fused, reference, params, targets, temperature, face, chunk, dtype=torch.float32, factor=4.0):
    """fused(params, targets, temperature, chunk) and reference(token_logps, mask) -> loss; compare."""
    check_against_float64(lambda p: fused(p, targets, temperature, chunk), reference, params, targets, temperature,
                          face, dtype=dtype, factor=factor, scale=1.7)


def _pairs(values, mask, average=False):
    return losses.sequence_logps(values, mask, average).chunk(2)


# --- DPO family ------------------------------------------------------------------------------

def _dpo_case(loss_type, pairs=3):
    ref_logps = -20.0 - 5 * torch.rand(2 * pairs, dtype=torch.float64)
    eps = SMOOTHING.get(loss_type, 0.0)
    average = loss_type == "ipo"

    def fused(p, t, temperature, chunk):
        h, w, *_ = p
        return losses.fused_dpo_loss(h, w, t, ref_logps[:pairs].float(), ref_logps[pairs:].float(), beta=0.3,
                                     loss_type=loss_type, label_smoothing=eps, chunk_size=chunk,
                                     **head_kw(p, temperature))[0]

    def reference(token, mask):
        chosen, rejected = _pairs(token, mask, average)
        return losses.dpo_loss(chosen, rejected, ref_logps[:pairs], ref_logps[pairs:], beta=0.3, loss_type=loss_type,
                               label_smoothing=eps)[0]
    return fused, reference


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_dpo_every_type_torch(seed, loss_type, chunk):
    params, targets = _batch()
    _check(*_dpo_case(loss_type), params, targets, 0.8, "torch", chunk)


@pytest.mark.skipif("triton" not in FACES, reason="needs Triton")
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "discopop", "aot"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_dpo_triton(seed, loss_type, chunk):
    params, targets = _batch()
    _check(*_dpo_case(loss_type), params, targets, 0.8, "triton", chunk)


def test_dpo_without_bias_or_lora_and_16_bit(seed):
    params, targets = _batch(head_extras=False, empty=False)
    _check(*_dpo_case("sigmoid"), params, targets, 1.0, "torch", None, dtype=torch.bfloat16, factor=2.0)
    if "triton" in FACES:
        _check(*_dpo_case("sigmoid"), params, targets, 1.0, "triton", 13, dtype=torch.float16, factor=2.0)


# --- SimPO, CPO, ORPO, KTO, SFT -----------------------------------------------------------------

def _simpo_case():
    def fused(p, t, temperature, chunk):
        return losses.fused_simpo_loss(p[0], p[1], t, beta=2.0, gamma=0.4, label_smoothing=0.1, chunk_size=chunk,
                                       **head_kw(p, temperature))[0]

    def reference(token, mask):
        return losses.simpo_loss(*_pairs(token, mask, True), beta=2.0, gamma=0.4, label_smoothing=0.1)[0]
    return fused, reference


def _cpo_case(loss_type, alpha=0.0):
    average = loss_type in ("ipo", "simpo")

    def fused(p, t, temperature, chunk):
        return losses.fused_cpo_loss(p[0], p[1], t, beta=0.2, loss_type=loss_type, label_smoothing=0.05 if loss_type
                                     == "sigmoid" else 0.0, alpha=alpha, cpo_alpha=0.6, chunk_size=chunk,
                                     **head_kw(p, temperature))[0]

    def reference(token, mask):
        half = token.shape[0] // 2
        nll = losses.sft_loss(token[:half], mask[:half])
        return losses.cpo_loss(*_pairs(token, mask, average), beta=0.2, loss_type=loss_type,
                               label_smoothing=0.05 if loss_type == "sigmoid" else 0.0, alpha=alpha,
                               chosen_nll_loss=nll, cpo_alpha=0.6)[0]
    return fused, reference


def _orpo_case():
    def fused(p, t, temperature, chunk):
        return losses.fused_orpo_loss(p[0], p[1], t, beta=0.3, chunk_size=chunk, **head_kw(p, temperature))[0]

    def reference(token, mask):  # orpo_loss computes in fp32 (as TRL); the same formula in float64 here
        half = token.shape[0] // 2
        return losses.sft_loss(token[:half], mask[:half]) + orpo_pair_losses(*_pairs(token, mask, True), 0.3).mean()
    return fused, reference


def _kto_case(loss_type, n=5):
    labels = torch.tensor([True, False, True, True, False][:n])
    ref_logps = -15.0 - 5 * torch.rand(n, dtype=torch.float64)

    def fused(p, t, temperature, chunk):
        return losses.fused_kto_loss(p[0], p[1], t, labels, ref_logps.float(), kl=0.4, beta=0.2, desirable_weight=1.3,
                                     undesirable_weight=0.8, loss_type=loss_type, chunk_size=chunk,
                                     **head_kw(p, temperature))[0]

    def reference(token, mask):
        seq = losses.sequence_logps(token, mask)
        return losses.kto_loss(seq[labels], seq[~labels], None, ref_logps[labels], ref_logps[~labels], None, beta=0.2,
                               desirable_weight=1.3, undesirable_weight=0.8, loss_type=loss_type, kl=0.4)[0]
    return fused, reference


CASES = {
    "simpo": lambda: (_simpo_case(), dict()),
    "cpo_sigmoid": lambda: (_cpo_case("sigmoid"), dict()),
    "cpo_hinge": lambda: (_cpo_case("hinge"), dict()),
    "cpo_ipo": lambda: (_cpo_case("ipo"), dict()),
    "cpo_simpo": lambda: (_cpo_case("simpo"), dict()),
    "cpo_alphapo": lambda: (_cpo_case("sigmoid", alpha=0.05), dict()),
    "orpo": lambda: (_orpo_case(), dict(empty=False)),
    "kto": lambda: (_kto_case("kto"), dict(pairs=5, group=1)),
    "kto_apo": lambda: (_kto_case("apo_zero_unpaired"), dict(pairs=5, group=1)),
}


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_preference_losses(seed, face, case):
    (fused, reference), shape = CASES[case]()
    params, targets = _batch(**shape)
    if case.startswith("cpo_hinge"):
        params[0] = params[0] * 0.1  # keep the hinge's kink away from the pairs (its derivative jumps there)
    for chunk in ([None, 7] if face == "torch" else [5]):
        _check(fused, reference, params, targets, 0.8, face, chunk)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sft_forward_formed_gradients(seed, face, label_smoothing):
    params, targets = _batch(pairs=2, group=1)
    p64 = leaves(params, torch.float64)
    h, w, b, a, lb = p64
    mean = ref.linear_mean_logprobs(h, w, targets, bias=b, temperature=0.8, lora_A=a, lora_B=lb, lora_scaling=0.7)
    expected = losses.sft_loss(token_logps(p64, targets, 0.8), targets != -100, label_smoothing=label_smoothing,
                               token_mean_logps=mean)
    g_expected = grads(expected, p64)
    mine = leaves(params, torch.float32)
    with backend.use(face):
        loss = losses.fused_sft_loss(mine[0], mine[1], targets, label_smoothing=label_smoothing, chunk_size=3,
                                     **head_kw(mine, 0.8))
    assert_close(loss, expected.detach(), torch.float32, "loss", 4)
    for name, got, want in zip(NAMES, grads(loss, mine), g_expected):
        assert_close(got, want, torch.float32, f"d{name}", 4)


# --- the path the fused losses replace, and accumulation ----------------------------------------

@pytest.mark.parametrize("face", FACES)
def test_same_as_recompute_path(seed, face):
    """The forward-formed gradients equal those of the recompute-in-backward path (today's path:
    sequence log-probs through fused_linear_logprobs, then dpo_loss)."""
    params, targets = _batch()
    refs = -20.0 - 5 * torch.rand(6)
    a, b = leaves(params, torch.float32), leaves(params, torch.float32)
    with backend.use(face):
        loss_a = losses.fused_dpo_loss(a[0], a[1], targets, refs[:3], refs[3:], beta=0.5, **head_kw(a, 0.9))[0]
        seq = losses.fused_sequence_logps(b[0], b[1], targets, **head_kw(b, 0.9))
        loss_b = losses.dpo_loss(seq[:3], seq[3:], refs[:3], refs[3:], beta=0.5)[0]
    assert_close(loss_a, loss_b.detach(), torch.float32, "loss")
    for name, ga, gb in zip(NAMES, grads(loss_a, a), grads(loss_b, b)):
        assert_close(ga, gb, torch.float32, f"d{name}")


@pytest.mark.parametrize("face", FACES)
def test_gradient_accumulation_scales_stored_gradients(seed, face):
    """Two micro-batches, each loss scaled before backward, accumulate into .grad as the float64
    reference of the scaled sum; a retained graph backpropagated twice doubles them."""
    params, targets = _batch(pairs=4)
    refs = -20.0 - 5 * torch.rand(8, dtype=torch.float64)
    halves = [(slice(0, 2), slice(4, 6)), (slice(2, 4), slice(6, 8))]
    scales = (0.25, -1.5)
    p64 = leaves(params, torch.float64)
    total = 0.0
    token = token_logps(p64, targets, 1.0)
    for (c, r), s in zip(halves, scales):
        rows = torch.cat([torch.arange(8)[c], torch.arange(8)[r]])
        chosen, rejected = _pairs(token[rows], targets[rows] != -100)
        total = total + s * losses.dpo_loss(chosen, rejected, refs[c], refs[r], beta=0.4)[0]
    expected = grads(total, p64)
    mine = leaves(params, torch.float32)
    h, w, b, a, lb = mine
    for (c, r), s in zip(halves, scales):
        rows = torch.cat([torch.arange(8)[c], torch.arange(8)[r]])
        with backend.use(face):
            loss = losses.fused_dpo_loss(h[rows], w, targets[rows], refs[c].float(), refs[r].float(), beta=0.4,
                                         bias=b, lora_A=a, lora_B=lb, lora_scaling=0.7)[0]
        (loss * s).backward()
    for name, t, want in zip(NAMES, mine, expected):
        assert_close(t.grad, want, torch.float32, f"accumulated d{name}")
    h.grad = None
    with backend.use(face):
        loss = losses.fused_dpo_loss(h[:4:3], w, targets[:4:3], refs[:1].float(), refs[3:4].float(), beta=0.4,
                                     bias=b, lora_A=a, lora_B=lb, lora_scaling=0.7)[0]
    loss.backward(retain_graph=True)
    once = h.grad.clone()
    loss.backward()
    assert_close(h.grad, 2 * once, torch.float32, "backward twice")


def test_no_grad_gives_the_value_only(seed):
    params, targets = _batch()
    refs = -20.0 - 5 * torch.rand(6)
    p = leaves(params, torch.float32)
    with_grad = losses.fused_dpo_loss(p[0], p[1], targets, refs[:3], refs[3:], **head_kw(p, 1.0))
    with torch.no_grad():
        without = losses.fused_dpo_loss(p[0], p[1], targets, refs[:3], refs[3:], **head_kw(p, 1.0))
    assert not without[0].requires_grad
    for x, y in zip(with_grad, without):
        assert_close(y, x.detach(), torch.float32, "no-grad value")


def test_rewards_and_reductions(seed):
    params, targets = _batch(empty=False)
    refs = -20.0 - 5 * torch.rand(6)
    h, w = params[0].float(), params[1].float()
    token = ref.linear_logprobs(h.double(), w.double(), targets).float()
    chosen, rejected = _pairs(token, targets != -100)
    loss, cr, rr = losses.fused_dpo_loss(h, w, targets, refs[:3], refs[3:], beta=0.3)
    total = losses.fused_dpo_loss(h, w, targets, refs[:3], refs[3:], beta=0.3, reduction="sum")[0]
    assert_close(total, 3 * loss, torch.float32, "sum")
    assert_close(cr, 0.3 * (chosen - refs[:3]), torch.float32, "chosen rewards")
    assert_close(rr, 0.3 * (rejected - refs[3:]), torch.float32, "rejected rewards")
    assert not cr.requires_grad
    with pytest.raises(ValueError, match="reduction"):
        losses.fused_dpo_loss(h, w, targets, refs[:3], refs[3:], reduction="none")
    with pytest.raises(ValueError, match="unknown loss_type"):
        losses.fused_dpo_loss(h, w, targets, refs[:3], refs[3:], loss_type="nope")
    with pytest.raises(ValueError, match="exo_pair"):
        losses.fused_dpo_loss(h, w, targets, refs[:3], refs[3:], loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        losses.fused_dpo_loss(h[:5], w, targets[:5], refs[:3], refs[3:])
    with pytest.raises(ValueError, match="preference_labels"):
        losses.fused_kto_loss(h, w, targets, torch.ones(5, dtype=torch.bool), refs)
