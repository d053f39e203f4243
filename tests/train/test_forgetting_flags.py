"""The trainer's tools against forgetting: multi-task mixing (weights, temperature, per-task losses),
rehearsal (an exact replay share, deterministic, resumable), and --ewc / --l2sp folded into the
optimizer step; bad input named."""
import json
import random

import pytest
import torch

from peftkern.cli import main
from peftkern.models import tasks
from peftkern.optim import PagedAdamW
from peftkern.train.config import TrainConfig
from peftkern.train.errors import ConfigError
from peftkern.train.mixing import REHEARSAL, MixedSampler, parse_data_spec, task_probabilities
from peftkern.train.run import build_trainer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("forgetting")
    for skill, seed in (("upper", 1), ("reverse", 2)):
        rng = random.Random(seed)
        items = [tasks.make_question(rng, skill) for _ in range(48)]
        (d / f"{skill}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks.sft_records(items)))
    text = tasks.pretraining_text(tasks.questions(40, 3))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    return d


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-micro", out=str(tmp_path / "run"), quiet=True, log_every=1, seed=0, strategy="none",
                lora_r=4, lora_alpha=8, batch_size=8, max_steps=4, lr=1e-2)
    base.update(kw)
    return TrainConfig(**base).check()


# -- the sampler ----------------------------------------------------------------------------------------

def _sampler(ratio=0.25, probs=(0.75, 0.25), seed=0, batch=8):
    tasks_ = {"a": [{"id": f"a{i}"} for i in range(30)], "b": [{"id": f"b{i}"} for i in range(7)]}
    replay = [{"id": f"r{i}", "task": REHEARSAL} for i in range(5)]
    return MixedSampler(tasks_, dict(zip("ab", probs)), replay if ratio else None, ratio, batch, seed)


def test_replay_share_is_exact_and_tasks_follow_their_weights():
    s = _sampler(ratio=0.3)
    steps = 400
    counts = {"a": 0, "b": 0, "r": 0}
    for step in range(steps):
        batch = s.global_examples(step)
        assert len(batch) == 8
        for e in batch:
            counts[e["id"][0]] += 1
    assert counts["r"] == int(0.3 * 8 * steps)  # floor((s+1) r G) - floor(s r G) sums to exactly r G steps
    main_total = counts["a"] + counts["b"]
    assert abs(counts["a"] / main_total - 0.75) < 0.03


def test_deterministic_in_seed_and_step_and_cursors_count_what_steps_took():
    s1, s2, s3 = _sampler(seed=5), _sampler(seed=5), _sampler(seed=6)
    seq1 = [[e["id"] for e in s1.global_examples(k)] for k in range(20)]
    assert seq1 == [[e["id"] for e in s2.global_examples(k)] for k in range(20)]
    assert seq1 != [[e["id"] for e in s3.global_examples(k)] for k in range(20)]
    fresh = _sampler(seed=5)  # a resumed run: cursors rebuilt from the step alone
    assert [e["id"] for e in fresh.global_examples(13)] == seq1[13]
    taken = {"a": 0, "b": 0, REHEARSAL: 0}
    for batch in seq1[:13]:
        for i in batch:
            taken[{"a": "a", "b": "b", "r": REHEARSAL}[i[0]]] += 1
    assert fresh.cursors(13) == taken
    # every pass over a task is a permutation of it
    b_ids = [i for batch in seq1 for i in batch if i.startswith("b")]
    assert sorted(b_ids[:7]) == sorted(f"b{i}" for i in range(7))


def test_micro_batches_cut_the_global_batch_per_process():
    s = _sampler(batch=8)
    whole = [e["id"] for e in s.global_examples(3)]
    rank0 = s.micro_batches(3, rank=0, batch_size=2, grad_accum=2)
    rank1 = s.micro_batches(3, rank=1, batch_size=2, grad_accum=2)
    assert [e["id"] for mb in rank0 + rank1 for e in mb] == whole


def test_temperature_and_weights():
    assert task_probabilities([100, 25], [None, None], 1.0) == pytest.approx([0.8, 0.2])
    assert task_probabilities([100, 25], [None, None], 1e9) == pytest.approx([0.5, 0.5])
    assert task_probabilities([100, 25], [0.5, 0.5], 1.0) == pytest.approx([0.5, 0.5])
    assert task_probabilities([1, 1], [0.9, 0.1], 2.0) == pytest.approx([0.75, 0.25])
    with pytest.raises(ConfigError, match="mix_temperature"):
        task_probabilities([1], [None], 0.0)


def test_data_spec_errors_name_the_problem():
    assert [(s.path, s.weight) for s in parse_data_spec("a.jsonl:0.5,b.jsonl:1.5")] == [("a.jsonl", 0.5),
                                                                                       ("b.jsonl", 1.5)]
    with pytest.raises(ConfigError, match="give a weight to every file or to none"):
        parse_data_spec("a.jsonl:0.5,b.jsonl")
    with pytest.raises(ConfigError, match="the weight of a.jsonl must be a number > 0, got '-1'"):
        parse_data_spec("a.jsonl:-1")
    with pytest.raises(ConfigError, match="share the task name 'a'"):
        parse_data_spec("x/a.jsonl,y/a.jsonl")
    with pytest.raises(ConfigError, match="rehearsal_ratio must be in \\[0, 1\\)"):
        _sampler(ratio=1.0)


