"""``peftkern grpo`` / ``peftkern rloo`` on the micro model: the trainer's loss on a rollout equals TRL
1.16's GRPOTrainer / RLOOTrainer loss code (and its gradients of the LoRA weights) on the same
rollout; the sampler's token log-probs are the training forward's; the plan over rollouts,
iterations and slices; DoRA and QLoRA policies; bad rewards, settings and prompts fail naming them."""
import json
import os

import pytest
import torch

from peftkern.losses.grpo import GRPO_LOSS_TYPES
from peftkern.train.config import TrainConfig
from peftkern.train.data import IGNORE_INDEX
from peftkern.train.errors import ConfigError, DataError
from peftkern.train.rewards import RewardError, answer_format, exact_answer
from peftkern.train.run import build_trainer
from tests.losses import _grpo_peers as peers

REWARD = "tests.train.grpo_rewards:lowercase_share"


def _cfg(out, **kw):
    base = dict(model="tiny-micro", lora_r=4, lora_alpha=8, lr=1e-2, batch_size=2, max_steps=2, out=str(out),
                quiet=True, log_every=1, strategy="none", num_generations=4, max_completion_length=6,
                reward_fn=REWARD, temperature=0.9)
    base.update(kw)
    return TrainConfig(**base).check()


def _trainer(kind, cfg, n_eval=4):
    t = build_trainer(kind, cfg)
    t.eval_examples = t.eval_examples[:n_eval]
    torch.manual_seed(0)
    t.prepare()
    return t


def _policy_logps(t, batch):
    """[N, T-1] log-probs of the labels from the model's full logits at the run's temperature."""
    logits = t.module.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / t.cfg.temperature, -1)
    labels = batch["labels"][:, 1:]
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE_INDEX)


def _lora_grads(t):
    return {n: p.grad.clone() for n, p in t.module.named_parameters() if p.requires_grad and p.grad is not None}


