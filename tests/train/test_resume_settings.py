"""Issue 28.2: each checkpoint records the resolved settings and a fingerprint of the data; --resume
refuses what changes the model, data or objective, applies and reports what may change."""
import json
import math

import pytest

from peftkern.train import checkpoint as ck
from peftkern.train.errors import CheckpointError, RunWarning
from peftkern.train.logs import read_log
from tests.train.helpers import losses, micro, run


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A 6-step run stopped (by deleting the later checkpoints) at step 4."""
    out = tmp_path_factory.mktemp("half")
    run("sft", micro(out, schedule="constant", max_steps=6))
    return out


def _copy(half, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(half, out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "metrics.json").unlink()
    return out


@pytest.mark.parametrize("change, message", [
    (dict(lora_alpha=64), 'lora_alpha: 8.0 in the checkpoint, 64.0 now'),
    (dict(lora_r=8), "lora_r: 4 in the checkpoint, 8 now"),
    (dict(batch_size=2), "batch_size: 4 in the checkpoint, 2 now"),
    (dict(seed=1), "seed: 0 in the checkpoint, 1 now"),
])
def test_changes_to_model_or_data_are_refused(tmp_path, half, change, message):
    out = _copy(half, tmp_path)
    with pytest.raises(CheckpointError) as refused:
        run("sft", micro(out, schedule="constant", max_steps=6, resume=True, **change))
    assert message in str(refused.value) and "start a new run" in str(refused.value)


def test_a_checkpoint_of_another_model_is_refused(tmp_path, half):
    from peftkern.models import build_byte_tokenizer, build_tiny_model

    out = _copy(half, tmp_path)
    other = tmp_path / "other-model"
    build_tiny_model("micro", seed=5).save_pretrained(other)
    build_byte_tokenizer().save_pretrained(other)
    from peftkern.train.run import bundled_records

    data = tmp_path / "bundled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bundled_records("sft", 0)[0]))
    with pytest.raises(CheckpointError, match=f'model: "tiny-micro" in the checkpoint, "{other}" now'):
        run("sft", micro(out, model=str(other), data=str(data), schedule="constant", max_steps=6, resume=True))


def test_other_training_data_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("sft", micro(tmp_path / "o", data=str(data), eval_data=str(data), max_steps=2))
    rows[5]["completion"] = "changed"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CheckpointError, match="the training data: its tokenized examples differ"):
        run("sft", micro(tmp_path / "o", data=str(data), eval_data=str(data), max_steps=4, resume=True))


def test_lr_and_max_steps_changes_apply_and_are_reported(tmp_path, half):
    out = _copy(half, tmp_path)
    with pytest.warns(RunWarning) as warned:
        summary = run("sft", micro(out, schedule="constant", max_steps=8, lr=0.05, resume=True))
    said = " | ".join(str(w.message) for w in warned)
    assert "--resume: lr: 0.01 in the checkpoint, 0.05 now; the new value applies from step 4 on" in said
    assert "--resume: max_steps: 6 in the checkpoint, 8 now" in said
    rows = {r["step"]: r for r in read_log(str(out / "log.jsonl")) if "loss" in r}
    assert [rows[s]["lr"] for s in (1, 4, 5, 8)] == [0.01, 0.01, 0.05, 0.05]
    assert summary["steps"] == 8 and sorted(losses(str(out))) == list(range(1, 9))


def test_max_steps_below_the_checkpoint_and_a_finished_run(tmp_path, half):
    out = _copy(half, tmp_path)
    with pytest.raises(CheckpointError, match="the checkpoint is at step 4, past this run's 3 steps"):
        run("sft", micro(out, schedule="constant", max_steps=3, resume=True))
    run("sft", micro(out, schedule="constant", max_steps=6, resume=True))
    metrics = (out / "metrics.json").read_bytes()
    with pytest.raises(CheckpointError, match="already finished at step 6 .metrics.json.; raise --max-steps"):
        run("sft", micro(out, schedule="constant", max_steps=6, resume=True))
    assert (out / "metrics.json").read_bytes() == metrics
    summary = json.loads(metrics)
    assert math.isfinite(summary["final_loss"]) and summary["steps"] == 6


def test_resume_with_nothing_to_resume(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume in .*checkpoints holds no checkpoint; start the run "
                                              "without --resume"):
        run("sft", micro(tmp_path, resume=True))


def test_checkpoint_records_settings_and_data(tmp_path):
    run("sft", micro(tmp_path, max_steps=2))
    state = ck.read_state(ck.latest_checkpoint(str(tmp_path)))
    assert state["config"]["lr"] == 0.01 and state["config"]["model"] == "tiny-micro"
    assert len(state["data_fingerprint"]) == 64 and state["kind"] == "sft"
