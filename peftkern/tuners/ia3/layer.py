"""IA3Linear: (IA)^3 on a linear layer, running through ``peftkern.ops.ia3_linear``.

Laid out as PEFT's ``ia3.Linear``: ``base_layer`` and ``ia3_l.<adapter>``, a vector of shape
[out, 1] (output scale) or [1, in] (input scale, feed-forward layers), so state dicts map one to
one. Several active adapters multiply their vectors, as in PEFT.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.ops.ia3 import ia3_linear
from peftkern.tuners.layers import AdapterLayer, plain_base


class IA3Linear(AdapterLayer):
    """y = (base(x)) * l (keys, values) or base(x * l) (``is_feedforward``), l the product of the
    active adapters' vectors; the fused op runs when the base is a dense linear."""

    peft_type = "IA3"
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool):
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add adapter ``adapter_name``: ones (the model unchanged), or standard normal when
        ``init_ia3_weights`` is False (as PEFT)."""
        weight = self.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape, **factory) if init_ia3_weights else torch.randn(shape, **factory)
        self.ia3_l[adapter_name] = nn.Parameter(vector)

    def scale(self, names: list[str]) -> torch.Tensor:
        """The product of ``names``' vectors, flat ([in] or [out])."""
        scale = self.ia3_l[names[0]].reshape(-1)
        for name in names[1:]:
            scale = scale * self.ia3_l[name].reshape(-1)
        return scale

    def _fusable(self) -> bool:
        base = self.base_layer
        return self.base_is_plain() and isinstance(getattr(base, "weight", None), torch.Tensor) \
            and base.weight.is_floating_point() and not hasattr(base, "lora_forward")

    def adapter_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        scale = self.scale(active)
        if not self._fusable():  # another method's layer (or a quantized base) below: scale around it
            if self.is_feedforward:
                return self.base_layer((x * scale).to(x.dtype))
            y = self.base_layer(x)
            return (y * scale).to(y.dtype)
        out_dtype = x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight_out_in().to(dtype)
            bias = self.bias.to(dtype) if self.bias is not None else None
            y = ia3_linear(x.to(dtype), weight, bias, scale, self.is_feedforward)
        return y.to(out_dtype)

    # -- merging -----------------------------------------------------------------------------
    def _scale_weight(self, scale: torch.Tensor, inverse: bool) -> None:
        base = plain_base(self)
        factor = (1.0 / scale.float()) if inverse else scale.float()
        dense = base.dequantize(torch.float32) if hasattr(base, "set_weight") else None
        w = dense if dense is not None else self.weight_out_in().float()
        w = w * (factor[None, :] if self.is_feedforward else factor[:, None])
        if dense is not None:
            base.set_weight(w)
        else:
            target = base.weight
            target.copy_((w.t() if self.fan_in_fan_out else w).to(target.dtype))
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            base.bias.copy_((base.bias.float() * factor).to(base.bias.dtype))

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W <- W * l (rows; columns for a feed-forward layer), and b <- b * l for an output scale."""
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.ia3_l:
                continue
            scale = self.ia3_l[name].detach().reshape(-1)
            if safe_merge and not torch.isfinite(scale).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base layer is unchanged")
            self._scale_weight(scale, inverse=False)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide every merged vector back out, last first (exact up to rounding; a zero entry cannot be undone)."""
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            scale = self.ia3_l[name].detach().reshape(-1)
            if (scale == 0).any():
                raise ValueError(f"adapter {name!r} has zero entries: its merge cannot be undone")
            self._scale_weight(scale, inverse=True)
            self.merged_adapters.pop()

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return (f"in_features={self.in_features}, out_features={self.out_features}, scales={kind}, "
                f"adapters={list(self.ia3_l.keys())}, active={self.active_adapters}")
