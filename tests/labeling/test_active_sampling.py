"""Candidate sampling on peftkern.generate (tiny-micro) and active learning's serving order."""
import json
import math

import pytest
import torch

from peftkern.generate.loading import load_for_generation
from peftkern.generate.settings import DecodingSettings
from peftkern.labeling.active import bt_uncertainty, ensemble_disagreement, prioritize, sigmoid, uncertainties
from peftkern.labeling.db import LabelDB
from peftkern.labeling.items import Item, read_items
from peftkern.labeling.sampling import SamplingPlan, sample_candidates


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_for_generation("tiny-micro")


def test_bt_uncertainty_and_ensemble_disagreement_by_hand():
    assert bt_uncertainty([1.0, 1.0]) == 0.5
    assert bt_uncertainty([0.0, 2.0]) == pytest.approx(0.5 - (sigmoid(2.0) - 0.5))
    assert bt_uncertainty([0.0, 5.0, 0.3]) == pytest.approx(0.5 - abs(sigmoid(-0.3) - 0.5))  # the closest pair
    assert ensemble_disagreement([[1.0, 1.0], [0.0, 0.0]]) == 0.0  # members agree
    p1, p2 = sigmoid(1.0), sigmoid(-1.0)  # member 1 says a > b, member 2 the reverse
    assert ensemble_disagreement([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(math.sqrt(((p1 - p2) / 2) ** 2))


def test_most_uncertain_items_are_served_first(tmp_path, candidates):
    db = LabelDB.create_or_open(str(tmp_path / "l.sqlite"), read_items(candidates))
    confident = {"4 (good)": 3.0, "5": -3.0, "Lyon": 0.0, "Paris (good)": 0.1, "hi (good)": 1.0, "bye": 0.0,
                 "large": 0.0, "medium": 2.0, "small": 4.0, "fast": 0.0, "slow": 0.05, "still": 3.0}
    seen = []

    def scorer(prompts, completions):
        seen.append(len(completions))
        return [confident[c] for c in completions]
    found = prioritize(db, scorer)
    assert seen == [12]  # one call for every answer
    assert found["p1"] == pytest.approx(0.5 - (sigmoid(6.0) - 0.5))
    order = []
    while (got := db.next_item("alice")) is not None:
        order.append(got[0].id)
        db.save_label("alice", got[0].id, "flag", {})
    assert order == sorted(found, key=lambda i: -found[i]) == ["r2", "p2", "p3", "r1", "p1"]
    # an ensemble: lists of member rewards
    ens = uncertainties(db.items()[:1], lambda p, c: [[1.0, -1.0], [0.0, 0.0]])
    assert ens["p1"] == pytest.approx(abs(sigmoid(1.0) - sigmoid(-1.0)) / 2)


@pytest.mark.parametrize("bad, message", [(lambda p, c: [0.0], "returned 1 values for 2 answers"),
                                          (lambda p, c: [0.0, float("nan")], "expected finite numbers"),
                                          (lambda p, c: [0.0, [1.0]], "mixed single rewards and ensemble")])
def test_bad_scorers_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        uncertainties([Item("x", "p", ["a", "b"], "pairwise")], bad)


def test_sampling_gives_k_distinct_answers_reproducibly(micro):
    lm, tok = micro
    settings = DecodingSettings(max_new_tokens=6, seed=11)
    plan = SamplingPlan(k=3)
    a = sample_candidates(lm, tok, ["ab", "cd"], plan, settings)
    b = sample_candidates(lm, tok, ["ab", "cd"], SamplingPlan(k=3), settings)
    assert a == b
    for rec in a:
        assert len(rec["completions"]) == 3 and len(set(rec["completions"])) == 3 and rec["short"] == 0
        assert [c["temperature"] for c in rec["candidates"]] == [1.0] * 3


def test_duplicates_are_dropped_and_drawn_again(micro):
    lm, tok = micro
    # a near-zero temperature makes every draw the greedy answer: one distinct answer, the rest duplicates
    out = sample_candidates(lm, tok, ["ab"], SamplingPlan(k=3, max_rounds=2),
                            DecodingSettings(max_new_tokens=4, seed=0, temperature=1e-4))
    [rec] = out
    assert len(rec["completions"]) == 1 and rec["short"] == 2 and rec["duplicates_dropped"] == 4  # 2 + 2 redrawn


def test_best_of_n_keeps_the_best_or_a_spread(micro):
    lm, tok = micro
    settings = DecodingSettings(max_new_tokens=6, seed=5)

    def by_code(prompts, completions):
        return [float(sum(map(ord, c)) % 97) for c in completions]
    top = sample_candidates(lm, tok, ["ab"], SamplingPlan(k=2, strategy="best-of-n", n=6), settings, scorer=by_code)[0]
    spread = sample_candidates(lm, tok, ["ab"], SamplingPlan(k=3, strategy="best-of-n", n=6, keep="spread"), settings,
                               scorer=by_code)[0]
    every = sample_candidates(lm, tok, ["ab"], SamplingPlan(k=6), settings, scorer=by_code)[0]
    rewards = sorted((c["reward"] for c in every["candidates"]), reverse=True)
    assert [c["reward"] for c in top["candidates"]] == rewards[:2]
    assert [c["reward"] for c in spread["candidates"]] == [rewards[0], rewards[2], rewards[5]] or \
        [c["reward"] for c in spread["candidates"]] == [rewards[0], rewards[3], rewards[5]]
    with pytest.raises(ValueError, match="best-of-n needs a reward"):
        sample_candidates(lm, tok, ["ab"], SamplingPlan(k=2, strategy="best-of-n"), settings)


def test_diverse_sampling_cycles_temperatures(micro):
    lm, tok = micro
    out = sample_candidates(lm, tok, ["ab"], SamplingPlan(k=4, strategy="diverse", temperatures=(0.5, 1.5)),
                            DecodingSettings(max_new_tokens=6, seed=1))[0]
    assert [c["temperature"] for c in out["candidates"]] == [0.5, 1.5, 0.5, 1.5]
    assert len({c["seed"] for c in out["candidates"]}) == 4


def test_sample_pairs_cli_writes_what_label_serve_reads(tmp_path, capsys):
    from peftkern.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ab", "topic": "x"}\n{"prompt": "cd"}\n')
    out = tmp_path / "cands.jsonl"
    assert main(["sample-pairs", "--model", "tiny-micro", "--prompts", str(prompts), "--out", str(out), "-k", "3",
                 "--max-new-tokens", "5", "--seed", "2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["topic"] == "x" and all(len(r["completions"]) == 3 for r in rows)
    items = read_items(str(out))
    assert [it.id for it in items] == [r["id"] for r in rows] and items[0].task == "ranking"
    assert main(["sample-pairs", "--model", "tiny-micro", "--prompts", str(prompts), "--out", str(out), "-k", "1"]) == 2
    assert "k must be an integer >= 2" in capsys.readouterr().err
    # near-greedy draws: one distinct answer per prompt, nothing to compare: left out, with a warning
    assert main(["sample-pairs", "--model", "tiny-micro", "--prompts", str(prompts), "--out", str(out), "-k", "2",
                 "--max-new-tokens", "3", "--temperature", "1e-4", "--max-rounds", "1"]) == 0
    assert out.read_text() == ""
    assert f"2 prompt(s) gave fewer than 2 distinct answers in 1 round(s) and were left out: {prompts}:1, " \
           f"{prompts}:2" in capsys.readouterr().err


@pytest.mark.slow
def test_prioritize_with_peftkern_reward_models(tmp_path, candidates):
    """``label prioritize`` with a reward model written by 'peftkern rm' (and two as an ensemble) stores
    the uncertainty computed from that model's own scores."""
    from peftkern.cli import main
    from peftkern.evaluation.scoring import reward_model_scorer
    from peftkern.models import build_byte_tokenizer
    from peftkern.train.config import TrainConfig
    from peftkern.train.run import build_trainer

    rms = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        build_trainer("rm", TrainConfig(model="tiny-micro", lora_r=4, lora_alpha=8, batch_size=4, max_steps=1, seed=seed,
                                        out=str(out), quiet=True, strategy="none").check()).train()
        rms.append(str(out / "reward_model"))
    db = LabelDB.create_or_open(str(tmp_path / "l.sqlite"), read_items(candidates))
    assert main(["label", "prioritize", "--db", db.path, "--reward-model", rms[0], "--tokenizer", "tiny"]) == 0
    expected = uncertainties(db.items(), reward_model_scorer(rms[0], build_byte_tokenizer()))
    stored = {it.id: p for it, p in zip(db.items(), _priorities(db))}
    assert stored == pytest.approx(expected)
    assert main(["label", "prioritize", "--db", db.path, "--reward-model", rms[0], "--reward-model", rms[1],
                 "--tokenizer", "tiny"]) == 0
    assert all(p > 0 for p in _priorities(db))  # two different models disagree somewhere


def _priorities(db):
    import sqlite3

    return [r[0] for r in sqlite3.connect(db.path).execute("SELECT priority FROM items ORDER BY position")]