@pytest.mark.parametrize("flags, message", [
    (["--ewc-lambda", "-1"], "ewc_lambda must be a finite number >= 0, got -1.0"),
    (["--rehearsal-ratio", "1.0"], "rehearsal_ratio must be in [0, 1), got 1.0"),
    (["--rehearsal-ratio", "-0.1"], "rehearsal_ratio must be in [0, 1), got -0.1"),
    (["--l2sp", "--ewc", "F.safetensors"], "--ewc and --l2sp both given"),
    (["--mix-temperature", "0"], "mix_temperature must be a finite number > 0"),
    (["--ewc", "nowhere.safetensors"], "--ewc nowhere.safetensors: no such Fisher file"),
    (["--data", "a.jsonl:0.5,b.jsonl"], "give a weight to every file or to none"),
])
def test_cli_names_bad_input(tmp_path, capsys, flags, message):
    code = main(["sft", "--model", "tiny-micro", "--out", str(tmp_path / "o"), "--quiet", *flags])
    assert code == 2
    assert message in capsys.readouterr().err


# -- in a run ---------------------------------------------------------------------------------------------

def test_mixed_run_logs_each_tasks_loss_and_replays(files, tmp_path):
    cfg = _cfg(tmp_path, data=f"{files}/upper.jsonl:0.5,{files}/reverse.jsonl:0.5",
               eval_data=f"{files}/upper.jsonl,{files}/reverse.jsonl", rehearsal_data=str(files / "text.jsonl"),
               rehearsal_ratio=0.25)
    trainer = build_trainer("sft", cfg)
    trainer.eval_examples = trainer.eval_examples[:8] + trainer.eval_examples[-8:]
    summary = trainer.train()
    assert {"loss/upper", "loss/reverse"} <= set(summary["eval_after"])
    replayed = sum(e.get("task") == REHEARSAL for s in range(4) for mb in trainer.micro_batches(s) for e in mb)
    assert replayed == 4 * 2  # 0.25 of 8 per step
    logged = [h for h in trainer.history if "loss/rehearsal" in h]
    assert logged and all(h["loss/rehearsal"] > 0 for h in logged)
    state = json.loads(next((tmp_path / "run").glob("checkpoints/*/state.json")).read_text())
    assert state["trainer"]["data_step"] == 4 and set(state["trainer"]["data_cursors"]) == {"upper", "reverse",
                                                                                              REHEARSAL}


@pytest.mark.slow
def test_a_resumed_mixed_run_sees_the_same_batches(files, tmp_path):
    spec = dict(data=f"{files}/upper.jsonl,{files}/reverse.jsonl", rehearsal_data=str(files / "text.jsonl"),
                rehearsal_ratio=0.2, eval_data=str(files / "upper.jsonl"), save_every=2, schedule="constant")
    straight = build_trainer("sft", _cfg(tmp_path / "a", max_steps=4, **spec))
    straight.eval_examples = straight.eval_examples[:4]
    straight.train()
    first = build_trainer("sft", _cfg(tmp_path / "b", max_steps=2, **spec))
    first.eval_examples = first.eval_examples[:4]
    first.train()
    resumed = build_trainer("sft", _cfg(tmp_path / "b", max_steps=4, resume=True, **spec))
    resumed.eval_examples = resumed.eval_examples[:4]
    resumed.train()
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history[2:]], rel=1e-5)
    ids = [[e["input_ids"] for mb in t.micro_batches(3) for e in mb] for t in (straight, resumed)]
    assert ids[0] == ids[1]


def test_l2sp_holds_the_parameters_to_their_start(tmp_path):
    def moved(**kw):
        trainer = build_trainer("sft", _cfg(tmp_path / str(len(kw)), **kw))
        start = {n: p.detach().clone() for n, p in trainer.module.lm.named_parameters() if p.requires_grad}
        trainer.eval_examples = trainer.eval_examples[:4]
        trainer.train()
        assert isinstance(trainer.optimizer, PagedAdamW) == bool(kw)
        return sum((p.detach() - start[n]).norm() ** 2 for n, p in trainer.module.lm.named_parameters()
                   if p.requires_grad) ** 0.5

    free = moved()
    held = moved(l2sp=True, ewc_lambda=1e4)
    assert held < 0.5 * free


def test_ewc_with_a_fisher_of_other_parameters_is_refused(tmp_path, capsys):
    fisher = tmp_path / "F.safetensors"
    assert main(["fisher", "--model", "tiny-micro", "--lora-r", "8", "--samples", "2", "--out", str(fisher),
                 "--quiet"]) == 0
    code = main(["sft", "--model", "tiny-micro", "--lora-r", "4", "--ewc", str(fisher), "--max-steps", "1",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"--ewc {fisher}" in err and "has shape (8, 32) in the Fisher file but (4, 32)" in err


def test_ewc_run_anchors_every_trainable_parameter_with_its_fisher(tmp_path):
    fisher = tmp_path / "F.safetensors"
    assert main(["fisher", "--model", "tiny-micro", "--lora-r", "4", "--lora-alpha", "8", "--samples", "3",
                 "--out", str(fisher), "--quiet"]) == 0
    trainer = build_trainer("sft", _cfg(tmp_path, ewc=str(fisher), ewc_lambda=5.0, ewc_fisher_bits=8, max_steps=1))
    trainer.eval_examples = trainer.eval_examples[:4]
    with _no_warning():
        trainer.train()
    opt = trainer.optimizer
    assert opt.param_groups[0]["anchor_lambda"] == 5.0
    anchored = [p for p in trainer.module.lm.parameters() if p.requires_grad]
    assert anchored and all("anchor_fisher_codes" in opt.state[p] for p in anchored)


class _no_warning:
    """The Fisher was estimated at this run's start (same model, --lora-r and --seed): no warning."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [r for r in self.records if "Fisher was estimated" in str(r.message)]
        return False
