"""Reward models: K-way rankings with the Plackett-Luce / all-pairs Bradley-Terry losses, bootstrap
ensembles, temperature-scaling calibration and ``peftkern rm-calibrate``."""
import json
import math
import os

import pytest
import torch

from peftkern.cli import main
from peftkern.models import tasks
from peftkern.train.calibration import (calibrate, expected_calibration_error, fit_temperature, pair_nll,
                                        read_temperature, reliability, write_calibration)
from peftkern.train.config import TrainConfig
from peftkern.train.errors import ConfigError, DataError
from peftkern.train.reward_ensemble import RewardModel, aggregate, disagreement
from peftkern.train.rm import bootstrap_counts, load_reward_model, load_scorer, rm_examples
from peftkern.train.run import build_trainer


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-micro", out=str(tmp_path), quiet=True, log_every=1, seed=0, strategy="none", lora_r=0,
                lr=1e-2, batch_size=16, max_steps=4)
    base.update(kw)
    return TrainConfig(**base).check()


def _train(cfg, n_eval=24):
    torch.manual_seed(0)
    trainer = build_trainer("rm", cfg)
    trainer.eval_examples = trainer.eval_examples[:n_eval]
    return trainer, trainer.train()


def _ranking_records(items, seed=0):
    """K = 3 lists: the right answer, the bundled wrong one and an echo of the question, shuffled."""
    import random

    rng = random.Random(seed)
    out = []
    for q, a, w in items:
        texts = [a, w, q.split("'")[1] if "'" in q else q[8:-1]]
        if len(set(texts)) < 3:
            texts[2] = texts[2] + "?"
        order = list(range(3))
        rng.shuffle(order)
        out.append({"prompt": tasks._prompt(q), "completions": [[{"role": "assistant", "content": texts[i]}]
                                                                 for i in order],
                    "ranking": sorted(range(3), key=lambda j: order[j])})
    return out


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_ranking_record_order_and_pairs(tmp_path):
    from peftkern.models import build_byte_tokenizer

    rec = {"prompt": "p", "completions": ["b", "c", "a"], "ranking": [2, 0, 1]}
    path = _write(tmp_path / "r.jsonl", [rec, {"prompt": "p", "chosen": "x", "rejected": "y", "margin": 0.5}])
    tok = build_byte_tokenizer()
    ex = rm_examples(tok, path, TrainConfig(max_length=64))
    texts = [tok.decode([t for t in s["labels"] if t != -100], skip_special_tokens=True) for s in ex[0]["ranked"]]
    assert texts == ["a", "b", "c"] and ex[0]["margin"] == 0.0
    assert len(ex[1]["ranked"]) == 2 and ex[1]["margin"] == 0.5


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]}, r"r\.jsonl:2: 'ranking' \[0, 0, 1\] "
                                                                            "repeats completion 0"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}, r"r\.jsonl:2: 'ranking' has 2 entries for 3"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}, r"r\.jsonl:2: .*index 2, outside 0..1"),
    ({"prompt": "p", "completions": ["a"], "ranking": [0]}, r"r\.jsonl:2: 'completions' must be a list of at least 2"),
    ({"prompt": "p", "completions": ["a", "b"]}, r"r\.jsonl:2: missing field 'ranking'"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "chosen": "a"}, r"r\.jsonl:2: .*cannot also have"),
    ({"prompt": "p", "completions": ["a", 3], "ranking": [0, 1]}, r"r\.jsonl:2: 'completions'\[1\] must be a string"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, True]}, r"r\.jsonl:2: 'ranking' must be a list of"),
])
def test_bad_ranking_records_name_file_and_line(tmp_path, record, message):
    from peftkern.models import build_byte_tokenizer

    good = {"prompt": "p", "completions": ["a", "b"], "ranking": [1, 0]}
    path = _write(tmp_path / "r.jsonl", [good, record])
    with pytest.raises(DataError, match=message):
        rm_examples(build_byte_tokenizer(), path, TrainConfig(max_length=64))


def test_bad_settings():
    with pytest.raises(ConfigError, match="ensemble must be >= 1"):
        TrainConfig(ensemble=0).check()
    with pytest.raises(ConfigError, match="rank_loss must be one of"):
        TrainConfig(rank_loss="listnet").check()
    with pytest.raises(ConfigError, match="--reward-aggregate min combines"):
        TrainConfig(reward_aggregate="min").check()
    with pytest.raises(ConfigError, match="--reward-std-coef is the lambda"):
        TrainConfig(reward_model="x", reward_std_coef=2.0).check()


