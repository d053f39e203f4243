"""BottleneckLayer: bottleneck adapters around one sub-layer of a transformer block (its attention,
its feed-forward block, or the whole block), running through ``peftkern.ops.bottleneck_adapter``.

The wrapped sub-layer runs unchanged; the adapters act on its output (the first element when it
returns a tuple), so no model code is edited:

    serial   (Houlsby, Pfeiffer):  h <- h + s * up(act(down(h)))       h: the sub-layer's output
    parallel (He et al.):          h <- h + s * up(act(down(x)))       x: the sub-layer's input

Several active adapters apply in turn (serial ones stack, parallel ones add). Per-adapter tables:
``adapter_down.<name>`` / ``adapter_up.<name>`` (nn.Linear [hidden -> bottleneck] / [bottleneck ->
hidden], with biases), so a file's keys are ``<sub-layer path>.adapter_down.weight`` and so on.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from peftkern.nn.mixed_batch import BASE_ONLY, current_rows
from peftkern.ops.bottleneck import bottleneck_adapter
from peftkern.tuners.layers import AdapterLayer


class BottleneckLayer(AdapterLayer):
    """Adapters on the output of ``base_layer`` (a sub-layer of hidden size ``hidden``); ``parallel``:
    they read its input instead."""

    peft_type = "BOTTLENECK"
    adapter_layer_names = ("adapter_down", "adapter_up")
    other_tables = ("adapter_settings",)

    def __init__(self, base_layer: nn.Module, hidden: int, parallel: bool):
        trainable = {id(p): p.requires_grad for p in base_layer.parameters()}
        super().__init__(base_layer)
        for p in base_layer.parameters():  # the base class freezes what it wraps; the tuner already froze the model
            p.requires_grad_(trainable[id(p)])
        self.hidden, self.parallel = hidden, parallel
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_settings: dict[str, tuple[float, str]] = {}

    def update_layer(self, adapter_name: str, bottleneck: int, scaling: float, activation: str,
                     init_weights: str = "mam_adapter") -> None:
        """Add adapter ``adapter_name`` (bottleneck width, scaling, non-linearity, initialization)."""
        ref = next(self.base_layer.parameters(), None)
        factory = {"device": ref.device if ref is not None else None,
                   "dtype": ref.dtype if ref is not None and ref.is_floating_point() else torch.float32}
        down = nn.Linear(self.hidden, bottleneck, **factory)
        up = nn.Linear(bottleneck, self.hidden, **factory)
        with torch.no_grad():
            if init_weights == "mam_adapter":  # the model is unchanged until the up-projection trains
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            elif init_weights == "houlsby":
                for layer in (down, up):
                    nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    nn.init.zeros_(layer.bias)
            else:  # "bert"
                for layer in (down, up):
                    layer.weight.normal_(0.0, 0.02)
                    layer.bias.zero_()
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_settings[adapter_name] = (float(scaling), activation)

    # -- forward ----------------------------------------------------------------------------------
    def _run_adapters(self, h: torch.Tensor, x: torch.Tensor | None, names: list[str]) -> torch.Tensor:
        for name in names:
            down, up = self.adapter_down[name], self.adapter_up[name]
            scaling, activation = self.adapter_settings[name]
            dt = h.dtype
            weights = (down.weight.to(dt), down.bias.to(dt), up.weight.to(dt), up.bias.to(dt))
            if self.parallel:
                h = bottleneck_adapter(x.to(dt), *weights, scaling, activation, residual=h)
            else:
                h = bottleneck_adapter(h, *weights, scaling, activation)
        return h

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        rows = current_rows()
        held = set(self.adapter_names())
        if rows is None:
            names = self.runnable_adapters()
            if not names:
                return out
        elif self.disable_adapters or not any(n in held for n in rows.groups):
            return out
        h = out[0] if isinstance(out, tuple) else out
        x = (args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))) if self.parallel else None
        if rows is None:
            h = self._run_adapters(h, x, names)
        else:  # mixed batch: row i through adapter rows.names[i] alone (the sub-layer already ran once)
            if h.shape[0] != len(rows.names):
                raise ValueError(f"adapter_names has {len(rows.names)} entries but this layer's output has "
                                 f"{h.shape[0]} rows; pass one name per row")
            mixed = h.clone()
            for name in rows.groups:
                if name == BASE_ONLY or name not in held:
                    continue
                idx = rows.index(name, h.device)
                mixed.index_copy_(0, idx, self._run_adapters(h.index_select(0, idx),
                                                      None if x is None else x.index_select(0, idx), [name]))
            h = mixed
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    # -- merging: a non-linear adapter cannot fold into weights -----------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.adapter_down]
        if names:
            raise ValueError(f"bottleneck adapters {names} cannot be merged into the base weights (the adapter is "
                             "non-linear); use unload() to remove them, or keep the adapter")

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, {'parallel' if self.parallel else 'serial'}, "
                f"adapters={ {n: d.out_features for n, d in self.adapter_down.items()} }, "
                f"active={self.active_adapters}")
