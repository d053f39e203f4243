"""AdaLoraLinear: AdaLoRA's SVD-form update on a linear layer, through the fused LoRA op.

    y = x W^T + b + (s / (r0 + 1e-5)) * (drop(x) (A * E)^T) B^T

A [r, in] and B [out, r] play P^T and Q^T of the paper, E [r, 1] the singular values; E is folded
into A before the call, so the forward and backward are ``peftkern.ops.lora_linear``'s (the rank-r
term in the base GEMM's epilogue). s = lora_alpha (r when alpha is 0), r0 the rank the adapter was
created with (``ranknum``), as PEFT. Laid out as PEFT's ``adalora.SVDLinear``: ``lora_A.<name>``,
``lora_B.<name>``, ``lora_E.<name>``, ``ranknum.<name>`` (ParameterDicts), so state dicts map one to one.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.ops.lora import lora_linear
from peftkern.tuners.layers import AdapterLayer

RANK_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


class AdaLoraLinear(AdapterLayer):
    peft_type = "ADALORA"
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_tables = ("ranknum", "lora_dropout")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_divisor: dict[str, float] = {}  # float(ranknum) + 1e-5, kept on the host

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool = True, ranknum: float | None = None) -> None:
        """Add (or re-create at rank ``r``) adapter ``adapter_name``: E = 0, A and B ~ N(0, 0.02) as
        PEFT (all standard normal with ``init_lora_weights=False``). ``ranknum``: the divisor's rank
        (default r; a layer resized after allocation keeps its initial rank there)."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"AdaLoRA rank must be an integer >= 0, got {r!r}")
        weight = self.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, **factory))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **factory))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **factory))
        rank = float(r if ranknum is None else ranknum)
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), rank, device=weight.device), requires_grad=False)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.rank_divisor[adapter_name] = rank + RANK_EPS
        if init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for table in (self.r, self.lora_alpha, self.scaling, self.rank_divisor):
            table.pop(adapter_name, None)

    def factor(self, name: str) -> float:
        """The scalar in front of the rank-r term: s / (r0 + 1e-5)."""
        return self.scaling[name] / self.rank_divisor[name]

    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    def adapter_forward(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        active = [n for n in active if self.r[n] > 0]
        if not active:
            return self.base_layer(x)
        out_dtype = x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        plain = self.base_is_plain() and not hasattr(self.base_layer, "lora_forward")
        y = None if plain else self.base_layer(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            for name in active:
                a = (self.lora_A[name] * self.lora_E[name]).to(dtype)
                b = self.lora_B[name].to(dtype)
                if y is None:  # the first adapter rides in the base GEMM's epilogue
                    bias = self.bias.to(dtype) if self.bias is not None else None
                    y = lora_linear(x, self.weight_out_in().to(dtype), bias, a, b, self.factor(name),
                                    self._dropout_p(name), self.training)
                else:
                    y = y.to(dtype) + self.factor(name) * (self.lora_dropout[name](x) @ a.t()) @ b.t()
        return y.to(out_dtype)

    # -- merging -----------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """s / (r0 + 1e-5) * B (A * E), [out, in], fp32."""
        a = (self.lora_A[name] * self.lora_E[name]).float()
        return (self.lora_B[name].float() @ a) * self.factor(name)

    def _add(self, delta: torch.Tensor) -> None:
        weight = self.weight
        delta = delta.t() if self.fan_in_fan_out else delta
        weight.copy_((weight.float() + delta).to(weight.dtype))

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            delta = self.delta_weight(name)
            if safe_merge and not torch.isfinite(self.weight.float() + (delta.t() if self.fan_in_fan_out
                                                                          else delta)).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base layer is unchanged")
            self._add(delta)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add(-self.delta_weight(self.merged_adapters.pop()))

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}" for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}], "
                f"active={self.active_adapters}")