def _micro(t, rows=None):
    ro = t.rollout
    rows = rows or slice(0, t.cfg.batch_size * t.cfg.num_generations)
    return {k: (ro[k][rows] if ro.get(k) is not None else None) for k in t.TENSORS}


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_step_loss_equals_trl(tmp_path, loss_type):
    """One micro-batch of a rollout (mu = 2, so old log-probs from the sampler, and beta > 0): our loss
    in TRL's normalization and the LoRA gradients equal TRL's _compute_loss on logits of the same model."""
    level = "sequence" if loss_type == "grpo" else "token"
    t = _trainer("grpo", _cfg(tmp_path, loss_type=loss_type, beta=0.04, num_iterations=2, delta=1.6,
                              epsilon_high=0.28 if loss_type != "cispo" else 4.0, importance_sampling_level=level))
    t.rollout = t.make_rollout(0)
    batch = _micro(t)
    assert t.shared_prompts(batch) is not None and t.module.shares_prompts()  # each prompt runs once per group
    with torch.no_grad():  # move the policy off the sampler so ratios are not all 1
        for p in t.module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    loss_sum, metrics = t.loss(t.model, batch)
    units = {"bnpo": 1.0, "dapo": float(t.rollout["tokens"]), "cispo": float(t.rollout["tokens"])}.get(
        loss_type, float(batch["input_ids"].shape[0]))
    (loss_sum / units).backward()
    ours = _lora_grads(t)
    t.module.zero_grad(set_to_none=True)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    cfg = t.cfg
    expected, trl_metrics = peers.trl_grpo_loss(
        _policy_logps(t, batch), batch["old_logps"], batch["ref_logps"], batch["advantages"], mask,
        loss_type=loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta, delta=cfg.delta,
        importance_sampling_level=level, max_completion_length=cfg.max_completion_length,
        num_items_in_batch=t.rollout["tokens"])
    expected.backward()
    assert abs(float(loss_sum / units) - float(expected)) <= 1e-5 * max(1.0, abs(float(expected)))
    for name, g in _lora_grads(t).items():
        err = (ours[name] - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 1e-4, (name, float(err))
    assert abs(float(metrics["kl"]) - trl_metrics["kl"]) < 1e-5


def test_rloo_step_loss_equals_trl(tmp_path):
    t = _trainer("rloo", _cfg(tmp_path, num_iterations=2, beta=0.05))
    t.rollout = t.make_rollout(0)
    batch = _micro(t)
    with torch.no_grad():
        for p in t.module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    loss_sum, _ = t.loss(t.model, batch)
    (loss_sum / batch["input_ids"].shape[0]).backward()
    ours = _lora_grads(t)
    t.module.zero_grad(set_to_none=True)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    expected, _ = peers.trl_rloo_loss(_policy_logps(t, batch), batch["old_logps"], batch["advantages"], mask)
    expected.backward()
    assert abs(float(loss_sum) / batch["input_ids"].shape[0] - float(expected)) < 1e-5
    for name, g in _lora_grads(t).items():
        assert (ours[name] - g).norm() / g.norm().clamp(min=1e-12) < 1e-4, name


def test_rloo_advantages_carry_the_kl_penalty(tmp_path):
    """RLOO's reward is the functions' minus beta times the summed k1 KL of the sampled tokens; its
    advantages are leave-one-out over each prompt's G completions."""
    t = _trainer("rloo", _cfg(tmp_path, beta=0.5))
    examples = t.rollout_examples(0)
    ro = t.make_rollout(0)
    mask = ro["labels"][:, 1:] != IGNORE_INDEX
    rewards, _ = t.score(examples, [row[m].tolist() for row, m in zip(ro["input_ids"][:, 1:], mask)],
                         {k: ro[k] for k in ("input_ids", "attention_mask")})
    assert ro["old_logps"] is None  # one step per rollout: the ratio is the policy's own
    assert torch.isfinite(ro["advantages"]).all() and abs(float(ro["advantages"].view(-1, 4).sum(1).abs().max())) < 1e-4
    assert "kl" in ro["stats"]


def test_sampler_logps_are_the_training_forward(tmp_path):
    """The old log-probs taken while sampling (KV cache, left-padded prompts) equal the full forward's
    on the right-padded rollout, at the sampling temperature."""
    t = _trainer("grpo", _cfg(tmp_path, num_iterations=2, temperature=0.7))
    ro = t.make_rollout(0)
    with torch.no_grad():
        expected = _policy_logps(t, ro)
    mask = ro["labels"][:, 1:] != IGNORE_INDEX
    assert mask.any()
    assert torch.allclose(ro["old_logps"][mask], expected[mask], atol=2e-5, rtol=1e-5)


def test_plan_and_resume_state(tmp_path):
    """steps_per_generation 4 with grad_accum 2 and mu 2: a rollout serves 2 slices x 2 passes = 4 steps;
    the rollout is saved in the checkpoint state only while later steps still need it."""
    t = _trainer("grpo", _cfg(tmp_path, grad_accum=2, steps_per_generation=4, num_iterations=2, max_steps=5))
    assert (t.slices, t.steps_per_rollout) == (2, 4)
    assert [t._position(s) for s in range(5)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0)]
    record = t.train_step(0)
    assert record["completion_length"] > 0 and "reward" in record and "clip_ratio" in record
    saved = t.extra_state()
    assert saved["rollout"]["index"] == 0
    t2 = _trainer("grpo", _cfg(tmp_path / "b", grad_accum=2, steps_per_generation=4, num_iterations=2, max_steps=5))
    t2.load_extra_state(json.loads(json.dumps(saved)))
    for k in t.TENSORS:
        a, b = t.rollout[k], t2.rollout[k]
        assert (a is None and b is None) or torch.equal(a, b), k
    for s in (1, 2, 3):
        t.train_step(s)
    assert t.extra_state() == {}  # the next step starts a new rollout


