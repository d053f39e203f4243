"""A run killed with SIGKILL and resumed ends exactly as an uninterrupted one; two processes under
torchrun (gloo, CPU) take the same steps as one process at the same global batch."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from peftkern.train.errors import RunWarning
from tests.train import resume_worker
from tests.train.helpers import ROOT, env

def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    killed = str(tmp_path / "killed")
    os.makedirs(killed)
    proc = resume_worker.run_until_killed(killed, 6)
    assert proc.returncode == -signal.SIGKILL
    checkpoints = sorted(os.listdir(os.path.join(killed, "checkpoints")))
    assert checkpoints == ["step-000004"]  # step 6 had run but was never saved

    stale = f"--out {killed}: taking over the lock of a run that is gone \\(pid {proc.pid} "
    with pytest.warns(RunWarning, match=stale):
        resumed = resume_worker.run(killed, resume=True)
    straight = resume_worker.run(str(tmp_path / "straight"))
    assert resumed["final_loss"] == straight["final_loss"], (resumed, straight)
    assert resumed["eval_after"] == straight["eval_after"]
    assert _losses(killed) == _losses(str(tmp_path / "straight"))  # log rewritten from step 4 on
    assert sorted(os.listdir(os.path.join(killed, "checkpoints"))) == ["step-000008", "step-000012"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft(out, extra, nproc=1):
    args = ["-m", "peftkern", "sft", "--model", "tiny-micro", "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2",
            "--max-steps", "4", "--out", out, "--quiet", "--log-every", "1"] + extra
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port())] + args
    else:
        cmd = [sys.executable] + args
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return _losses(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _sft(str(tmp_path_factory.mktemp("one")), ["--batch-size", "4", "--grad-accum", "2"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes_match_one(tmp_path, strategy, one_process):
    two = _sft(str(tmp_path / strategy), ["--batch-size", "4", "--grad-accum", "1", "--strategy", strategy], nproc=2)
    one = one_process
    assert (tmp_path / strategy / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (step, one, two)
