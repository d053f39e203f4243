"""`peftkern sweep`: the file checked with line numbers, the plan, skipping finished runs, and a real sweep of
4 micro-model runs killed and resumed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from peftkern.cli import main
from peftkern.data import sweep as sw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SWEEP = """\
trainer: sft
search: grid
processes: 0
out: out
base:
  model: tiny-micro
  max_steps: 2
  batch_size: 4
  quiet: true
params:
  lr: [1.0e-3, 3.0e-3]
  rank: [2, 4]
"""


def write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("text, pattern", [
    ("trainer: sft\nparams:\n  lr: [1]\nfoo: 1\n", r"sweep.yaml:4: unknown key 'foo'"),
    ("trainer: sftt\nparams:\n  lr: [1]\n", r"sweep.yaml:1: 'trainer' must be one of"),
    ("trainer: sft\nparams:\n  lr: [1.0e-3]\n  lora_rnk: [2]\n", r"sweep.yaml:4: unknown setting 'lora_rnk'"),
    ("trainer: sft\nbase:\n  beta: 0.1\nparams:\n  lr: [1.0e-3]\n", r"sweep.yaml:3: 'beta' does not apply to 'peftkern sft'"),
    ("trainer: sft\nparams:\n  method: [lora, vera]\n", r"sweep.yaml:3: method 'vera' unknown"),
    ("trainer: sft\nparams:\n  lr: {low: 1.0e-4, high: 1.0e-3}\n", r"sweep.yaml:3: a \{low, high\} range needs search: random"),
    ("trainer: sft\nparams:\n  lr: 0.1\n", r"sweep.yaml:3: 'lr' must be a non-empty list"),
    ("trainer: sft\nbase:\n  out: x\nparams:\n  lr: [1]\n", r"sweep.yaml:3: 'out' is set by the sweep"),
    ("trainer: sft\nmode: best\nparams:\n  lr: [1]\n", r"sweep.yaml:2: 'mode' must be min or max"),
    ("trainer: sft\nparams:\n  lr: [1\n", r"sweep.yaml:\d+: not valid YAML"),
    ("trainer: sft\nparams:\n  lr: [-1.0]\n", r"the run \{'lr': -1.0\} is not a valid 'peftkern sft' run: lr must be positive"),
])
def test_bad_sweep_files_name_file_and_line(tmp_path, text, pattern):
    with pytest.raises(sw.SweepError, match=pattern):
        sw.plan(sw.load_sweep(write(tmp_path, text)))


def test_grid_plan_aliases_and_stable_names(tmp_path):
    path = write(tmp_path, "trainer: sft\nbase: {model: tiny-micro}\nparams:\n  rank: [4, 8]\n  alpha: [8]\n"
                           "  dropout: [0.0, 0.1]\n  epochs: [1]\n  method: [lora, dora, full]\n")
    runs = sw.plan(sw.load_sweep(path))
    assert len(runs) == 10  # 'full' drops the rank: rank 4 and 8 are the same run, planned once
    full = [r for r in runs if r.params["method"] == "full"]
    assert all(r.settings["lora_r"] == 0 and r.settings["dora"] is False for r in full)
    dora = [r for r in runs if r.params["method"] == "dora"]
    assert {r.settings["lora_r"] for r in dora} == {4, 8} and all(r.settings["lora_alpha"] == 8 for r in dora)
    assert [r.name for r in runs] == [r.name for r in sw.plan(sw.load_sweep(path))]
    assert len({r.name for r in runs}) == 10
    reordered = write(tmp_path, "trainer: sft\nparams:\n  method: [full]\n  rank: [8]\n", "b.yaml")
    assert sw.plan(sw.load_sweep(reordered))[0].settings["lora_r"] == 0
    assert runs[0].out.startswith(str(tmp_path / "runs" / "sweep" / "runs"))


def test_random_plan_is_seeded_and_in_range(tmp_path):
    path = write(tmp_path, "trainer: dpo\nsearch: random\ntrials: 6\nseed: 3\nparams:\n"
                           "  lr: {low: 1.0e-5, high: 1.0e-3, log: true}\n  rank: {low: 2, high: 16, int: true}\n"
                           "  beta: [0.05, 0.1]\n")
    runs = sw.plan(sw.load_sweep(path))
    assert len(runs) == 6 and [r.params for r in runs] == [r.params for r in sw.plan(sw.load_sweep(path))]
    for r in runs:
        assert 1e-5 <= r.params["lr"] <= 1e-3 and isinstance(r.params["rank"], int) and 2 <= r.params["rank"] <= 16


def test_finished_runs_are_skipped_and_results_sorted(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, SWEEP)
    spec = sw.load_sweep(path)
    calls = []

    def fake_run(kind, cfg):
        calls.append(cfg.out)
        os.makedirs(cfg.out, exist_ok=True)
        loss = 10 * cfg.lr + cfg.lora_r / 1000
        if cfg.lr > 2e-3 and cfg.lora_r == 4:
            raise RuntimeError("boom")
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump({"eval_after": {"loss": loss}, "seconds": 1.0}, f)

    monkeypatch.setattr(sw, "train_run", fake_run)
    assert main(["sweep", path]) == 1  # one run failed
    assert len(calls) == 4
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["metric"] for r in rows[:3]] == pytest.approx([0.012, 0.014, 0.032])
    assert rows[3]["status"] == "failed" and "boom" in rows[3]["error"]
    calls.clear()
    assert main(["sweep", path]) == 1
    assert len(calls) == 1  # only the failed run again
    out = capsys.readouterr().out
    assert out.count("skip ") == 3 + 0 and "| 1 | 0.001 | 2" in out
    assert (tmp_path / "out" / "results.png").stat().st_size > 5000
    assert "sorted by eval_after.loss" in (tmp_path / "out" / "results.md").read_text()
    assert main(["sweep", path, "--dry-run"]) == 1 - 1


def _events(out_dir):
    path = os.path.join(out_dir, "sweep_log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_sweep_of_four_runs_killed_and_resumed(tmp_path):
    path = write(tmp_path, SWEEP)
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peftkern", "sweep", path], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while sum(e["event"] == "done" for e in _events(out)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "two runs did not finish in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = [e["run"] for e in _events(out) if e["event"] == "done"]
    assert len(first) == 2
    stamps = {r: os.stat(os.path.join(out, "runs", r, "metrics.json")).st_mtime_ns for r in first}

    assert main(["sweep", path]) == 0
    events = _events(out)
    for r in first:
        assert os.stat(os.path.join(out, "runs", r, "metrics.json")).st_mtime_ns == stamps[r]
        assert [e["event"] for e in events if e["run"] == r] == ["start", "done", "skip"]
    done = [e["run"] for e in events if e["event"] == "done"]
    assert len(done) == len(set(done)) == 4
    rows = json.loads(open(os.path.join(out, "results.json")).read())["runs"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    metrics = [r["metric"] for r in rows]
    assert metrics == sorted(metrics) and all(m > 0 for m in metrics)
    assert os.path.getsize(os.path.join(out, "results.png")) > 5000


@pytest.mark.slow
def test_runs_as_parallel_processes(tmp_path):
    path = write(tmp_path, SWEEP.replace("processes: 0", "processes: 2").replace("rank: [2, 4]", "rank: [2]"))
    assert main(["sweep", path]) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    for r in rows:
        assert (out / "logs" / f"{r['run']}.log").is_file()
        assert (out / "runs" / r["run"] / "adapter").is_dir()
