"""What every method's adapter layer shares, and the generic operations the tuner base runs on any
of them (activate, delete, list parameters, walk a stack of layers on one module).

An adapter layer (of any method) is a module that

* keeps the module it adapts as ``base_layer`` (a plain linear, or another method's adapter layer
  when several methods adapt one module: a *stack*, outermost first);
* declares ``adapter_layer_names``: its per-adapter tables (``nn.ModuleDict`` / ``nn.ParameterDict``
  keyed by adapter name; PEFT's attribute of the same name), and ``peft_type``: its method;
* has ``active_adapters``, ``merged_adapters``, ``disable_adapters``, ``merge(names, safe_merge)``,
  ``unmerge()`` and ``delete_adapter(name)``; its forward skips active names it does not hold.

peftkern's LoRALinear / DoRALinear (``peftkern.nn``) follow this protocol; the other methods'
layers derive from :class:`AdapterLayer` below.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.nn.lora import is_conv1d, linear_shape
from peftkern.nn.mixed_batch import adapter_stack, current_rows, forward_by_rows, is_adapter_layer, runnable_adapters
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper

__all__ = ["AdapterLayer", "is_adapter_layer", "adapter_stack", "plain_base", "layer_adapters", "adapter_parameters",
           "activate_layer", "delete_from_layer", "layer_of", "is_linear_like"]


class AdapterLayer(nn.Module):
    """Base of the adapter layers of IA3, AdaLoRA, BitFit, ...: the bookkeeping every method shares.

    Subclasses set ``peft_type`` and ``adapter_layer_names``, create their tables in ``__init__``
    and implement ``update_layer``, ``adapter_forward`` (the output with the runnable adapters,
    given as a list), ``merge`` and ``unmerge``.
    """

    peft_type = ""
    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        inner = plain_base(base_layer)
        self.in_features, self.out_features = linear_shape(inner) if is_linear_like(inner) else (None, None)
        self.fan_in_fan_out = is_conv1d(inner)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # -- adapters -----------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return layer_adapters(self)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Run ``adapter_names`` (names this layer does not hold are skipped); only they train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = names
        for name in self.adapter_names():
            for p in adapter_parameters(self, name):
                p.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() first")
        for table in self.adapter_layer_names + getattr(self, "other_tables", ()):
            entries = getattr(self, table)
            if adapter_name in entries:
                del entries[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def runnable_adapters(self) -> list[str]:
        """The active adapters this layer holds, or [] when the base layer alone gives the output
        (adapters disabled, which unmerges any merged one, or merged, or none active)."""
        return runnable_adapters(self, set(self.adapter_names()))

    # -- the base weight, whatever wraps it -------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The adapted module's weight as stored (Conv1D: [in, out]), through any stack."""
        return plain_base(self).weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(plain_base(self), "bias", None)

    def weight_out_in(self) -> torch.Tensor:
        w = self.weight
        return w.t() if self.fan_in_fan_out else w

    def base_is_plain(self) -> bool:
        """True when ``base_layer`` is the adapted module itself (not another method's layer), so the
        fused ops can read its weight directly."""
        return not is_adapter_layer(self.base_layer)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = current_rows()
        if rows is not None and not self.disable_adapters:
            return forward_by_rows(self, x, rows, *args, **kwargs)
        active = self.runnable_adapters()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self.adapter_forward(x, active)

    def adapter_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        raise NotImplementedError


# -- generic operations on any method's layers ---------------------------------------------------

def plain_base(module: nn.Module) -> nn.Module:
    """The adapted module under any stack of adapter layers."""
    while is_adapter_layer(module):
        module = module.base_layer
    return module


def layer_adapters(layer: nn.Module) -> list[str]:
    """Names of the adapters a layer holds (keys of its first table, in insertion order)."""
    names: list[str] = []
    for table in layer.adapter_layer_names:
        entries = getattr(layer, table, None)
        if isinstance(entries, (nn.ModuleDict, nn.ParameterDict)):
            names.extend(k for k in entries.keys() if k not in names)
    return names


def adapter_parameters(layer: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The trainable parameters of one adapter on a layer (every table's entry for it)."""
    params = []
    for table_name in layer.adapter_layer_names:
        table = getattr(layer, table_name, None)
        if isinstance(table, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in table:
            entry = table[adapter_name]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return params


def activate_layer(layer: nn.Module, names: list[str], trainable: set[str]) -> None:
    """Run ``names`` on ``layer`` (names it does not hold are skipped at run time, as PEFT does) and
    let exactly the adapters in ``trainable`` (of those running) train."""
    layer.active_adapters = list(names)
    for adapter in layer_adapters(layer):
        for p in adapter_parameters(layer, adapter):
            p.requires_grad_(adapter in names and adapter in trainable)


def delete_from_layer(layer: nn.Module, adapter_name: str) -> None:
    if adapter_name in layer_adapters(layer):
        layer.delete_adapter(adapter_name)


def layer_of(module: nn.Module, peft_type: str) -> nn.Module | None:
    """The layer of method ``peft_type`` in the stack at ``module``, if there is one."""
    if not is_adapter_layer(module):
        return None
    return next((m for m in adapter_stack(module) if getattr(m, "peft_type", None) == peft_type), None)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2 Conv1D, an adapter layer over one (any method), or any module that
    declares in_features/out_features and holds a weight (e.g. a quantized linear)."""
    module = plain_base(module)
    if isinstance(module, ModulesToSaveWrapper):
        return False
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
            and not isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)))
