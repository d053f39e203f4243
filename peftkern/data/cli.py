"""``peftkern data convert|inspect|self-instruct|augment|pairs`` and ``peftkern sweep``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from tqdm.auto import tqdm

from peftkern.data import augmentation as augment_mod
from peftkern.data import converters as convert_mod
from peftkern.data import inspection, negatives, selfinstruct, sweep
from peftkern.data.io import read_records, write_json, write_jsonl
from peftkern.data.plots import plot_inspection
from peftkern.data.risks import format_risks
from peftkern.train.config import TrainConfig
from peftkern.train.data import DataError
from peftkern.train.loading import load_lm, load_tokenizer


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="instruction data: convert to TRL formats, inspect, self-instruct, augment, "
                       "preference pairs from negatives", description="Instruction data tools; see docs/data.md.")
    data = p.add_subparsers(dest="data_command", required=True)

    c = data.add_parser("convert", help="Alpaca / ShareGPT / Dolly / OpenOrca / FLAN task files -> TRL JSONL")
    c.add_argument("source", help="JSONL, JSON array, or a datasets save_to_disk directory")
    c.add_argument("--from", dest="fmt", default="auto", choices=convert_mod.FORMATS,
                   help="source format (default: told from each record's fields)")
    c.add_argument("--to", default="messages", choices=convert_mod.TARGETS, help="TRL format (default: messages)")
    c.add_argument("--out", required=True, help="output JSONL")
    c.add_argument("--seed", type=int, default=0, help="FLAN task files: seed of the template draws (default 0)")
    c.add_argument("--templates-per-example", type=int, default=1,
                   help="FLAN task files: distinct templates per example (default 1)")
    c.set_defaults(func=_convert)

    i = data.add_parser("inspect", help="format errors, structure, truncation, duplicates, leakage, distributions, "
                        "diversity; a table, JSON and a PNG")
    i.add_argument("source", help="training data (any format 'data convert' reads)")
    i.add_argument("--eval", default=None, help="held-out data: duplicates of its prompts in the training data are leakage")
    i.add_argument("--from", dest="fmt", default="auto", choices=convert_mod.FORMATS, help="source format (default auto)")
    i.add_argument("--tokenizer", default=None, help="'tiny' (the embedded byte tokenizer) or a local tokenizer "
                   "directory: lengths in tokens, and the truncation check with --max-length")
    i.add_argument("--max-length", type=int, default=None, help="tokens per sequence the trainer keeps")
    i.add_argument("--threshold", type=float, default=0.8,
                   help="near duplicates: Jaccard similarity of character shingles at or above this (default 0.8)")
    i.add_argument("--shingle", type=int, default=5, help="characters per shingle (default 5)")
    i.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    i.add_argument("--seed", type=int, default=0, help="MinHash seed; FLAN template draws (default 0)")
    i.add_argument("--json", default=None, help="write the full report here")
    i.add_argument("--png", default=None, help="write the distributions plot here")
    i.add_argument("--show", type=int, default=10, help="locations listed per finding in the table (default 10)")
    i.set_defaults(func=_inspect)

    s = data.add_parser("self-instruct", help="new instructions from seed tasks with a local model, filtered "
                        "(ROUGE-L < 0.7 with the pool, length, keywords), with a risk report")
    s.add_argument("--model", default="tiny", help="'tiny' (the embedded default), 'tiny-micro' or a local model directory")
    s.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    s.add_argument("--seeds", default=None, help="seed tasks: Self-Instruct's seed_tasks.jsonl or any format 'data "
                   "convert' reads (default with a tiny model: bundled task questions)")
    s.add_argument("--out", required=True, help="directory for instructions.jsonl, data.jsonl, rejected.jsonl, report.json")
    defaults = selfinstruct.SelfInstructSettings()
    for name, help_text in (("n", "new instructions wanted"), ("batch_size", "prompts per generate call"),
                            ("seed_in_prompt", "seed tasks listed per prompt"),
                            ("generated_in_prompt", "accepted instructions listed per prompt"),
                            ("max_new_tokens", "tokens generated per prompt"), ("min_words", "shortest instruction"),
                            ("max_words", "longest instruction"), ("max_rounds", "give up after this many batches"),
                            ("output_tokens", "tokens per answer"), ("seed", "seed of prompts and sampling")):
        s.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name),
                       help=f"{help_text} (default {getattr(defaults, name)})")
    for name, help_text in (("temperature", "sampling temperature"), ("top_p", "nucleus sampling"),
                            ("rouge_threshold", "reject at ROUGE-L F >= this with any pool instruction")):
        s.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                       help=f"{help_text} (default {getattr(defaults, name)})")
    s.add_argument("--blocked-keywords", default=",".join(defaults.blocked_keywords),
                   help="comma-separated words an instruction must not contain")
    s.add_argument("--no-outputs", action="store_true", help="instructions only: no answers generated")
    s.add_argument("--augment", type=int, default=0, help="also write N augmented copies per record (augmented.jsonl): "
                   "templated rephrasings, with the same risk report")
    s.add_argument("--augment-perturb", type=float, default=0.0,
                   help="with --augment: share of input words given a typo (default 0)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_self_instruct)

    a = data.add_parser("augment", help="templated rephrasings and input typos, with a risk report")
    a.add_argument("source")
    a.add_argument("--from", dest="fmt", default="auto", choices=convert_mod.FORMATS)
    a.add_argument("--out", required=True, help="output JSONL (TRL messages)")
    a.add_argument("--per-record", type=int, default=1, help="augmented copies per record (default 1)")
    a.add_argument("--no-rephrase", action="store_true", help="keep the instruction's wording")
    a.add_argument("--perturb", type=float, default=0.0, help="share of input words given a typo (default 0)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--report", default=None, help="write the risk report (JSON) here")
    a.set_defaults(func=_augment)

    q = data.add_parser("pairs", help="preference pairs from records marked as refusals or counter-examples")
    q.add_argument("source")
    q.add_argument("--from", dest="fmt", default="auto", choices=convert_mod.FORMATS)
    q.add_argument("--out", required=True, help="pairs JSONL (prompt / chosen / rejected)")
    q.add_argument("--sft-out", default=None, help="also write the records safe for SFT (no counter-examples)")
    q.add_argument("--refusals", default="chosen", choices=negatives.REFUSAL_SIDES,
                   help="side of marked refusals: chosen (safety pairs, default) or rejected (over-refusal pairs)")
    q.set_defaults(func=_pairs)

    w = sub.add_parser("sweep", help="grid or random search over trainer settings; resumable; table and plot",
                       description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("file", help="sweep YAML")
    w.add_argument("--processes", type=int, default=None, help="override the file's 'processes'")
    w.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished; run nothing")
    w.set_defaults(func=_sweep)


def _error(args, exc) -> int:
    name = f"data {args.data_command}" if args.command == "data" else args.command
    print(f"peftkern {name}: error: {exc}", file=sys.stderr)
    return 2


def _guarded(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except (DataError, ValueError, FileNotFoundError) as exc:  # SweepError is a ValueError
            return _error(args, exc)
    return run


def _items(source: str, fmt: str, seed: int = 0, per_example: int = 1) -> list[dict]:
    return convert_mod.normalize_all(read_records(source), fmt, None, seed, per_example)


@_guarded
def _convert(args) -> int:
    records = read_records(args.source)
    out = convert_mod.convert_records(records, args.fmt, args.to, args.seed, args.templates_per_example)
    if not out:
        raise DataError(f"{args.source}: no records")
    write_jsonl(out, args.out)
    dropped = convert_mod.dropped_fields(records, args.fmt)
    note = f"; fields not carried over: {', '.join(f'{k} ({v})' for k, v in dropped.most_common())}" if dropped else ""
    print(f"wrote {len(out)} records ({args.to}) to {args.out}{note}")
    return 0


def _tokenizer(name: str | None):
    if name is None:
        return None
    if name.startswith("tiny"):
        return load_tokenizer(TrainConfig(model=name))
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--tokenizer {name}: not 'tiny' and not a local tokenizer directory")
    return load_tokenizer(TrainConfig(model=name, tokenizer=name))


@_guarded
def _inspect(args) -> int:
    report = inspection.inspect_data(args.source, args.eval, args.fmt, _tokenizer(args.tokenizer), args.max_length,
                                     args.threshold, args.shingle, args.num_perm, args.seed)
    print(inspection.format_report(report, args.show))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.png:
        print(f"wrote {args.png}" if plot_inspection(report, args.png) else "no PNG: matplotlib is not installed")
    return 1 if inspection.has_blocking_findings(report) else 0


@_guarded
def _self_instruct(args) -> int:
    names = [f.name for f in dataclasses.fields(selfinstruct.SelfInstructSettings)]
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    values["blocked_keywords"] = tuple(k.strip() for k in args.blocked_keywords.split(",") if k.strip())
    values["outputs"] = not args.no_outputs
    settings = selfinstruct.SelfInstructSettings(**values).check()
    if args.seeds:
        seeds = selfinstruct.load_seed_tasks(args.seeds)
    elif args.model.startswith("tiny"):
        seeds = selfinstruct.bundled_seed_tasks()
    else:
        raise DataError(f"--seeds is required with --model {args.model} (the bundled seeds are the tiny model's tasks)")
    cfg = TrainConfig(model=args.model, tokenizer=args.tokenizer, quiet=args.quiet)
    tok = load_tokenizer(cfg)
    lm = load_lm(cfg, quiet=args.quiet)
    if torch.cuda.is_available():
        lm = lm.cuda()
    bar = None
    if not args.quiet:
        bar = tqdm(total=settings.n, desc="self-instruct", unit="instruction", file=sys.stderr)
    result = selfinstruct.self_instruct(lm, tok, seeds, settings,
                                        progress=(lambda k: bar.update(k - bar.n)) if bar is not None else None)
    if bar is not None:
        bar.close()
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(result.instructions, os.path.join(args.out, "instructions.jsonl"))
    write_jsonl(result.records, os.path.join(args.out, "data.jsonl"))
    write_jsonl(result.rejected, os.path.join(args.out, "rejected.jsonl"))
    report = {"self_instruct": result.report}
    print(format_risks(result.report, "self-instruct"))
    if args.augment:
        items = [{**r, "where": f"{args.out}/data.jsonl:{i + 1}"} for i, r in enumerate(result.records)]
        new, areport = augment_mod.augment(items, args.augment, True, args.augment_perturb, settings.seed)
        write_jsonl([_plain(it) for it in new], os.path.join(args.out, "augmented.jsonl"))
        report["augment"] = areport
        print(format_risks(areport, "augment"))
    write_json(report, os.path.join(args.out, "report.json"))
    print(f"wrote {len(result.instructions)} instructions, {len(result.records)} records to {args.out}")
    if not result.report["complete"]:
        print(f"peftkern data self-instruct: only {len(result.instructions)} of {settings.n} instructions passed the "
              f"filters in {settings.max_rounds} rounds (raise --max-rounds, or see rejected.jsonl)", file=sys.stderr)
        return 1
    return 0


def _plain(item: dict) -> dict:
    """A normal-form item as a TRL messages record (its location dropped)."""
    return {k: v for k, v in item.items() if k != "where"}


@_guarded
def _augment(args) -> int:
    new, report = augment_mod.augment(_items(args.source, args.fmt), args.per_record, not args.no_rephrase,
                                      args.perturb, args.seed)
    write_jsonl([_plain(it) for it in new], args.out)
    print(format_risks(report, "augment"))
    if report["answer_mentions_perturbed_word"]:
        print(f"  warning: {report['answer_mentions_perturbed_word']} copies changed an input word that the answer "
              "repeats: their answers may no longer fit")
    if args.report:
        write_json(report, args.report)
    print(f"wrote {len(new)} records to {args.out}")
    return 0


@_guarded
def _pairs(args) -> int:
    pairs, kept, stats = negatives.build_pairs(_items(args.source, args.fmt), args.refusals)
    write_jsonl(pairs, args.out)
    if args.sft_out:
        write_jsonl([_plain(it) for it in kept], args.sft_out)
    print(f"{stats['pairs']} pairs from {stats['prompts']} prompts to {args.out}; "
          f"{stats['negatives_without_a_counterpart']} negatives had no counterpart"
          + (f"; {stats['kept_for_sft']} records for SFT to {args.sft_out}" if args.sft_out else ""))
    return 0


@_guarded
def _sweep(args) -> int:
    spec = sweep.load_sweep(args.file)
    if args.processes is not None and args.processes < 0:
        raise ValueError(f"--processes must be >= 0, got {args.processes}")
    if args.dry_run:
        runs = sweep.plan(spec)
        print(sweep.format_table(spec, sweep.results(spec, runs)))
        return 0
    rows = sweep.run_sweep(spec, args.processes)
    print(sweep.format_table(spec, rows))
    png = os.path.exists(os.path.join(spec.out, "results.png"))
    print(f"wrote {spec.out}/results.json, results.md" + (", results.png" if png else " (no PNG: matplotlib is not "
                                                            "installed)"))
    return 0 if all(r["status"] == "finished" for r in rows) else 1
