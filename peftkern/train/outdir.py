"""The output directory of a run: checked before anything heavy starts, held by one writer at a time.

* ``--out`` must be a directory this process can write (a file, or no permission, fails at once);
* a non-empty ``--out`` holds another run: refused unless ``--resume`` (continue it) or
  ``--overwrite`` (delete that run's checkpoints, log and outputs first);
* a lock file (``.peftkern.lock``, an ``flock`` plus the holder's pid and host) keeps a second run out
  of a directory in use; a lock left by a run that is gone (the flock died with it) is taken over
  with a warning naming its pid.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time

from peftkern.train.atomic import TEMP_PREFIX, remove_temp_entries
from peftkern.train.errors import OutputDirError

LOCK_NAME = ".peftkern.lock"
# What a run writes into --out; --overwrite deletes these (and nothing else the user put there).
RUN_OUTPUTS = ("checkpoints", "log.jsonl", "metrics.json", "adapter", "model", "reward_model", "base_model")


def check_writable(out: str) -> None:
    """``out`` is (or can be created as) a directory this process can write to."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"--out {out}: is a file, expected a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def previous_run(out: str) -> list[str]:
    """What ``out`` holds besides the lock and temp files (sorted names)."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n != LOCK_NAME and not n.startswith(TEMP_PREFIX))


def check_new_or_resumed(out: str, resume, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` for a new run (neither ``resume`` nor ``overwrite``)."""
    held = previous_run(out)
    if held and not resume and not overwrite:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise OutputDirError(f"--out {out} is not empty (it holds {shown}): continue that run with --resume, "
                             "replace it with --overwrite, or pick another --out")


def preflight(cfg) -> None:
    """The cheap checks, before the model loads: writable, and not another run's directory."""
    check_writable(cfg.out)
    check_new_or_resumed(cfg.out, cfg.resume, cfg.overwrite)


def clear_previous_run(out: str) -> list[str]:
    """Delete what an earlier run wrote (:data:`RUN_OUTPUTS`); returns the names deleted."""
    gone = []
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        else:
            continue
        gone.append(name)
    return gone


class OutDirLock:
    """An exclusive ``flock`` on ``<out>/.peftkern.lock`` holding ``{"pid", "host", "started"}``."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self, warn=None) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirError(f"--out {self.out} is in use by another run ({_describe(holder)}); wait for it "
                                     "to finish or stop it, or pick another --out") from None
            except OSError:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our flock: start again
                os.close(fd)
                continue
            stale = _read_holder(fd)
            if stale and warn is not None:
                warn(f"--out {self.out}: taking over the lock of a run that is gone ({_describe(stale)}); "
                     "its checkpoints are checked before any is used")
            payload = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload.encode(), 0)
            self.fd = fd
            return

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {"raw": str(holder)}
    except (OSError, ValueError):
        return {"raw": "unreadable lock file"}


def _describe(holder: dict) -> str:
    if "pid" in holder:
        host = holder.get("host")
        started = holder.get("started")
        when = (time.strftime(", started %Y-%m-%d %H:%M:%S", time.localtime(started))
                if isinstance(started, (int, float)) else "")
        return f"pid {holder['pid']}" + (f" on {host}" if host else "") + when
    return holder.get("raw", "holder unknown")


def claim(cfg, warn=None) -> OutDirLock:
    """Everything before a run writes to ``cfg.out``: writable, locked, not another run's (or cleared
    with ``--overwrite``), temp files of a killed writer removed. Returns the held lock."""
    check_writable(cfg.out)
    lock = OutDirLock(cfg.out)
    lock.acquire(warn)
    try:
        check_new_or_resumed(cfg.out, cfg.resume, cfg.overwrite)
        if cfg.overwrite:
            gone = clear_previous_run(cfg.out)
            if gone and warn is not None:
                warn(f"--overwrite: deleted the previous run's {', '.join(gone)} in {cfg.out}")
        remove_temp_entries(cfg.out)
        remove_temp_entries(os.path.join(cfg.out, "checkpoints"))
    except BaseException:
        lock.release()
        raise
    return lock
