"""fused_grpo_loss / fused_rloo_loss (gradients formed in the forward pass) against the float64
definition: full logits, log-softmax, token log-probs, then grpo_loss / rloo_loss (which test_grpo.py
holds equal to TRL's code), differentiated by autograd; and against Liger-Kernel's
LigerFusedLinearGRPOLoss (loss, d hidden, d weight) for every loss type it has."""
import pytest
import torch

from peftkern import losses
from peftkern.reference import logprobs as ref
from tests.helpers import assert_close
from tests.losses._fused_checks import FACES, check_against_float64, head_kw, leaves, token_logps

def _batch(B=6, T=7, H=16, V=40, prompt=2, head_extras=True):
    """float64 leaves (hidden [B, T, H], weight, bias, lora_A, lora_B) and targets [B, T] (prompt
    positions and a ragged tail ignored; the last completion empty)."""
    params = [torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64) * 0.4,
              torch.randn(V, dtype=torch.float64) * 0.5 if head_extras else None,
              torch.randn(3, H, dtype=torch.float64) * 0.4 if head_extras else None,
              torch.randn(V, 3, dtype=torch.float64) * 0.4 if head_extras else None]
    targets = torch.randint(0, V, (B, T))
    targets[:, :prompt] = -100
    for b in range(B):
        targets[b, prompt + int(torch.randint(1, T - prompt + 1, ())):] = -100
    targets[-1] = -100
    return params, targets


def _check(fused, reference, params, targets, face, temperature=0.8, dtype=torch.float32, factor=4.0):
    # group-normalized advantages sum to zero per group, so the loss is a sum that largely cancels: its
    # relative error runs above the gradients' (4.4e-5 seen in fp32 on one fresh seed), hence 4x the factor
    return check_against_float64(lambda p: fused(p, targets, temperature), reference, params, targets, temperature,
                                 face, dtype=dtype, factor=factor, loss_factor=4 * factor, scale=1.3,
                                 loss_of=lambda out: out.loss)


def _grpo_case(loss_type, level, beta, delta=None, quantile=1.0, chunk=None, spread=0.4):
    """(fused, reference) for one configuration; old / ref log-probs near the policy's."""
    params, targets = _batch()
    with torch.no_grad():
        base = token_logps(params, targets, 0.8)
    old = (base + spread * torch.randn_like(base)).float()
    refs = (base + spread * torch.randn_like(base)).float()
    adv = torch.randn(targets.shape[0])
    entropies = 3 * torch.rand(targets.shape)
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=3.0 if loss_type == "cispo" else 0.28, beta=beta,
              delta=delta, importance_sampling_level=level, max_completion_length=targets.shape[1],
              top_entropy_quantile=quantile)

    def fused(p, t, temperature):
        return losses.fused_grpo_loss(p[0], p[1], t, adv, old, refs, entropies=entropies if quantile < 1 else None,
                                      chunk_size=chunk, return_entropy=True, **kw, **head_kw(p, temperature))

    def reference(token, mask):
        return losses.grpo_loss(token, old.double(), refs.double(), adv.double(), mask, entropies=entropies, **kw).loss
    return params, targets, fused, reference


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("loss_type", losses.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_loss_type(seed, face, loss_type, level):
    params, targets, fused, reference = _grpo_case(loss_type, level, beta=0.05, chunk=None if face == "torch" else 9)
    out = _check(fused, reference, params, targets, face)
    with torch.no_grad():
        expected = token_logps(params, targets, 0.8).float()
    assert_close(out.logps, expected, torch.float32, "logps")
    assert not out.logps.requires_grad and out.entropy.shape == targets.shape


@pytest.mark.parametrize("chunk", [3, 11])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_chunks_cut_sequences_and_split_units(seed, chunk, level):
    """Token-local chunks that cut completions; sequences longer than a chunk (split units)."""
    params, targets, fused, reference = _grpo_case("grpo", level, beta=0.05, delta=1.4, chunk=chunk, spread=1.0)
    _check(fused, reference, params, targets, "torch")


def test_entropy_mask_and_no_reference(seed):
    params, targets, fused, reference = _grpo_case("dapo", "token", beta=0.0, quantile=0.4)
    _check(fused, reference, params, targets, "torch")


def test_entropy_mask_computed_here_equals_given(seed):
    """Without ``entropies``, top_entropy_quantile < 1 runs a statistics pass first: the same loss as
    with the entropies given (the float64 ones), and the returned entropy is the distribution's."""
    params, targets = _batch()
    p = leaves(params, torch.float32)
    adv = torch.randn(targets.shape[0])
    kw = dict(loss_type="dapo", top_entropy_quantile=0.5, **head_kw(p, 0.9))
    out = losses.fused_grpo_loss(p[0], p[1], targets, adv, return_entropy=True, **kw)
    given = losses.fused_grpo_loss(p[0], p[1], targets, adv, entropies=out.entropy, **kw)
    assert torch.equal(out.loss, given.loss)
    with torch.no_grad():
        logits = (p[0] @ p[1].t() + p[2] + 0.7 * (p[0] @ p[3].t()) @ p[4].t()) / 0.9
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1) * (targets != -100)
    assert_close(out.entropy, entropy, torch.float32, "entropy")


