"""save_adapter / load_adapter: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic per file (temp file in the same folder, fsync, ``os.replace``), and both files are
complete on disk before either replaces the old one, so a writer killed part-way leaves the previous
adapter in place. Loads read and check everything before the model changes, and put the model back
as it was if a key or shape does not fit.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from peftkern.tuners.config import CONFIG_NAME, LoraConfig
from peftkern.tuners.model import PeftKernModel, freeze_base
from peftkern.tuners.state_dict import PEFT_PREFIX, adapter_state_dict, checkpoint_to_model_keys, peft_keyed_state

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class AdapterLoadError(ValueError):
    """An adapter's files do not fit the model (the message names the file, key or shape)."""


# -- writing ------------------------------------------------------------------------------------

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
    weights = safetensors_save(tensors, metadata={"format": "pt"})
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


def _savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def save_adapter(model: PeftKernModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Save ``adapter_name`` (every adapter when None) as PEFT does: ``adapter_config.json`` and
    ``adapter_model.safetensors`` under PEFT's key names, "default" in ``directory``, others in
    ``directory/<name>``."""
    if not isinstance(model, PeftKernModel):
        raise TypeError(f"save_adapter needs the model get_peft_model/load_adapter returned, got {type(model).__name__}")
    names = list(model.peft_config) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in model.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(model.peft_config)}")
        config = model.peft_config[name].replace(inference_mode=True)
        tensors = _savable(adapter_state_dict(model.model, model.peft_config, name))
        write_adapter_files(adapter_directory(directory, name), config.to_json(), tensors)


# -- reading ------------------------------------------------------------------------------------

def _find_adapter_dir(directory: str, adapter_name: str) -> str:
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


def _place_weights(base: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Check every checkpoint key and shape against the model, then copy the tensors in."""
    mapping, required = checkpoint_to_model_keys(base, adapter_name)
    state = peft_keyed_state(base)
    placed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        ckpt_key = key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key
        model_key = mapping.get(ckpt_key, ckpt_key)
        if model_key not in state:
            raise AdapterLoadError(f"{source}: key {key!r} fits no module of the model (adapter {adapter_name!r})")
        if tuple(tensor.shape) != tuple(state[model_key].shape):
            raise AdapterLoadError(f"{source}: {key!r} has shape {tuple(tensor.shape)} but the model's "
                                   f"{model_key.removeprefix(PEFT_PREFIX)!r} is {tuple(state[model_key].shape)}")
        if not tensor.is_floating_point():
            raise AdapterLoadError(f"{source}: {key!r} has dtype {tensor.dtype}; expected a float tensor")
        placed[model_key] = tensor
    missing = sorted(k.removeprefix(PEFT_PREFIX) for k in required - placed.keys())
    if missing:
        raise AdapterLoadError(f"{source}: adapter weights missing for {missing[:8]}"
                               f"{' and more' if len(missing) > 8 else ''}")
    with torch.no_grad():
        for model_key, tensor in placed.items():
            state[model_key].copy_(tensor)


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftKernModel:
    """Load a PEFT adapter folder into ``model`` (a transformers model, or a PeftKernModel to add a
    further adapter to) and return the PeftKernModel.

    On a plain model the adapter becomes active; on a PeftKernModel it is added inactive, as PEFT's
    ``load_adapter`` does. Its weights train only when ``is_trainable``; otherwise the model is put
    in eval mode, as PEFT does. Any error (missing file, corrupted safetensors, unknown key, wrong shape) is
    raised before the model changes, or after putting it back as it was.
    """
    wrapped = model if isinstance(model, PeftKernModel) else None
    if wrapped is not None and adapter_name in wrapped.peft_config:
        raise ValueError(f"adapter {adapter_name!r} is already loaded; pick another adapter_name")
    folder = _find_adapter_dir(os.fspath(directory), adapter_name)
    config = LoraConfig.from_pretrained(folder).replace(inference_mode=not is_trainable)
    source = os.path.join(folder, WEIGHTS_NAME)
    tensors = read_adapter_weights(folder)

    fresh = wrapped is None
    if fresh:
        wrapped = PeftKernModel(model)
    journal = wrapped._inject(config, adapter_name)
    try:
        _place_weights(wrapped.model, adapter_name, tensors, source)
    except BaseException:
        journal.undo()
        del wrapped.peft_config[adapter_name]
        raise
    if fresh:
        freeze_base(wrapped)
        wrapped.set_adapter(adapter_name)
    else:
        wrapped._refresh()
    if not is_trainable:
        wrapped.eval()  # as PEFT: dropout off for an adapter loaded for inference
    return wrapped
