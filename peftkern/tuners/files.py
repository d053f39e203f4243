"""Reading and writing an adapter's two files, ``adapter_config.json`` and
``adapter_model.safetensors`` (or PEFT's older ``adapter_model.bin``).

Writes are atomic per file (temp file in the same folder, fsync, ``os.replace``), and both files are
complete on disk before either replaces the old one, so a writer killed part-way leaves the previous
adapter in place.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from peftkern.tuners.config import CONFIG_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterLoadError(ValueError):
    """An adapter's files do not fit the model (the message names the file, key or shape)."""


def adapter_directory(directory: str | os.PathLike, adapter_name: str) -> str:
    """PEFT's layout: the "default" adapter at the top, any other in a subfolder of its name."""
    directory = os.fspath(directory)
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _write_temp(directory: str, final_name: str, payload: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_content(path: str, payload: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read() == payload
    except OSError:
        return False


def write_adapter_files(directory: str, config_json: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write both files to temp names, then rename them into place (weights first, then config).

    A config identical to the one on disk (re-saving a training checkpoint) is not rewritten, so
    such a save is one atomic rename. Otherwise the two renames follow each other directly, after
    both files are complete and synced.
    """
    os.makedirs(directory, exist_ok=True)
    weights = safetensors_save(savable(tensors), metadata={"format": "pt"})
    config_bytes = config_json.encode("utf-8")
    staged = []
    try:
        staged.append((_write_temp(directory, WEIGHTS_NAME, weights), WEIGHTS_NAME))
        if not _same_content(os.path.join(directory, CONFIG_NAME), config_bytes):
            staged.append((_write_temp(directory, CONFIG_NAME, config_bytes), CONFIG_NAME))
    except BaseException:
        for tmp, _ in staged:
            os.unlink(tmp)
        raise
    for tmp, final in staged:
        os.replace(tmp, os.path.join(directory, final))
    _fsync_dir(directory)


def savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def find_adapter_dir(directory: str, adapter_name: str) -> str:
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        return directory
    nested = os.path.join(directory, adapter_name)
    if os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        return nested
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory {directory!r} does not exist")
    raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r} (nor in {nested!r})")


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (or, failing that, ``adapter_model.bin`` through
    ``torch.load(weights_only=True)``). A missing, truncated or malformed file is an error naming it."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            payload = fh.read()
        try:
            return safetensors_load(payload)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(f"{path}: not a readable safetensors file (truncated or corrupted?): {exc}") from None
    pickled = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickled):
        try:
            data = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise AdapterLoadError(f"{pickled}: cannot be read with torch.load(weights_only=True): {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterLoadError(f"{pickled}: expected a dict of tensors")
        return data
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {PICKLE_WEIGHTS_NAME}) in {directory!r}")
