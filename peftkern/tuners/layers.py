"""Building and switching LoRA-family layers. ``make_lora_layer`` is the one place a target module
becomes (or gains an adapter as) a peftkern layer, so DoRA and quantized bases plug in here."""
from __future__ import annotations

import importlib

from torch import nn

from peftkern.nn.lora import LoRALinear
from peftkern.tuners.config import LoraConfig

# Per-adapter containers of a LoRA-family layer (ModuleDict / ParameterDict keyed by adapter name).
ADAPTER_TABLES = ("lora_A", "lora_B", "lora_magnitude_vector")


def is_lora_layer(module: nn.Module) -> bool:
    """A peftkern LoRA-family layer: LoRALinear, DoRALinear, or anything laid out like them."""
    return isinstance(module, LoRALinear) or (hasattr(module, "lora_A") and hasattr(module, "base_layer")
                                               and hasattr(module, "update_layer"))


def is_dora_layer(module: nn.Module) -> bool:
    return type(module).__name__ == "DoRALinear"


def dora_class():
    """peftkern.nn.dora.DoRALinear, imported only when a config asks for DoRA."""
    try:
        return importlib.import_module("peftkern.nn.dora").DoRALinear
    except (ImportError, AttributeError) as exc:
        raise ValueError("LoraConfig.use_dora=True needs peftkern.nn.dora.DoRALinear, which is not available in "
                         f"this install ({exc})") from None


def make_lora_layer(target: nn.Module, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig) -> nn.Module:
    """Return the layer that should sit where ``target`` is, carrying adapter ``adapter_name``.

    An existing peftkern layer gains the adapter in place (returned as is); any other linear-like
    module (nn.Linear, Conv1D, a quantized base exposing its weight) is wrapped in LoRALinear, or in
    DoRALinear when ``config.use_dora``. The new adapter is left inactive and frozen; the caller
    decides which adapters run.
    """
    if is_lora_layer(target):
        if config.use_dora != is_dora_layer(target):
            kind = "DoRA" if is_dora_layer(target) else "LoRA"
            raise ValueError(f"cannot add a use_dora={config.use_dora} adapter to a {kind} layer "
                             f"(adapter {adapter_name!r} on a layer holding {list(target.lora_A.keys())})")
        if adapter_name in target.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        layer = target
    else:
        layer = (dora_class() if config.use_dora else LoRALinear)(target)
    layer.update_layer(adapter_name, r, lora_alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
    for p in adapter_parameters(layer, adapter_name):
        p.requires_grad_(False)
    return layer


def adapter_parameters(layer: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """Parameters of one adapter on a LoRA-family layer."""
    params = []
    for table_name in ADAPTER_TABLES:
        table = getattr(layer, table_name, None)
        if isinstance(table, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in table:
            entry = table[adapter_name]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return params


def activate_layer(layer: nn.Module, names: list[str], trainable: bool) -> None:
    """Run ``names`` (those this layer holds; others are skipped, as PEFT does) and let only their
    parameters train (when ``trainable``)."""
    layer.active_adapters = list(names)
    for adapter in layer.lora_A.keys():
        for p in adapter_parameters(layer, adapter):
            p.requires_grad_(trainable and adapter in names)


def delete_from_layer(layer: nn.Module, adapter_name: str) -> None:
    if adapter_name in layer.lora_A:
        layer.delete_adapter(adapter_name)
