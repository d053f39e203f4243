"""Issue 28.4 and 28.5: strict JSON in metrics.json and log.jsonl, a torn last log line skipped on
resume; a damaged reference log-prob cache is a miss, rebuilt, and the cache is flushed before the
rename."""
import json
import math
import os
import shutil

import pytest
import torch

from peftkern.losses import RefLogpCache
from peftkern.train.errors import RunWarning
from peftkern.train.logs import LogError, dumps, read_json, read_log
from tests.train.helpers import losses, micro, poison, run, trainer


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_strings_in_both_files(tmp_path):
    t = poison(trainer("sft", micro(tmp_path, max_steps=3)), {2})
    with pytest.warns(RunWarning):
        summary = t.train()
    assert math.isnan(summary["final_loss"])
    metrics = _strict((tmp_path / "metrics.json").read_text())
    assert metrics["final_loss"] == "nan" and metrics["bad_steps"] == 1
    assert math.isnan(read_json(str(tmp_path / "metrics.json"))["final_loss"])
    lines = [_strict(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if r.get("step") == 3 and "loss" in r] == ["nan"]
    assert math.isnan(read_log(str(tmp_path / "log.jsonl"))[-2]["loss"])
    assert _strict(dumps({"a": [float("inf"), -float("inf"), torch.tensor(float("nan"))]})) == \
        {"a": ["inf", "-inf", "nan"]}


def test_a_torn_last_log_line_is_skipped_on_resume(tmp_path):
    out = tmp_path / "run"
    run("sft", micro(out, schedule="constant"))
    before = losses(str(out))
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "metrics.json").unlink()
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 7, "loss": 5.5')  # a write cut by a kill
    with pytest.warns(RunWarning, match=f"{log}:\\d+: skipping a torn last line"):
        run("sft", micro(out, schedule="constant", resume=True))
    assert losses(str(out)) == before
    lines = log.read_text().splitlines()
    assert all(_strict(ln) for ln in lines)
    lines.insert(2, '{"step": 2, "lo')  # damage before the last line is an error naming file and line
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=f"{log}:3: not a JSON log record"):
        read_log(str(log))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_reference_cache_is_rebuilt(tmp_path, damage):
    cfg = dict(max_steps=2, lora_r=4)
    run("dpo", micro(tmp_path, **cfg))
    path = tmp_path / "reference_logps.safetensors"
    from safetensors.torch import load_file

    expected = {k: v.clone() for k, v in load_file(str(path)).items()}  # load_file maps the file
    with open(path, "r+b") as f:
        f.truncate(0 if damage == "empty" else os.path.getsize(path) // 2)
    with pytest.warns(RunWarning, match="reference_logps.safetensors is truncated or corrupted .*computing the "
                                        "reference log-probs again"):
        run("dpo", micro(tmp_path, overwrite=True, **cfg))
    again = load_file(str(path))
    assert sorted(again) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(again[k], expected[k])


def test_ref_logp_cache_damaged_file(tmp_path):
    path = tmp_path / "c.safetensors"
    data = [torch.tensor([1.0, 2.0])]
    calls = []

    def compute(batch):
        calls.append(1)
        return {"chosen": batch}

    RefLogpCache(path, {"m": "x"}).load_or_build(compute, data)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="is truncated or corrupted"):
        RefLogpCache(path, {"m": "x"}).load()
    with pytest.warns(RuntimeWarning, match="rebuilding it"):
        out = RefLogpCache(path, {"m": "x"}).load_or_build(compute, data)
    assert len(calls) == 2 and torch.equal(out["chosen"], data[0])
    assert torch.equal(RefLogpCache(path, {"m": "x"}).load()["chosen"], data[0])


def test_ref_logp_cache_is_flushed_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    RefLogpCache(tmp_path / "c.safetensors").save({"x": torch.ones(3)})
    assert "fsync" in events and events.index("fsync") < events.index("replace")
