"""Bradley-Terry reward loss (TRL RewardTrainer's formula) and PPO's per-token pieces."""
import pytest
import torch
import torch.nn.functional as F

from peftkern import losses
from tests.helpers import assert_close


def test_reward_model_loss(seed):
    chosen, rejected, margin = torch.randn(8), torch.randn(8), torch.rand(8)
    assert_close(losses.reward_model_loss(chosen, rejected), -F.logsigmoid(chosen - rejected).mean(),
                 torch.float32, "plain")
    expected = -F.logsigmoid(chosen - rejected - margin).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    got = losses.reward_model_loss(chosen[:, None], rejected[:, None], margin, center_rewards_coefficient=0.01)
    assert_close(got, expected, torch.float32, "margin + centering")


def test_ppo_policy_and_value_losses(seed):
    B, T = 3, 5
    logps, old = torch.randn(B, T) * 0.3 - 2, torch.randn(B, T) * 0.3 - 2
    adv, mask = torch.randn(B), torch.rand(B, T) > 0.3
    loss, clipfrac, approx_kl = losses.ppo_policy_loss(logps, old, adv, mask, clip_range=0.2)
    ratio = (logps - old).exp()
    per = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.2))
    assert_close(loss, per[mask].mean(), torch.float32, "policy")
    assert 0.0 <= clipfrac.item() <= 1.0
    assert_close(approx_kl, (0.5 * (logps - old) ** 2)[mask].mean(), torch.float32, "approx kl")

    values, old_v, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    vloss, _ = losses.ppo_value_loss(values, old_v, returns, mask, clip_range_value=0.1)
    clipped = torch.maximum(torch.minimum(values, old_v + 0.1), old_v - 0.1)
    expected = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)[mask].mean()
    assert_close(vloss, expected, torch.float32, "value")


def test_kl_estimators_and_entropy_bonus(seed):
    logps, ref = torch.randn(2, 6) - 1, torch.randn(2, 6) - 1
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    log_r = ref - logps
    k1 = losses.kl_penalty(logps, ref, mask, "k1")
    k3 = losses.kl_penalty(logps, ref, mask, "k3")
    assert_close(k1, -log_r * mask, torch.float32, "k1")
    assert_close(k3, (log_r.exp() - 1 - log_r) * mask, torch.float32, "k3")
    assert (k3 >= 0).all() and (k1[~mask] == 0).all()
    entropy = torch.rand(2, 6)
    assert_close(losses.entropy_bonus(entropy, mask, 0.1), -0.1 * entropy[mask].mean(), torch.float32, "entropy")
    scores = torch.tensor([1.0, -2.0])
    rewards = losses.kl_penalized_rewards(scores, logps, ref, mask, kl_coef=0.5)
    assert_close(rewards[0, 5], -0.5 * k1[0, 5] + 1.0, torch.float32, "last token")
    assert_close(rewards[1, 3], -0.5 * k1[1, 3] - 2.0, torch.float32, "last unmasked token")
    with pytest.raises(ValueError, match="estimator"):
        losses.kl_penalty(logps, ref, mask, "k9")
