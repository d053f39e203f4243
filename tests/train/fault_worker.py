"""Small SFT runs that run out of disk at a chosen moment: ``python -m tests.train.fault_worker OUT MODE``.

MODE ``fsize``: after step 3 of 6 the process's file-size limit drops to 4 KiB (RLIMIT_FSIZE, SIGXFSZ
ignored, so writes fail with EFBIG); the step-4 checkpoint cannot be written. MODE ``fill``: after
step 3 a filler file takes every free byte of the filesystem holding OUT (run it in a small tmpfs:
writes fail with ENOSPC). MODE ``fill-outputs``: a finished 4-step run, then the run resumed to 6
steps fills the disk after its final checkpoint, so writing the adapter fails.

Prints one JSON line: the error, each checkpoint and whether it verifies, temp files left, the
adapter's sha256 before and after; exits 2 when the (last) run stopped with an error."""
import hashlib
import json
import os
import resource
import signal
import sys

import torch

from peftkern.train.checkpoint import list_checkpoints, verify_checkpoint
from peftkern.train.errors import TrainError
from tests.train.helpers import micro, run, temp_entries


def fill(directory):
    """Take every free byte of ``directory``'s filesystem."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    size = 1 << 16
    while size:
        try:
            os.write(fd, b"\0" * size)
        except OSError:
            size //= 2
    os.close(fd)


def adapter_digest(out):
    path = os.path.join(out, "adapter")
    if not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        h.update(name.encode())
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def main():
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    at = 6 if mode == "fill-outputs" else 3

    def fault(trainer, step, record):
        if step != at:
            return
        if mode == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        else:
            fill(os.path.dirname(os.path.abspath(out)))

    report = {"error": None}
    if mode == "fill-outputs":
        run("sft", micro(out, max_steps=4))
        report["adapter_before"] = adapter_digest(out)
        cfg = micro(out, max_steps=6, resume=True)
    else:
        cfg = micro(out, max_steps=6)
    code = 0
    try:
        run("sft", cfg, callbacks=[fault])
    except TrainError as exc:
        report["error"], report["type"], code = str(exc), type(exc).__name__, 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report["checkpoints"] = {os.path.basename(p): verify_checkpoint(p) for _, p in list_checkpoints(out)}
    report["temp"] = temp_entries(out)
    report["adapter_after"] = adapter_digest(out)
    report["outputs"] = sorted(os.listdir(out))
    print(json.dumps(report))
    sys.exit(code)


if __name__ == "__main__":
    main()
