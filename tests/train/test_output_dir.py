"""Issues 24 and 28: one writer per --out (lock, stale lock taken over), a non-empty --out refused
without --resume / --overwrite, an --out that cannot be written refused before any work, the trainer
kind recorded and checked."""
import json
import os
import stat
import subprocess
import sys

import pytest

from peftkern.cli import main
from peftkern.train import checkpoint as ck
from peftkern.train.errors import CheckpointError, OutputDirError, RunWarning
from peftkern.train.outdir import LOCK_NAME, OutDirLock
from tests.train.helpers import ROOT, checkpoints, env, losses, micro, run

HOLD = """
import sys, time
from peftkern.train.outdir import OutDirLock
lock = OutDirLock(sys.argv[1]); lock.acquire(); print("held", flush=True); time.sleep(120)
"""


def test_a_second_run_on_the_same_out_fails_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match=f"--out {tmp_path} is in use by another run \\(pid {holder.pid} on "):
            run("sft", micro(tmp_path))
        assert not checkpoints(tmp_path) and not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # its holder gone (the flock died with it), the lock is taken over with a warning naming the old pid
    with pytest.warns(RunWarning, match=f"taking over the lock of a run that is gone \\(pid {holder.pid} "):
        summary = run("sft", micro(tmp_path, max_steps=2))
    assert summary["steps"] == 2 and not (tmp_path / LOCK_NAME).exists()


def test_two_trainers_in_one_process(tmp_path):
    lock = OutDirLock(str(tmp_path))
    lock.acquire()
    try:
        with pytest.raises(OutputDirError, match=f"pid {os.getpid()}"):
            run("sft", micro(tmp_path))
    finally:
        lock.release()


def test_a_new_run_into_a_used_out_is_refused(tmp_path, capsys):
    """Issue 28.1: the second run used to exit 0 with its checkpoints pruned away as they were written."""
    out = str(tmp_path)
    run("sft", micro(out, max_steps=8, save_every=4))
    code = main(["sft", "--model", "tiny-micro", "--lora-r", "4", "--max-steps", "3", "--save-every", "1",
                 "--out", out, "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (it holds adapter, base_model, checkpoints, log.jsonl, metrics.json): " \
           "continue that run with --resume, replace it with --overwrite" in err
    assert checkpoints(out) == ["step-000004", "step-000008"]
    with pytest.warns(RunWarning, match="--overwrite: deleted the previous run's checkpoints, log.jsonl, "
                                        "metrics.json, adapter, base_model"):
        summary = run("sft", micro(out, max_steps=3, save_every=1, overwrite=True))
    assert summary["steps"] == 3 and checkpoints(out) == ["step-000002", "step-000003"]
    assert sorted(losses(out)) == [1, 2, 3]


def test_resuming_with_another_trainer_is_refused(tmp_path):
    run("sft", micro(tmp_path, max_steps=2))
    state = ck.read_state(ck.latest_checkpoint(str(tmp_path)))
    assert state["kind"] == "sft" and state["config"]["lora_r"] == 4 and state["world"] == 1
    with pytest.raises(CheckpointError, match="written by peftkern sft, not peftkern dpo; resume it with "
                                              "'peftkern sft'"):
        run("dpo", micro(tmp_path, max_steps=4, resume=True))


def test_an_out_that_is_a_file_fails_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "out").write_text("x")
    loaded = []
    monkeypatch.setattr("peftkern.train.run.load_lm", lambda *a, **k: loaded.append(1))
    code = main(["dpo", "--model", "tiny-micro", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2 and not loaded
    assert f"--out {tmp_path / 'out'}: is a file, expected a directory" in capsys.readouterr().err


def test_an_out_that_cannot_be_written(tmp_path):
    """A directory without write permission (as a user), or on a read-only mount (as root, who writes
    through permission bits)."""
    script = ("import sys\nfrom peftkern.train.outdir import check_writable\nfrom peftkern.train.errors import "
              "OutputDirError\ntry:\n    check_writable(sys.argv[1])\nexcept OutputDirError as e:\n    print(e)\n")
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        os.chmod(target, stat.S_IRUSR | stat.S_IXUSR)
        wrap, reason = [], "Permission denied"
    else:
        wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                f'mount -t tmpfs -o ro,size=64k tmpfs {target} && exec "$0" "$@"']
        reason = "Read-only file system"
        if subprocess.run(wrap + ["true"], capture_output=True).returncode != 0:
            pytest.skip("root, and no user namespace to mount a read-only directory")
    done = subprocess.run(wrap + [sys.executable, "-c", script, str(target)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert f"--out {target}: cannot write there ({reason})" in done.stdout, done.stderr[-2000:]


def test_outputs_follow_the_umask(tmp_path):
    """Issue 28.8: files 0644 and directories 0755 under umask 022 (mkstemp/mkdtemp made them 0600/0700)."""
    old = os.umask(0o022)
    try:
        run("sft", micro(tmp_path, max_steps=2))
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(tmp_path):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o755, os.path.join(root, name)
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o644, os.path.join(root, name)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
