"""Issue 24: damaged checkpoints, --resume PATH, pruning, and writes that fail (full disk, file-size
limit, I/O error) during a checkpoint and during the adapter save."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from peftkern.train import atomic
from peftkern.train import checkpoint as ck
from peftkern.train.errors import CheckpointError, RunWarning, SaveError
from tests.train.helpers import ROOT, checkpoints, env, losses, micro, run, temp_entries


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4, 6, and its losses."""
    out = tmp_path_factory.mktemp("finished")
    run("sft", micro(out, keep_last=3))
    return str(out), losses(str(out))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "truncated weights": (lambda d: _truncate(os.path.join(d, "trainable.safetensors")),
                          "trainable.safetensors is .* bytes"),
    "missing optimizer": (lambda d: os.unlink(os.path.join(d, "optimizer.pt")), "optimizer.pt is missing"),
    "corrupted weights": (lambda d: _flip_byte(os.path.join(d, "trainable.safetensors")),
                          "trainable.safetensors does not match its sha256"),
    "no manifest": (lambda d: os.unlink(os.path.join(d, "manifest.json")), "no manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, finished, damage):
    out = _copy(finished[0], tmp_path / "run")
    hurt, message = DAMAGE[damage]
    hurt(os.path.join(out, "checkpoints", "step-000006"))
    with pytest.warns(RunWarning, match=f"step-000006 is damaged \\({message}"):
        summary = run("sft", micro(out, keep_last=3, resume=True))
    assert summary["steps"] == 6
    assert losses(out) == finished[1]  # steps 5 and 6 again from step 4: the same losses
    assert ck.verify_checkpoint(os.path.join(out, "checkpoints", "step-000006")) is None  # rewritten whole


def test_resume_path_and_its_errors(tmp_path, finished):
    out = _copy(finished[0], tmp_path / "run")
    chosen = os.path.join(out, "checkpoints", "step-000002")
    os.unlink(os.path.join(out, "metrics.json"))
    summary = run("sft", micro(out, keep_last=3, resume=chosen))
    assert summary["steps"] == 6 and losses(out) == finished[1]
    with pytest.raises(CheckpointError, match="no such directory"):
        run("sft", micro(out, resume=str(tmp_path / "nope")))
    _truncate(os.path.join(chosen, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="step-000002: the checkpoint is damaged \\(optimizer.pt is"):
        run("sft", micro(out, resume=chosen))


def test_resume_with_every_checkpoint_damaged(tmp_path, finished):
    out = _copy(finished[0], tmp_path / "run")
    for name in checkpoints(out):
        os.unlink(os.path.join(out, "checkpoints", name, "manifest.json"))
    with pytest.warns(RunWarning), pytest.raises(CheckpointError, match="none of its 3 checkpoints is complete"):
        run("sft", micro(out, resume=True))


def _save(out, step, keep_last):
    import torch

    ck.save_checkpoint(str(out), step, {"w": torch.full((4,), float(step))}, {}, {}, {"kind": "sft"}, keep_last)


def test_pruning_never_deletes_the_newest_valid_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    _truncate(os.path.join(tmp_path, "checkpoints", "step-000003", "trainable.safetensors"))
    _save(tmp_path, 4, keep_last=2)
    # kept by validity, not by step number: step 3 is damaged, so step 2 is one of the two kept
    assert checkpoints(tmp_path) == ["step-000002", "step-000004"]
    os.makedirs(tmp_path / "checkpoints" / "step-000007")  # a newer one that never finished
    ck.prune_checkpoints(str(tmp_path), 1, str(tmp_path / "checkpoints" / "step-000004"))
    assert checkpoints(tmp_path) == ["step-000004", "step-000007"]
    assert ck.latest_checkpoint(str(tmp_path), warn=None).endswith("step-000004")


def _failing_save_file(real, fail_times):
    """safetensors' save_file that writes half a file and then fails with ENOSPC, ``fail_times`` times."""
    calls = {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] <= fail_times:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)

    return save_file


def test_enospc_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def fault(trainer, step, record):
        if step == 3:
            monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(real, 10))

    with pytest.raises(SaveError, match="could not write checkpoint .*step-000004: No space left on device "
                                        "\\(errno 28\\)\\. The previous checkpoint .*step-000002 is intact"):
        run("sft", micro(tmp_path), callbacks=[fault])
    assert checkpoints(tmp_path) == ["step-000002"] and not temp_entries(str(tmp_path))
    assert ck.verify_checkpoint(str(tmp_path / "checkpoints" / "step-000002")) is None


