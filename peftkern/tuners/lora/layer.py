"""LoRA's layers in the tuner: peftkern.nn's LoRALinear / DoRALinear, built or extended here.
``make_lora_layer`` is the one place a target becomes (or gains an adapter as) a LoRA layer, so
DoRA and quantized bases plug in here."""
from __future__ import annotations

import importlib

from torch import nn

from peftkern.nn.lora import LoRALinear
from peftkern.tuners.layers import adapter_parameters, is_adapter_layer

__all__ = ["LoRALinear", "is_lora_layer", "is_dora_layer", "dora_class", "make_lora_layer"]


def is_lora_layer(module: nn.Module) -> bool:
    """A peftkern LoRA-family layer: LoRALinear, DoRALinear, or anything declaring itself LoRA's."""
    return isinstance(module, LoRALinear) or (is_adapter_layer(module) and getattr(module, "peft_type", None) == "LORA")


def is_dora_layer(module: nn.Module) -> bool:
    return type(module).__name__ == "DoRALinear"


def dora_class():
    """peftkern.nn.dora.DoRALinear, imported only when a config asks for DoRA."""
    try:
        return importlib.import_module("peftkern.nn.dora").DoRALinear
    except (ImportError, AttributeError) as exc:
        raise ValueError("LoraConfig.use_dora=True needs peftkern.nn.dora.DoRALinear, which is not available in "
                         f"this install ({exc})") from None


def make_lora_layer(target: nn.Module, existing: nn.Module | None, adapter_name: str, r: int, lora_alpha: float,
                    config) -> nn.Module:
    """The LoRA layer carrying ``adapter_name`` for the module ``target`` (inactive and frozen).

    ``existing``: LoRA's layer already in the stack at ``target`` (it gains the adapter in place and
    ``target`` is returned as is). Otherwise ``target`` (nn.Linear, Conv1D, a quantized base exposing
    its weight, or another method's adapter layer) is wrapped in LoRALinear, or in DoRALinear when
    ``config.use_dora``.
    """
    if existing is not None:
        if config.use_dora != is_dora_layer(existing):
            kind = "DoRA" if is_dora_layer(existing) else "LoRA"
            raise ValueError(f"cannot add a use_dora={config.use_dora} adapter to a {kind} layer "
                             f"(adapter {adapter_name!r} on a layer holding {list(existing.lora_A.keys())})")
        if adapter_name in existing.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        layer, result = existing, target
    else:
        layer = (dora_class() if config.use_dora else LoRALinear)(target)
        result = layer
    layer.update_layer(adapter_name, r, lora_alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
    for p in adapter_parameters(layer, adapter_name):
        p.requires_grad_(False)
    return result
