"""Checkpoints: written atomically, the last N kept, and everything a resume needs to continue the
run exactly (trainable weights, optimizer, scheduler, every RNG, the data position).

Layout: ``<out>/checkpoints/step-000040/`` holding ``trainable.safetensors`` (the parameters that
train, by name), ``optimizer.pt`` and ``scheduler.pt`` (read back with ``weights_only=True``),
``rng-rank<k>.pt`` (torch CPU/CUDA RNG states, Python's and NumPy's) and ``state.json`` (step,
epoch, data position, metrics). A checkpoint is written into a hidden temp directory and renamed into
place, so a run killed mid-write leaves the previous checkpoint intact and no half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temp directory beside ``final``; on success it replaces ``final`` by rename."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(final):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and ``os.replace``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_plain(state: dict) -> dict:
    """Python and NumPy RNG states as lists and tensors, so ``torch.load(weights_only=True)`` reads them."""
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = {"torch": state["torch"], "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_plain(plain: dict) -> dict:
    version, internal, gauss = plain["python"]
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    out = {"torch": plain["torch"], "python": (version, tuple(int(x) for x in internal.tolist()), gauss),
           "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}
    if "cuda" in plain:
        out["cuda"] = plain["cuda"]
    return out


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``out_dir/checkpoints``, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, state: dict, keep_last: int, rank: int = 0, world: int = 1) -> str:
    """Write checkpoint ``step`` (rank 0 writes the shared files; every rank its RNG) and delete all but
    the newest ``keep_last``. With several ranks the caller synchronises around this call."""
    from safetensors.torch import save_file

    path = os.path.join(out_dir, "checkpoints", f"step-{step:06d}")
    rng_name = f"rng-rank{rank}.pt"
    if world > 1:
        # Each rank's RNG goes to a side directory that rank 0 moves in before the rename.
        side = os.path.join(out_dir, "checkpoints", f".rng-{step:06d}")
        os.makedirs(side, exist_ok=True)
        torch.save(_rng_to_plain(rng_state()), os.path.join(side, rng_name))
        _barrier()
    if rank == 0:
        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
            save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
            if world > 1:
                for name in os.listdir(side):
                    shutil.move(os.path.join(side, name), os.path.join(tmp, name))
                shutil.rmtree(side, ignore_errors=True)
            else:
                torch.save(_rng_to_plain(rng_state()), os.path.join(tmp, rng_name))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, **state}, f, indent=1)
        for _, old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        _barrier()
    return path


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, rank: int = 0) -> dict:
    """``{"trainable", "optimizer", "scheduler", "rng", "state"}`` of the checkpoint at ``path``."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.isfile(rng_path):
        raise FileNotFoundError(f"{path} has no RNG state for rank {rank}: resume with the world size it was "
                                "written with")
    return {
        "trainable": load_file(os.path.join(path, "trainable.safetensors")),
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), weights_only=True),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), weights_only=True),
        "rng": _rng_from_plain(torch.load(rng_path, weights_only=True)),
        "state": state,
    }
