"""``peftkern data inspect``: everything that can be checked about an instruction set before training.

* format errors, per record, with file:line and field (bad JSON, missing or mistyped fields, unknown
  roles or speakers);
* structure: role order (system only first, user and assistant alternating from a user turn, an
  assistant turn last), empty turns, and how consistently a system prompt is used;
* with a tokenizer and ``max_length``: records the trainer will cut, and those left with no
  assistant token to learn from;
* exact duplicates (same text after lower-casing and collapsing whitespace) and near duplicates
  (Jaccard similarity of character shingles >= the threshold, see :mod:`peftkern.data.dedup`) within
  each file, and leakage: eval prompts found (exactly or nearly) among the training prompts;
* length and turn distributions, the task / category mix, a diversity summary of the instructions
  (:mod:`peftkern.data.diversity`), and negative examples (:mod:`peftkern.data.negatives`).

:func:`inspect_data` returns a JSON-able report; :func:`format_report` prints it as tables.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from peftkern.data.converters import check_format, normalize_all
from peftkern.data.dedup import Pair, exact_groups, near_duplicate_pairs, normalize_text
from peftkern.data.diversity import diversity_summary
from peftkern.data.io import Problem, read_records
from peftkern.data.negatives import count_negatives
from peftkern.train.data import DataError, encode_messages

LIMIT = 200  # locations listed per kind of finding in the report (counts are always complete)


def full_text(messages: list[dict]) -> str:
    """The conversation as text for duplicate detection, system prompt left out: it is shared by design
    (its consistency is checked apart), and would make every pair of short records look alike."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")


