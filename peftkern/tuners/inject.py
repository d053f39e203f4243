"""Putting one adapter into a model in place, and taking it back out again if a later step fails."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from peftkern.nn.lora import is_conv1d
from peftkern.tuners.config import LoraConfig
from peftkern.tuners.layers import delete_from_layer, is_lora_layer, make_lora_layer
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.targeting import find_modules_to_save, find_targets


def _parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


@dataclass
class Injection:
    """What inject_adapter changed, so that :meth:`undo` can restore the model exactly."""
    model: nn.Module
    adapter_name: str
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attr, original)
    extended: list[nn.Module] = field(default_factory=list)  # layers / wrappers that gained the adapter
    requires_grad: dict[int, bool] = field(default_factory=dict)

    def undo(self) -> None:
        for layer in self.extended:
            if isinstance(layer, ModulesToSaveWrapper):
                layer.delete(self.adapter_name)
            else:
                delete_from_layer(layer, self.adapter_name)
        for parent, attr, original in reversed(self.replaced):
            setattr(parent, attr, original)
        for p in self.model.parameters():
            if id(p) in self.requires_grad:
                p.requires_grad_(self.requires_grad[id(p)])


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> Injection:
    """Swap every module ``config`` targets for a peftkern LoRA layer carrying ``adapter_name`` (or add
    the adapter to the layer already there) and wrap ``modules_to_save``. Targets are all found and
    checked before the first change. The new adapter is left inactive. Mirrors PEFT by setting
    ``config.fan_in_fan_out`` to match the targets' weight layout (Conv1D: True), with a warning."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    targets = find_targets(model, config)
    save_paths = find_modules_to_save(model, config)
    _align_fan_in_fan_out(config, targets)
    journal = Injection(model, adapter_name, requires_grad={id(p): p.requires_grad for p in model.parameters()})
    try:
        for target in targets:
            layer = make_lora_layer(target.module, adapter_name, target.r, target.lora_alpha, config)
            if layer is target.module:
                journal.extended.append(layer)
            else:
                parent, attr = _parent_and_attr(model, target.name)
                setattr(parent, attr, layer)
                journal.replaced.append((parent, attr, target.module))
        for path in save_paths:
            module = model.get_submodule(path)
            if isinstance(module, ModulesToSaveWrapper):
                module.add(adapter_name)
                journal.extended.append(module)
            else:
                parent, attr = _parent_and_attr(model, path)
                setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
                journal.replaced.append((parent, attr, module))
    except BaseException:
        journal.undo()
        raise
    return journal


def _align_fan_in_fan_out(config: LoraConfig, targets) -> None:
    bases = [t.module.base_layer if is_lora_layer(t.module) else t.module for t in targets]
    if any(is_conv1d(b) for b in bases) and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is False but the targets are transformers Conv1D (weight stored [in, out]); "
                      "setting fan_in_fan_out=True as PEFT does", stacklevel=4)
        config.fan_in_fan_out = True
    elif bases and not any(is_conv1d(b) for b in bases) and config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is True but the targets store their weight [out, in]; setting "
                      "fan_in_fan_out=False as PEFT does", stacklevel=4)
        config.fan_in_fan_out = False
