"""Adapters folded into their base: ``merge_adapters`` loads a model folder and one or more adapter
folders (PEFT's files, any method), merges them and returns a plain transformers model;
``save_checkpoint_folder`` writes it as ``save_pretrained`` does (config, safetensors shards of a
chosen size, tokenizer files), 16-bit or, for a 4-bit base, requantized in bitsandbytes' layout.

On an NF4 base every adapted layer is merged against its dequantized weight in fp32,
W' = merge(dequant(W4), adapter), then either kept in 16 bits (what the adapter model computes,
to rounding) or requantized, which adds an error reported per layer as
||dequant(quant(W')) - W'|| / ||W'||.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from peftkern.nn import NF4Linear
from peftkern.quant import layout
from peftkern.quant.shards import ShardWriter, copy_side_files, staged_directory
from peftkern.quant.streaming import bnb_tensors, quantize_sliced, tied_keys
from peftkern.train.pretrained import load_pretrained
from peftkern.tuners import load_adapter


def load_with_adapters(model_dir: str, adapters: list[str], dtype="auto", quant: str = "none", device="cpu"):
    """(the model with every adapter loaded and active, adapter names): ``model_dir`` read by
    ``load_pretrained``, adapters named ``a0``, ``a1``, ... Errors name the adapter folder."""
    if not adapters:
        raise ValueError("give at least one --adapter to merge")
    model = load_pretrained(model_dir, dtype, device, quant)
    names = []
    for i, folder in enumerate(adapters):
        name = f"a{i}"
        try:
            model = load_adapter(model, folder, adapter_name=name)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            text = str(exc)
            where = "" if folder in text else f"{os.path.join(folder, 'adapter_config.json')}: "
            raise ValueError(f"--adapter {folder}: does not fit --model {model_dir}: {where}{text}") from None
        names.append(name)
    model.set_adapter(names)
    return model.eval(), names


def merge_adapters(model_dir: str, adapters: list[str], weights: list[float] | None = None, dtype="auto",
                   quant: str = "none", requantize: bool = False, device="cpu") -> tuple[nn.Module, dict[str, float]]:
    """(merged plain model, {layer: requantization error}). ``weights`` scale each adapter's update
    (LoRA adapters only: they are combined exactly, sum_i w_i s_i B_i A_i, as PEFT's
    ``add_weighted_adapter(combination_type="cat")``); without weights every adapter is merged as
    the model runs them all active. A 4-bit base (a 4-bit checkpoint, or ``quant="nf4"``) comes out
    16-bit in the base's compute dtype, or requantized to NF4 with ``requantize``."""
    model, names = load_with_adapters(model_dir, adapters, dtype, quant, device)
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"--weights: {len(weights)} weights for {len(names)} adapters")
    if weights is not None:
        kinds = {n: model.peft_config[n].peft_type for n in names}
        dora = [n for n in names if getattr(model.peft_config[n], "use_dora", False)]
        if set(kinds.values()) != {"LORA"} or dora:
            raise ValueError(f"--weights scales LoRA adapters only (a weighted sum of their updates); these are "
                             f"{ {adapters[int(n[1:])]: ('DORA' if n in dora else k) for n, k in kinds.items()} }")
        model.add_weighted_adapter(names, list(weights), "merged", combination_type="cat")
        model.set_adapter("merged")
        names = ["merged"]
    quantized = _dense_bases(model)
    plain = model.merge_and_unload(names)
    errors = {}
    with torch.no_grad():
        for path, (old, compute_dtype) in quantized.items():
            merged = plain.get_submodule(path)
            if requantize:
                w4 = quantize_sliced(merged.weight.to(old.quant_dtype), old.blocksize, old.nested_absmax is not None)
                back = w4.dequantize(torch.float32)
                errors[path] = float((back - merged.weight).norm() / merged.weight.norm().clamp(min=1e-30))
                layer = NF4Linear(w4, merged.bias, compute_dtype)
            else:
                layer = nn.Linear(merged.in_features, merged.out_features, bias=merged.bias is not None,
                                  dtype=compute_dtype, device=merged.weight.device)
                layer.weight.copy_(merged.weight)
                if merged.bias is not None:
                    layer.bias.copy_(merged.bias)
            _replace(plain, path, layer)
        if not requantize:  # the layers no adapter touched: 16-bit too
            for path, module in list(plain.named_modules()):
                if isinstance(module, NF4Linear):
                    _replace(plain, path, _dense(module, module.compute_dtype or module.quant_dtype))
    return plain, errors


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _dense(base: NF4Linear, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` in ``dtype`` holding the NF4 layer's dequantized weight (and its bias)."""
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                      device=base.weight.device)
    with torch.no_grad():
        dense.weight.copy_(base.dequantize(torch.float32))
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    return dense.requires_grad_(False)


def _dense_bases(model) -> dict[str, tuple[NF4Linear, torch.dtype]]:
    """Swap every adapted NF4Linear for an fp32 ``nn.Linear`` of its dequantized weight, so each
    method merges with its own rule; returns {path: (the NF4Linear, its compute dtype)}."""
    swapped = {}
    stacks: dict[str, list[nn.Module]] = {}
    for path, layer in model.adapter_layers():
        stacks.setdefault(path, []).append(layer)
    for path, stack in stacks.items():
        inner = stack[-1]
        base = inner.base_layer
        if not isinstance(base, NF4Linear):
            continue
        inner.base_layer = _dense(base, torch.float32)
        swapped[path] = (base, base.compute_dtype or base.quant_dtype)
    return swapped


def save_checkpoint_folder(model: nn.Module, out_dir: str, source_dir: str | None = None,
                           dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """Write ``model`` (a transformers model, possibly with NF4Linear layers) to the new folder
    ``out_dir`` as ``save_pretrained`` does: config.json (with bitsandbytes' ``quantization_config``
    when it has 4-bit layers), safetensors shards of at most ``max_shard_bytes``, tied weights once,
    and the tokenizer files of ``source_dir``. Floating tensors are cast to ``dtype`` (4-bit layers
    keep their codes). Written in a temporary folder renamed into place. Returns the weight files."""
    tied = tied_keys(model)
    nf4 = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    with staged_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if name in nf4:
                for key, tensor in bnb_tensors(name, module.w4).items():
                    writer.add(key, tensor)
                if module.bias is not None:
                    writer.add(prefix + "bias", _cast(module.bias, dtype))
                continue
            if any(name.startswith(q + ".") for q in nf4):
                continue
            for leaf, tensor in list(module.named_parameters(recurse=False)) + [
                    (b, t) for b, t in module.named_buffers(recurse=False)
                    if b not in getattr(module, "_non_persistent_buffers_set", set())]:
                if prefix + leaf not in tied and tensor is not None:
                    writer.add(prefix + leaf, _cast(tensor, dtype))
        written = writer.close()
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if nf4:
            first = next(iter(nf4.values()))
            config.quantization_config = layout.bnb_nf4_config(first.nested_absmax is not None,
                                                                first.compute_dtype or torch.bfloat16)
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        if source_dir is not None:
            copy_side_files(source_dir, tmp)
    return written


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
