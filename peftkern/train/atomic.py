"""Writing so that nothing a user saved is ever lost: into a temp file or directory beside the
target, flushed to the disk, then renamed over it. A write that fails (full disk, I/O error, no
permission) or a process killed mid-write leaves the previous version intact and no temp file.

Temp files are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); what is renamed into place
gets the modes of an ordinary file or directory under the process's umask."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

from peftkern.train.errors import SaveError

TEMP_PREFIX = ".tmp-"
RETRY_DELAY_S = 2.0  # seconds before the first retry of a failed save; doubles each time


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: str, directory: bool) -> None:
    """Give a temp file (0600) or directory (0700) the mode the umask gives new files (0666 & ~umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def fsync_dir(path: str) -> None:
    """Flush a directory entry (a rename) to the disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str, public: bool = True) -> None:
    """fsync every file under ``path``, then the directories; with ``public``, give each the mode the
    umask gives new files (writers such as safetensors create theirs 0600)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            if public:
                public_mode(file, directory=False)
        if public and root != path:
            public_mode(root, directory=True)
        fsync_dir(root)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temp directory beside ``final``; on success it replaces ``final`` by rename."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        public_mode(tmp, directory=True)
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(final):
            old = tempfile.mkdtemp(prefix=TEMP_PREFIX + "old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(os.path.join(old, "x"), final)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temp file, fsync and ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp, directory=False)
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_temp_entries(directory: str) -> None:
    """Delete what a killed writer left in ``directory`` (entries named ``.tmp-*``)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def as_os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError when it is one, or wraps one (safetensors reports a failed write as
    ``SafetensorError: ... I/O error: ... (os error 28)``); else None."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def with_retries(write: Callable[[], object], what: str, kept: str, retries: int = 0, warn=None):
    """Run ``write()``; on an I/O error retry up to ``retries`` times (waiting ``RETRY_DELAY_S``,
    doubling), then raise SaveError naming ``what`` failed, the OS error, and what is ``kept`` intact."""
    attempt = 0
    while True:
        try:
            return write()
        except Exception as raised:
            exc = as_os_error(raised)
            if exc is None or isinstance(raised, SaveError):
                raise
            reason = f"{exc.strerror or exc}" + (f" (errno {exc.errno})" if exc.errno else "")
            if attempt < retries:
                delay = RETRY_DELAY_S * 2 ** attempt
                attempt += 1
                if warn is not None:
                    warn(f"writing {what} failed: {reason}; retry {attempt} of {retries} in {delay:g} s")
                time.sleep(delay)
                continue
            tried = f" after {retries} retries" if retries else ""
            raise SaveError(f"could not write {what}{tried}: {reason}. {kept} "
                            "Free space or fix the permission, then resume with --resume"
                            + ("" if retries else " (--save-retries N retries a failed write)") + ".") from raised
