"""NF4 at the model level: load a transformers checkpoint saved with bitsandbytes 4-bit weights into
NF4Linear modules, and ``peftkern quantize MODEL_DIR OUT_DIR`` (a transformers checkpoint -> NF4 in
bitsandbytes' layout).

It sits above both the NF4 format (``peftkern.quant``, which knows no layer) and the layer module
(``peftkern.nn``), and imports both.
"""
from __future__ import annotations

import argparse
import glob
import os

import torch
from torch import nn

from peftkern.nn.nf4 import NF4Linear, _output_head_names, quantize_model
from peftkern.quant import checkpoint
from peftkern.reference.nf4 import BLOCKSIZES

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_nf4_state_dict(model: nn.Module, state_dict: dict, compute_dtype: torch.dtype | None = None,
                        strict: bool = True) -> nn.Module:
    """Load a state dict holding bitsandbytes 4-bit weights into ``model`` (in place): each
    ``nn.Linear`` whose weight is 4-bit there becomes an NF4Linear built from the stored codes and
    statistics (no requantization); every other tensor loads as usual. Returns ``model``."""
    state_dict = dict(state_dict)
    weights = checkpoint.pop_nf4_weights(state_dict)
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
        stored_dtype = checkpoint.read_quantization_config(config)
    except ValueError as exc:
        raise ValueError(f"{model_dir}: {exc}") from None
    compute_dtype = compute_dtype or stored_dtype
    dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_nf4_state_dict(model, checkpoint.read_safetensors_dir(model_dir), compute_dtype, strict=False)


# ---------------------------------------------------------------------------------------------
# peftkern quantize
# ---------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a transformers checkpoint's linears to NF4 (bitsandbytes format)")
    p.add_argument("model_dir", help="directory with config.json and *.safetensors")
    p.add_argument("out_dir", help="where to write the 4-bit checkpoint (config.json, model.safetensors, tokenizer)")
    p.add_argument("--blocksize", type=int, default=64, help="NF4 blocksize: 32..4096, a power of two (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax (4.5 bits/param at 64)")
    p.add_argument("--compute-dtype", choices=sorted(_DTYPES), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the output head (kept 16-bit by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    if args.blocksize not in BLOCKSIZES:
        raise SystemExit(f"peftkern quantize: --blocksize must be one of {BLOCKSIZES}, got {args.blocksize}")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise SystemExit(f"peftkern quantize: {args.model_dir} has no config.json")
    if os.path.abspath(args.model_dir) == os.path.abspath(args.out_dir):
        raise SystemExit("peftkern quantize: OUT_DIR must differ from MODEL_DIR")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="auto", use_safetensors=True)
    heads = sorted(_output_head_names(model)) if not args.quantize_head else []
    todo = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in heads]
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="quantizing", unit="layer")
    compute_dtype = _DTYPES[args.compute_dtype]
    with torch.no_grad():
        quantize_model(model, args.blocksize, not args.no_double_quant, compute_dtype,
                       skip_output_head=not args.quantize_head,
                       progress=(lambda name: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    checkpoint.save_nf4_pretrained(model, args.out_dir, args.blocksize, not args.no_double_quant, compute_dtype, heads)
    checkpoint.copy_side_files(args.model_dir, args.out_dir)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    params = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.w4.bits_per_param * m.in_features * m.out_features for m in layers) / max(params, 1)
    before = sum(os.path.getsize(p) for p in _weights(args.model_dir))
    after = sum(os.path.getsize(p) for p in _weights(args.out_dir))
    print(f"quantized {len(layers)} linears ({params / 1e6:.2f}M params, {bits:.3f} bits/param), kept 16-bit: "
          f"{', '.join(heads) or 'none'}; weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {args.out_dir}")
    return 0


def _weights(directory: str) -> list[str]:
    return glob.glob(os.path.join(directory, "*.safetensors"))
