"""Smoke test of the whole suite: ``peftkern bench --quick --op lora`` writes the JSON, Markdown and
plot, with every row carrying the keys the report promises (checks the harness, not speed)."""
import json
import os
import subprocess
import sys

from benchmarks import harness


def test_peftkern_bench_quick_lora(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (harness.QUICK_ENV, "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-m", "peftkern.cli", "bench", "--quick", "--op", "lora", "--out",
                           str(tmp_path), "--no-progress"], capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("*-quick.json")
    doc = json.loads(json_path.read_text())
    rows = doc["rows"]
    for row in rows:
        assert set(harness.ROW_KEYS) <= set(row), row
        assert row["op"] == "lora"
    kinds = {row["kind"] for row in rows}
    assert {"measured-cpu", "modeled-h100", "static"} <= kinds
    metrics = {(row["kind"], row["metric"]) for row in rows}
    assert ("modeled-h100", "bytes beyond the base linear") in metrics
    assert ("measured-cpu", "peak RSS extra (fresh process)") in metrics
    assert ("measured-cpu", "peak live tensor bytes") in metrics
    assert doc["meta"]["quick"] is True and doc["meta"]["versions"]["torch"]
    assert json_path.with_suffix(".md").exists()
    assert list(tmp_path.glob("*-quick-lora.png"))
