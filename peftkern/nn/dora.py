"""DoRALinear: LoRALinear plus DoRA's per-row magnitude, running through ``peftkern.ops.dora_linear``.

    y = (m / ||W + s B A||_row) * (x W^T + s (drop(x) A^T) B^T) + b

Laid out as PEFT's LoRA layer with ``use_dora=True``: ``base_layer``, ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight`` and ``lora_magnitude_vector.<adapter>.weight`` [out], so a state dict
maps onto PEFT's keys one to one. The base may be dense (nn.Linear, GPT-2 Conv1D) or 4-bit NF4 (a
module holding a :class:`peftkern.quant.NF4Weight`); for NF4 the row norm is computed from the
4-bit codes row block by row block, never from a 16-bit copy of W.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.nn.lora import LoRALinear
from peftkern.nn.mixed_batch import current_rows, forward_by_rows
from peftkern.ops.dora import dora_from_base, dora_linear, dora_row_norm_from_rows, weight_row_sq_norm


class DoRAMagnitude(nn.Module):
    """One adapter's magnitude vector m [out] (PEFT keeps it as the ``weight`` of a small module)."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


def nf4_weight_of(module: nn.Module):
    """The NF4Weight a quantized base holds (as ``weight``, ``w4`` or ``nf4_weight``), else None."""
    try:
        from peftkern.quant import NF4Weight
    except ImportError:
        return None
    for name in ("weight", "w4", "nf4_weight"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, NF4Weight):
            return candidate
    return None


