"""4-bit checkpoints in the layout transformers + bitsandbytes write: the format only (read the
NF4 weights out of a state dict, write a model's state dict and config the same way). Building
NF4Linear modules from them is ``peftkern.quantize`` (above the layer module, which this layer
does not import).

A bitsandbytes 4-bit checkpoint stores, per quantized linear ``name``: ``name.weight`` (uint8
codes [n/2, 1]), ``name.weight.absmax``, ``name.weight.quant_map``, with double quant
``name.weight.nested_absmax`` / ``name.weight.nested_quant_map``, and
``name.weight.quant_state.bitsandbytes__nf4`` (JSON of blocksize, dtype, shape, ...); its
config.json carries a ``quantization_config`` with ``quant_method: "bitsandbytes"``.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import torch
from torch import nn

from peftkern.quant.nf4 import QUANT_STATE_KEY, NF4Weight

_FP4_KEY = "quant_state.bitsandbytes__fp4"


def quantized_prefixes(state_dict: dict) -> list[str]:
    """Module names ('model.layers.0.self_attn.q_proj') whose weights are bnb 4-bit in ``state_dict``."""
    fp4 = [k for k in state_dict if k.endswith("." + _FP4_KEY)]
    if fp4:
        raise ValueError(f"checkpoint holds FP4 weights ({fp4[0]}); peftkern loads NF4 only")
    suffix = ".weight." + QUANT_STATE_KEY
    return [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]


def pop_nf4_weights(state_dict: dict) -> dict[str, NF4Weight]:
    """Take every bitsandbytes 4-bit weight out of ``state_dict`` (in place): {module name:
    NF4Weight built from the stored codes and statistics, no requantization}. What remains is the
    state dict of everything else."""
    weights = {}
    for name in quantized_prefixes(state_dict):
        prefix = name + ".weight."
        stats = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
        weights[name] = NF4Weight.from_bnb(state_dict.pop(name + ".weight"), stats)
    return weights


def read_safetensors_dir(model_dir: str) -> dict:
    """Every tensor of the ``*.safetensors`` files in ``model_dir`` (safetensors only, never pickle)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    state: dict = {}
    for path in files:
        state.update(load_file(path))
    return state


def read_quantization_config(config) -> torch.dtype | None:
    """Check a transformers config's ``quantization_config`` (bitsandbytes NF4 or none) and remove
    it from ``config``; returns its compute dtype, when it names one."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("quant_method") not in (None, "bitsandbytes") or qconfig.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ValueError(f"quantization_config {qconfig} is not bitsandbytes NF4")
    del config.quantization_config
    dtype = qconfig.get("bnb_4bit_compute_dtype")
    return getattr(torch, dtype) if isinstance(dtype, str) else None


def save_nf4_pretrained(model: nn.Module, out_dir: str, blocksize: int, double_quant: bool,
                        compute_dtype: torch.dtype | None, skipped: list[str]) -> None:
    """Write ``model`` (its linears NF4Linear) as a transformers + bitsandbytes 4-bit checkpoint:
    model.safetensors and config.json with a ``quantization_config``, each written atomically."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for key in list(state):  # tied weights: safetensors stores each storage once
        ptr = state[key].data_ptr()
        if ptr in seen and state[key].numel():
            del state[key]
        else:
            seen[ptr] = key
    _atomic(os.path.join(out_dir, "model.safetensors"), lambda path: save_file(state, path, metadata={"format": "pt"}))
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool(double_quant),
        "bnb_4bit_compute_dtype": str(compute_dtype or torch.float32).split(".")[-1],
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_blocksize": blocksize,
        "llm_int8_skip_modules": skipped,
    }
    _atomic(os.path.join(out_dir, "config.json"),
            lambda path: open(path, "w").write(json.dumps(config, indent=2, sort_keys=True, default=str)))


def copy_side_files(model_dir: str, out_dir: str) -> list[str]:
    """Copy tokenizer and generation files (everything but weights and config.json)."""
    copied = []
    for path in sorted(glob.glob(os.path.join(model_dir, "*"))):
        name = os.path.basename(path)
        if os.path.isfile(path) and name != "config.json" and not name.endswith((".safetensors", ".bin", ".pt",
                                                                                      ".pth", ".index.json")):
            shutil.copy2(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _atomic(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