@pytest.mark.parametrize("policy", [dict(dora=True), dict(quant="nf4"), dict(lora_r=0, beta=0.1)])
def test_dora_qlora_and_full_policies(tmp_path, policy):
    summary = build_trainer("grpo", _cfg(tmp_path, max_steps=1, **policy)).train()
    assert summary["steps"] == 1 and summary["bad_steps"] == 0


def test_rewards_raise_wrong_length_nan(tmp_path):
    for name, pattern in [("raises", r"reward function tests.train.grpo_rewards:raises raised KeyError: .*'solution'"
                                     r".* \(on the completions of record \d+"),
                          ("one_too_few", r"returned 7 values for 8 completions"),
                          ("nan_reward", r"returned nan for completion 3 \(of record \d+\)")]:
        t = _trainer("grpo", _cfg(tmp_path / name, reward_fn=f"tests.train.grpo_rewards:{name}"))
        with pytest.raises(RewardError, match=pattern):
            t.make_rollout(0)


def test_unscorable_completions_get_no_advantage(tmp_path):
    t = _trainer("grpo", _cfg(tmp_path, reward_fn="tests.train.grpo_rewards:abstains", scale_rewards="none"))
    ro = t.make_rollout(0)
    assert torch.count_nonzero(ro["advantages"]) == 0  # one scorable completion per group: no baseline gap


def test_settings_and_prompts_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        _cfg(tmp_path, num_generations=1)
    with pytest.raises(ConfigError, match="multiple of --grad-accum"):
        build_trainer("grpo", _cfg(tmp_path, grad_accum=2, steps_per_generation=3))
    with pytest.raises(ValueError, match="unknown loss_type 'sigmoid'"):
        build_trainer("grpo", _cfg(tmp_path, loss_type="sigmoid"))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "x" * 300}) + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: the prompt has 30\d tokens; with --max-completion-length 6"):
        build_trainer("grpo", _cfg(tmp_path / "o", data=str(data), max_length=64))
    with pytest.raises(ConfigError, match="reward_weights"):
        build_trainer("grpo", _cfg(tmp_path / "w", reward_weights="1,x"))
    with pytest.raises(ConfigError, match="--reward-weights has 2 values for 1 reward"):
        build_trainer("grpo", _cfg(tmp_path / "w2", reward_weights="1,2"))


def test_bundled_rewards():
    prompts = [[{"role": "user", "content": "What is 7 + 8?"}], [{"role": "user", "content": "Reverse 'kel'."}],
               "Something else"]
    completions = [[{"role": "assistant", "content": "15"}], "lek.", "x y"]
    assert exact_answer(prompts, completions) == [1.0, 0.0, None]
    assert exact_answer(prompts, completions, answer=["15", "lek.", "x y"]) == [1.0, 1.0, 1.0]
    assert answer_format(prompts, completions) == [1.0, 0.0, 0.0]


def test_log_and_outputs(tmp_path):
    out = tmp_path / "run"
    summary = build_trainer("rloo", _cfg(out, max_steps=2)).train()
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all("reward" in r and "reward_std" in r and "completion_length" in r for r in steps)
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert "reward" in summary["eval_after"]


def test_reward_model_truncation_mask_and_entropy_quantile(tmp_path):
    """--reward-model scores the rollouts (a 'peftkern rm' output); --mask-truncated-completions takes
    completions cut at max_completion_length out of the loss; --top-entropy-quantile trains."""
    build_trainer("rm", TrainConfig(model="tiny-micro", lora_r=4, lora_alpha=8, batch_size=4, max_steps=1,
                                    out=str(tmp_path / "rm"), quiet=True, strategy="none").check()).train()
    t = _trainer("grpo", _cfg(tmp_path / "g", reward_fn=None, reward_model=str(tmp_path / "rm" / "reward_model"),
                              mask_truncated_completions=True, max_completion_length=2, top_entropy_quantile=0.5))
    ro = t.make_rollout(0)
    assert "rewards/reward_model" in ro["stats"] and ro["stats"]["reward_std"] > 0
    truncated = ro["stats"]["clipped_ratio"]
    scored_rows = (ro["labels"] != IGNORE_INDEX).any(1).float().mean().item()
    assert truncated > 0 and abs(scored_rows - (1 - truncated)) < 1e-6
    t.rollout = ro
    record = t.train_step(0)  # every completion may be truncated here: a zero loss, never NaN
    assert not record.get("skipped") and record["loss"] == record["loss"] and record["entropy"] >= 0


