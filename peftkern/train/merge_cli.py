"""``peftkern merge`` (adapters folded into their base, written as a plain transformers checkpoint)
and ``peftkern export`` (a checkpoint folder re-written in safetensors shards of a chosen size)."""
from __future__ import annotations

import argparse
import os
import sys

from peftkern.quant.layout import ModelFolderError
from peftkern.quant.shards import CheckpointFileError, parse_size
from peftkern.quant.streaming import reshard_checkpoint
from peftkern.train.merging import merge_adapters, save_checkpoint_folder
from peftkern.train.pretrained import DTYPES, DtypeError

_ERRORS = (ModelFolderError, CheckpointFileError, DtypeError, ValueError, FileNotFoundError)


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold adapters into their base model and write a plain transformers checkpoint",
                       description="Loads --model (16-bit, or a 4-bit checkpoint), the --adapter folders (PEFT's "
                       "files, any method), merges them and writes --out: config.json, safetensors shards, tokenizer. "
                       "A 4-bit base is written in 16 bits, or requantized to NF4 with --requantize (the error "
                       "requantizing adds is printed per layer).")
    p.add_argument("--model", required=True, help="base model folder (the one the adapters were trained on)")
    p.add_argument("--adapter", action="append", required=True, help="adapter folder; repeat to merge several")
    p.add_argument("--weights", default=None, help="comma-separated weight per adapter (LoRA adapters: their updates "
                   "are summed with these weights, exactly); default: every adapter as the model runs them all")
    p.add_argument("--out", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the merged weights (default "
                   "auto: the checkpoint's own; the merge itself is computed in fp32)")
    p.add_argument("--quant", default="none", choices=["none", "nf4"], help="nf4: merge into the NF4-quantized base, "
                   "as a QLoRA adapter was trained (a 4-bit checkpoint is NF4 anyway)")
    p.add_argument("--requantize", action="store_true", help="with a 4-bit base: write the merged layers in NF4 "
                   "(bitsandbytes' layout) instead of 16 bits")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=run_merge)

    p = sub.add_parser("export", help="re-write a checkpoint folder (e.g. a merged model) in safetensors shards of a "
                       "chosen size, optionally in another dtype",
                       description="Reads MODEL_DIR one tensor at a time and writes OUT_DIR as save_pretrained does: "
                       "model-0000i-of-0000N.safetensors + model.safetensors.index.json (or one model.safetensors), "
                       "config.json and the tokenizer files.")
    p.add_argument("model_dir", help="checkpoint folder (safetensors or pytorch_model.bin, sharded or not)")
    p.add_argument("out_dir", help="new folder")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB, 2GB (default 5GB)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast floating tensors (default: as stored)")
    p.set_defaults(func=run_export)


def _weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected comma-separated numbers, one per --adapter") from None
    if len(weights) != count:
        raise ValueError(f"--weights {text!r}: {len(weights)} weights for {count} adapters")
    return weights


def run_merge(args: argparse.Namespace) -> int:
    try:
        for folder in args.adapter:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--adapter {folder}: no such adapter folder")
        weights = _weights(args.weights, len(args.adapter))
        max_bytes = parse_size(args.max_shard_size)
        model, errors = merge_adapters(args.model, args.adapter, weights, args.dtype, args.quant, args.requantize)
        dtype = DTYPES.get(args.dtype)
        files = save_checkpoint_folder(model, args.out, args.model, dtype, max_bytes)
    except _ERRORS as exc:
        print(f"peftkern merge: error: {exc}", file=sys.stderr)
        return 2
    if errors:
        print("requantization error per layer (||quant(W') - W'|| / ||W'||):")
        for name, err in errors.items():
            print(f"  {name}: {err:.3e}")
        print(f"  mean {sum(errors.values()) / len(errors):.3e}, max {max(errors.values()):.3e}")
    print(f"merged {len(args.adapter)} adapter(s) into {args.model}; wrote {args.out} ({', '.join(files)})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    try:
        summary = reshard_checkpoint(args.model_dir, args.out_dir, parse_size(args.max_shard_size),
                                     DTYPES.get(args.dtype) if args.dtype else None)
    except _ERRORS as exc:
        print(f"peftkern export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['tensors']} tensors ({summary['bytes'] / 2**20:.1f} MiB) to {args.out_dir}: "
          f"{', '.join(summary['files'])}")
    return 0
