"""Adapter state dicts under PEFT's key names, for any method.

peftkern's layers are laid out as PEFT's (``base_layer``, ``lora_A.<adapter>``, ``ia3_l.<adapter>``,
``original_module``, ``modules_to_save.<adapter>``), so the keys of one method's adapter follow from
the model's module paths by PEFT's rules: this adapter's entries only, under the path of the module
they adapt (stacked layers of other methods on the same module are transparent), modules_to_save
copies under the wrapped module's own name, the adapter name removed, ``base_model.model.`` in front.

Each key maps to a :class:`~peftkern.tuners.tuner.Slot` (the live tensor, and how to read and
write it), so saving and loading (with every key and shape checked before anything is written) go
through one table.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.nn.mixed_batch import adapter_stack, is_adapter_layer
from peftkern.tuners.layers import layer_adapters
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.tuner import Slot, Tuner, adapter_stacks, wrappers


def adapter_slots(model: nn.Module, tuner: Tuner, config, adapter_name: str) -> dict[str, Slot]:
    """PEFT's file key -> Slot for every tensor adapter ``adapter_name`` (of ``tuner``'s method) saves."""
    slots: dict[str, Slot] = {}
    for path, stack in adapter_stacks(model):
        for layer in stack:
            if getattr(layer, "peft_type", None) == tuner.peft_type and adapter_name in layer_adapters(layer):
                slots.update(tuner.layer_slots(layer, path, adapter_name, config))
    for path, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                slots[f"{path}.{key}"] = Slot(tensor)
    slots.update(tuner.extra_slots(model, config, adapter_name))
    return {tuner.file_prefix + k: v for k, v in slots.items()}


def adapter_state_dict(model: nn.Module, tuner: Tuner, config, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's file keys (live, not copies)."""
    return {k: slot.read() for k, slot in adapter_slots(model, tuner, config, adapter_name).items()}


def method_view_state(model: nn.Module, peft_type: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the base model (adapters' own tables left out) under the keys a
    model adapted by ``peft_type`` alone would have: a module adapted by that method is
    ``<path>.base_layer.<key>``, every other module its plain ``<path>.<key>``. Live tensors."""
    out: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if is_adapter_layer(module):
            stack = adapter_stack(module)
            own = any(getattr(m, "peft_type", None) == peft_type for m in stack)
            base = stack[-1].base_layer
            base_prefix = prefix + ("base_layer." if own else "")
            for key, value in base.state_dict(keep_vars=True).items():
                out[base_prefix + key] = value
            return
        if isinstance(module, ModulesToSaveWrapper):
            return
        for key, value in module._parameters.items():
            if value is not None:
                out[prefix + key] = value
        for key, value in module._buffers.items():
            if value is not None and key not in module._non_persistent_buffers_set:
                out[prefix + key] = value
        for key, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{key}.")

    visit(model, "")
    return out
