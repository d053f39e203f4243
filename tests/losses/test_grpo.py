"""GRPO and RLOO over log-probs and their advantages against the real TRL 1.16 (GRPOTrainer /
RLOOTrainer code run on the same tensors): loss, gradient and the logged KL and clip shares, for
every loss type, both importance-sampling levels, delta, beta, the entropy mask, ratios that sit
exactly at 1 (autograd's ties) and ratios far outside the clip range."""
import math

import pytest
import torch

from peftkern.losses import (GRPO_LOSS_TYPES, group_advantages, grpo_loss, rloo_advantages, rloo_loss)
from tests.helpers import assert_close
from tests.losses import _grpo_peers as peers

pytest.importorskip("trl")


def _batch(B=8, T=9, spread=0.4, dtype=torch.float64):
    """Log-probs [B, T] (leaf), old and ref [B, T] near them, advantages [B], a ragged mask with one
    empty completion, entropies [B, T]."""
    logps = (-3 * torch.rand(B, T, dtype=dtype)).requires_grad_(True)
    old = logps.detach() + spread * torch.randn(B, T, dtype=dtype)
    ref = logps.detach() + spread * torch.randn(B, T, dtype=dtype)
    adv = torch.randn(B, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[-1] = False
    entropies = 3 * torch.rand(B, T, dtype=dtype)
    return logps, old, ref, adv, mask, entropies


def _compare(logps, trl_out, ours, metric_keys):
    trl_loss, trl_metrics = trl_out
    (g_trl,) = torch.autograd.grad(trl_loss, logps)
    (g_ours,) = torch.autograd.grad(ours.loss, logps)
    assert_close(ours.loss, trl_loss.detach(), torch.float64, "loss")
    assert_close(g_ours, g_trl, torch.float64, "d logps")
    for key, value in metric_keys.items():
        assert math.isclose(float(value), trl_metrics[key], rel_tol=1e-6, abs_tol=1e-7), key


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(seed, loss_type, level, beta):
    logps, old, ref, adv, mask, _ = _batch()
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=5.0 if loss_type == "cispo" else 0.28, beta=beta,
              importance_sampling_level=level, max_completion_length=9)
    ours = grpo_loss(logps, old, ref, adv, mask, **kw)
    metrics = {"clip_ratio/low_mean": ours.clip_ratio_low, "clip_ratio/high_mean": ours.clip_ratio_high,
               "clip_ratio/region_mean": ours.clip_ratio_region}
    if loss_type == "cispo":
        metrics = {"cispo_clip_ratio": ours.clip_ratio_high}
    if beta:
        metrics["kl"] = ours.kl
    else:
        assert ours.kl is None
    _compare(logps, peers.trl_grpo_loss(logps, old, ref, adv, mask, **kw), ours, metrics)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_delta_and_far_ratios(seed, loss_type):
    """Ratios from 0.1 to 10: both clips and the delta cap bind somewhere."""
    logps, old, ref, adv, mask, _ = _batch(spread=1.5)
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, delta=1.5, beta=0.1)
    ours = grpo_loss(logps, old, ref, adv, mask, **kw)
    assert 0 < float(ours.clip_ratio_region) < 1
    _compare(logps, peers.trl_grpo_loss(logps, old, ref, adv, mask, **kw), ours,
             {"clip_ratio/region_mean": ours.clip_ratio_region, "kl": ours.kl})


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_first_iteration_ties(seed, level):
    """old = the policy itself (TRL's default when a rollout is used once): every ratio is exactly 1,
    where min's two branches tie and autograd splits the gradient; the loss is -mean advantage."""
    logps, _, ref, adv, mask, _ = _batch()
    ours = grpo_loss(logps, None, ref, adv, mask, loss_type="grpo", importance_sampling_level=level)
    _compare(logps, peers.trl_grpo_loss(logps, None, ref, adv, mask, loss_type="grpo",
                                        importance_sampling_level=level), ours, {})


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_top_entropy_quantile(seed, loss_type):
    logps, old, ref, adv, mask, entropies = _batch()
    kw = dict(loss_type=loss_type, beta=0.04, top_entropy_quantile=0.3)
    ours = grpo_loss(logps, old, ref, adv, mask, entropies=entropies, **kw)
    _compare(logps, peers.trl_grpo_loss(logps, old, ref, adv, mask, entropies=entropies, **kw), ours, {"kl": ours.kl})


def test_dapo_num_items(seed):
    """dapo normalizes by the generation batch's tokens, given as num_items_in_batch."""
    logps, old, ref, adv, mask, _ = _batch()
    ours = grpo_loss(logps, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=123)
    _compare(logps, peers.trl_grpo_loss(logps, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=123),
             ours, {})


def test_rloo_loss_matches_trl(seed):
    logps, _, _, adv, mask, _ = _batch(spread=0.0)
    old = (logps.detach() * mask).sum(-1) + 0.3 * torch.randn(logps.shape[0], dtype=torch.float64)
    ours = rloo_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    _compare(logps, peers.trl_rloo_loss(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28), ours,
             {"clip_ratio/region_mean": ours.clip_ratio_region})


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(seed, scale):
    rewards = torch.randn(24)
    rewards[5] = float("nan")  # an unscorable completion
    rewards[8:12] = 0.7  # a group with no spread
    expected = peers.trl_group_advantages(rewards, 4, scale)
    assert torch.allclose(group_advantages(rewards, 4, scale), expected, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_match_trl(seed, normalize):
    rewards = torch.randn(18)
    rewards[4] = float("nan")
    expected = peers.trl_rloo_advantages(rewards, 3, normalize)
    assert torch.allclose(rloo_advantages(rewards, 3, normalize), expected, atol=1e-6)


def test_bad_input():
    logps, old, ref, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="num_generations must be an integer >= 2"):
        group_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError, match="not a whole number of groups"):
        rloo_advantages(torch.randn(5), 2)
    with pytest.raises(ValueError, match="unknown scale_rewards 'std'"):
        group_advantages(torch.randn(4), 2, "std")
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        grpo_loss(logps, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match="old_logps has shape"):
        grpo_loss(logps, old[:, :2], ref, adv, mask)
    with pytest.raises(ValueError, match="delta must be"):
        grpo_loss(logps, old, ref, adv, mask, delta=-1.0)
    with pytest.raises(ValueError, match="needs the per-token entropies"):
        grpo_loss(logps, old, ref, adv, mask, top_entropy_quantile=0.5)
    adv_nan = adv.clone()
    adv_nan[0] = float("nan")
    with pytest.raises(ValueError, match="advantages are not all finite"):
        grpo_loss(logps, old, ref, adv_nan, mask)


def test_beta_zero_never_reads_the_reference(seed):
    logps, old, _, adv, mask, _ = _batch()
    out = grpo_loss(logps, old, None, adv, mask, beta=0.0)
    assert out.kl is None and torch.isfinite(out.loss)
