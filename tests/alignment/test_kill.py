"""A pipeline killed with SIGKILL in the middle of a round (inside its DPO stage, which checkpoints
every step) and started again with --resume finishes with the report of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.alignment.test_pipeline import MICRO

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = {**MICRO, "stages": [MICRO["stages"][0], MICRO["stages"][1], MICRO["stages"][3],
                            {"stage": "dpo", "settings": {**MICRO["stages"][4]["settings"], "max_steps": 10,
                                                          "save_every": 1}}]}


def _start(path, out, *extra):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "peftkern", "pipeline", path, "--out", out, "--quiet", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done(out):
    try:
        with open(os.path.join(out, "state.json")) as f:
            return json.load(f)["done"]
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_sigkill_mid_round_then_resume(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    full = _start(str(path), str(tmp_path / "full"))
    assert full.wait(timeout=900) == 0, full.stdout.read()

    out = str(tmp_path / "killed")
    proc = _start(str(path), out)
    checkpoints = os.path.join(out, "round-1", "dpo", "checkpoints")
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:  # kill once DPO has written a checkpoint
        if "round-1/rlaif" in _done(out) and os.path.isdir(checkpoints) and \
                any(n.startswith("step-") for n in os.listdir(checkpoints)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _done(out)
    assert "round-1/sft" in done_before
    with open(os.path.join(out, "state.json")) as f:  # killed inside round 1 (almost always inside its DPO stage)
        assert [r["round"] for r in json.load(f)["rounds"]] == [0]

    again = _start(str(path), out)
    assert again.wait(timeout=60) == 2 and "--resume" in again.stdout.read()
    resumed = _start(str(path), out, "--resume")
    log = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, log
    assert "round-1/sft: done before (skipped)" in log
    with open(tmp_path / "full" / "report.json") as f:
        want = json.load(f)
    with open(os.path.join(out, "report.json")) as f:
        got = json.load(f)
    assert [r["metrics"] for r in got["rounds"]] == [r["metrics"] for r in want["rounds"]]
    assert got["stages"]["round-1/dpo"]["steps"] == 10
    assert got["stages"]["round-1/sft"] == done_before["round-1/sft"]   # not run again
