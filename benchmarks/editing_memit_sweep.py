"""Why MEMIT's efficacy stays low on the embedded tiny model: a sweep of its settings.

    python benchmarks/editing_memit_sweep.py N single|batch|rome|trace '{"layers": [0], "lam": 30}' ...

On ``tiny_with_facts()`` with the bundled corpus's key statistics, for the first N bundled requests:
``single`` computes MEMIT for each request alone (each on the unedited model), ``batch`` one MEMIT
edit of all N, ``rome`` ROME at layer 0 for each (the reference), ``trace`` the mean causal trace
of the N requests (the MLP indirect effect per layer at the subject's last token). Each JSON argument is one
setting: ``layers`` (MEMIT, default [0]), ``layer`` (ROME, default 0), ``lam`` (mom2_weight: an absolute
lambda) or ``scale`` (mom2_scale: lambda relative to the keys' k^T C^-1 k; the library's default when
neither is given), ``prefixes`` (default ``[""]``) and
``settings`` (ValueSettings fields over the experiment's tuned ones: 100 steps, lr 1, decay 0.05,
clamp 10). Prints efficacy, generalization, specificity, neighbour accuracy (no fluency) and the
mean per-token target probability the optimization of delta reached ("v*prob").
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.editing_experiment import TUNED, tiny_setup
from peftkern.editing import (
    ValueSettings,
    bundled_requests,
    evaluate_edits,
    memit,
    peak_layer,
    rome,
)

KEYS = ("efficacy", "generalization", "specificity", "neighbourhood_accuracy")


def summary(rows: list[dict]) -> dict:
    out = {}
    for k in KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = round(sum(vals) / len(vals), 2) if vals else None
    return out


def scored(model, tok, edit, requests) -> list[dict]:
    wrapped = edit.apply(model)
    try:
        return evaluate_edits(wrapped, tok, requests, fluency=False)["per_request"]
    finally:
        wrapped.unload()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[1] not in ("single", "batch", "rome", "trace"):
        print(__doc__)
        return 2
    n, mode, configs = int(argv[0]), argv[1], [json.loads(c) for c in argv[2:]] or [{}]
    torch.set_num_threads(1)
    tok, model, stats = tiny_setup()
    requests = bundled_requests(n)
    if mode == "trace":
        peak, effect = peak_layer(model, tok, requests)
        print("trace", n, "peak layer", peak, "mean MLP effect per layer", [round(e, 3) for e in effect])
        return 0
    for c in configs:
        started = time.time()
        settings = ValueSettings(**{**vars(TUNED), **c.get("settings", {})})
        kw = {"stats": stats, "prefixes": c.get("prefixes", [""]), "settings": settings}
        rows, probs = [], []
        if mode == "rome":
            for q in requests:
                edit = rome(model, tok, q, c.get("layer", 0), **kw)
                probs.append(edit.info["value"]["target_prob"])
                rows += scored(model, tok, edit, [q])
        elif mode == "single":
            for q in requests:
                edit = memit(model, tok, [q], c.get("layers", [0]), mom2_weight=c.get("lam"), mom2_scale=c.get("scale"),
                             **kw)
                probs.append(edit.info["values"][0]["target_prob"])
                rows += scored(model, tok, edit, [q])
        else:
            edit = memit(model, tok, requests, c.get("layers", [0]), mom2_weight=c.get("lam"), mom2_scale=c.get("scale"),
                         **kw)
            probs = [v["target_prob"] for v in edit.info["values"]]
            rows = scored(model, tok, edit, requests)
            print("  per layer:", [{k: round(v, 1) for k, v in layer.items()} for layer in edit.info["layers"]])
        print(mode, n, json.dumps(c), summary(rows), "v*prob", round(sum(probs) / len(probs), 2),
              f"{time.time() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
