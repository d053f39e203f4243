"""Adapter state dicts under PEFT's key names.

Because peftkern's layers are laid out as PEFT's (``base_layer``, ``lora_A.<adapter>``,
``lora_B.<adapter>``, ``original_module``, ``modules_to_save.<adapter>``), a model's own state-dict
keys, prefixed with ``base_model.model.``, are the keys PEFT's model has. The checkpoint keys
follow from those by PEFT's rules: only this adapter's entries, modules_to_save copies under the
wrapped module's own name, biases per ``bias``, and the adapter name removed.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from peftkern.tuners.config import LoraConfig
from peftkern.tuners.layers import is_lora_layer
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper

PEFT_PREFIX = "base_model.model."


def remove_adapter_name(key: str, adapter_name: str) -> str:
    """``...lora_A.<adapter>.weight`` -> ``...lora_A.weight``; ``...x.<adapter>`` -> ``...x``; only the
    final position is touched, so a module that happens to share the adapter's name is left alone."""
    if "." not in key:
        return key
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    head, _, leaf = key.rpartition(".")
    return f"{re.sub(re.escape('.' + adapter_name) + '$', '', head)}.{leaf}"


def _dora_checkpoint_key(key: str, adapter_name: str) -> str:
    """PEFT stores DoRA's magnitude as ``lora_magnitude_vector`` (no ``.weight``)."""
    suffix = f"lora_magnitude_vector.{adapter_name}.weight"
    return key[: -len(".weight")] if key.endswith(suffix) else key


def _under(key: str, prefixes: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def lora_prefixes(model: nn.Module, adapter_name: str | None = None) -> set[str]:
    """Prefixed paths of every adapter container on the model's LoRA-family layers (all but the
    base layer); restricted to ``adapter_name``'s entries when given."""
    prefixes = set()
    for path, module in model.named_modules():
        if not is_lora_layer(module):
            continue
        names = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)]
        for name in names:
            if name == "base_layer":
                continue
            prefix = f"{PEFT_PREFIX}{path}.{name}"
            child = getattr(module, name)
            if adapter_name is not None and isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                prefix = f"{prefix}.{adapter_name}"
            prefixes.add(prefix)
    return prefixes


def wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def peft_keyed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under PEFT's model keys (shares storage with the parameters)."""
    return {PEFT_PREFIX + k: v for k, v in model.state_dict().items()}


def adapter_state_dict(model: nn.Module, configs: dict[str, LoraConfig], adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's checkpoint keys."""
    config = configs[adapter_name]
    others = [n for n in configs if n != adapter_name]
    state = {k: v for k, v in peft_keyed_state(model).items()
             if not any(f".{o}." in k or k.endswith(f".{o}") for o in others)}
    prefixes = lora_prefixes(model)
    out = {k: v for k, v in state.items() if _under(k, prefixes)}
    if config.bias == "all":
        out.update({k: v for k, v in state.items() if k == "bias" or k.endswith(".bias")})
    elif config.bias == "lora_only":
        for path, module in model.named_modules():
            key = f"{PEFT_PREFIX}{path}.base_layer.bias"
            if is_lora_layer(module) and key in state:
                out[key] = state[key]
    out = {_dora_checkpoint_key(k, adapter_name): v for k, v in out.items()}
    for path, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                out[f"{PEFT_PREFIX}{path}.{k}"] = state[f"{PEFT_PREFIX}{path}.modules_to_save.{adapter_name}.{k}"]
    return {remove_adapter_name(k, adapter_name): v for k, v in out.items()}


def checkpoint_to_model_keys(model: nn.Module, adapter_name: str) -> tuple[dict[str, str], set[str]]:
    """(checkpoint key -> model key, the model keys the checkpoint must provide) for loading
    ``adapter_name``, once its layers are in the model. Keys it does not map (saved biases) load
    onto the model key of the same name."""
    state = peft_keyed_state(model)
    mapping: dict[str, str] = {}
    for path, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                mapping[f"{PEFT_PREFIX}{path}.{k}"] = f"{PEFT_PREFIX}{path}.modules_to_save.{adapter_name}.{k}"
    prefixes = lora_prefixes(model, adapter_name)
    for model_key in state:
        if _under(model_key, prefixes):
            mapping[remove_adapter_name(_dora_checkpoint_key(model_key, adapter_name), adapter_name)] = model_key
    return mapping, set(mapping.values())
