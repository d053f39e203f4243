"""``peftkern quantize MODEL_DIR OUT_DIR``: a transformers checkpoint -> the NF4 checkpoint
transformers + bitsandbytes write (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)``), one weight in memory at a time."""
from __future__ import annotations

import argparse
import sys

import torch

from peftkern.quant.layout import ModelFolderError
from peftkern.quant.shards import CheckpointFileError, parse_size
from peftkern.quant.streaming import quantize_checkpoint
from peftkern.reference.nf4 import BLOCKSIZES

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a transformers checkpoint's linears to NF4 (the checkpoint "
                       "transformers + bitsandbytes write; loads with AutoModelForCausalLM.from_pretrained)")
    p.add_argument("model_dir", help="directory with config.json and safetensors (or pytorch_model.bin) weights, "
                   "one file or shards with an index")
    p.add_argument("out_dir", help="new directory for the 4-bit checkpoint (config.json, safetensors, tokenizer)")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="NF4 blocksize (default 64, "
                   "bitsandbytes' own; other sizes load in bitsandbytes too, from each weight's quant state)")
    p.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax (4.5 bits/param at 64)")
    p.add_argument("--compute-dtype", choices=sorted(_DTYPES), default="bf16",
                   help="bnb_4bit_compute_dtype written in the config (default bf16)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the output head (kept 16-bit by "
                   "default, as transformers does)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB; e.g. 500MB)")
    p.add_argument("--device", default=None, help="where to quantize (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    if os.path.abspath(args.model_dir) == os.path.abspath(args.out_dir):
        print("peftkern quantize: OUT_DIR must differ from MODEL_DIR", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model_dir):
        print(f"peftkern quantize: {args.model_dir}: no such model directory", file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(desc="quantizing", unit="linear")
    try:
        summary = quantize_checkpoint(args.model_dir, args.out_dir, args.blocksize, not args.no_double_quant,
                                      _DTYPES[args.compute_dtype], args.quantize_head, parse_size(args.max_shard_size),
                                      args.device, progress=(lambda name: bar.update(1)) if bar is not None else None)
    except (ModelFolderError, CheckpointFileError, ValueError) as exc:
        print(f"peftkern quantize: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    ignored = summary["ignored"]
    print(f"quantized {summary['linears']} linears ({summary['params'] / 1e6:.2f}M params, "
          f"{summary['bits_per_param']:.3f} bits/param), kept 16-bit: {', '.join(summary['kept']) or 'none'}; weights "
          f"{summary['bytes_before'] / 2**20:.1f} MiB -> {summary['bytes_after'] / 2**20:.1f} MiB in {args.out_dir}"
          + (f"; ignored {len(ignored)} tensors the model does not have ({', '.join(ignored[:3])})" if ignored else ""))
    return 0
