"""Checkpoints: written atomically, verified on resume, the last N valid ones kept, and everything a
resume needs to continue the run exactly (trainable weights, optimizer, scheduler, every RNG, the
data position, the run's settings).

Layout: ``<out>/checkpoints/step-000040/`` holding ``trainable.safetensors`` (the parameters that
train, by name), ``optimizer.pt`` and ``scheduler.pt`` (read back with ``weights_only=True``),
``rng-rank<k>.pt`` (torch CPU/CUDA RNG states, Python's and NumPy's), ``state.json`` (step, trainer
kind, the resolved settings, a fingerprint of the training data, metrics) and ``manifest.json``
(every other file's name, size and sha256), written last.

A checkpoint is written into a hidden temp directory and renamed into place, so a run killed
mid-write leaves the previous checkpoint intact and no half-written one. On resume the manifest is
checked: a checkpoint whose files are missing, truncated or corrupted is passed over, with a
warning saying what was wrong, for the newest one that is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from peftkern.train.atomic import atomic_dir, atomic_write_text, with_retries  # noqa: F401 (atomic_*: re-exported)
from peftkern.train.errors import CheckpointError, RunWarning

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FORMAT = "peftkern.checkpoint.v1"
REQUIRED = ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt")


# -- RNG ------------------------------------------------------------------------------------------
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


# -- manifest -------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str) -> None:
    """``manifest.json``: name, size and sha256 of every file in ``directory`` (call it last)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name != MANIFEST and os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1)