def test_cli_ensemble_zero_is_a_clear_error(tmp_path, capsys):
    assert main(["rm", "--model", "tiny-micro", "--ensemble", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert "ensemble must be >= 1" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("ensemble: zero\n")
    assert main(["rm", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "run.yaml: ensemble: expected an integer" in capsys.readouterr().err


def test_pairs_train_identically_with_either_rank_loss(tmp_path):
    histories = []
    for loss in ("bradley_terry", "plackett_luce"):
        trainer, _ = _train(_cfg(tmp_path / loss, rank_loss=loss, max_steps=3), n_eval=8)
        histories.append([(h["loss"], h["accuracy"]) for h in trainer.history])
    assert histories[0][0] == histories[1][0]  # the first step's loss: the same floating-point operations
    # later steps agree to rounding (logcumsumexp's backward rounds the gradient differently, and AdamW's
    # normalization of the first steps enlarges that: 3e-4 relative by step 3 on the bundled word tasks)
    assert [h[0] for h in histories[0]] == pytest.approx([h[0] for h in histories[1]], rel=1e-3)
    assert [h[1] for h in histories[0]] == [h[1] for h in histories[1]]


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_rankings_train(tmp_path, loss):
    train, held = tasks.split(240, 24, 0)
    cfg = _cfg(tmp_path / "run", data=_write(tmp_path / "train.jsonl", _ranking_records(train)),
               eval_data=_write(tmp_path / "eval.jsonl", _ranking_records(held, 1)), rank_loss=loss, max_steps=30,
               warmup_steps=2)
    _, s = _train(cfg)
    assert s["eval_after"]["accuracy"] > 0.75 > s["eval_before"]["accuracy"], s
    assert s["eval_after"]["loss"] < 0.8 * s["eval_before"]["loss"], s


def test_bootstrap_counts():
    counts = bootstrap_counts(50, 4, seed=3)
    assert counts.shape == (50, 4) and (counts.sum(0) == 50).all()
    assert torch.equal(counts, bootstrap_counts(50, 4, seed=3))
    assert not torch.equal(counts[:, 0], counts[:, 1])
    assert 0.25 < float((counts == 0).float().mean()) < 0.5  # ~1/e of the records left out of each head


def test_aggregates_and_disagreement():
    s = torch.tensor([[1.0, 2.0, 6.0], [3.0, 3.0, 3.0]])
    std = torch.tensor([math.sqrt(14 / 3), 0.0])
    assert torch.allclose(disagreement(s), std)
    assert aggregate(s, "mean").tolist() == [3.0, 3.0]
    assert aggregate(s, "min").tolist() == [1.0, 3.0]
    assert torch.allclose(aggregate(s, "mean_minus_std", 0.5), torch.tensor([3.0, 3.0]) - 0.5 * std)
    with pytest.raises(ValueError, match="unknown 'max'"):
        aggregate(s, "max")


def test_ensemble_trains_saves_and_scores(tmp_path):
    trainer, s = _train(_cfg(tmp_path, ensemble=3, max_steps=60, warmup_steps=2))
    assert s["eval_after"]["accuracy"] > 0.7 > s["eval_before"]["accuracy"], s
    assert s["eval_after"]["disagreement"] > 0
    boots = torch.tensor([e["boot"] for e in trainer.train_examples])
    assert boots.shape[1] == 3 and (boots.sum(0) == len(trainer.train_examples)).all()
    path = str(tmp_path / "reward_model")
    scorer = load_scorer(path)
    assert scorer.score_head.weight.shape[0] == 3
    batch = trainer.to_device(trainer.collate(trainer.eval_examples[:4]))
    members = scorer(batch["input_ids"], batch["attention_mask"])["scores"]
    assert members.shape == (batch["input_ids"].shape[0], 3)
    for how in ("mean", "min", "mean_minus_std"):
        rm = load_reward_model(path, how, 0.7)
        out = rm(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(out["member_scores"], members)
        assert torch.allclose(out["scores"], aggregate(members, how, 0.7))
        assert torch.allclose(rm.uncertainty(batch["input_ids"], batch["attention_mask"]), members.std(-1, correction=0))


def test_single_head_refuses_min(tmp_path):
    _train(_cfg(tmp_path, max_steps=1), n_eval=4)
    with pytest.raises(ConfigError, match="has one head"):
        load_reward_model(str(tmp_path / "reward_model"), "min")
    rm = load_reward_model(str(tmp_path / "reward_model"))
    assert rm.heads == 1


def test_temperature_recovers_a_known_scale():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, generator=gen, dtype=torch.float64) * 2
    won = torch.rand(20000, generator=gen, dtype=torch.float64) < torch.sigmoid(z)
    margins = torch.where(won, z, -z) * 3.0  # an over-confident model: true logits times 3
    t = fit_temperature(margins)
    assert t == pytest.approx(3.0, rel=0.05)
    assert pair_nll(margins, t) < pair_nll(margins) and pair_nll(margins, t) <= pair_nll(margins, 0.95 * t)
    rec = calibrate(margins)
    assert rec["ece_after"] < 0.02 < rec["ece_before"], rec


def test_ece_by_hand():
    # confidences sigmoid(|d|): d = 0 -> 0.5 (half right); d = +-ln 3 -> 0.75; bins of width 0.25
    d = [0.0, math.log(3), -math.log(3), math.log(3)]
    rows = reliability(d, 1.0, bins=2)
    assert [r["count"] for r in rows] == [1, 3]
    assert rows[1]["confidence"] == pytest.approx(0.75) and rows[1]["accuracy"] == pytest.approx(2 / 3)
    assert expected_calibration_error(d, 1.0, bins=2) == pytest.approx(0.25 * 0.0 + 0.75 * abs(2 / 3 - 0.75))


def test_calibration_file_is_applied_and_checked(tmp_path):
    _train(_cfg(tmp_path, max_steps=1), n_eval=4)
    path = str(tmp_path / "reward_model")
    assert read_temperature(path) == 1.0
    trainer = build_trainer("rm", _cfg(tmp_path / "x", max_steps=1))
    batch = trainer.collate(trainer.eval_examples[:3])
    raw = load_reward_model(path)(batch["input_ids"], batch["attention_mask"])["scores"]
    write_calibration(path, {"temperature": 2.0})
    scaled = load_reward_model(path)(batch["input_ids"], batch["attention_mask"])["scores"]
    assert torch.allclose(scaled, raw / 2)
    uncal = load_reward_model(path, calibrated=False)(batch["input_ids"], batch["attention_mask"])["scores"]
    assert torch.equal(uncal, raw)
    (tmp_path / "reward_model" / "calibration.json").write_text('{"temperature": -1}')
    with pytest.raises(ConfigError, match="calibration.json: temperature must be a finite number > 0"):
        load_reward_model(path)


def test_rm_calibrate_command(tmp_path, capsys):
    _train(_cfg(tmp_path, max_steps=20), n_eval=4)
    _, held = tasks.split(10, 60, 5)
    data = _write(tmp_path / "held.jsonl", tasks.preference_records(held))
    rm_dir = str(tmp_path / "reward_model")
    assert main(["rm-calibrate", "--reward-model", rm_dir, "--data", data, "--bins", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 60 and report["nll_after"] <= report["nll_before"]
    assert os.path.getsize(report["plot"]) > 1000 and report["plot"].endswith("reliability.png")
    assert read_temperature(rm_dir) == pytest.approx(report["temperature"])
    assert main(["rm-calibrate", "--reward-model", str(tmp_path / "nope"), "--data", data]) == 2
    assert "no such directory" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 1]}])
    assert main(["rm-calibrate", "--reward-model", rm_dir, "--data", bad]) == 2
    assert "bad.jsonl:1: 'ranking' [1, 1] repeats completion 1" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_rl_trainers_use_the_ensemble_reward(tmp_path, kind):
    _train(_cfg(tmp_path / "rm", ensemble=2, max_steps=2), n_eval=4)
    rm_dir = str(tmp_path / "rm" / "reward_model")
    extra = dict(max_new_tokens=4) if kind == "ppo" else dict(num_generations=2, max_completion_length=4)
    cfg = _cfg(tmp_path / kind, batch_size=4, max_steps=1, reward_model=rm_dir, reward_aggregate="mean_minus_std",
               reward_std_coef=0.5, **extra)
    torch.manual_seed(0)
    trainer = build_trainer(kind, cfg)
    trainer.eval_examples = []
    trainer.train()
    rm = trainer.reward_model if kind == "grpo" else None
    if kind == "ppo":
        assert "reward_disagreement" in trainer.history[0] and trainer.history[0]["reward_disagreement"] > 0
    else:
        assert isinstance(rm, RewardModel) and rm.how == "mean_minus_std" and rm.std_coef == 0.5 and rm.heads == 2


def test_text_level_uncertainty_callable(tmp_path):
    from peftkern.evaluation import reward_model_scorer
    from peftkern.models import build_byte_tokenizer

    _train(_cfg(tmp_path, ensemble=3, max_steps=2), n_eval=4)
    path, tok = str(tmp_path / "reward_model"), build_byte_tokenizer()
    prompts = [tasks._prompt("Reverse 'abc'."), tasks._prompt("Who wrote Hamlet?")]
    spread = reward_model_scorer(path, tok, what="disagreement")(prompts, ["cba", "Shakespeare"])
    scores = reward_model_scorer(path, tok)(prompts, ["cba", "Shakespeare"])
    assert len(spread) == 2 and all(v > 0 for v in spread) and len(scores) == 2
    with pytest.raises(ValueError, match="what must be"):
        reward_model_scorer(path, tok, what="std")


def test_calibrate_on_flag(tmp_path):
    _, held = tasks.split(10, 40, 5)
    data = _write(tmp_path / "held.jsonl", tasks.preference_records(held))
    _, s = _train(_cfg(tmp_path / "run", max_steps=10, calibrate_on=data), n_eval=4)
    rm_dir = tmp_path / "run" / "reward_model"
    assert s["calibration"]["pairs"] == 40 and (rm_dir / "reliability.png").is_file()
    assert read_temperature(str(rm_dir)) == pytest.approx(s["calibration"]["temperature"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(s["calibration"]["temperature"])
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}])
    with pytest.raises(DataError, match="bad.jsonl:1: 'ranking' has 2 entries for 3"):
        _train(_cfg(tmp_path / "run2", max_steps=10, calibrate_on=bad), n_eval=4)
    assert not (tmp_path / "run2" / "reward_model").exists()  # refused before training


@pytest.mark.slow
def test_ensemble_of_adapters_learns(tmp_path):
    cfg = _cfg(tmp_path, ensemble=3, ensemble_adapters=True, lora_r=4, lora_alpha=8, max_steps=40, warmup_steps=2)
    _, s = _train(cfg)
    assert s["eval_after"]["accuracy"] > 0.7 > s["eval_before"]["accuracy"], s


def test_ensemble_of_adapters(tmp_path):
    cfg = _cfg(tmp_path, ensemble=3, ensemble_adapters=True, lora_r=4, lora_alpha=8, max_steps=3)
    trainer, _ = _train(cfg, n_eval=4)
    assert trainer.adapters == ["default", "member1", "member2"]
    lm = trainer.module.lm
    a = [dict(lm.named_parameters())[f"model.model.layers.0.self_attn.q_proj.lora_B.{n}.weight"] for n in trainer.adapters]
    assert all(float(x.detach().abs().sum()) > 0 for x in a) and not torch.equal(a[0], a[1])  # each trained, apart
    path = str(tmp_path / "reward_model")
    assert json.loads((tmp_path / "reward_model" / "ensemble.json").read_text())["adapters"] == trainer.adapters
    rm = load_reward_model(path)
    assert rm.adapters == trainer.adapters and rm.heads == 3
    batch = trainer.to_device(trainer.collate(trainer.eval_examples[:4]))
    trainer.module.eval()
    with torch.no_grad():
        live = trainer._ranked(trainer.module, batch)
    got = rm(batch["input_ids"], batch["attention_mask"])["member_scores"]
    assert torch.allclose(got[batch["slots"]], live, rtol=1e-4, atol=1e-5)
    # member h alone: adapter h on, head h
    lm.set_adapter("member2")
    with torch.no_grad():
        alone = trainer.module(batch["input_ids"], batch["attention_mask"])["scores"][:, 2]
    assert torch.allclose(got[:, 2], alone, rtol=1e-4, atol=1e-5)


def test_ensemble_adapters_settings():
    with pytest.raises(ConfigError, match="--ensemble-adapters .* needs --ensemble >= 2"):
        TrainConfig(ensemble_adapters=True).check()
    with pytest.raises(ConfigError, match="--lora-r > 0"):
        TrainConfig(ensemble=2, ensemble_adapters=True, lora_r=0).check()
    with pytest.raises(ConfigError, match="--grad-checkpointing"):
        TrainConfig(ensemble=2, ensemble_adapters=True, grad_checkpointing=True).check()