def test_save_retries_get_past_a_passing_fault(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(atomic, "RETRY_DELAY_S", 0.0)
    real = safetensors.torch.save_file

    def fault(trainer, step, record):
        if step == 3:
            monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(real, 1))

    with pytest.warns(RunWarning, match="writing checkpoint .*step-000004 failed: No space left on device .*retry 1 "
                                        "of 2"):
        summary = run("sft", micro(tmp_path, save_retries=2), callbacks=[fault])
    assert summary["steps"] == 6 and checkpoints(tmp_path) == ["step-000004", "step-000006"]
    assert not temp_entries(str(tmp_path))


def _digest(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode() + open(os.path.join(path, name), "rb").read())
    return h.hexdigest()


def test_enospc_during_the_adapter_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    import peftkern.train.adapters as train_adapters

    run("sft", micro(tmp_path, max_steps=4))
    before = _digest(tmp_path / "adapter")

    def failing(directory, config_json, tensors):
        with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as f:
            f.write(b"\0" * 64)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = train_adapters.write_adapter_files
    monkeypatch.setattr(train_adapters, "write_adapter_files", failing)  # the name the trainers' save calls
    with pytest.warns(RunWarning, match="max_steps: 4 in the checkpoint, 6 now"), \
            pytest.raises(SaveError, match="could not write the adapter .*No space left on device.*The previous "
                                           ".*adapter is intact"):
        run("sft", micro(tmp_path, max_steps=6, resume=True))
    assert _digest(tmp_path / "adapter") == before and not temp_entries(str(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
    # the final checkpoint was written before the outputs: resuming writes them
    monkeypatch.setattr(train_adapters, "write_adapter_files", real)
    summary = run("sft", micro(tmp_path, max_steps=6, resume=True))
    assert summary["steps"] == 6 and _digest(tmp_path / "adapter") != before
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 6


def _worker(out, mode, wrap=()):
    cmd = [*wrap, sys.executable, "-m", "tests.train.fault_worker", str(out), mode]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert lines, done.stderr[-3000:]
    return done.returncode, json.loads(lines[-1])


def test_file_size_limit_during_a_checkpoint(tmp_path):
    """RLIMIT_FSIZE: the kernel refuses the write (EFBIG) in the middle of the step-4 checkpoint."""
    code, report = _worker(tmp_path / "out", "fsize")
    assert code == 2 and report["type"] == "SaveError", report
    assert "step-000004: File too large (errno 27)" in report["error"]
    assert "step-000002 is intact" in report["error"]
    assert report["checkpoints"] == {"step-000002": None} and report["temp"] == []


def _tmpfs_wrap(mount_point):
    """Run under a private 2 MiB tmpfs at ``mount_point`` (an unprivileged user + mount namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {mount_point}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size=2m tmpfs {mount_point} && exec "$0" "$@"']


@pytest.mark.slow
def test_full_tmpfs_during_a_checkpoint(tmp_path):
    code, report = _worker(tmp_path / "out", "fill", _tmpfs_wrap(tmp_path))
    assert code == 2 and report["type"] == "SaveError", report
    assert "step-000004: No space left on device (errno 28)" in report["error"]
    assert report["checkpoints"] == {"step-000002": None} and report["temp"] == []


@pytest.mark.slow
def test_full_tmpfs_during_the_adapter_save(tmp_path):
    code, report = _worker(tmp_path / "out", "fill-outputs", _tmpfs_wrap(tmp_path))
    assert code == 2 and report["type"] == "SaveError", report
    assert "could not write the adapter" in report["error"] and "No space left on device" in report["error"]
    assert report["adapter_after"] == report["adapter_before"] is not None
    assert report["checkpoints"] == {"step-000004": None, "step-000006": None} and report["temp"] == []
