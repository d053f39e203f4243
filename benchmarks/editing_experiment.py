"""The editing figures of the README: ROME, MEMIT and a LoRA fine-tuning baseline on the embedded
tiny model, after it has learned the bundled facts.

    python benchmarks/editing_experiment.py [--n 30] [--n-many 50] [--out benchmarks/results]

1. The base: ``peftkern.editing.tiny_facts.tiny_with_facts()``: the pretrained tiny Llama
   fine-tuned (all weights, deterministic) on the 100 bundled facts in their three phrasings.
2. Key statistics: the bundled corpus (what the model read), per layer, cached.
3. The layer: the peak of the MLP indirect effect at the subject's last token, averaged over the
   ``--n`` requests' causal traces (``peak_layer``), unless ``--rome-layer``.
4. Single edits, each on the unedited model (CounterFact's protocol), for the first ``--n`` bundled
   requests: ROME with the papers' settings (layer located per request by tracing, 10 prefixes the
   model samples); ROME with settings tuned for this model (the traced layer, no prefixes, 100
   steps of lr 1, decay 0.05, clamp 10); MEMIT with one request (same settings, ``--memit-layers``
   (default: the window ending at the traced layer), lambda relative to the keys unless ``--mom2-weight``); LoRA fine-tuning on the edit sentence (r 8, every linear, loss on the
   new object, ``--ft-steps`` of Adam at ``--ft-lr``). Then one batch of all ``--n``: MEMIT, and
   LoRA fine-tuning on the ``--n`` sentences together.
5. Many edits: ``--n-many`` requests by sequential ROME (each on the model with the previous
   edits) against one MEMIT batch.
Every edited model is scored with ``peftkern.editing.evaluate_edits`` (fluency from 60 sampled
tokens); the results go to ``<out>/<date>-editing.json`` and ``.md``.

On a busy machine the row groups can run as separate processes and be merged (the same figures):

    python benchmarks/editing_experiment.py --groups paper --out /tmp/a   # ROME, the paper's settings
    python benchmarks/editing_experiment.py --groups single --out /tmp/b  # ROME, MEMIT, LoRA: single edits
    python benchmarks/editing_experiment.py --groups batch --out /tmp/c   # MEMIT and LoRA, --n at once
    python benchmarks/editing_experiment.py --groups many --out /tmp/d    # sequential ROME vs MEMIT, --n-many
    python benchmarks/editing_experiment.py --merge /tmp/[abcd]/*.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from peftkern.editing import (
    ValueSettings,
    bundled_corpus,
    bundled_requests,
    evaluate_edits,
    key_statistics,
    memit,
    peak_layer,
    rome,
)
from peftkern.editing.memit import layer_window
from peftkern.editing.rome import rome_sequential
from peftkern.editing.sampling import context_prefixes
from peftkern.editing.tiny_facts import tiny_with_facts
from peftkern.editing.tokens import pad, target_ids
from peftkern.models import build_byte_tokenizer
from peftkern.train.pretrain import build_pretrained_tiny
from peftkern.tuners import LoraConfig, get_peft_model

SEPARATOR = ".<|end|><|bos|>"   # the tiny model's documents are single sentences: end one, start the next
TUNED = ValueSettings(steps=100, lr=1.0, weight_decay=0.05, clamp_factor=10.0)  # delta's settings for this model
GROUPS = ("paper", "single", "batch", "many")
METRICS = ("efficacy", "generalization", "specificity", "neighbourhood_accuracy", "fluency")


def tiny_setup():
    """(tokenizer, the tiny model after learning the bundled facts, key statistics per layer on the
    bundled corpus): what every editing figure here starts from."""
    tok = build_byte_tokenizer()
    model = tiny_with_facts(quiet=True, base=lambda: build_pretrained_tiny(quiet=True))
    corpus = bundled_corpus()
    stats = {l: key_statistics(model, tok, l, corpus=corpus) for l in range(model.config.num_hidden_layers)}
    return tok, model, stats


def finetune_lora(model, tok, requests, steps: int, lr: float, r: int = 8, seed: int = 0):
    """The baseline: LoRA (r, alpha = 2r, every linear) trained on the edit sentences, loss on the
    new object's tokens only, Adam, full batch, ``steps`` steps. Returns the wrapped model."""
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))
    rows, labels = [], []
    for q in requests:
        prompt, target = target_ids(tok, q.text, q.target_new)
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    batch = pad(tok, rows)
    label = torch.full_like(batch.input_ids, -100)
    for i, lab in enumerate(labels):
        label[i, :len(lab)] = torch.tensor(lab)
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    wrapped.train()
    for _ in range(steps):
        loss = wrapped(**batch.as_kwargs(), labels=label).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return wrapped.eval()


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in METRICS + ("new_prob",):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    return out


