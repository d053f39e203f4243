"""benchmarks/harness.py and report.py: rows, targets, the interleaved timer, the written report."""
import json

import pytest

from benchmarks import harness, report, runner


def _row(op="lora", kind="measured-cpu", ours=8.0, peer=10.0, target="<= 0.80", **extra):
    return harness.make_row(op, kind=kind, case="fwd+bwd M=4", shape={"M": 4}, dtype="torch.float32",
                            metric="step time", ours=ours, peer=peer, peer_name="peft", unit="ms", target=target,
                            **extra)


def test_row_has_the_keys_ratio_and_met():
    row = _row()
    assert set(harness.ROW_KEYS) <= set(row)
    assert row["ratio"] == pytest.approx(0.8) and row["met"] is True and row["dtype"] == "float32"
    assert _row(ours=9.0)["met"] is False
    assert _row(peer=None)["ratio"] is None and _row(peer=None)["met"] is None
    with pytest.raises(ValueError, match="kind"):
        _row(kind="guessed")


@pytest.mark.parametrize("target,ratio,met", [("<= 1.05", 1.05, True), ("< 1", 1.0, False), (">= 2x", 3.0, True),
                                               ("> 2", 2.0, False), (None, 1.0, None)])
def test_target_met(target, ratio, met):
    assert harness.target_met(target, ratio) is met


def test_interleaved_alternates_and_keeps_rounds():
    calls = []
    contenders = {name: (lambda n=name: calls.append(n)) for name in ("ours", "peft", "base")}
    samples = harness.interleaved(contenders, rounds=4, warmup=1)
    assert {name: len(s) for name, s in samples.items()} == {"ours": 4, "peft": 4, "base": 4}
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 5 and all(sorted(r) == ["base", "ours", "peft"] for r in rounds)
    assert rounds[0][:2] == ["peft", "base"] and rounds[1][:2] == ["base", "peft"]  # the others' order alternates


def test_report_writes_json_markdown_png_and_merges_ops(tmp_path):
    meta = report.run_metadata(quick=False)
    lora = [_row(), _row(kind="modeled-h100", target="<= 0.10", ours=0.17, peer=1.0),
            _row(kind="static", ours=128, peer=None, target=None, spill_bytes=0, shared_bytes=1024, ok=True)]
    paths = report.write(lora, out_dir=tmp_path, ops=["lora"], meta=meta)
    stem = f"{meta['date']}-{meta['device']}"
    assert {p.name for p in paths} == {f"{stem}.json", f"{stem}.md", f"{stem}-lora.png"}
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert len(doc["rows"]) == 3 and doc["meta"]["versions"]["torch"]
    md = (tmp_path / f"{stem}.md").read_text()
    assert "### modeled-h100" in md and "**missed**" in md and "| met |" in md
    # another op's run keeps lora's rows; a new lora run replaces them
    report.write([_row(op="nf4")], out_dir=tmp_path, ops=["nf4"], meta=meta)
    report.write([_row()], out_dir=tmp_path, ops=["lora"], meta=meta)
    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert sorted(r["op"] for r in doc["rows"]) == ["lora", "nf4"]
    assert set(doc["runs"]) == {"lora", "nf4"}


def test_runner_finds_bench_files_and_rejects_unknown_ops():
    assert "lora" in runner.available_ops()
    cmd = runner.command(["lora"], quick=True, out="/tmp/x", progress=False, threads=1)
    assert any(part.endswith("bench_lora.py") for part in cmd) and "--bench-quick" in cmd
    with pytest.raises(ValueError, match="bench_<op>.py"):
        runner.command(["no_such_op"])


def test_pick_takes_shared_shapes_only_where_given_and_never_under_quick(monkeypatch):
    monkeypatch.delenv(harness.QUICK_ENV, raising=False)
    monkeypatch.delenv(harness.SHARED_ENV, raising=False)
    assert harness.pick("full", "quick", shared="shared") == "full"
    monkeypatch.setenv(harness.SHARED_ENV, "1")
    assert harness.pick("full", "quick", shared="shared") == "shared"
    assert harness.pick("full", "quick") == "full"  # a case without shared shapes keeps its own
    monkeypatch.setenv(harness.QUICK_ENV, "1")
    assert harness.pick("full", "quick", shared="shared") == "quick"
