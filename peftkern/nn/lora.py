"""LoRALinear: a drop-in replacement for ``nn.Linear`` (and transformers' GPT-2 ``Conv1D``) that adds
low-rank adapters and runs through the fused ``peftkern.ops.lora_linear``.

Its parameters are laid out as PEFT's ``LoraLayer`` lays them out (``base_layer``,
``lora_A.<adapter>.weight`` [r, in], ``lora_B.<adapter>.weight`` [out, r]) so a state dict maps
onto PEFT's key names one to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftkern.nn.mixed_batch import (RowAdapters, check_rows, current_rows, forward_by_rows, is_adapter_layer,
                                     runnable_adapters)
from peftkern.ops.lora import lora_linear
from peftkern.ops.multi_lora import multi_lora_linear

INIT_CHOICES = (True, False, "gaussian")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def inner_module(module: nn.Module) -> nn.Module:
    """The adapted module under any stack of adapter layers (methods stacked on one module)."""
    while is_adapter_layer(module):
        module = module.base_layer
    return module


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D, or a module with those attributes."""
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


class LoRALinear(nn.Module):
    """y = base(x) + sum over active adapters of s * (drop(x) A^T) B^T.

    The base layer is frozen and kept as ``self.base_layer``. ``s = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with rsLoRA). Build one with :meth:`from_linear`. The base is a
    linear module (nn.Linear, GPT-2 Conv1D, NF4Linear), where the fused op runs, or another
    method's adapter layer (methods stacked on one module), where the rank-r term is added to
    its output.
    """

    peft_type = "LORA"
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool | None = None):
        super().__init__()
        if isinstance(base_layer, LoRALinear) or getattr(base_layer, "peft_type", None) == "LORA":
            raise TypeError(f"the base layer is already a {type(base_layer).__name__}; add another adapter to it "
                            "with update_layer(name, r, lora_alpha, ...) instead of wrapping it again")
        if not isinstance(base_layer, nn.Module):
            raise TypeError(f"base_layer must be an nn.Module (nn.Linear, Conv1D, ...), got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        inner = inner_module(base_layer)
        self.fan_in_fan_out = is_conv1d(inner) if fan_in_fan_out is None else fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_name: str = "default", init_lora_weights=True) -> "LoRALinear":
        """Wrap ``linear`` (nn.Linear or GPT-2 Conv1D) with one adapter of rank ``r``. Every setting is
        checked before ``linear`` is touched."""
        check_adapter_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        module = cls(linear)
        module.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        module.set_adapter(adapter_name)
        return module

    # -- adapters ---------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights=True) -> None:
        """Add (or replace) adapter ``adapter_name``; A Kaiming-uniform as PEFT does, B zeros."""
        check_adapter_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        weight = self.base_weight()
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights=True) -> None:
        """``True``: A ~ Kaiming-uniform(a=sqrt(5)), B = 0; ``"gaussian"``: A ~ N(0, 1/r); ``False``: both random."""
        if init_lora_weights is False:
            return  # nn.Linear's own init leaves B non-zero: an adapter that changes the output
        a = self.lora_A[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[adapter_name])
        elif init_lora_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.lora_A:
                raise KeyError(f"no adapter {name!r} in this layer (it has {list(self.lora_A.keys())})")
        self.active_adapters = names
        for name in self.lora_A:
            trainable = name in names
            self.lora_A[name].weight.requires_grad_(trainable)
            self.lora_B[name].weight.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() first")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[adapter_name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora):
            table.pop(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # -- weights ----------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as stored (Conv1D: [in, out]; nn.Linear: [out, in])."""
        return self.base_layer.weight

    def _weight_out_in(self) -> torch.Tensor:
        w = self.base_weight()
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s * B A as [out, in], computed in fp32."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        return (b @ a) * self.scaling[adapter_name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add s B A into the base weight for the given (default: active) adapters."""
        weight = self.base_weight()
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:  # not on this layer: skipped, as PEFT
                continue
            delta = self.delta_weight(name)
            delta = delta.t() if self.fan_in_fan_out else delta
            if hasattr(self.base_layer, "merge_delta"):  # quantized base: merged against dequant(W), requantized
                self.base_layer.merge_delta(delta)
                self.merged_adapters.append(name)
                continue
            merged = weight.float() + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base layer is unchanged")
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter back out of the base weight."""
        weight = self.base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            delta = self.delta_weight(name)
            delta = delta.t() if self.fan_in_fan_out else delta
            if hasattr(self.base_layer, "merge_delta"):  # quantized base: requantized, so not exactly undone
                self.base_layer.merge_delta(-delta)
                continue
            weight.copy_((weight.float() - delta).to(weight.dtype))

    # -- forward ----------------------------------------------------------------------------
    def _dropout_p(self, adapter_name: str) -> float:
        drop = self.lora_dropout[adapter_name]
        return drop.p if isinstance(drop, nn.Dropout) else 0.0

    def _runnable_adapters(self) -> list[str]:
        """The active adapters to run, or [] when the base layer alone gives the output (adapters
        disabled, which unmerges any merged one, or merged, or none active)."""
        return runnable_adapters(self, self.lora_A)

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = current_rows()
        if rows is not None and not self.disable_adapters:
            if is_adapter_layer(self.base_layer):  # a stack: each group runs the whole stack
                return forward_by_rows(self, x, rows)
            return self._forward_rows(x, rows)
        active = self._runnable_adapters()
        if not active:
            return self.base_layer(x)
        out_dtype = x.dtype
        dtype = self._compute_dtype(x)
        if is_adapter_layer(self.base_layer):  # another method's layer below: its output, plus ours
            y = self.base_layer(x)
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(dtype)
                y = y.to(dtype)
                for name in active:
                    y = y + self._rank_term(x, name, dtype)
            return y.to(out_dtype)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            first, rest = active[0], active[1:]
            fused_base = getattr(self.base_layer, "lora_forward", None)
            if fused_base is not None:  # a quantized base (NF4Linear): its GEMM and the first adapter in one pass
                y = fused_base(x, self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype),
                               self.scaling[first], self._dropout_p(first), self.training).to(dtype)
            else:
                weight = self._weight_out_in().to(dtype)
                bias = self.base_layer.bias
                bias = bias.to(dtype) if bias is not None else None
                if not torch.is_grad_enabled() and not (self.training and self._dropout_p(first) > 0) \
                        and self._plain_pays(x):
                    y = self._plain_no_grad(x, weight, bias, first, dtype)
                    for name in rest:
                        y = y + self._rank_term(x, name, dtype)
                    return y.to(out_dtype)
                y = lora_linear(x, weight, bias, self.lora_A[first].weight.to(dtype),
                                self.lora_B[first].weight.to(dtype), self.scaling[first], self._dropout_p(first),
                                self.training)
            for name in rest:  # further active adapters: the plain rank-r path, added on
                y = y + self._rank_term(x, name, dtype)
        return y.to(out_dtype)

    @staticmethod
    def _plain_pays(x: torch.Tensor) -> bool:
        """Whether a no-grad forward takes the plain path: always off CUDA (the op's torch face does the
        same GEMMs behind a per-call dispatch), on CUDA only for decoding-sized inputs (<= 128 rows),
        where launches, not bytes, set the time; a large prefill or scoring pass keeps the fused kernel."""
        return x.device.type != "cuda" or x.numel() <= 128 * x.shape[-1]

    def _plain_no_grad(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
                       dtype: torch.dtype) -> torch.Tensor:
        """x W^T + b + s (x A^T) B^T with two plain GEMMs and an in-place addmm, for forwards without
        autograd (decoding, scoring, evaluation): the same math as ``lora_linear``'s torch face without
        the registered op's per-call dispatch, which dominates a decoding step at small shapes."""
        x2d = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        y.addmm_(x2d @ self.lora_A[name].weight.to(dtype).t(), self.lora_B[name].weight.to(dtype).t(),
                 alpha=self.scaling[name])
        return y.view(*x.shape[:-1], weight.shape[0])

    def _rank_term(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """s * (drop(x) A^T) B^T of adapter ``name``, in ``dtype`` (x already in it)."""
        a, b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
        return self.scaling[name] * (self.lora_dropout[name](x) @ a.t()) @ b.t()

    def _forward_by_rows(self, x: torch.Tensor, rows) -> torch.Tensor:
        """Mixed batch (``adapter_names``, one adapter per row): the base layer once over all rows
        (one GEMM of the whole batch), then each adapter's rank-r term added to its own rows only;
        "__base__" rows and names this layer does not hold get the base output alone (as PEFT)."""
        check_rows(x, rows, [self])
        y = self.base_layer(x)
        held = [name for name in rows.groups if name in self.lora_A]
        if not held:
            return y
        out_dtype = x.dtype
        dtype = self._compute_dtype(x)
        in_place = not torch.is_grad_enabled()  # with autograd, out of place: the base's backward may need y
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            y = y.to(dtype)
            for name in held:
                picked = rows.rows_of(name, x.device)
                term = self._rank_term(x[picked], name, dtype)
                if in_place:
                    y[picked] += term
                else:
                    y = y.index_add(0, rows.index(name, x.device), term)
        return y.to(out_dtype)

    def _forward_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        """Row i through adapter ``rows.names[i]`` alone (the base alone for a name this layer does not
        hold), in one pass over the base weight with ``multi_lora_linear``. Where that op does not
        apply (a quantized base, merged adapters, a row count that does not match, or dropout rates
        that differ between the batch's adapters while training): :meth:`_forward_by_rows`."""
        names = tuple(n for n in rows.groups if n in self.lora_A)
        one_pass = (not hasattr(self.base_layer, "lora_forward") and not self.merged and x.dim() > 1
                    and x.shape[0] == len(rows.names)
                    and (not self.training or len({self._dropout_p(n) for n in names}) <= 1))
        if not one_pass:
            return self._forward_by_rows(x, rows)
        if not names:
            return self.base_layer(x)
        out_dtype = x.dtype
        dtype = self._compute_dtype(x)
        ranks = [self.r[n] for n in names]
        rank = max(ranks)
        with torch.autocast(x.device.type, enabled=False):
            lora_A = torch.stack([F.pad(self.lora_A[n].weight.to(dtype), (0, 0, 0, rank - self.r[n])) for n in names])
            lora_B = torch.stack([F.pad(self.lora_B[n].weight.to(dtype), (0, rank - self.r[n])) for n in names])
            bias = self.base_layer.bias
            y = multi_lora_linear(x.to(dtype), self._weight_out_in().to(dtype),
                                  bias.to(dtype) if bias is not None else None, lora_A, lora_B,
                                  [self.scaling[n] for n in names], rows.adapter_index(names, x.device), ranks,
                                  self._dropout_p(names[0]), self.training, check_index=False)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]:g}, scaling={self.scaling[n]:.4g}, "
                             f"dropout={self._dropout_p(n):g}" for n in self.lora_A)
        state = ", merged" if self.merged else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, adapters=[{adapters}], active={self.active_adapters}{state}")


def check_adapter_settings(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights) -> None:
    """Types and ranges of one adapter's settings, each error naming the argument."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    for name, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {use_rslora!r}")
    if init_lora_weights not in INIT_CHOICES or (isinstance(init_lora_weights, (int, float))
                                                 and not isinstance(init_lora_weights, bool)):
        raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