def score(model, tok, requests, seed=0) -> list[dict]:
    return evaluate_edits(model, tok, requests, fluency=True, seed=seed)["per_request"]


def score_edit(edit, model, tok, requests) -> list[dict]:
    """Scores with the edit switched on as an adapter, then takes the adapter out again."""
    wrapped = edit.apply(model)
    try:
        return score(wrapped, tok, requests)
    finally:
        wrapped.unload()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=30, help="requests for the single-edit and batch rows (default 30)")
    ap.add_argument("--n-many", type=int, default=50, help="requests for sequential ROME vs MEMIT (default 50)")
    ap.add_argument("--rome-layer", type=int, default=None, help="fix ROME's layer (default: causal tracing)")
    ap.add_argument("--memit-layers", default=None, help="MEMIT's layers, comma-separated (default: the library's, "
                    "the window ending at the traced peak layer)")
    ap.add_argument("--mom2-weight", type=float, default=None, help="MEMIT's lambda, absolute (default: --mom2-scale)")
    ap.add_argument("--mom2-scale", type=float, default=None, help="MEMIT's lambda relative to the keys' k^T C^-1 k "
                    "(default: the library's)")
    ap.add_argument("--ft-steps", type=int, default=10, help="LoRA baseline steps (default 10)")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="LoRA baseline learning rate (default 1e-3)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"row groups to run, comma-separated (default all: "
                    f"{','.join(GROUPS)}); fewer than all writes <date>-editing-<groups>.json for --merge")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine the results of separate --groups "
                    "runs into <out>/<date>-editing.{json,md} (nothing is run)")
    args = ap.parse_args(argv)
    if args.merge:
        return write(merge(args.merge), args.out, "editing")
    groups = [g for g in args.groups.split(",") if g]
    if not groups or set(groups) - set(GROUPS):
        ap.error(f"--groups takes a comma-separated subset of {','.join(GROUPS)}, got {args.groups!r}")
    torch.set_num_threads(args.threads)
    started = time.time()
    tok, model, stats = tiny_setup()
    requests = bundled_requests(args.n)
    many = bundled_requests(args.n_many)
    paper_prefixes = context_prefixes(model, tok, n=10, length=20, separator=SEPARATOR)
    results: dict = {"settings": {**vars(args), "paper_value": vars(ValueSettings()), "prefixes": paper_prefixes,
                                  "stat_tokens": {l: s.count for l, s in stats.items()}}}

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    peak, effect = peak_layer(model, tok, requests)          # the papers' choice: averaged causal traces
    rome_layer = peak if args.rome_layer is None else args.rome_layer
    memit_layers = layer_window(peak, model.config.num_hidden_layers) if args.memit_layers is None else \
        [int(x) for x in args.memit_layers.split(",")]
    lam = {"mom2_weight": args.mom2_weight, "mom2_scale": args.mom2_scale}
    results["settings"]["memit_layers_used"] = memit_layers
    results["causal_trace"] = {"mean_mlp_effect_at_subject_last": effect, "peak_layer": peak}
    tuned = TUNED
    plain = {"stats": stats, "prefixes": [""], "settings": tuned}
    results["settings"]["tuned_value"] = vars(tuned)

    rows = {"unedited": score(model, tok, requests)} if "single" in groups else {}
    single = {"ROME, paper settings": [], "ROME": [], "MEMIT (1 request)": [], "LoRA fine-tuning": []}
    seconds = {k: 0.0 for k in single}
    layers_used = []
    for q in requests if "paper" in groups else []:
        edit, sec = timed(lambda q=q: rome(model, tok, q, None, stats=stats, prefixes=paper_prefixes))
        layers_used.append(edit.layers[0])
        seconds["ROME, paper settings"] += sec
        single["ROME, paper settings"] += score_edit(edit, model, tok, [q])
    for q in requests if "single" in groups else []:
        edit, sec = timed(lambda q=q: rome(model, tok, q, rome_layer, **plain))
        seconds["ROME"] += sec
        single["ROME"] += score_edit(edit, model, tok, [q])
        edit, sec = timed(lambda q=q: memit(model, tok, [q], memit_layers, **lam, **plain))
        seconds["MEMIT (1 request)"] += sec
        single["MEMIT (1 request)"] += score_edit(edit, model, tok, [q])
        wrapped, sec = timed(lambda q=q: finetune_lora(model, tok, [q], args.ft_steps, args.ft_lr))
        seconds["LoRA fine-tuning"] += sec
        single["LoRA fine-tuning"] += score(wrapped, tok, [q])
        wrapped.unload()
    rows.update({name: r for name, r in single.items() if r})
    if layers_used:
        results["rome_paper_layers"] = layers_used
    if "batch" in groups:
        batch_rows(args, model, tok, requests, memit_layers, lam, plain, rows, seconds, timed)
    if "many" in groups:
        many_rows(args, model, tok, many, rome_layer, memit_layers, lam, plain, rows, seconds, timed)
    results["rows"] = {name: {"summary": summary(r), "seconds": seconds.get(name), "per_request": r}
                       for name, r in rows.items()}
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
                          or platform.machine(), "threads": args.threads, "wall_s": time.time() - started}
    return write(results, args.out, "editing" if groups == list(GROUPS) else "editing-" + "-".join(groups))


