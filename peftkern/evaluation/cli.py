"""``peftkern eval``: run evaluation suites on a model with adapters, print a table, write JSON;
``--compare`` puts the base and each adapter setting side by side (what each training stage gained
on its target and lost elsewhere)."""
from __future__ import annotations

import json
import os
import sys

from peftkern.evaluation.suites import NAMES


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluation suites on a model and adapters: a table and JSON; --compare puts "
                       "the base and each adapter side by side",
                       description="Suites: " + ", ".join(NAMES) + ", or a .jsonl / .txt file (see docs/evaluation.md). "
                       "Without --compare, every --adapter is loaded and run together. With --compare, the first "
                       "column is the base model and each --adapter is a column of its own; join folders with '+' "
                       "to stack adapters in one column (e.g. --adapter dpo=out/sft/adapter+out/dpo/adapter for a "
                       "DPO adapter trained on the SFT model).")
    p.add_argument("--model", required=True, help="'tiny', 'tiny-micro' or a local transformers causal-LM directory")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR[+DIR...]", help="PEFT adapter folder(s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--nf4", action="store_true", help="quantize the base's linears to NF4 on load")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--suite", action="append", default=[], metavar="NAME|FILE",
                   help="repeatable; default for tiny models: tasks, instruct-tasks, preference, perplexity-tasks; "
                   "otherwise instruct, perplexity, safety")
    p.add_argument("--compare", action="store_true", help="one column per setting: the base, then each --adapter")
    p.add_argument("--no-base", action="store_true", help="with --compare: leave out the base column")
    p.add_argument("--limit", type=int, default=None, help="items per suite (bundled tasks: held-out questions "
                   "drawn; default 60)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per answer "
                   "(default: per suite)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reward-model", default=None, metavar="DIR", help="reward model from 'peftkern rm', for the "
                   "preference suite")
    p.add_argument("--reward-fn", default=None, metavar="MODULE:FUNCTION", help="reward function f(prompt, text) -> "
                   "float for the preference suite (default: the bundled task reward for the bundled suite)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--detail", action="store_true", help="also the per-skill / per-check / per-group rows")
    p.set_defaults(func=run)


def _adapter_name(path: str, taken) -> str:
    """A name for the adapter folder ``path``: its folder name, with the parent's in front if taken."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    name = parts[-1] if parts else "adapter"
    if name in taken and len(parts) > 1:
        name = f"{parts[-2]}-{name}"
    base, i = name.replace(".", "_"), 2
    name = base
    while name in taken:
        name, i = f"{base}{i}", i + 1
    return name


def _columns(adapters: list[str], compare: bool, base: bool) -> tuple[list[str], dict[str, list[str]]]:
    """(adapters to load as NAME=DIR, {column label: adapter names run in it}). ``LABEL=DIR+DIR`` stacks
    folders in one column; without ``compare`` there is one column with every adapter."""
    to_load, columns, name_of = [], {}, {}
    for spec in adapters:
        label, sep, rest = spec.partition("=")
        if not sep:
            label, rest = "", spec
        members = []
        for path in rest.split("+"):
            if not path:
                raise ValueError(f"--adapter {spec!r}: an empty folder name")
            if path not in name_of:
                name_of[path] = _adapter_name(path, set(name_of.values()))
                to_load.append(f"{name_of[path]}={path}")
            members.append(name_of[path])
        label = label or "+".join(members)
        if label in columns:
            raise ValueError(f"--adapter {spec!r}: the column {label!r} is given twice")
        columns[label] = members
    if not compare:
        names = list(name_of.values())
        return to_load, {"+".join(names) if names else "model": names}
    out = {"base": []} if base or not columns else {}
    out.update(columns)
    return to_load, out


def run(args) -> int:
    from peftkern.evaluation.harness import default_suites, evaluate_columns
    from peftkern.evaluation.report import format_table
    from peftkern.evaluation.scoring import reward_fn_scorer, reward_model_scorer
    from peftkern.generate.cli import import_function, write_atomic
    from peftkern.generate.loading import load_for_generation

    try:
        to_load, columns = _columns(args.adapter, args.compare, not args.no_base)
        suites = args.suite or list(default_suites(args.model))
        lm, tok = load_for_generation(args.model, to_load, args.tokenizer, args.nf4, args.device)
        reward = None
        if args.reward_model:
            reward = reward_model_scorer(args.reward_model, tok, args.device)
        elif args.reward_fn:
            reward = reward_fn_scorer(import_function(args.reward_fn))

        def progress(name):
            print(f"  {name} ...", file=sys.stderr, flush=True)

        results = evaluate_columns(lm, tok, columns, suites, reward=reward, limit=args.limit,
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"peftkern eval: error: {exc}", file=sys.stderr)
        return 2
    results.update(model=args.model, suites=suites, limit=args.limit)
    print(format_table(results["columns"], markdown=args.markdown, detail=args.detail))
    if args.out:
        write_atomic(args.out, json.dumps(results, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
