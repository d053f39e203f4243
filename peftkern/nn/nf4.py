"""NF4Linear: a frozen 4-bit NF4 linear (bitsandbytes' format) that runs through the fused
dequant-GEMM, the base of QLoRA.

    layer = NF4Linear.from_linear(nn.Linear(4096, 4096), blocksize=64, double_quant=True,
                                  compute_dtype=torch.bfloat16)
    model = peftkern.quantize_model(model)            # every nn.Linear but the output head
    lora = LoRALinear(layer) ...                      # or get_peft_model(model, LoraConfig(...))

Its state dict uses bitsandbytes' ``Linear4bit`` key names (``weight`` = packed codes [n/2, 1]
uint8, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a transformers
checkpoint saved with bitsandbytes 4-bit weights loads into it and ours loads in bitsandbytes.
"""
from __future__ import annotations

import torch
from torch import nn

from peftkern.ops.nf4 import nf4_linear
from peftkern.quant import checkpoint as nf4_checkpoint
from peftkern.quant.nf4 import QUANT_STATE_KEY, NF4Weight, quantize_nf4

_STAT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QUANT_STATE_KEY)


class NF4Linear(nn.Module):
    """y = x dequant(W4)^T + b, W4 frozen, computed in ``compute_dtype`` (default: x's dtype)."""

    def __init__(self, w4: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(w4.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D [out, in] weight, got shape {tuple(w4.shape)}")
        self.out_features, self.in_features = int(w4.shape[0]), int(w4.shape[1])
        self.weight = nn.Parameter(w4.packed, requires_grad=False)  # as bnb's Params4bit: uint8 codes
        self.register_buffer("absmax", w4.absmax)
        self.register_buffer("nested_absmax", w4.nested_absmax)
        self.register_buffer("nested_code", w4.nested_code)
        self.blocksize, self.offset, self.nested_blocksize = w4.blocksize, w4.offset, w4.nested_blocksize
        self.quant_dtype = w4.dtype
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    # -- dtype casts keep the quantization statistics fp32 (as bitsandbytes keeps its QuantState) ---------
    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` / ``.half()`` cast the bias, but move the fp32 statistics
        (absmax, nested absmax, nested code) to the new device only: cast, they would shift the
        dequantized weights (with double quant) or break the kernels' fp32 inputs."""
        stats = {k: self._buffers[k] for k in ("absmax", "nested_absmax", "nested_code") if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, before in stats.items():
            after = self._buffers[key]
            if after.dtype != before.dtype:
                self._buffers[key] = before.to(after.device)
        return self

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize ``linear``'s weight (bitsandbytes-exact); the bias stays as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects nn.Linear, got {type(linear).__name__}")
        w4 = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls(w4, linear.bias, compute_dtype)

    @classmethod
    def from_bnb(cls, layer, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """From a quantized ``bitsandbytes.nn.Linear4bit`` (NF4), sharing nothing with it."""
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise ValueError("NF4Linear.from_bnb: the Linear4bit is not quantized yet (move it to a device first)")
        w4 = NF4Weight.from_bnb(layer.weight.data.clone(), state.as_dict(packed=True),
                                shape=(layer.out_features, layer.in_features))
        if compute_dtype is None:
            compute_dtype = getattr(layer, "compute_dtype", None)
        return cls(w4, layer.bias, compute_dtype)

    # -- the weight --------------------------------------------------------------------------------
    @property
    def w4(self) -> NF4Weight:
        return NF4Weight(self.weight.data, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.quant_dtype, self.blocksize, self.nested_absmax, self.nested_code, self.offset,
                         self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] in ``dtype`` (default: the dtype it was quantized from)."""
        return self.w4.dequantize(dtype or self.quant_dtype)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Requantize from a dense [out, in] weight (same blocksize and double quant)."""
        w4 = quantize_nf4(weight.to(self.quant_dtype), self.blocksize, self.nested_absmax is not None)
        self.weight.data = w4.packed.to(self.weight.device)
        self.absmax = w4.absmax.to(self.weight.device)
        if w4.double_quant:
            self.nested_absmax = w4.nested_absmax.to(self.weight.device)
            self.nested_code = w4.nested_code.to(self.weight.device)
        self.offset = w4.offset

    @torch.no_grad()
    def merge_delta(self, delta: torch.Tensor) -> float:
        """W4 <- quant(dequant(W4) + delta), delta [out, in]. Returns the error requantizing adds:
        ||quant(W') - W'|| / ||W'|| with W' = dequant(W4) + delta, in fp32."""
        merged = self.dequantize(torch.float32) + delta.float()
        self.set_weight(merged)
        back = self.dequantize(torch.float32)
        return float((back - merged).norm() / merged.norm().clamp(min=1e-30))

    # -- forward -----------------------------------------------------------------------------------
    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.compute_dtype or (x.dtype if x.is_floating_point() else torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_forward(x)

    def lora_forward(self, x: torch.Tensor, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                     scaling: float = 1.0, dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
        """x dequant(W4)^T + b (+ scaling (drop(x) A^T) B^T), one pass over the 4-bit weight;
        LoRALinear calls this when its base layer is an NF4Linear. Output in x's dtype."""
        dtype = self._dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            bias = self.bias.to(dtype) if self.bias is not None else None
            a = lora_A.to(dtype) if lora_A is not None else None
            b = lora_B.to(dtype) if lora_B is not None else None
            y = nf4_linear(x.to(dtype), self.w4, bias, a, b, scaling, dropout_p, training)
        return y.to(x.dtype)

    # -- bitsandbytes-compatible state dict --------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.w4.to_bnb().items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        stats = {k: state_dict[key + "." + k] for k in _STAT_KEYS if key + "." + k in state_dict}
        if key not in state_dict or QUANT_STATE_KEY not in stats:
            missing_keys.extend(k for k in [key, key + "." + QUANT_STATE_KEY] if k not in state_dict)
            return
        try:
            w4 = NF4Weight.from_bnb(state_dict[key], stats)
        except ValueError as exc:
            error_msgs.append(f"{prefix}: {exc}")
            return
        if tuple(w4.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: checkpoint shape {tuple(w4.shape)} != "
                              f"{(self.out_features, self.in_features)}")
            return
        device = self.weight.device
        self.weight.data = w4.packed.to(device)
        self.absmax = w4.absmax.to(device)
        self.nested_absmax = w4.nested_absmax.to(device) if w4.double_quant else None
        self.nested_code = w4.nested_code.to(device) if w4.double_quant else None
        self.blocksize, self.offset, self.nested_blocksize = w4.blocksize, w4.offset, w4.nested_blocksize
        self.quant_dtype = w4.dtype
        if prefix + "bias" in state_dict and self.bias is not None:
            self.bias.data.copy_(state_dict[prefix + "bias"])
        elif self.bias is not None and strict:
            missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names or {name for name, _ in model.named_modules() if name.split(".")[-1] in ("lm_head", "score")}


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, skip_output_head: bool = True,
                   skip: tuple[str, ...] = (), progress=None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an NF4Linear; the output head
    (``get_output_embeddings()``, else a module named lm_head / score) stays 16-bit unless
    ``skip_output_head=False``, as do modules whose dotted name ends with one in ``skip``.
    ``progress``: an optional callable(name) called per quantized layer. Returns ``model``."""
    heads = _output_head_names(model) if skip_output_head else set()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name not in heads and not any(name.endswith(s) for s in skip)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype))
        if progress is not None:
            progress(name)
    return model


def merge_nf4_lora(model: nn.Module, requantize: bool = True, dtype: torch.dtype | None = None):
    """Fold every LoRA layer whose base is an NF4Linear into its base, in place.

    The merge is W' = dequant(W4) + sum of the active adapters' s B A (fp32). ``requantize=True``
    puts quant(W') back as an NF4Linear and reports, per layer, the relative error requantizing
    adds (||quant(W') - W'|| / ||W'||); ``requantize=False`` puts a 16-bit ``nn.Linear`` of W'
    (in ``dtype``, default the quantized-from dtype) instead, and reports 0.
    Returns (model, {layer name: error}).
    """
    errors: dict[str, float] = {}
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if not isinstance(base, NF4Linear) or not hasattr(module, "delta_weight"):
            continue
        active = [n for n in getattr(module, "active_adapters", []) if n in module.lora_A
                  and n not in getattr(module, "merged_adapters", [])]
        delta = sum((module.delta_weight(n) for n in active), torch.zeros(base.out_features, base.in_features,
                                                                         device=base.weight.device))
        with torch.no_grad():
            if requantize:
                errors[name] = base.merge_delta(delta)
                replacement = base
            else:
                out_dtype = dtype or base.quant_dtype
                replacement = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                        device=base.weight.device, dtype=out_dtype)
                replacement.weight.copy_(base.dequantize(torch.float32) + delta)
                if base.bias is not None:
                    replacement.bias.copy_(base.bias)
                errors[name] = 0.0
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model, errors


# ---------------------------------------------------------------------------------------------
# checkpoints saved with bitsandbytes 4-bit weights (their format: peftkern.quant.checkpoint)
# ---------------------------------------------------------------------------------------------

def load_nf4_state_dict(model: nn.Module, state_dict: dict, compute_dtype: torch.dtype | None = None,
                        strict: bool = True) -> nn.Module:
    """Load a state dict holding bitsandbytes 4-bit weights into ``model`` (in place): each
    ``nn.Linear`` whose weight is 4-bit there becomes an NF4Linear built from the stored codes and
    statistics (no requantization); every other tensor loads as usual. Returns ``model``."""
    state_dict = dict(state_dict)
    weights = nf4_checkpoint.pop_nf4_weights(state_dict)
    for name, w4 in weights.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint has a 4-bit weight for {name!r}, which the model does not have") from None
        if not isinstance(module, (nn.Linear, NF4Linear)):
            raise ValueError(f"checkpoint has a 4-bit weight for {name!r}, a {type(module).__name__} in the model")
        if tuple(w4.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: checkpoint weight is {tuple(w4.shape)}, the model's layer is "
                             f"{(module.out_features, module.in_features)}")
        bias = state_dict.pop(name + ".bias", None)
        if bias is None and module.bias is not None:
            bias = module.bias.detach()
        device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
        layer = NF4Linear(w4.to(device), bias.to(device) if bias is not None else None, compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(k.startswith(name + ".") for name in weights)]
    if strict and (missing or unexpected):
        raise ValueError(f"loading the checkpoint: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model


def load_pretrained_nf4(model_dir: str, compute_dtype: torch.dtype | None = None):
    """A transformers causal LM from ``model_dir`` whose weights were saved with bitsandbytes 4-bit
    (or by ``peftkern quantize``), with its quantized linears as NF4Linear. Builds the model from
    config.json (nothing downloaded), then loads the safetensors shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    try:
        stored_dtype = nf4_checkpoint.read_quantization_config(config)
    except ValueError as exc:
        raise ValueError(f"{model_dir}: {exc}") from None
    compute_dtype = compute_dtype or stored_dtype
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_nf4_state_dict(model, nf4_checkpoint.read_safetensors_dir(model_dir), compute_dtype, strict=False)
