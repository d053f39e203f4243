"""``peftkern sample-pairs`` (candidate answers to compare) and ``peftkern label serve|export|stats|
prioritize`` (the labelling page and what comes out of it). See docs/labeling.md."""
from __future__ import annotations

import argparse
import json
import sys

from peftkern.generate.cli import add_decoding_arguments, add_model_arguments
from peftkern.labeling.db import LabelDB, SchemaError
from peftkern.labeling.items import TASKS, LabelError
from peftkern.train.errors import TrainError


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _add_reward_arguments(p, what: str) -> None:
    p.add_argument("--reward-model", action="append", default=[], metavar="DIR", help=f"reward model from 'peftkern "
                   f"rm' (its reward_model/ folder) {what}; repeat for an ensemble (its disagreement is the "
                   "uncertainty)")
    p.add_argument("--reward-fn", default=None, metavar="MODULE:FUNCTION", help=f"reward function f(prompt, "
                   f"completion) -> float {what}")


def add_parser(sub) -> None:
    p = sub.add_parser("sample-pairs", help="K candidate answers per prompt to label (sampling, best-of-n under a "
                       "reward, diverse temperatures), deduplicated; JSONL for 'peftkern label serve'",
                       description="Each output line: the prompt record plus 'id', 'completions' (K answers), "
                       "'candidates' (temperature, top_p, seed, round, finish_reason, reward per answer), "
                       "'strategy', 'duplicates_dropped', 'short' (answers missing to reach K). Sampling is always on "
                       "(--sample is implied). See docs/labeling.md.")
    add_model_arguments(p, "a PEFT adapter folder (repeatable: all are loaded and run together)")
    p.add_argument("--prompts", required=True, help="JSONL file of prompts ('prompt' or 'messages' per line)")
    p.add_argument("--out", required=True, help="candidates JSONL")
    p.add_argument("-k", "--k", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--strategy", choices=("sample", "best-of-n", "diverse"), default="sample",
                   help="sample: K draws; best-of-n: N draws ranked by a reward; diverse: one temperature per "
                   "answer slot (default sample)")
    p.add_argument("--n", type=int, default=None, help="best-of-n: draws per prompt (default 4 K)")
    p.add_argument("--keep", choices=("top", "spread"), default="top",
                   help="best-of-n: the K best, or K spread from best to worst (default top)")
    p.add_argument("--temperatures", type=_floats, default=(0.7, 1.0, 1.3),
                   help="diverse: comma-separated temperatures, used in turn (default 0.7,1.0,1.3)")
    p.add_argument("--dedup", choices=("exact", "near", "none"), default="exact",
                   help="drop answers equal after normalising case and spaces (exact), or with character-5-gram "
                   "Jaccard >= --near-threshold (near), and draw again (default exact)")
    p.add_argument("--near-threshold", type=float, default=0.9, help="(default 0.9)")
    p.add_argument("--max-rounds", type=int, default=3, help="rounds of drawing again after duplicates (default 3)")
    p.add_argument("--chat", action="store_true", help="send string prompts as a user turn through the chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    _add_reward_arguments(p, "(best-of-n's ranking; with other strategies each answer's 'reward'); with --model "
                          "tiny the bundled tasks' reward is the default")
    add_decoding_arguments(p)
    p.set_defaults(func=run_sample_pairs)

    p = sub.add_parser("label", help="the labelling web page (pairwise, K-way ranking, Likert) and its export, "
                       "agreement statistics and active-learning order", description="See docs/labeling.md.")
    label = p.add_subparsers(dest="label_command", required=True)

    s = label.add_parser("serve", help="serve the labelling page (local web app; labels saved at once in --db)")
    s.add_argument("--data", default=None, help="candidates JSONL ('peftkern sample-pairs' output, or prompt/chosen/"
                   "rejected pairs); its new items are added to --db (optional when --db exists)")
    s.add_argument("--db", required=True, help="SQLite labels database (created when missing)")
    s.add_argument("--instructions", default=None, metavar="FILE.md", help="rater instructions (Markdown)")
    s.add_argument("--raters-per-item", type=int, default=None, help="raters each item is shown to (default 1, or "
                   "the database's setting)")
    s.add_argument("--task", choices=TASKS, default=None, help="task of items that name none (default: pairwise for "
                   "2 answers, ranking for more)")
    s.add_argument("--scale", type=int, default=None, help="Likert points for rating items (default 5)")
    s.add_argument("--host", default="127.0.0.1", help="(default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8765, help="(default 8765)")
    s.add_argument("--title", default="peftkern labelling", help="page title")
    _add_reward_arguments(s, "to serve the items it is least sure about first (see 'label prioritize')")
    s.add_argument("--tokenizer", default=None, help="tokenizer of the reward model: 'tiny' or a directory "
                   "(default: the reward model's)")
    s.set_defaults(func=run_serve)

    e = label.add_parser("export", help="labels -> TRL preference pairs (rankings as all implied pairs) or "
                         "consensus rankings, with per-pair agreement")
    e.add_argument("--db", required=True)
    e.add_argument("--out", required=True, help="JSONL")
    e.add_argument("--format", choices=("pairs", "rankings"), default="pairs",
                   help="pairs: prompt/chosen/rejected (TRL); rankings: prompt/completions best first (default pairs)")
    e.add_argument("--min-agreement", type=float, default=0.0, help="leave out pairs (rankings) whose agreement is "
                   "below this (default 0: all)")
    e.add_argument("--per-rater", action="store_true", help="pairs: one line per rater's preference, not pooled")
    e.set_defaults(func=run_export)

    t = label.add_parser("stats", help="agreement: Cohen's kappa per pair of raters, Fleiss' kappa, Krippendorff's "
                         "alpha (nominal, ordinal), per rater and overall")
    t.add_argument("--db", required=True)
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(func=run_stats)

    a = label.add_parser("prioritize", help="order the items by reward-model uncertainty (|p - 0.5| of the "
                         "Bradley-Terry probability, or an ensemble's disagreement): the page serves them first")
    a.add_argument("--db", required=True)
    _add_reward_arguments(a, "to score the answers with")
    a.add_argument("--tokenizer", default=None, help="tokenizer of the reward model: 'tiny' or a directory "
                   "(default: the reward model's)")
    a.add_argument("--device", default=None)
    a.set_defaults(func=run_prioritize)


def _fail(command: str, exc: Exception) -> int:
    print(f"peftkern {command}: error: {exc}", file=sys.stderr)
    return 2


_USER_ERRORS = (ValueError, FileNotFoundError, TrainError, SchemaError, LabelError)


def reward_scorer(reward_models: list[str], reward_fn: str | None, tokenizer=None, tokenizer_spec=None,
                  device=None, default_fn=None):
    """scorer(prompts, completions) -> rewards (one model or a function), or -> [M] per answer (several
    models: an ensemble); None when nothing is given and there is no ``default_fn``."""
    from peftkern.evaluation.scoring import reward_fn_scorer, reward_model_scorer
    from peftkern.generate.loading import load_tokenizer
    from peftkern.train.ppo import load_reward_fn

    if reward_models and reward_fn:
        raise ValueError("give --reward-model or --reward-fn, not both")
    if reward_fn:
        return reward_fn_scorer(load_reward_fn(reward_fn))
    if not reward_models:
        return reward_fn_scorer(default_fn) if default_fn is not None else None
    if tokenizer is not None:
        tok = tokenizer
    elif tokenizer_spec in ("tiny", "tiny-micro"):
        tok = load_tokenizer(tokenizer_spec)
    else:
        tok = load_tokenizer(reward_models[0], tokenizer_spec)
    members = [reward_model_scorer(path, tok, device) for path in reward_models]
    if len(members) == 1:
        return members[0]

    def ensemble(prompts, completions):
        scores = [m(prompts, completions) for m in members]
        return [list(v) for v in zip(*scores)]
    return ensemble


def run_sample_pairs(args) -> int:
    from peftkern.data.io import write_jsonl
    from peftkern.generate.cli import settings_from_args, steering_from_args
    from peftkern.generate.loading import load_for_generation
    from peftkern.generate.prompts import read_prompt_file
    from peftkern.labeling.items import item_id
    from peftkern.labeling.sampling import SamplingPlan, sample_candidates
    from peftkern.models.tasks import task_reward
    from peftkern.train.loading import is_embedded

    try:
        settings = settings_from_args(args)
        plan = SamplingPlan(k=args.k, strategy=args.strategy, n=args.n, keep=args.keep, temperatures=args.temperatures,
                            dedup=args.dedup, near_threshold=args.near_threshold, max_rounds=args.max_rounds)
        records = read_prompt_file(args.prompts)
        lm, tok = load_for_generation(args.model, args.adapter, args.tokenizer, args.nf4, args.device)
        default = task_reward if is_embedded(args.model) and args.strategy == "best-of-n" else None
        scorer = reward_scorer(args.reward_model, args.reward_fn, tokenizer=tok, device=args.device,
                               default_fn=default)
        processors, step_scorer = steering_from_args(args, lm, tok)
        outs = sample_candidates(lm, tok, [r["prompt"] for r in records], plan, settings, scorer=scorer,
                                 batch_size=args.batch_size, chat=args.chat, system=args.system,
                                 processors=processors, step_scorer=step_scorer, where=[r["_where"] for r in records])
    except _USER_ERRORS as exc:
        return _fail("sample-pairs", exc)
    rows, left_out = [], []
    for rec, out in zip(records, outs):
        if len(out["completions"]) < 2:  # nothing to compare: the labelling page could not show it
            left_out.append(rec["_where"])
            continue
        row = {k: v for k, v in rec.items() if k != "_where"}
        row.update(out)
        row["id"] = item_id(row["prompt"], row["completions"])
        rows.append(row)
    write_jsonl(rows, args.out)
    short = sum(r["short"] > 0 for r in rows)
    print(f"wrote {len(rows)} prompts x up to {args.k} answers to {args.out}"
          + (f"; {short} prompt(s) have fewer distinct answers (see 'short')" if short else ""), file=sys.stderr)
    if left_out:
        print(f"peftkern sample-pairs: warning: {len(left_out)} prompt(s) gave fewer than 2 distinct answers in "
              f"{args.max_rounds} round(s) and were left out: {', '.join(left_out[:10])}"
              + (" ..." if len(left_out) > 10 else "") + " (raise --temperature or --max-rounds)", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    import os

    try:
        from peftkern.labeling.app import create_app
    except ImportError as exc:
        return _fail("label serve", ImportError(f"the labelling page needs Flask ({exc}); install it with "
                                                "pip install 'peftkern[label]'"))
    from peftkern.labeling.items import read_items

    try:
        items = read_items(args.data, args.task) if args.data else None
        if items is None and not os.path.isfile(args.db):
            raise ValueError(f"--db {args.db} does not exist yet: give --data candidates.jsonl to create it")
        db = LabelDB.create_or_open(args.db, items, args.raters_per_item, args.scale)
        instructions = None
        if args.instructions:
            with open(args.instructions, encoding="utf-8") as f:
                instructions = f.read()
        if args.reward_model or args.reward_fn:
            _prioritize(db, args)
        app = create_app(db, instructions, args.title)
    except (*_USER_ERRORS, OSError) as exc:
        return _fail("label serve", exc)
    print(f"labelling {len(db.items())} items ({db.raters_per_item} rater(s) each) at http://{args.host}:{args.port}/ "
          f"(admin: /admin); labels saved in {args.db}. Ctrl+C stops.", file=sys.stderr)
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)
    return 0


def run_export(args) -> int:
    from peftkern.data.io import write_jsonl
    from peftkern.labeling.export import export_pairs, export_rankings

    try:
        db = LabelDB(args.db)
        if args.format == "pairs":
            rows = export_pairs(db, args.min_agreement, args.per_rater)
        else:
            if args.per_rater:
                raise ValueError("--per-rater applies to --format pairs")
            rows = export_rankings(db, args.min_agreement)
    except _USER_ERRORS as exc:
        return _fail("label export", exc)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} {args.format} to {args.out}", file=sys.stderr)
    return 0


def run_stats(args) -> int:
    from peftkern.labeling.agreement import agreement_report, format_report, without_nan

    try:
        report = agreement_report(LabelDB(args.db).labels())
    except _USER_ERRORS as exc:
        return _fail("label stats", exc)
    print(json.dumps(without_nan(report), indent=1) if args.json else format_report(report))
    return 0


def _prioritize(db, args) -> dict:
    from peftkern.labeling.active import prioritize

    scorer = reward_scorer(args.reward_model, args.reward_fn, tokenizer_spec=args.tokenizer,
                           device=getattr(args, "device", None))
    if scorer is None:
        raise ValueError("give --reward-model DIR (repeat for an ensemble) or --reward-fn MODULE:FUNCTION")
    return prioritize(db, scorer)


def run_prioritize(args) -> int:
    try:
        found = _prioritize(LabelDB(args.db), args)
    except _USER_ERRORS as exc:
        return _fail("label prioritize", exc)
    ranked = sorted(found.items(), key=lambda kv: -kv[1])
    print(f"{len(found)} items ordered by uncertainty; most uncertain first: "
          + ", ".join(f"{i} ({u:.3f})" for i, u in ranked[:5]), file=sys.stderr)
    return 0