def nf4_rows(w4, absmax: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an NF4 weight [out, in] dequantized to fp32, decoded straight from the
    packed codes (two per byte, high nibble first) and the fp32 per-block ``absmax``."""
    from peftkern.reference.nf4 import nf4_code

    in_features = w4.shape[1]
    first, last = start * in_features, stop * in_features
    byte0, byte1 = first // 2, (last + 1) // 2
    packed = w4.packed.reshape(-1)[byte0:byte1]
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[first - 2 * byte0:][:last - first]
    blocks = torch.arange(first, last, device=packed.device) // w4.blocksize
    values = nf4_code(packed.device)[codes.long()] * absmax[blocks]
    return values.view(stop - start, in_features)


class DoRALinear(LoRALinear):
    """y = base-with-DoRA(x): every adapter of this layer is a DoRA adapter.

    Build one with :meth:`from_linear`, or ``DoRALinear(base)`` then :meth:`update_layer`. The
    magnitude starts as ||W + s B A||_row (= ||W||_row with B = 0), as PEFT initializes it.
    ||W||^2_row is recomputed on every call, in the pass that already reads W for W A^T: a cache
    keyed on W's version missed edits through ``weight.data`` (which bump no version), and reading
    W once more costs less than a stale norm.

    Several active adapters compose as PEFT 0.21.2 composes them (eval, or no dropout): each one
    rescales the running result, y_i = (m_i / ||W + s_i B_i A_i||) * (y_{i-1} + s_i x A_i^T B_i^T)
    with y_0 = x W^T, then the bias is added once.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool | None = None):
        if hasattr(base_layer, "adapter_layer_names"):
            raise TypeError(f"DoRA needs the adapted module itself as its base (its norm is the base weight's), "
                            f"got another adapter layer ({type(base_layer).__name__}); put DoRA on the module first")
        self._nf4 = nf4_weight_of(base_layer) is not None
        if self._nf4 and fan_in_fan_out:
            raise ValueError("an NF4 base is [out, in]; fan_in_fan_out must be False")
        super().__init__(base_layer, False if self._nf4 else fan_in_fan_out)
        self.lora_magnitude_vector = nn.ModuleDict()
        self._merged_norms: dict[str, torch.Tensor] = {}

    # -- adapters ---------------------------------------------------------------------------
    def base_weight(self):
        """The base weight as stored: a dense tensor, or the NF4Weight of a 4-bit base."""
        return nf4_weight_of(self.base_layer) if self._nf4 else self.base_layer.weight

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights=True, use_dora: bool = True) -> None:
        """Add (or replace) adapter ``adapter_name`` with its magnitude m = ||W + s B A||_row."""
        if not use_dora:
            raise ValueError("DoRALinear holds DoRA adapters only; use LoRALinear for use_dora=False")
        if self._nf4:
            self._update_nf4_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        else:
            super().update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        a = self.lora_A[adapter_name].weight
        norm = self.weight_norm(adapter_name)
        self.lora_magnitude_vector[adapter_name] = DoRAMagnitude(norm.to(device=a.device, dtype=a.dtype))

    def _update_nf4_layer(self, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights):
        # LoRALinear.update_layer takes the adapters' device and dtype from base_weight(), a tensor
        # there; for a 4-bit base they are the codes' device and the compute dtype (fp32 default).
        w4 = self.base_weight()
        compute = getattr(self.base_layer, "compute_dtype", None) or torch.float32
        probe = torch.empty(0, device=w4.device, dtype=compute)
        self.base_weight = lambda: probe
        try:
            super().update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        finally:
            del self.base_weight

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        super().set_adapter(adapter_names)
        for name, mag in self.lora_magnitude_vector.items():
            mag.weight.requires_grad_(name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.lora_magnitude_vector[adapter_name]

    # -- norms ------------------------------------------------------------------------------
    def _dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] as a dense tensor (a 4-bit base is dequantized: for merging only, never in forward)."""
        if self._nf4:
            return self.base_weight().dequantize(dtype or torch.float32)
        w = self._weight_out_in()
        return w if dtype is None else w.to(dtype)

    def weight_sq_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """||W||^2 per row (fp32 [out]) of the dense base in ``dtype``, as it is now."""
        return weight_row_sq_norm(self._dense_weight(dtype))

    def _nf4_norm(self, lora_A, lora_B, scaling) -> torch.Tensor:
        w4 = self.base_weight()
        absmax = w4.absmax_fp32()
        return dora_row_norm_from_rows(lambda i, j: nf4_rows(w4, absmax, i, j), w4.shape[0], lora_A, lora_B, scaling)

    def weight_norm(self, adapter_name: str) -> torch.Tensor:
        """||W + s B A|| per output row (fp32 [out], no grad), from the factored form."""
        a = self.lora_A[adapter_name].weight.detach()
        b = self.lora_B[adapter_name].weight.detach()
        s = self.scaling[adapter_name]
        if self._nf4:
            return self._nf4_norm(a.float(), b.float(), s)
        w = self._dense_weight().detach()
        return dora_row_norm_from_rows(lambda i, j: w[i:j], w.shape[0], a.float(), b.float(), s)

    # -- merge ----------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """What merging changes: (m / ||W + s B A||) * (W + s B A) - W, [out, in], fp32."""
        w = self._dense_weight().float()
        scale = self.lora_magnitude_vector[adapter_name].weight.detach().float() / self.weight_norm(adapter_name)
        return scale[:, None] * (w + LoRALinear.delta_weight(self, adapter_name)) - w

    def _store_weight(self, w: torch.Tensor) -> None:
        """Write a dense [out, in] fp32 weight back into the base (a 4-bit base is requantized)."""
        if self._nf4:
            self.base_layer.set_weight(w)
            return
        weight = self.base_layer.weight
        weight.copy_((w.t() if self.fan_in_fan_out else w).to(weight.dtype))

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W <- (m / ||W + s B A||) * (W + s B A) for each given (default: active) adapter, the norm
        taken on W before this adapter joins it (as PEFT's forward does) and kept for unmerge. A
        4-bit base is dequantized, merged and requantized (so unmerge is exact only up to NF4)."""
        if self._nf4 and not hasattr(self.base_layer, "set_weight"):
            raise RuntimeError(f"{type(self.base_layer).__name__} cannot be requantized (no set_weight); "
                               "merging into it is not possible")
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:  # not on this layer: skipped, as PEFT
                continue
            norm = self.weight_norm(name)
            scale = self.lora_magnitude_vector[name].weight.float() / norm
            merged = scale[:, None] * (self._dense_weight().float() + LoRALinear.delta_weight(self, name))
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the base layer is unchanged")
            self._store_weight(merged)
            self._merged_norms[name] = norm
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merged adapter, last first: W <- W / (m / norm) - s B A, norm as kept at merge."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            scale = self.lora_magnitude_vector[name].weight.float() / self._merged_norms.pop(name)
            self._store_weight(self._dense_weight().float() / scale[:, None] - LoRALinear.delta_weight(self, name))

    # -- forward ----------------------------------------------------------------------------
    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias, for a 4-bit base."""
        from peftkern.ops.nf4 import nf4_linear

        return nf4_linear(x, self.base_weight(), None)

    def _dora(self, name: str, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """This adapter's DoRA output (m / norm) * (base + s drop(x) A^T B^T) + bias, base = x W^T
        (computed here, fused, when not given)."""
        a = self.lora_A[name].weight.to(dtype)
        b = self.lora_B[name].weight.to(dtype)
        m = self.lora_magnitude_vector[name].weight
        s, p = self.scaling[name], self._dropout_p(name)
        if self._nf4 or base is not None:
            norm = self._nf4_norm(a.detach().float(), b.detach().float(), s) if self._nf4 else self.weight_norm(name)
            base = self._base_no_bias(x) if base is None else base
            return dora_from_base(base, x, bias, a, b, m, norm, s, p, self.training)
        return dora_linear(x, self._dense_weight(dtype), bias, a, b, m, s, p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = current_rows()
        if rows is not None and not self.disable_adapters:
            return forward_by_rows(self, x, rows)
        active = self._runnable_adapters()
        if not active:
            return self.base_layer(x)
        out_dtype = x.dtype
        dtype = self._compute_dtype(x)
        if not torch.is_autocast_enabled(x.device.type) and self._nf4 \
                and getattr(self.base_layer, "compute_dtype", None) is not None:
            dtype = self.base_layer.compute_dtype  # a 4-bit base computes in its compute dtype, as bnb's does
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            bias = self.base_layer.bias
            bias = bias.to(dtype) if bias is not None else None
            if len(active) == 1:
                return self._dora(active[0], x, dtype, bias).to(out_dtype)
            # PEFT 0.21.2 feeds each adapter the running result (minus the bias) as its base output:
            # y_i = (m_i / norm_i) * (y_{i-1} + s_i lora_i(x)), y_0 = x W^T; the bias joins once, at the end.
            y = None
            for name in active:
                y = self._dora(name, x, dtype, None, base=y if y is not None else self._plain_base(x, dtype))
            y = y + bias if bias is not None else y
        return y.to(out_dtype)

    def _plain_base(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._base_no_bias(x) if self._nf4 else x @ self._dense_weight(dtype).t()

    def extra_repr(self) -> str:
        return super().extra_repr() + (", base=nf4" if self._nf4 else "")
