"""Issue 24: SIGTERM / SIGINT checkpoint at the next step boundary and stop cleanly; a second signal
stops at once; under torchrun every process stops after the same step."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from peftkern.cli import main
from peftkern.train import checkpoint as ck
from peftkern.train.outdir import LOCK_NAME
from tests.train import resume_worker
from tests.train.helpers import ROOT, checkpoints, env, losses, micro, run, temp_entries


def _signal_at(step_wanted, sig=signal.SIGTERM, times=1):
    def callback(trainer, step, record):
        if step == step_wanted:
            for _ in range(times):
                os.kill(os.getpid(), sig)
    return callback


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_the_next_step_then_resume_matches(tmp_path, sig):
    out = str(tmp_path / "stopped")
    # resume_worker's run: LoRA dropout (RNG), grad accumulation, warm-up; 12 steps, checkpoints every 4
    first = resume_worker.run(out, callbacks=[_signal_at(5, sig)])
    assert first["preempted"] and first["signal"] == signal.Signals(sig).name and first["steps"] == 6
    assert checkpoints(out) == ["step-000004", "step-000006"]  # step 6 written for the signal
    assert first["checkpoint"].endswith("step-000006") and not os.path.exists(os.path.join(out, "metrics.json"))
    assert not os.path.exists(os.path.join(out, LOCK_NAME)) and not temp_entries(out)
    assert signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL)  # handlers put back

    resumed = resume_worker.run(out, resume=True)
    straight = resume_worker.run(str(tmp_path / "straight"))
    assert resumed["final_loss"] == straight["final_loss"] and resumed["eval_after"] == straight["eval_after"]
    assert losses(out) == losses(str(tmp_path / "straight"))


def test_a_second_signal_stops_at_once(tmp_path):
    out = str(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run("sft", micro(out), callbacks=[_signal_at(3, times=2)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert checkpoints(out) == ["step-000002"]  # no checkpoint for the stop: it was at once
    assert not os.path.exists(os.path.join(out, LOCK_NAME)) and not temp_entries(out)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_cli_prints_how_to_resume_and_exits_0(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", "tiny-micro", "--lora-r", "4", "--max-steps", "40", "--log-every", "1", "--out",
            str(out), "--quiet"]

    def send_when_step_2_is_logged():
        deadline = time.time() + 120
        while time.time() < deadline:
            log = out / "log.jsonl"
            if log.is_file() and sum('"loss"' in ln for ln in log.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_when_step_2_is_logged)
    sender.start()
    code = main(args)
    sender.join()
    err = capsys.readouterr().err
    assert code == 0, err
    assert "peftkern sft: stopped by SIGTERM after step" in err
    assert f"resume with: peftkern sft --model tiny-micro --lora-r 4 --max-steps 40 --log-every 1 --out {out} " \
           "--quiet --resume" in err
    newest = ck.latest_checkpoint(str(out), warn=None)
    assert newest is not None and int(newest[-6:]) < 40


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_processes_stop_after_the_same_step(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tests.train.signal_worker", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    summaries = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    assert all(s["preempted"] and s["steps"] == 3 for s in summaries), summaries  # rank 1's signal, both stop
    assert checkpoints(str(tmp_path)) == ["step-000003"]
    names = os.listdir(tmp_path / "checkpoints" / "step-000003")
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(names)
    assert ck.verify_checkpoint(str(tmp_path / "checkpoints" / "step-000003")) is None
