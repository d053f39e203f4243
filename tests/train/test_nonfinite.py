"""Issue 24: a non-finite loss or gradient skips the step (counted, logged), --max-bad-steps in a row
stops the run naming the step and its records, and no checkpoint ever holds non-finite weights."""
import json
import math

import pytest
import torch

from peftkern.train import checkpoint as ck
from peftkern.train.errors import NonFiniteError, RunWarning
from peftkern.train.logs import read_log
from tests.train.helpers import micro, poison, trainer


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_one_bad_batch_is_skipped_and_counted(tmp_path, where):
    t = poison(trainer("sft", micro(tmp_path)), {2}, where)
    before = {n: p.detach().clone() for n, p in t.module.named_parameters() if p.requires_grad}
    after_step = {}

    def snapshot(tr, step, record):
        after_step[step] = {n: p.detach().clone() for n, p in tr.module.named_parameters() if p.requires_grad}

    t.callbacks.append(snapshot)
    with pytest.warns(RunWarning, match="step 3: non-finite loss or gradient; the update was skipped"):
        summary = t.train()
    assert summary["bad_steps"] == 1 and summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    for n in before:  # step 3 changed nothing; steps 2 and 4 did
        assert torch.equal(after_step[3][n], after_step[2][n]), n
    assert any(not torch.equal(after_step[4][n], after_step[3][n]) for n in before)
    rows = {r["step"]: r for r in read_log(str(tmp_path / "log.jsonl")) if "loss" in r}
    assert rows[3]["skipped"] is True and ("skipped" not in rows[2])
    assert math.isnan(rows[3][where if where == "loss" else "grad_norm"])
    if where == "gradient":
        assert math.isfinite(rows[3]["loss"])
    text = (tmp_path / "log.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: the non-finite value is a string
    for _, path in ck.list_checkpoints(str(tmp_path)):
        weights = ck.load_checkpoint(path)["trainable"]
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_max_bad_steps_in_a_row_stops_naming_step_and_records(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(16)))
    cfg = micro(tmp_path / "out", data=str(data), eval_data=str(data), max_bad_steps=2, max_steps=8)
    t = poison(trainer("sft", cfg), {3, 4, 5, 6, 7})
    with pytest.warns(RunWarning), pytest.raises(NonFiniteError) as stopped:
        t.train()
    message = str(stopped.value)
    assert message.startswith("step 5: the loss or gradients were not finite in 2 steps in a row "
                              "(--max-bad-steps 2)")
    records = sorted(e["where"] for mb in t.micro_batches(4) for e in mb)
    assert all(r in message for r in records) and f"{data}:" in message
    assert "step-000004" in message and "holds finite weights" in message
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path / "out"))] == [2, 4]  # nothing saved after the NaNs


def test_non_finite_weights_are_never_saved(tmp_path):
    def spoil(tr, step, record):
        if step == 3:
            with torch.no_grad():
                next(p for p in tr.module.parameters() if p.requires_grad).fill_(float("nan"))

    t = trainer("sft", micro(tmp_path, save_every=1), callbacks=[spoil])
    with pytest.raises(NonFiniteError, match="step 4: the trainable weights are not finite; no checkpoint written "
                                             "\\(the newest one, .*step-000003, is kept\\)"):
        t.train()
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [2, 3]
