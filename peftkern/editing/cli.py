"""``peftkern edit`` (ROME / MEMIT -> a PEFT adapter folder) and ``peftkern eval-edits`` (efficacy,
generalization, specificity, fluency of a model, with and without edit adapters)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from peftkern.editing.defaults import DEFAULT_MOM2_SCALE
from peftkern.editing.requests import EditError

BUNDLED = "bundled"
TINY_SEPARATOR = ".<|end|><|bos|>"   # the tiny model's documents are single sentences: end one, start the next


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="edit facts with ROME or MEMIT and save the edit as a LoRA adapter (PEFT's files)",
                       description="Computes ROME (one request, or several one after another) or MEMIT (all at once) "
                       "and writes the low-rank update as a PEFT adapter folder: load it with peftkern.load_adapter "
                       "or peft.PeftModel.from_pretrained.")
    _model_args(p)
    p.add_argument("--out", required=True, help="adapter folder to write (adapter_config.json, "
                   "adapter_model.safetensors, edit_info.json)")
    p.add_argument("--method", choices=("rome", "memit"), default="rome",
                   help="rome: rank one per request, requests applied in turn (default); memit: all requests in one "
                   "batched update over --layers")
    p.add_argument("--layer", type=int, default=None, help="ROME: the layer to edit (default: located by causal tracing)")
    p.add_argument("--layers", default=None, help="MEMIT: comma-separated layers (default: located by causal tracing)")
    p.add_argument("--mom2-weight", type=float, default=None, help="MEMIT: an absolute lambda, the weight of the corpus "
                   "key statistics at every layer (the paper's; default: --mom2-scale)")
    p.add_argument("--mom2-scale", type=float, default=None, help="MEMIT: lambda relative to the edit keys, lambda_l = this "
                   "* mean k^T C_l^-1 k at each layer (one request writes 1/(1 + this) of its shift; default "
                   f"{DEFAULT_MOM2_SCALE})")
    p.add_argument("--corpus", default=None, help="text for the key statistics: a .txt file (one document per line) "
                   "or .jsonl with a 'text' field (default: the bundled corpus, which fits the tiny model only)")
    p.add_argument("--stat-tokens", type=int, default=100_000, help="tokens of the corpus for the statistics (default 100000)")
    p.add_argument("--steps", type=int, default=25, help="optimization steps of v* (default 25)")
    p.add_argument("--lr", type=float, default=0.5, help="Adam learning rate of v* (default 0.5)")
    p.add_argument("--kl-factor", type=float, default=0.0625, help="weight of the KL term (default 0.0625)")
    p.add_argument("--weight-decay", type=float, default=0.5, help="weight of ||delta||^2/||v0||^2 (default 0.5)")
    p.add_argument("--clamp-factor", type=float, default=4.0, help="||delta|| <= this * ||v0|| (default 4)")
    p.add_argument("--prefixes", type=int, default=10, help="prefix contexts the model samples for k* and v* (default "
                   "10; 0: the prompt alone)")
    p.add_argument("--prefix-length", type=int, default=10, help="tokens per prefix (default 10)")
    p.add_argument("--no-cache", action="store_true", help="recompute the key statistics (and do not cache them)")
    p.set_defaults(func=run_edit)

    p = sub.add_parser("eval-edits", help="efficacy, generalization, specificity and fluency of edits",
                       description="Scores the model on edit requests (CounterFact's measures); with --adapter, "
                       "scores the model with the adapter(s) switched on as well, side by side.")
    _model_args(p)
    p.add_argument("--adapter", action="append", default=[], help="adapter folder to switch on (repeat to stack)")
    p.add_argument("--no-fluency", action="store_true", help="skip the sampled generations for fluency")
    p.add_argument("--json", action="store_true", help="print the full JSON (per request too)")
    p.set_defaults(func=run_eval)


def _model_args(p) -> None:
    p.add_argument("--model", required=True, help="a transformers model folder, 'tiny' (the embedded pretrained "
                   "default) or 'tiny-facts' (it, after learning the bundled facts; built and cached on first use)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder; the byte "
                   "tokenizer for tiny)")
    p.add_argument("--requests", required=True, help="edit requests, JSON Lines (one per line; see docs/editing.md), "
                   "or 'bundled' / 'bundled:N' for the package's requests about the bundled facts")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled prefixes and generations (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def _load(args):
    import torch

    from peftkern.editing.facts import bundled_requests
    from peftkern.editing.requests import load_requests
    from peftkern.editing.tiny_facts import tiny_with_facts
    from peftkern.models import build_byte_tokenizer
    from peftkern.train.pretrain import build_pretrained_tiny as pretrained_tiny

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.requests == BUNDLED or args.requests.startswith(BUNDLED + ":"):
        count = args.requests.partition(":")[2]
        if count and not count.isdigit():
            raise EditError(f"--requests {args.requests}: expected 'bundled' or 'bundled:N'")
        requests = bundled_requests(int(count) if count else None)
    else:
        requests = load_requests(args.requests)
    if args.model in ("tiny", "tiny-facts"):
        model = pretrained_tiny(quiet=True) if args.model == "tiny" else \
            tiny_with_facts(quiet=True, base=lambda: pretrained_tiny(quiet=True))
        tok = build_byte_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise EditError(f"--model {args.model}: not 'tiny', 'tiny-facts' or a folder with config.json")
        model = AutoModelForCausalLM.from_pretrained(args.model)
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model, use_fast=True)
    if args.model in ("tiny", "tiny-facts") and args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, use_fast=True)
    return model.eval(), tok, requests


def _read_corpus(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            out = []
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise EditError(f"{path}:{lineno}: expected an object with a 'text' string")
                    out.append(record["text"])
            return out
        return [line.rstrip("\n") for line in fh if line.strip()]


def run_edit(args: argparse.Namespace) -> int:
    from peftkern.editing.compute import ValueSettings
    from peftkern.editing.memit import memit
    from peftkern.editing.rome import rome, rome_sequential
    from peftkern.editing.sampling import context_prefixes

    try:
        model, tok, requests = _load(args)
        settings = ValueSettings(steps=args.steps, lr=args.lr, kl_factor=args.kl_factor, weight_decay=args.weight_decay,
                                 clamp_factor=args.clamp_factor)
        separator = TINY_SEPARATOR if args.model in ("tiny", "tiny-facts") else ". "
        prefixes = context_prefixes(model, tok, n=args.prefixes, length=args.prefix_length, seed=args.seed,
                                    separator=separator) if args.prefixes else [""]
        common = dict(settings=settings, corpus=_read_corpus(args.corpus) if args.corpus else None,
                      n_stat_tokens=args.stat_tokens, prefixes=prefixes, seed=args.seed, cache=not args.no_cache)
        if args.method == "memit":
            if args.layer is not None:
                raise EditError("--layer is for ROME; MEMIT takes --layers")
            layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
            edit = memit(model, tok, requests, layers, mom2_weight=args.mom2_weight, mom2_scale=args.mom2_scale,
                         **common)
        else:
            if args.layers:
                raise EditError("--layers is for MEMIT; ROME takes --layer")
            if args.mom2_weight is not None or args.mom2_scale is not None:
                raise EditError("--mom2-weight and --mom2-scale are for MEMIT (--method memit)")
            edit = rome(model, tok, requests[0], args.layer, **common) if len(requests) == 1 else \
                rome_sequential(model, tok, requests, args.layer, **common)
        edit.save(model, args.out)
    except (EditError, FileNotFoundError, ValueError) as exc:
        print(f"peftkern edit: error: {exc}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "edit_info.json"), "w", encoding="utf-8") as fh:
        json.dump({"method": edit.method, "layers": edit.layers, "requests": [r.as_dict() for r in edit.requests],
                   "info": edit.info}, fh, indent=1, default=str)
    ranks = {name: edit.rank(name) for name in sorted(edit.factors)}
    print(f"{edit.method}: {len(edit.requests)} request(s) into layers {edit.layers} "
          f"({', '.join(f'{n} rank {r}' for n, r in ranks.items())}); adapter written to {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from peftkern.editing.metrics import evaluate_edits
    from peftkern.tuners import load_adapter

    try:
        model, tok, requests = _load(args)
        results = {"base": evaluate_edits(model, tok, requests, fluency=not args.no_fluency, seed=args.seed)}
        if args.adapter:
            wrapped = model
            for i, folder in enumerate(args.adapter):
                wrapped = load_adapter(wrapped, folder, adapter_name=f"edit{i}")
            wrapped.set_adapter([f"edit{i}" for i in range(len(args.adapter))])
            results["edited"] = evaluate_edits(wrapped, tok, requests, fluency=not args.no_fluency, seed=args.seed)
    except (EditError, FileNotFoundError, ValueError) as exc:
        print(f"peftkern eval-edits: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    names = list(results)
    print(f"{'metric':<24}" + "".join(f"{n:>10}" for n in names) + f"   ({len(requests)} requests)")
    for key in ("efficacy", "generalization", "specificity", "neighbourhood_accuracy", "fluency", "new_prob"):
        cells = [results[n][key] for n in names]
        print(f"{key:<24}" + "".join(f"{'-' if c is None else format(c, '.3f'):>10}" for c in cells))
    return 0
