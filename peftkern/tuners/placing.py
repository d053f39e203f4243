"""Loading an adapter once its files are read: check every key and shape against the model, then
write the tensors in (``load_tensors``). ``tuners/io.py`` reads PEFT's files and ends here, and so do
converters of other tools' files (``tuners/bottleneck/adapterhub.py``); on any error the model is put
back as it was."""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.files import AdapterLoadError
from peftkern.tuners.methods import tuner_for
from peftkern.tuners.model import PeftKernModel, freeze_base, refuse_adapted
from peftkern.tuners.state_dict import adapter_slots
from peftkern.tuners.tuner import PEFT_PREFIX, check_adapter_name

__all__ = ["place_weights", "check_load_target", "load_tensors"]


def place_weights(base: nn.Module, tuner, config, adapter_name: str, tensors: dict[str, torch.Tensor],
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


def check_load_target(model: nn.Module, adapter_name: str) -> None:
    if isinstance(model, PeftKernModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} is already loaded; pick another adapter_name")
    else:
        refuse_adapted(model, "load_adapter")


def load_tensors(model: nn.Module, config, tensors: dict[str, torch.Tensor], adapter_name: str = "default",
                 is_trainable: bool = False, source: str = "adapter") -> PeftKernModel:
    """:func:`load_adapter` once its files are read: ``config`` and ``tensors`` under peftkern's file
    keys (a converter of another tool's files, e.g. AdapterHub's, ends here). ``source`` names the
    file in errors."""
    check_adapter_name(adapter_name)
    check_load_target(model, adapter_name)
    wrapped = model if isinstance(model, PeftKernModel) else None
    config = config.replace(inference_mode=not is_trainable)
    tuner = tuner_for(config)

    fresh = wrapped is None
    if fresh:
        wrapped = PeftKernModel(model)
    journal = wrapped._inject(config, adapter_name)
    try:
        tuner.before_load(wrapped, wrapped.peft_config[adapter_name], adapter_name, tensors)
        place_weights(wrapped.model, tuner, wrapped.peft_config[adapter_name], adapter_name, tensors, source)
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
