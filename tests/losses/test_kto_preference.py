"""KTO, SimPO and ORPO against the real TRL trainers' loss code and Liger-Kernel's chunked losses."""
import pytest
import torch

from peftkern import losses
from tests.helpers import assert_close
from tests.losses import _peers


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.7)])
def test_kto_matches_trl(seed, loss_type, weights):
    n = 7
    labels = torch.tensor([True, False, True, True, False, False, True])
    policy = (-20 - 5 * torch.rand(n, dtype=torch.float64)).requires_grad_(True)
    ref = -20 - 5 * torch.rand(n, dtype=torch.float64)
    policy_kl, ref_kl = -22 - 5 * torch.rand(n, dtype=torch.float64), -24 - 5 * torch.rand(n, dtype=torch.float64)
    expected = _peers.trl_kto_loss(policy, ref, labels, policy_kl, ref_kl, 0.2, *weights, loss_type=loss_type)
    (g_expected,) = torch.autograd.grad(expected, [policy])
    loss, chosen_rewards, rejected_rewards, kl = losses.kto_loss(
        policy[labels], policy[~labels], policy_kl, ref[labels], ref[~labels], ref_kl, beta=0.2,
        desirable_weight=weights[0], undesirable_weight=weights[1], loss_type=loss_type)
    assert_close(loss, expected.detach(), torch.float64, "kto")
    assert_close(torch.autograd.grad(loss, [policy])[0], g_expected, torch.float64, "kto grad")
    assert_close(chosen_rewards, 0.2 * (policy[labels] - ref[labels]).detach(), torch.float64, "rewards")
    if loss_type == "kto":
        assert_close(kl, (policy_kl - ref_kl).mean().clamp(min=0), torch.float64, "kl")


def test_kto_fused_matches_liger(seed):
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    B, T, H, V = 5, 6, 16, 40
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) * 0.3
    targets = torch.randint(0, V, (B, T))
    targets[:, :2] = -100
    labels = torch.tensor([True, False, True, False, False])
    ref_hidden, ref_weight = torch.randn(B, T, H), weight + 0.05 * torch.randn(V, H)
    kl = torch.tensor(0.3)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearKTOLoss(beta=0.2, compiled=False, use_ref_model=True)
    expected = liger(h1, w1, targets, preference_labels=labels, ref_input=ref_hidden, ref_weight=ref_weight, kl=kl)
    expected = expected[0] if isinstance(expected, tuple) else expected
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.no_grad():
        ref_logps = losses.fused_sequence_logps(ref_hidden, ref_weight, targets)
    loss, _, _, z0 = losses.fused_kto_loss(h2, w2, targets, labels, ref_logps, kl=kl, beta=0.2)
    loss.backward()
    assert_close(loss, expected.detach(), torch.float32, "kto", factor=10)
    assert_close(h2.grad, h1.grad, torch.float32, "dhidden", factor=10)
    assert_close(w2.grad, w1.grad, torch.float32, "dweight", factor=10)
    assert z0.item() == pytest.approx(0.3)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl(seed, label_smoothing):
    chosen = (-1.0 - torch.rand(6, dtype=torch.float64)).requires_grad_(True)
    rejected = (-1.5 - torch.rand(6, dtype=torch.float64)).requires_grad_(True)
    trl_losses, trl_cr, _ = _peers.trl_simpo_losses(chosen, rejected, 2.0, 0.7, label_smoothing)
    expected = trl_losses.mean()
    g_expected = torch.autograd.grad(expected, [chosen, rejected])
    loss, cr, _ = losses.simpo_loss(chosen, rejected, beta=2.0, gamma=0.7, label_smoothing=label_smoothing)
    assert_close(loss, expected.detach(), torch.float64, "simpo")
    for got, exp in zip(torch.autograd.grad(loss, [chosen, rejected]), g_expected):
        assert_close(got, exp, torch.float64, "simpo grad")
    assert_close(cr, trl_cr, torch.float64, "rewards")


def test_orpo_matches_trl(seed):
    chosen = (-0.2 - 2 * torch.rand(6, dtype=torch.float64)).requires_grad_(True)
    rejected = (-0.5 - 2 * torch.rand(6, dtype=torch.float64)).requires_grad_(True)
    trl_losses = _peers.trl_orpo_losses(chosen, rejected, 0.25)[0]
    nll = torch.tensor(1.7, dtype=torch.float64)
    expected = nll - trl_losses.mean()  # ORPOTrainer: policy_nll_loss - losses.mean()
    g_expected = torch.autograd.grad(expected, [chosen, rejected])
    loss, _, _ = losses.orpo_loss(chosen, rejected, beta=0.25, chosen_nll_loss=nll)
    assert_close(loss, expected.detach(), torch.float32, "orpo")  # TRL computes ORPO in float32
    for got, exp in zip(torch.autograd.grad(loss, [chosen, rejected]), g_expected):
        assert_close(got, exp, torch.float32, "orpo grad")


def _pair_batch(B=2, T=7, H=16, V=50):
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100
    targets[0, -1] = -100
    return torch.randn(2 * B, T, H), torch.randn(V, H) * 0.3, targets


@pytest.mark.parametrize("which", ["simpo", "orpo"])
def test_fused_simpo_orpo_match_liger(seed, which):
    from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss, LigerFusedLinearSimPOLoss

    hidden, weight, targets = _pair_batch()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    if which == "simpo":
        liger = LigerFusedLinearSimPOLoss(beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=False)
        loss = losses.fused_simpo_loss(h2, w2, targets, beta=2.0, gamma=0.5)[0]
    else:
        liger = LigerFusedLinearORPOLoss(beta=0.3, compiled=False)
        loss = losses.fused_orpo_loss(h2, w2, targets, beta=0.3)[0]
    expected = liger(w1, h1, targets)[0]
    expected.backward()
    loss.backward()
    assert_close(loss, expected.detach(), torch.float32, which, factor=10)
    assert_close(h2.grad, h1.grad, torch.float32, "dhidden", factor=10)
    assert_close(w2.grad, w1.grad, torch.float32, "dweight", factor=10)