def test_sixteen_bit_and_no_bias(seed):
    params, targets, fused, reference = _grpo_case("bnpo", "token", beta=0.05)
    params[2:] = [None, None, None]
    _check(fused, reference, params, targets, "torch", dtype=torch.bfloat16, factor=2.0)


def test_reference_from_hidden_states(seed):
    """beta > 0 with ref_hidden / ref_weight instead of ref_logps: the reference's log-probs computed
    here without gradients."""
    params, targets = _batch(head_extras=False)
    p = leaves(params, torch.float32)
    ref_h, ref_w = torch.randn_like(p[0]), p[1].detach() + 0.05 * torch.randn_like(p[1])
    adv = torch.randn(targets.shape[0])
    with torch.no_grad():
        ref_logps = ref.linear_logprobs(ref_h.double(), ref_w.double(), targets).float()
    a = losses.fused_grpo_loss(p[0], p[1], targets, adv, beta=0.1, ref_hidden=ref_h, ref_weight=ref_w)
    b = losses.fused_grpo_loss(p[0], p[1], targets, adv, ref_logps=ref_logps, beta=0.1)
    assert_close(a.loss, b.loss, torch.float32, "loss")
    assert_close(a.kl, b.kl, torch.float32, "kl")


@pytest.mark.parametrize("face", FACES)
def test_rloo(seed, face):
    params, targets = _batch()
    with torch.no_grad():
        seq = (token_logps(params, targets, 0.8) * (targets != -100)).sum(-1)
    old = (seq + 0.3 * torch.randn_like(seq)).float()
    adv = torch.randn(targets.shape[0])

    def fused(p, t, temperature):
        return losses.fused_rloo_loss(p[0], p[1], t, adv, old, epsilon=0.2, epsilon_high=0.28,
                                      chunk_size=None if face == "torch" else 9, **head_kw(p, temperature))

    def reference(token, mask):
        return losses.rloo_loss(token, old.double(), adv.double(), mask, epsilon=0.2, epsilon_high=0.28).loss
    _check(fused, reference, params, targets, face)


def test_bad_input():
    params, targets = _batch(head_extras=False)
    h, w = params[0].float(), params[1].float()
    adv = torch.randn(targets.shape[0])
    with pytest.raises(ValueError, match="needs ref_logps, or ref_hidden"):
        losses.fused_grpo_loss(h, w, targets, adv, beta=0.1)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, H\]"):
        losses.fused_grpo_loss(h[0], w, targets[0], adv)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        losses.fused_grpo_loss(h, w, targets, adv[:2])
    with pytest.raises(ValueError, match="old_logps has shape"):
        losses.fused_grpo_loss(h, w, targets, adv, old_logps=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unknown importance_sampling_level"):
        losses.fused_grpo_loss(h, w, targets, adv, importance_sampling_level="seq")


# --- Liger-Kernel ---------------------------------------------------------------------------------

LIGER_TYPES = [(t, lvl) for t in losses.GRPO_LOSS_TYPES for lvl in ("token", "sequence")
               if not (t == "cispo" and lvl == "sequence")]  # Liger refuses sequence-level cispo


@pytest.mark.parametrize("loss_type,level", LIGER_TYPES)
def test_matches_liger(seed, loss_type, level):
    """LigerFusedLinearGRPOLoss (compiled=False) on the same hidden states, weight, old and reference
    log-probs: loss, d hidden, d weight."""
    liger_mod = pytest.importorskip("liger_kernel.chunked_loss")
    params, targets = _batch(B=8, T=9, head_extras=False)
    mask = targets != -100
    h1, w1 = leaves(params[:2], torch.float32)
    h2, w2 = leaves(params[:2], torch.float32)
    with torch.no_grad():
        base = token_logps([h1, w1, None, None, None], targets, 1.0).float()
    old = (base + 0.4 * torch.randn_like(base)) * mask
    refs = (base + 0.4 * torch.randn_like(base)) * mask
    adv = torch.randn(targets.shape[0])
    eps_high = 3.0 if loss_type == "cispo" else 0.28
    liger = liger_mod.LigerFusedLinearGRPOLoss(beta=0.05, compiled=False, use_ref_model=True, chunk_size=2,
                                               epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
                                               max_completion_length=9, importance_sampling_level=level, delta=1.5)
    expected = liger(h1, w1, targets.clamp(min=0), mask.float(), adv, ref_per_token_logps=refs,
                     old_per_token_logps=old)[0]
    ours = losses.fused_grpo_loss(h2, w2, targets, adv, old, refs, loss_type=loss_type, epsilon=0.2,
                                  epsilon_high=eps_high, beta=0.05, delta=1.5, importance_sampling_level=level,
                                  max_completion_length=9)
    assert_close(ours.loss, expected.detach(), torch.float32, "loss", 8)
    for name, got, want in zip(("hidden", "weight"), torch.autograd.grad(ours.loss, [h2, w2]),
                               torch.autograd.grad(expected, [h1, w1])):
        assert_close(got, want, torch.float32, f"d{name}", 8)