def verify_checkpoint(path: str, deep: bool = True) -> str | None:
    """None when the checkpoint at ``path`` is complete, else what is wrong with it. ``deep`` also
    compares each file's sha256 with the manifest (sizes only otherwise)."""
    if not os.path.isdir(path):
        return "not a directory" if os.path.exists(path) else "no such directory"
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"no {MANIFEST} (the write did not finish, or an older peftkern wrote it)"
    try:
        with open(manifest_path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        listed = {str(name): (int(info["size"]), str(info["sha256"])) for name, info in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
    for name in REQUIRED:
        if name not in listed:
            return f"{MANIFEST} does not list {name}"
    for name, (size, digest) in sorted(listed.items()):
        if os.path.basename(name) != name or name in ("", ".", ".."):
            return f"{MANIFEST} lists a path outside the checkpoint: {name!r}"
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} (truncated or overwritten)"
        if deep and _sha256(file) != digest:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


# -- finding --------------------------------------------------------------------------------------
def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step-N`` directory under ``out_dir/checkpoints``, valid or not, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _warn(message: str) -> None:
    warnings.warn(message, RunWarning, stacklevel=3)


def latest_checkpoint(out_dir: str, warn=_warn) -> str | None:
    """The newest checkpoint under ``out_dir`` that passes :func:`verify_checkpoint`; each newer one
    that does not is named with what is wrong through ``warn`` (a RunWarning by default)."""
    for step, path in reversed(list_checkpoints(out_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"checkpoint {path} is damaged ({problem}); skipping it for an older one")
    return None


def resolve_resume(resume, out_dir: str, warn=_warn) -> str:
    """The checkpoint directory ``--resume`` names: the newest valid one in ``out_dir`` (``True``), or
    the given path (a checkpoint directory, or a run directory: its newest valid one)."""
    if resume is True:
        path = latest_checkpoint(out_dir, warn)
        if path is None:
            found = list_checkpoints(out_dir)
            why = (f"none of its {len(found)} checkpoints is complete" if found
                   else f"{os.path.join(out_dir, 'checkpoints')} holds no checkpoint")
            raise CheckpointError(f"--resume: nothing to resume in {out_dir}: {why}; start the run without --resume")
        return path
    path = str(resume)
    if not os.path.exists(path):
        raise CheckpointError(f"--resume {path}: no such directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: is a file, expected a checkpoint directory (…/checkpoints/step-N)")
    if not os.path.isfile(os.path.join(path, MANIFEST)) and not os.path.isfile(os.path.join(path, "state.json")) \
            and os.path.isdir(os.path.join(path, "checkpoints")):
        return resolve_resume(True, path, warn)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"--resume {path}: the checkpoint is damaged ({problem}); pick another one "
                              f"(--resume alone picks the newest complete one)")
    return path


def prune_checkpoints(out_dir: str, keep_last: int, newest: str) -> None:
    """Keep the ``keep_last`` newest valid checkpoints (``newest``, just written, among them); delete
    older valid ones and damaged ones older than ``newest``. Never deletes the newest valid one."""
    found = list_checkpoints(out_dir)
    newest_step = next(s for s, p in found if os.path.samefile(p, newest))
    kept = 0
    for step, path in reversed(found):
        if step > newest_step:
            continue  # a later checkpoint of the run being redone; replaced when its step is saved again
        if verify_checkpoint(path, deep=False) is None:
            kept += 1
            if kept <= max(keep_last, 1):
                continue
        shutil.rmtree(path, ignore_errors=True)


# -- saving and loading ---------------------------------------------------------------------------
def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step-{step:06d}")


def save_checkpoint(out_dir: str, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    scheduler_state: dict, state: dict, keep_last: int, rank: int = 0, world: int = 1,
                    retries: int = 0, warn=None) -> str:
    """Write checkpoint ``step`` (rank 0 writes the shared files; every rank its RNG) and prune to the
    newest ``keep_last`` valid ones. With several ranks every rank calls this (it synchronises once,
    before rank 0 writes). A write that fails is retried ``retries`` times, then raises SaveError with
    the previous checkpoints untouched and no temp files left."""
    from safetensors.torch import save_file

    path = checkpoint_dir(out_dir, step)
    rng_name = f"rng-rank{rank}.pt"
    side = os.path.join(out_dir, "checkpoints", f".tmp-rng-{step:06d}")
    if world > 1:
        # Each rank's RNG goes to a side directory that rank 0 copies in before the rename.
        os.makedirs(side, exist_ok=True)
        torch.save(_rng_to_plain(rng_state()), os.path.join(side, rng_name))
        _barrier()
    if rank != 0:
        return path
    rng_plain = _rng_to_plain(rng_state())

    def write():
        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
            save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
            if world > 1:
                for name in os.listdir(side):
                    shutil.copyfile(os.path.join(side, name), os.path.join(tmp, name))
            else:
                torch.save(rng_plain, os.path.join(tmp, rng_name))
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump({"step": step, **state}, f, indent=1, allow_nan=False)
            write_manifest(tmp)

    previous = [p for s, p in list_checkpoints(out_dir) if s != step and verify_checkpoint(p, deep=False) is None]
    kept = (f"The previous checkpoint {previous[-1]} is intact." if previous else "No earlier checkpoint exists.")
    try:
        with_retries(write, f"checkpoint {path}", kept, retries, warn)
    finally:
        if world > 1:
            shutil.rmtree(side, ignore_errors=True)
    prune_checkpoints(out_dir, keep_last, path)
    return path


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_state(path: str) -> dict:
    """``state.json`` of the checkpoint at ``path``; CheckpointError if it cannot be read."""
    try:
        with open(os.path.join(path, "state.json"), "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}/state.json: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}/state.json: not a peftkern checkpoint state (no integer 'step')")
    return state


def load_checkpoint(path: str, rank: int = 0) -> dict:
    """``{"trainable", "optimizer", "scheduler", "rng", "state"}`` of the checkpoint at ``path``."""
    from safetensors.torch import load_file

    state = read_state(path)
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    if not os.path.isfile(rng_path):
        raise CheckpointError(f"{path} has no RNG state for rank {rank}: resume with the world size it was "
                              "written with")
    name = "trainable.safetensors"
    try:
        trainable = load_file(os.path.join(path, name))
        name = "optimizer.pt"
        optimizer = torch.load(os.path.join(path, name), weights_only=True)
        name = "scheduler.pt"
        scheduler = torch.load(os.path.join(path, name), weights_only=True)
        name = os.path.basename(rng_path)
        rng = _rng_from_plain(torch.load(rng_path, weights_only=True))
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise CheckpointError(f"{os.path.join(path, name)}: unreadable ({type(exc).__name__}: {exc})") from None
    return {"trainable": trainable, "optimizer": optimizer, "scheduler": scheduler, "rng": rng, "state": state}