def batch_rows(args, model, tok, requests, memit_layers, lam, plain, rows, seconds, timed):
    """The rows of one edit of the ``--n`` requests: MEMIT and LoRA."""
    edit, sec = timed(lambda: memit(model, tok, requests, memit_layers, **lam, **plain))
    seconds[f"MEMIT ({args.n} at once)"] = sec
    rows[f"MEMIT ({args.n} at once)"] = score_edit(edit, model, tok, requests)
    wrapped, sec = timed(lambda: finetune_lora(model, tok, requests, args.ft_steps, args.ft_lr))
    seconds[f"LoRA fine-tuning ({args.n} at once)"] = sec
    rows[f"LoRA fine-tuning ({args.n} at once)"] = score(wrapped, tok, requests)
    wrapped.unload()


def many_rows(args, model, tok, many, rome_layer, memit_layers, lam, plain, rows, seconds, timed):
    """Sequential ROME against one MEMIT edit on the ``--n-many`` requests."""
    rows[f"unedited ({args.n_many})"] = score(model, tok, many)
    edit, sec = timed(lambda: rome_sequential(model, tok, many, rome_layer, **plain))
    seconds[f"sequential ROME ({args.n_many})"] = sec
    rows[f"sequential ROME ({args.n_many})"] = score_edit(edit, model, tok, many)
    edit, sec = timed(lambda: memit(model, tok, many, memit_layers, **lam, **plain))
    seconds[f"MEMIT ({args.n_many} at once)"] = sec
    rows[f"MEMIT ({args.n_many} at once)"] = score_edit(edit, model, tok, many)


def merge(paths: list[str]) -> dict:
    """One result from separate ``--groups`` runs: their rows in the full run's order, the first's
    settings (each run's own under ``runs``)."""
    parts = []
    for path in paths:
        with open(path) as fh:
            parts.append(json.load(fh))
    order = ["unedited", "ROME, paper settings", "ROME", "MEMIT (1 request)", "LoRA fine-tuning"]
    rows = {}
    for part in parts:
        rows.update(part["rows"])
    # a stable sort: the batch rows, all ranked last, keep their own order
    ranked = sorted(rows, key=lambda name: order.index(name) if name in order else len(order))
    merged = {**parts[0], "rows": {name: rows[name] for name in ranked},
              "runs": [{"file": os.path.basename(p), "settings": part["settings"], "machine": part["machine"]}
                       for p, part in zip(paths, parts)]}
    for part in parts:
        if "rome_paper_layers" in part:
            merged["rome_paper_layers"] = part["rome_paper_layers"]
    return merged


def write(results: dict, out: str, name: str) -> int:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{dt.date.today().isoformat()}-{name}")
    with open(stem + ".json", "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    table = markdown(results)
    with open(stem + ".md", "w") as fh:
        fh.write(table)
    print(table)
    return 0


def markdown(results: dict) -> str:
    lines = ["| edit | requests | efficacy | generalization | specificity | neighbour accuracy | fluency | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        s = row["summary"]
        n = len(row["per_request"])
        cells = [f"{s[k]:.2f}" if s[k] is not None else "-" for k in METRICS]
        sec = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {sec} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
