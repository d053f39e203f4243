"""Each trainer learns on the embedded micro model and the bundled data (a few seconds each)."""
import pytest
import torch

from peftkern.train.config import TrainConfig
from peftkern.train.run import build_trainer


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-micro", out=str(tmp_path), quiet=True, log_every=1, seed=0, strategy="none")
    base.update(kw)
    return TrainConfig(**base).check()


def _train(kind, cfg, n_eval=24):
    torch.manual_seed(0)
    trainer = build_trainer(kind, cfg)
    trainer.eval_examples = trainer.eval_examples[:n_eval]
    return trainer, trainer.train()


def test_sft_loss_falls(tmp_path):
    trainer, s = _train("sft", _cfg(tmp_path, lora_r=0, lr=1e-2, batch_size=16, max_steps=30, warmup_steps=2))
    losses = [h["loss"] for h in trainer.history]
    assert s["eval_after"]["loss"] < 0.75 * s["eval_before"]["loss"], s
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert (tmp_path / "model" / "config.json").is_file()
    assert (tmp_path / "log.jsonl").is_file() and (tmp_path / "metrics.json").is_file()


def test_sft_lora_loss_falls(tmp_path):
    trainer, s = _train("sft", _cfg(tmp_path, lora_r=8, lora_alpha=16, lr=2e-2, batch_size=16, max_steps=10))
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 0.05, s
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_reward_model_accuracy(tmp_path):
    # batch 32: the bundled word tasks (corpus version 3) give tiny-micro 0.67 at batch 16, 0.92 at 32
    trainer, s = _train("rm", _cfg(tmp_path, lora_r=0, lr=1e-2, batch_size=32, max_steps=60, warmup_steps=4),
                        n_eval=48)
    assert s["eval_after"]["accuracy"] > 0.8, s
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"]
    assert (tmp_path / "reward_model" / "score_head.safetensors").is_file()


def test_dpo_preference_accuracy_rises(tmp_path):
    trainer, s = _train("dpo", _cfg(tmp_path, lora_r=8, lora_alpha=16, lr=2e-2, batch_size=16, max_steps=20,
                                    beta=0.5))
    assert s["eval_before"]["preference_accuracy"] == pytest.approx(0.5)  # policy == reference: all ties
    assert s["eval_after"]["preference_accuracy"] > 0.7, s
    assert s["eval_after"]["reward_margin"] > 0
    assert (tmp_path / "reference_logps.safetensors").is_file()


def test_kto_loss_falls(tmp_path):
    trainer, s = _train("kto", _cfg(tmp_path, lora_r=0, lr=5e-3, batch_size=32, max_steps=40, beta=1.0))
    assert s["eval_after"]["loss"] < s["eval_before"]["loss"] - 0.04, s
    losses = [h["loss"] for h in trainer.history]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_ppo_mean_reward_rises(tmp_path):
    cfg = _cfg(tmp_path, lora_r=0, lr=1e-2, batch_size=16, max_steps=20, max_new_tokens=6,
               kl_coef=0.01, reward_fn="tests.train.rewards:lowercase_fraction")
    trainer, s = _train("ppo", cfg, n_eval=16)
    assert s["eval_after"]["reward"] > s["eval_before"]["reward"] + 0.3, s  # greedy responses
    sampled = [h["reward"] for h in trainer.history]
    assert sum(sampled[-5:]) / 5 > sum(sampled[:5]) / 5 + 0.1, sampled  # rollouts
    assert all("kl_coef" in h and "value_loss" in h for h in trainer.history)
