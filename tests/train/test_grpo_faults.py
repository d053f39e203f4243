"""GRPO under faults: SIGKILL mid-rollout then --resume ends with the same losses as an uninterrupted
run; a non-finite loss skips the step and no checkpoint holds non-finite weights; several processes
under torchrun (DDP, FSDP2; gloo on the CPU)."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from peftkern.train import checkpoint as ck
from peftkern.train.errors import RunWarning
from tests.train import resume_worker
from tests.train.helpers import ROOT, env, losses, poison


def test_sigkill_mid_rollout_then_resume_matches_uninterrupted(tmp_path):
    killed = str(tmp_path / "killed")
    os.makedirs(killed)
    resume_worker.run_until_killed(killed, 5, "grpo")
    assert sorted(os.listdir(os.path.join(killed, "checkpoints"))) == ["step-000003"]  # inside rollout 1
    state = ck.read_state(os.path.join(killed, "checkpoints", "step-000003"))
    assert state["trainer"]["rollout"]["index"] == 1
    with pytest.warns(RunWarning, match="taking over the lock"):
        resumed = resume_worker.run(killed, resume=True, kind="grpo")
    straight = resume_worker.run(str(tmp_path / "straight"), kind="grpo")
    assert losses(killed) == losses(str(tmp_path / "straight"))
    assert resumed["final_loss"] == straight["final_loss"] and resumed["eval_after"] == straight["eval_after"]


def test_non_finite_step_is_skipped_and_never_saved(tmp_path):
    from tests.train.test_grpo_trainer import _cfg
    from peftkern.train.run import build_trainer

    t = build_trainer("grpo", _cfg(tmp_path, max_steps=4, save_every=1, keep_last=4))
    t.eval_examples = t.eval_examples[:2]
    t = poison(t, {1, 2})
    with pytest.warns(RunWarning, match="non-finite loss or gradient; the update was skipped"):
        summary = t.train()
    assert summary["bad_steps"] == 2 and math.isfinite(summary["final_loss"])
    for _, path in ck.list_checkpoints(str(tmp_path)):
        assert all(torch.isfinite(w).all() for w in ck.load_checkpoint(path)["trainable"].values())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_two_processes(tmp_path, strategy):
    out = str(tmp_path / strategy)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "peftkern", "grpo", "--model", "tiny-micro", "--lora-r", "4",
           "--lora-alpha", "8", "--lr", "1e-2", "--max-steps", "2", "--batch-size", "1", "--num-generations", "4",
           "--max-completion-length", "5", "--beta", "0.05", "--loss-type", "grpo", "--reward-fn",
           "tests.train.grpo_rewards:lowercase_share", "--reward-fn", "tests.train.grpo_rewards:short",
           "--reward-weights", "1,0.5", "--scale-rewards", "batch", "--out", out, "--quiet", "--log-every", "1",
           "--strategy", strategy]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    got = losses(out)
    assert sorted(got) == [1, 2] and all(math.isfinite(v) for v in got.values())
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert all("rewards/short" in r and "kl" in r for r in steps)
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
