#!/usr/bin/env python
"""Train the embedded tiny base once and write it into the package (``peftkern/models/weights/tiny-base``).

    PYTHONPATH=. python scripts/train_tiny_base.py [--out DIR] [--threads 1]

It trains with :data:`peftkern.models.base.PRETRAIN` through :func:`peftkern.train.pretrain.pretrain`
(the code ``peftkern pretrain --fresh`` and ``peftkern demo --fresh-base`` run), on the corpus the
package generates from a seed, so nothing is downloaded. Deterministic: the same settings, torch
version and CPU give the same bytes (one torch thread, as here, removes the one source of run-to-run
change); ``peftkern_base.json`` records the settings, their key, the sha256 of ``model.safetensors``
and how long it took (2319 s of wall time for the default settings, measured on a busy 2-core machine).

The directory is complete for transformers and PEFT (config, weights, byte tokenizer), so an adapter
trained on ``--model tiny`` names it as its base when the cache has no copy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from peftkern.models.base import PRETRAIN, SHIPPED_DIR, SHIPPED_RECORD, settings_key
from peftkern.models.tokenizer import build_byte_tokenizer
from peftkern.train.atomic import atomic_dir
from peftkern.train.pretrain import pretrain


def sha256(path: str) -> str:
    with open(path, "rb") as fh:  # ~11 MB: read at once
        return hashlib.sha256(fh.read()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=SHIPPED_DIR, help=f"output directory (default: {SHIPPED_DIR})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible bytes)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(PRETRAIN)
    started = time.time()
    model = pretrain(settings, quiet=args.quiet)
    seconds = time.time() - started
    with atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp)
        build_byte_tokenizer().save_pretrained(tmp)
        record = {"key": settings_key(settings), "settings": settings,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "sha256": sha256(os.path.join(tmp, "model.safetensors")),
                  "trained_seconds": round(seconds, 1), "threads": args.threads, "torch": torch.__version__,
                  "machine": platform.machine(), "script": "scripts/train_tiny_base.py"}
        with open(os.path.join(tmp, SHIPPED_RECORD), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
        for name in os.listdir(tmp):  # package data: readable by every user of the installed package
            os.chmod(os.path.join(tmp, name), 0o644)
    print(f"wrote {args.out} ({record['parameters']} parameters, sha256 {record['sha256'][:16]}..., "
          f"{seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
