"""The DPO family against the real TRL (DPOTrainer's loss code) and Liger-Kernel's chunked loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from peftkern import losses
from peftkern.losses import DPO_LOSS_TYPES, dpo_loss
from tests.helpers import assert_close
from tests.losses import _peers

SMOOTHING = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}


def _logps(batch=6):
    pc = (-20.0 - 10 * torch.rand(batch, dtype=torch.float64)).requires_grad_(True)
    pr = (-25.0 - 10 * torch.rand(batch, dtype=torch.float64)).requires_grad_(True)
    rc = -20.0 - 10 * torch.rand(batch, dtype=torch.float64)
    rr = -25.0 - 10 * torch.rand(batch, dtype=torch.float64)
    return pc, pr, rc, rr


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_matches_trl(seed, loss_type):
    pc, pr, rc, rr = _logps()
    beta, eps = 0.1, SMOOTHING.get(loss_type, 0.0)
    lengths = None
    if loss_type == "ipo":  # TRL divides by completion lengths; ours takes length-normalized log-probs
        lengths = torch.randint(1, 5, (12,))
    expected = _peers.trl_dpo_loss(pc, pr, rc, rr, beta, loss_type, eps, completion_lengths=lengths)
    g_expected = torch.autograd.grad(expected, [pc, pr])
    args = (pc, pr, rc, rr)
    if lengths is not None:
        n = lengths.double()
        args = (pc / n[:6], pr / n[6:], rc / n[:6], rr / n[6:])
    loss, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=eps)
    # float32 tolerance: TRL forms some constants (EXO's log(1 - eps)) as float32 tensors
    assert_close(loss, expected.detach(), torch.float32, loss_type)
    for got, exp in zip(torch.autograd.grad(loss, [pc, pr]), g_expected):
        assert_close(got, exp, torch.float32, f"{loss_type} grad")
    assert_close(chosen_rewards, beta * (args[0] - args[2]).detach(), torch.float64, "chosen rewards")
    assert_close(rejected_rewards, beta * (args[1] - args[3]).detach(), torch.float64, "rejected rewards")
    assert not chosen_rewards.requires_grad


def test_sigmoid_label_smoothing_is_conservative_dpo(seed):
    pc, pr, rc, rr = _logps()
    eps, beta = 0.15, 0.3
    m = beta * ((pc - rc) - (pr - rr))
    expected = (-(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)).mean()
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert_close(loss, expected, torch.float64, "cdpo")


def test_bad_arguments():
    pc, pr, rc, rr = _logps()
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc[:3], pr, rc, rr)


LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]


def _pair_batch(B=2, T=7, H=16, V=50):
    hidden = torch.randn(2 * B, T, H)
    weight = torch.randn(V, H) * 0.3
    targets = torch.randint(0, V, (2 * B, T))
    targets[:, :2] = -100  # prompt positions
    targets[1, -2:] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_fused_matches_liger_chunked_dpo(seed, loss_type):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden, weight, targets = _pair_batch()
    ref_hidden, ref_weight = torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    eps = SMOOTHING.get(loss_type, 0.0)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearDPOLoss(beta=0.2, compiled=False, loss_type=loss_type, label_smoothing=eps)
    expected = liger(w1, h1, targets, ref_input=ref_hidden, ref_weight=ref_weight)[0]
    expected.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _, _ = losses.fused_dpo_loss(h2, w2, targets, beta=0.2, loss_type=loss_type, label_smoothing=eps,
                                       ref_hidden=ref_hidden, ref_weight=ref_weight)
    loss.backward()
    assert_close(loss, expected.detach(), torch.float32, loss_type, factor=10)
    assert_close(h2.grad, h1.grad, torch.float32, "dhidden", factor=10)
    assert_close(w2.grad, w1.grad, torch.float32, "dweight", factor=10)


def test_fused_dpo_with_precomputed_ref_and_ipo_average(seed):
    hidden, weight, targets = _pair_batch()
    h = hidden.requires_grad_(True)
    ref = torch.randn(4, dtype=torch.float32) - 10
    loss, cr, rr = losses.fused_dpo_loss(h, weight, targets, ref[:2], ref[2:], loss_type="ipo", beta=0.5)
    logits = hidden @ weight.t()
    token = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = targets != -100
    seq = (token * mask).sum(-1) / mask.sum(-1)
    expected, _, _ = dpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], beta=0.5, loss_type="ipo")
    assert_close(loss, expected, torch.float32, "ipo", factor=10)
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="ref_hidden"):
        losses.fused_dpo_loss(h, weight, targets)
