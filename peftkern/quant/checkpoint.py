"""4-bit checkpoints in the layout transformers + bitsandbytes write, the format only: the NF4
weights read out of a state dict, the quantization config checked. Building NF4Linear modules from
them is ``peftkern.nn.nf4.load_pretrained_nf4`` (the layer module; this layer imports none).

A bitsandbytes 4-bit checkpoint stores, per quantized linear ``name``: ``name.weight`` (uint8
codes [n/2, 1]), ``name.weight.absmax``, ``name.weight.quant_map``, with double quant
``name.weight.nested_absmax`` / ``name.weight.nested_quant_map``, and
``name.weight.quant_state.bitsandbytes__nf4`` (JSON of blocksize, dtype, shape, ...); its
config.json carries a ``quantization_config`` with ``quant_method: "bitsandbytes"``.
"""
from __future__ import annotations

import glob
import os

import torch

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
