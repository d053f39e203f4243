"""BitFitLayer: a module whose bias trains, per adapter.

Each adapter holds ``bitfit_bias.<name>``: the module's bias as this adapter trains it (starting
at the module's own bias, or at zero for a module without one), beside a frozen copy of the bias
it started from (``bias_ref.<name>``). The output is module(x) + (bias - bias_ref), so the module
itself stays frozen and adapters can be switched, disabled (the base model, e.g. DPO's reference),
deleted and stacked with other methods on one module. The file holds the trained bias itself;
merging adds bias - bias_ref into the module's bias (creating one if it had none).
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.layers import AdapterLayer, plain_base


def bias_size(module: nn.Module) -> int | None:
    """The length of ``module``'s bias (its output features), or None if it has neither."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1:
        return bias.shape[0]
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return getattr(module, "nf", None)


class BitFitLayer(AdapterLayer):
    peft_type = "BITFIT"
    adapter_layer_names = ("bitfit_bias",)
    other_tables = ("bias_ref",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.size = bias_size(plain_base(base_layer))
        self.bitfit_bias = nn.ParameterDict()
        self.bias_ref = nn.ParameterDict()

    def base_bias(self) -> torch.Tensor | None:
        bias = getattr(plain_base(self), "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def update_layer(self, adapter_name: str) -> None:
        bias = self.base_bias()
        if bias is not None:
            start = bias.detach().clone()
        else:
            weight = getattr(plain_base(self), "weight", None)
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
            start = torch.zeros(self.size, dtype=dtype, device=weight.device if weight is not None else None)
        self.bitfit_bias[adapter_name] = nn.Parameter(start.clone())
        self.bias_ref[adapter_name] = nn.Parameter(start, requires_grad=False)

    def delta(self, names: list[str]) -> torch.Tensor:
        total = self.bitfit_bias[names[0]] - self.bias_ref[names[0]]
        for name in names[1:]:
            total = total + (self.bitfit_bias[name] - self.bias_ref[name])
        return total

    def adapter_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.delta(active).to(y.dtype)

    @torch.no_grad()
    def _add_to_bias(self, delta: torch.Tensor) -> None:
        base = plain_base(self)
        if self.base_bias() is None:
            base.bias = nn.Parameter(delta.detach().clone(), requires_grad=False)
        else:
            base.bias.copy_((base.bias.float() + delta.float()).to(base.bias.dtype))

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.bitfit_bias:
                continue
            delta = self.delta([name])
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"merging adapter {name!r} gives a non-finite bias; the module is unchanged")
            self._add_to_bias(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_bias(-self.delta([self.merged_adapters.pop()]))

    def extra_repr(self) -> str:
        return f"bias={self.size}, adapters={list(self.bitfit_bias.keys())}, active={self.active_adapters}"