def test_cli_repeated_reward_functions(tmp_path):
    from peftkern import cli

    out = tmp_path / "cli"
    code = cli.main(["grpo", "--model", "tiny-micro", "--lora-r", "4", "--max-steps", "1", "--batch-size", "2",
                     "--num-generations", "2", "--max-completion-length", "4", "--reward-fn", REWARD, "--reward-fn",
                     "tests.train.grpo_rewards:short", "--reward-weights", "1,2", "--out", str(out), "--quiet"])
    assert code == 0
    with open(out / "log.jsonl") as f:
        step = [r for r in map(json.loads, f) if "loss" in r][0]
    assert {"rewards/lowercase_share", "rewards/short"} <= set(step)
    assert abs(step["reward"] - (step["rewards/lowercase_share"] + 2 * step["rewards/short"])) < 1e-5


def test_init_adapter_trains_on_top_of_an_sft_adapter(tmp_path):
    """--init-adapter merges an SFT adapter first: the merged model is the reference (adapters off) and
    is written to <out>/base_model, which the new adapter names; base_model + the new adapter is the
    trained policy."""
    import safetensors.torch as st
    from transformers import AutoModelForCausalLM

    from peftkern.train.adapters import adapters_disabled
    from peftkern.tuners import load_adapter

    build_trainer("sft", TrainConfig(model="tiny-micro", lora_r=4, lora_alpha=8, lr=5e-2, batch_size=4, max_steps=2,
                                     out=str(tmp_path / "sft"), quiet=True, strategy="none").check()).train()
    sft = str(tmp_path / "sft" / "adapter")
    assert any(v.abs().max() > 0 for k, v in st.load_file(f"{sft}/adapter_model.safetensors").items() if "lora_B" in k)
    out = tmp_path / "grpo"
    t = build_trainer("grpo", _cfg(out, init_adapter=sft, max_steps=1, beta=0.1))
    t.eval_examples = t.eval_examples[:2]
    t.train()
    with open(out / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(out / "base_model")
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad(), adapters_disabled(t.module.lm):
        reference = t.module.lm(input_ids=ids).logits
        assert torch.allclose(base(input_ids=ids).logits, reference, atol=1e-5)
        policy = load_adapter(base, str(out / "adapter"), is_trainable=False)(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(policy, t.module.lm(input_ids=ids).logits, atol=1e-5)


def test_shared_prefill_decodes_as_the_plain_batch(tmp_path):
    """Prefilling each prompt once and repeating its KV cache for its G copies draws the same tokens
    with the same log-probs as decoding all G x prompts rows from scratch (prompts of several lengths)."""
    from peftkern.generate import DecodingSettings

    t = _trainer("grpo", _cfg(tmp_path))
    examples = t.rollout_examples(0) + t.rollout_examples(1)
    assert len({len(e["prompt_ids"]) for e in examples}) > 1
    rows = [e["prompt_ids"] for e in examples for _ in range(4)]
    settings = DecodingSettings(max_new_tokens=6, do_sample=True, temperature=0.9).check()
    outs = [t.sample(rows, settings, torch.Generator().manual_seed(3), group=g, keep_logps=True) for g in (1, 4)]
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    assert torch.allclose(outs[0][2], outs[1][2], atol=1e-5)
    plain = t.sample(rows, settings, torch.Generator().manual_seed(3), group=4)  # no log-probs kept: same draws
    assert plain[0] == outs[0][0] and plain[2] is None
