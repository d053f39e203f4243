"""``peftkern quantize MODEL_DIR OUT_DIR``: a transformers checkpoint -> NF4 (bitsandbytes layout)."""
from __future__ import annotations

import argparse
import os

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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

    from peftkern.nn.nf4 import NF4Linear, _output_head_names, quantize_model
    from peftkern.quant import checkpoint
    from peftkern.reference.nf4 import BLOCKSIZES

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
    import glob

    return glob.glob(os.path.join(directory, "*.safetensors"))