def prompt_text(messages: list[dict]) -> str:
    """Every turn before the last assistant turn (what a model is asked), system prompt left out."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return full_text(messages[:last])


def first_instruction(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def role_issues(messages: list[dict]) -> list[str]:
    """What is wrong with the order of roles (empty list when nothing)."""
    issues = []
    roles = [m["role"] for m in messages]
    for i, r in enumerate(roles):
        if r == "system" and i > 0:
            issues.append(f"system message at turn {i} (only the first turn may be the system prompt)")
    turns = [r for r in roles if r != "system"]
    if turns and turns[0] != "user":
        issues.append(f"the conversation starts with {turns[0]!r}, not 'user'")
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1]:
            issues.append(f"two {turns[i]!r} turns in a row")
            break
    if "assistant" not in roles:
        issues.append("no assistant turn")
    elif roles[-1] != "assistant":
        issues.append(f"ends with a {roles[-1]!r} turn (nothing after it is learnt)")
    return issues


def stats(values) -> dict:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"count": int(a.size), "min": float(a.min()), "mean": float(a.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(a.max())}


def histogram(values, bins: int = 30) -> dict:
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(a, bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def _listed(wheres: list) -> dict:
    return {"count": len(wheres), "where": wheres[:LIMIT]}


def _load(source, fmt: str, seed: int, templates_per_example: int) -> tuple[list[dict], list[Problem]]:
    problems: list[Problem] = []
    records = read_records(source, problems)
    return normalize_all(records, fmt, problems, seed, templates_per_example), problems


def _structure(items: list[dict]) -> dict:
    order, empty = [], []
    systems: Counter = Counter()
    for it in items:
        for issue in role_issues(it["messages"]):
            order.append({"where": it["where"], "message": issue})
        for i, m in enumerate(it["messages"]):
            if not m["content"].strip():
                empty.append({"where": it["where"], "message": f"empty {m['role']!r} turn at turn {i}"})
        first = it["messages"][0]
        systems[first["content"] if first["role"] == "system" else None] += 1
    with_system = sum(c for s, c in systems.items() if s is not None)
    distinct = [(s, c) for s, c in systems.most_common() if s is not None]
    consistent = with_system in (0, len(items)) and len(distinct) <= 1
    return {"role_order": {"count": len(order), "issues": order[:LIMIT]},
            "empty_turns": {"count": len(empty), "issues": empty[:LIMIT]},
            "system_prompt": {"with": with_system, "without": len(items) - with_system,
                              "distinct": len(distinct), "top": [[s, c] for s, c in distinct[:5]],
                              "consistent": consistent}}


def _truncation(items: list[dict], tokenizer, max_length: int | None) -> tuple[dict | None, list[int] | None]:
    if tokenizer is None:
        return None, None
    lengths, cut, nothing, failed = [], [], [], []
    for it in items:
        try:
            ids, trainable = encode_messages(tokenizer, it["messages"], it["where"])
        except DataError as exc:
            failed.append({"where": it["where"], "message": str(exc)})
            lengths.append(0)
            continue
        lengths.append(len(ids))
        if max_length is not None and len(ids) > max_length:
            lost = sum(trainable[max_length:])
            cut.append({"where": it["where"], "tokens": len(ids), "assistant_tokens_cut": lost})
            if not any(trainable[1:max_length]):
                nothing.append(it["where"])
    report = {"max_length": max_length, "truncated": {"count": len(cut), "records": cut[:LIMIT]},
              "nothing_to_learn": _listed(nothing), "not_encodable": {"count": len(failed), "records": failed[:LIMIT]}}
    return report, lengths


def _duplicates(items: list[dict], threshold: float, k: int, num_perm: int, seed: int) -> dict:
    texts = [full_text(it["messages"]) for it in items]
    groups = exact_groups(texts)
    # Exact copies are counted above; only the first of each takes part in the near-duplicate search.
    first = list({normalize_text(t): i for i, t in reversed(list(enumerate(texts)))}.values())[::-1]
    first.sort()
    marked = [items[i].get("negative") is not None for i in first]

    def exclude(a: int, b: int) -> bool:
        # A marked negative shares its prompt with the answer it contrasts: similar by design.
        return marked[a] != marked[b]

    near = [Pair(first[p.i], first[p.j], p.similarity)
            for p in near_duplicate_pairs([texts[i] for i in first], None, threshold, k, num_perm, seed, exclude)]
    return {"exact": {"groups": len(groups), "extra_copies": sum(len(g) - 1 for g in groups),
                      "where": [[items[i]["where"] for i in g] for g in groups[:LIMIT]]},
            "near": {"records": len(near), "where": [{"record": items[p.i]["where"], "like": items[p.j]["where"],
                                                      "similarity": round(p.similarity, 4)} for p in near[:LIMIT]]}}


def _leakage(train: list[dict], evals: list[dict], threshold: float, k: int, num_perm: int, seed: int) -> dict:
    train_prompts = [prompt_text(it["messages"]) for it in train]
    eval_prompts = [prompt_text(it["messages"]) for it in evals]
    index: dict[str, int] = {}
    for j, t in enumerate(train_prompts):
        index.setdefault(normalize_text(t), j)
    exact = [{"eval": evals[i]["where"], "train": train[index[normalize_text(t)]]["where"]}
             for i, t in enumerate(eval_prompts) if normalize_text(t) in index]
    exact_eval = {e["eval"] for e in exact}
    near = near_duplicate_pairs(eval_prompts, train_prompts, threshold, k, num_perm, seed,
                                lambda i, j: evals[i]["where"] in exact_eval)
    leaked = {e["eval"] for e in exact} | {evals[p.i]["where"] for p in near}
    return {"on": "prompts", "eval_records_leaked": len(leaked),
            "exact": {"count": len(exact), "where": exact[:LIMIT]},
            "near": {"count": len(near), "where": [{"eval": evals[p.i]["where"], "train": train[p.j]["where"],
                                                    "similarity": round(p.similarity, 4)} for p in near[:LIMIT]]}}


def _describe(items: list[dict], lengths: list[int] | None) -> dict:
    unit = "tokens" if lengths is not None else "characters"
    if lengths is None:
        lengths = [sum(len(m["content"]) for m in it["messages"]) for it in items]
    turns = [sum(m["role"] != "system" for m in it["messages"]) for it in items]
    mix = Counter(str(it.get("category") or it.get("task") or "(none)") for it in items)
    return {"length_unit": unit, "length": stats(lengths), "length_histogram": histogram(lengths),
            "turns": stats(turns), "turns_histogram": sorted(Counter(turns).items()),
            "categories": dict(mix.most_common())}


def inspect_data(train, eval=None, fmt: str = "auto", tokenizer=None, max_length: int | None = None,
                 threshold: float = 0.8, shingle: int = 5, num_perm: int = 128, seed: int = 0,
                 templates_per_example: int = 1) -> dict:
    """The report on ``train`` (and ``eval``): a path, ``datasets.Dataset`` or list of dicts in any
    source format :mod:`peftkern.data.converters` reads. ``tokenizer`` (with a chat template) gives lengths
    in tokens and, with ``max_length``, the truncation check."""
    check_format(fmt)
    if max_length is not None and tokenizer is None:
        raise DataError("--max-length needs --tokenizer (lengths are counted in the tokenizer's tokens)")
    report = {"settings": {"format": fmt, "near_threshold": threshold, "shingle_chars": shingle,
                           "num_perm": num_perm, "max_length": max_length}}
    splits = {"train": train} if eval is None else {"train": train, "eval": eval}
    loaded = {}
    for name, source in splits.items():
        items, problems = _load(source, fmt, seed, templates_per_example)
        loaded[name] = items
        trunc, lengths = _truncation(items, tokenizer, max_length)
        report[name] = {"source": source if isinstance(source, str) else f"<{type(source).__name__}>",
                        "records": len(items),
                        "format_errors": {"count": len(problems), "errors": [p.as_dict() for p in problems[:LIMIT]]},
                        "structure": _structure(items), "truncation": trunc,
                        "duplicates": _duplicates(items, threshold, shingle, num_perm, seed),
                        **_describe(items, lengths),
                        "diversity": diversity_summary([first_instruction(it["messages"]) for it in items]),
                        "negatives": count_negatives(items)}
    if "eval" in loaded:
        report["leakage"] = _leakage(loaded["train"], loaded["eval"], threshold, shingle, num_perm, seed)
    return report


def has_blocking_findings(report: dict) -> bool:
    """Format errors or train/eval leakage: what ``data inspect`` exits 1 for."""
    errors = sum(report[s]["format_errors"]["count"] for s in ("train", "eval") if s in report)
    return errors > 0 or report.get("leakage", {}).get("eval_records_leaked", 0) > 0


# -- printing ------------------------------------------------------------------------------------
def _fmt_stats(s: dict) -> str:
    if not s.get("count"):
        return "-"
    return f"min {s['min']:.0f}  p50 {s['p50']:.0f}  p90 {s['p90']:.0f}  max {s['max']:.0f}  mean {s['mean']:.1f}"


def format_report(report: dict, show: int = 10) -> str:
    """The report as plain-text tables, listing the first ``show`` locations of each finding."""
    lines = []

    def row(name: str, value) -> None:
        lines.append(f"  {name:<28} {value}")

    def listing(entries, render) -> None:
        for e in entries[:show]:
            lines.append(f"      {render(e)}")

    for split in ("train", "eval"):
        if split not in report:
            continue
        r = report[split]
        lines.append(f"{split}: {r['source']} ({r['records']} records)")
        row("format errors", r["format_errors"]["count"])
        listing(r["format_errors"]["errors"],
                lambda e: f"{e['where']}: {e['field'] + ': ' if e['field'] else ''}{e['message']}")
        st = r["structure"]
        row("role-order issues", st["role_order"]["count"])
        listing(st["role_order"]["issues"], lambda e: f"{e['where']}: {e['message']}")
        row("empty turns", st["empty_turns"]["count"])
        listing(st["empty_turns"]["issues"], lambda e: f"{e['where']}: {e['message']}")
        sp = st["system_prompt"]
        row("system prompt", f"{sp['with']} with, {sp['without']} without, {sp['distinct']} distinct"
            f"{'' if sp['consistent'] else '  (inconsistent)'}")
        if r["truncation"] is not None:
            t = r["truncation"]
            if t["max_length"] is not None:
                row(f"truncated at {t['max_length']}", t["truncated"]["count"])
                listing(t["truncated"]["records"], lambda e: f"{e['where']}: {e['tokens']} tokens, "
                        f"{e['assistant_tokens_cut']} assistant tokens cut")
                row("nothing left to learn", t["nothing_to_learn"]["count"])
                listing(t["nothing_to_learn"]["where"], str)
            if t["not_encodable"]["count"]:
                row("not encodable", t["not_encodable"]["count"])
                listing(t["not_encodable"]["records"], lambda e: e["message"])
        d = r["duplicates"]
        row("exact duplicates", f"{d['exact']['extra_copies']} extra copies in {d['exact']['groups']} groups")
        listing(d["exact"]["where"], lambda g: " = ".join(g))
        row(f"near duplicates (>= {report['settings']['near_threshold']})",
            f"{d['near']['records']} records like an earlier one")
        listing(d["near"]["where"], lambda e: f"{e['record']} ~ {e['like']} ({e['similarity']:.3f})")
        row(f"length ({r['length_unit']})", _fmt_stats(r["length"]))
        row("turns (user + assistant)", _fmt_stats(r["turns"]))
        mix = r["categories"]
        row("task / category mix", ", ".join(f"{k} {v}" for k, v in list(mix.items())[:8])
            + (f" (+{len(mix) - 8} more)" if len(mix) > 8 else ""))
        dv = r["diversity"]
        row("distinct-1 / 2 / 3", f"{dv['distinct_1']:.3f} / {dv['distinct_2']:.3f} / {dv['distinct_3']:.3f}")
        row("verb-object pairs", f"{dv['unique_verb_object_pairs']} distinct, {dv['unique_verbs']} verbs, "
            f"{dv['with_verb']:.0%} of instructions start with a verb")
        if dv["top_verb_object_pairs"]:
            row("  most common", ", ".join(f"{p} {c}" for p, c in dv["top_verb_object_pairs"][:6]))
        n = r["negatives"]
        row("negatives", f"refusals {n['refusal']['count']}, counter-examples {n['counterexample']['count']}, "
            f"unmarked refusal-like answers {n['unmarked_refusal_like']['count']}")
        listing(n["unmarked_refusal_like"]["where"], lambda w: f"{w}: reads like a refusal, not marked")
    if "leakage" in report:
        lk = report["leakage"]
        lines.append(f"leakage (eval prompts in train): {lk['eval_records_leaked']} eval records")
        row("exact", lk["exact"]["count"])
        listing(lk["exact"]["where"], lambda e: f"{e['eval']} = {e['train']}")
        row("near", lk["near"]["count"])
        listing(lk["near"]["where"], lambda e: f"{e['eval']} ~ {e['train']} ({e['similarity']:.3f})")
    return "\n".join(lines)
