"""save_adapter / load_adapter: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, for
any method (the config's ``peft_type`` picks it).

Loads read and check everything before the model changes, and put the model back as it was if a
key or shape does not fit. Writes are atomic (``tuners/files.py``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from peftkern.tuners.files import (PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterLoadError, adapter_directory,
                                   find_adapter_dir, read_adapter_weights, write_adapter_files)
from peftkern.tuners.methods import read_config, tuner_for
from peftkern.tuners.model import PeftKernModel, freeze_base, refuse_adapted
from peftkern.tuners.state_dict import adapter_slots
from peftkern.tuners.tuner import PEFT_PREFIX, check_adapter_name

__all__ = ["save_adapter", "load_adapter", "AdapterLoadError", "write_adapter_files", "read_adapter_weights",
           "adapter_directory", "WEIGHTS_NAME", "PICKLE_WEIGHTS_NAME"]


def save_adapter(model: PeftKernModel, directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Save ``adapter_name`` (every adapter when None) as PEFT does: ``adapter_config.json`` and
    ``adapter_model.safetensors`` under PEFT's key names, "default" in ``directory``, others in
    ``directory/<name>``."""
    if not isinstance(model, PeftKernModel):
        raise TypeError(f"save_adapter needs the model get_peft_model/load_adapter returned, got {type(model).__name__}")
    model.save_pretrained(directory, None if adapter_name is None else [adapter_name])


def _place_weights(base: nn.Module, tuner, config, adapter_name: str, tensors: dict[str, torch.Tensor],
                   source: str) -> None:
    """Check every file key and shape against the model, then write the tensors in."""
    slots = adapter_slots(base, tuner, config, adapter_name)
    placed = {}
    for key, tensor in tensors.items():
        file_key = key if key.startswith(PEFT_PREFIX) or key in slots else PEFT_PREFIX + key
        slot = slots.get(file_key)
        if slot is None:
            raise AdapterLoadError(f"{source}: key {key!r} fits no module of the model (adapter {adapter_name!r})")
        if tuple(tensor.shape) != tuple(slot.target.shape):
            raise AdapterLoadError(f"{source}: {key!r} has shape {tuple(tensor.shape)} but the model's tensor for it "
                                   f"is {tuple(slot.target.shape)}")
        if not tensor.is_floating_point():
            raise AdapterLoadError(f"{source}: {key!r} has dtype {tensor.dtype}; expected a float tensor")
        placed[file_key] = tensor
    missing = sorted(k.removeprefix(PEFT_PREFIX) for k in slots.keys() - placed.keys())
    if missing:
        raise AdapterLoadError(f"{source}: adapter weights missing for {missing[:8]}"
                               f"{' and more' if len(missing) > 8 else ''}")
    for key, tensor in placed.items():
        slots[key].write(tensor)


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftKernModel:
    """Load an adapter folder of any method (PEFT's files) into ``model`` (a transformers model, or a
    PeftKernModel to add a further adapter to) and return the PeftKernModel.

    On a plain model the adapter becomes active; on a PeftKernModel it is added inactive, as PEFT's
    ``load_adapter`` does. Its weights train only when ``is_trainable``; otherwise the model is put
    in eval mode, as PEFT does. Any error (missing file, corrupted safetensors, unknown key, wrong
    shape) is raised before the model changes, or after putting it back as it was.
    """
    check_adapter_name(adapter_name)
    wrapped = model if isinstance(model, PeftKernModel) else None
    if wrapped is not None and adapter_name in wrapped.peft_config:
        raise ValueError(f"adapter {adapter_name!r} is already loaded; pick another adapter_name")
    if wrapped is None:
        refuse_adapted(model, "load_adapter")
    folder = find_adapter_dir(os.fspath(directory), adapter_name)
    config = read_config(folder).replace(inference_mode=not is_trainable)
    tuner = tuner_for(config)
    source = os.path.join(folder, WEIGHTS_NAME)
    tensors = read_adapter_weights(folder)

    fresh = wrapped is None
    if fresh:
        wrapped = PeftKernModel(model)
    journal = wrapped._inject(config, adapter_name)
    try:
        tuner.before_load(wrapped, wrapped.peft_config[adapter_name], adapter_name, tensors)
        _place_weights(wrapped.model, tuner, wrapped.peft_config[adapter_name], adapter_name, tensors, source)
    except BaseException:
        wrapped._forget(adapter_name, journal)
        raise
    if fresh:
        freeze_base(wrapped)
        wrapped.set_adapter(adapter_name)
    else:
        wrapped._refresh()
    if not is_trainable:
        wrapped.eval()  # as PEFT: dropout off for an adapter loaded for inference
    return wrapped
