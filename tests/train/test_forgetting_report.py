"""peftkern.train.forgetting: the report's data, its table, and the whole pipeline on the micro model
(a smoke run: a few steps cannot show forgetting, only that every stage and file is there)."""
import json
import os

import pytest

from peftkern.evaluation.suites import HELD_OUT_SEED
from peftkern.models import tasks
from peftkern.train import forgetting


def test_training_files_hold_one_skill_each_and_no_held_out_question(tmp_path):
    plan = dict(forgetting.PLANS["quick"], train=40, eval_limit=30)
    paths = forgetting.write_data(str(tmp_path), plan)
    held_out = {q for q, _, _ in tasks.questions(30, HELD_OUT_SEED)}
    for key, skill in (("a", forgetting.TASK_A), ("b", forgetting.TASK_B)):
        records = [json.loads(line) for line in open(paths[key])]
        assert len(records) == 40
        questions = [r["messages"][1]["content"] for r in records]
        assert not set(questions) & held_out
        assert all(tasks.answer_for(q) is not None for q in questions)
        if skill == "add":
            assert all(q.startswith("What is") for q in questions)
        else:
            assert all(q.startswith("Write") for q in questions)
    assert all("text" in json.loads(line) for line in open(paths["corpus"]))


def test_variants_cover_every_method_and_lambda():
    names = [(m, k.get("ewc_lambda")) for m, k in forgetting.variants(forgetting.PLANS["full"])]
    assert [m for m, _ in names[:3]] == ["none", "rehearsal", "rehearsal (corpus)"]
    assert [lam for m, lam in names if m == "EWC"] == list(forgetting.PLANS["full"]["ewc_lambdas"])
    assert [lam for m, lam in names if m == "L2-SP"] == list(forgetting.PLANS["full"]["l2sp_lambdas"])


@pytest.mark.slow
def test_the_pipeline_end_to_end_on_the_micro_model(tmp_path):
    report = forgetting.run_report(str(tmp_path), "quick", progress=lambda line: None, model="tiny-micro")
    methods = [r["variant"] for r in report["rows"] if r["mode"] == "full"]
    assert methods == [m for m, _ in forgetting.variants(forgetting.PLANS["quick"])]
    assert {r["mode"] for r in report["rows"]} == set(forgetting.MODES)
    row = report["rows"][0]
    for key in ("acc_a", "acc_b", "nll_a", "nll_b", "ppl", "b_gain", "acc_a_before_b", "nll_a_before_b"):
        assert isinstance(row[key], float), key
    assert [p["epoch"] for p in report["curve"]] == list(range(forgetting.PLANS["quick"]["curve_epochs"] + 1))
    for name in ("report.json", "report.md"):
        assert os.path.isfile(tmp_path / name)
    table = (tmp_path / "report.md").read_text()
    assert "| full | EWC |" in table and "| LoRA | rehearsal (corpus) |" in table
    assert os.path.isfile(tmp_path / "full" / "fisher_a.safetensors")
