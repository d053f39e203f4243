"""Negative examples: refusals and counter-examples, kept, counted, and made into preference pairs.

A record is marked with ``"negative": "refusal"`` (the answer declines: the right answer to a request
that should be declined) or ``"negative": "counterexample"`` (an answer that must not be learnt: a
wrong or unsafe reply, kept to be contrasted). Converters carry the mark through; ``data inspect``
counts marked records and also answers that read like refusals without a mark.

Pairs (``peftkern data pairs``): records are grouped by their prompt (every turn before the last
assistant turn, compared after lower-casing and collapsing whitespace). In each group every answer on
the good side is paired with every answer on the bad side as ``{"prompt", "chosen", "rejected"}``
(TRL's conversational preference format). Counter-examples are always on the bad side; refusals are
on the good side by default (safety pairs: refusal over the harmful compliance) or on the bad side
with ``refusals="rejected"`` (over-refusal pairs: the helpful answer over a needless refusal).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict

from peftkern.data.dedup import normalize_text
from peftkern.train.data import Record, check_record

REFUSAL_SIDES = ("chosen", "rejected")
_REFUSAL = re.compile(
    r"\b(i\s*(?:am|'m)\s*(?:sorry|afraid)|i\s*(?:can ?not|can't|won't|will not|am unable to|'m unable to|"
    r"am not able to|'m not able to)\s+(?:help|assist|provide|do that|comply|share|give|write|create|answer)|"
    r"as an ai\b|i must decline|i have to decline)", re.IGNORECASE)


def looks_like_refusal(text: str) -> bool:
    """Whether an answer reads like a refusal (a phrase list, English only: a hint, not a label)."""
    return bool(_REFUSAL.search(text.replace("\u2019", "'")))


def count_negatives(items: list[dict]) -> dict:
    """Counts (and the first few locations) of marked refusals, marked counter-examples, and unmarked
    answers that read like refusals."""
    out = {"refusal": [], "counterexample": [], "unmarked_refusal_like": []}
    for it in items:
        mark = it.get("negative")
        if mark in out:
            out[mark].append(it.get("where", ""))
            continue
        answers = [m["content"] for m in it["messages"] if m["role"] == "assistant"]
        if any(looks_like_refusal(a) for a in answers):
            out["unmarked_refusal_like"].append(it.get("where", ""))
    return {k: {"count": len(v), "where": v[:10]} for k, v in out.items()}


def _prompt_key(messages: list[dict]) -> str:
    return json.dumps([(m["role"], normalize_text(m["content"])) for m in messages])


def build_pairs(items: list[dict], refusals: str = "chosen") -> tuple[list[dict], list[dict], dict]:
    """(pairs, kept, stats) from normal-form items whose last turn is the assistant's.

    ``pairs``: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}``; ``kept``: the
    items safe for SFT (counter-examples left out, and refusals too when they are the rejected side);
    ``stats``: prompts, pairs, and negatives that found no counterpart."""
    if refusals not in REFUSAL_SIDES:
        raise ValueError(f"refusals must be one of {REFUSAL_SIDES}, got {refusals!r}")
    bad_marks = {"counterexample"} | ({"refusal"} if refusals == "rejected" else set())
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"good": [], "bad": []})
    kept = []
    for it in items:
        msgs = it["messages"]
        if msgs[-1]["role"] != "assistant":
            continue
        side = "bad" if it.get("negative") in bad_marks else "good"
        groups[_prompt_key(msgs[:-1])][side].append(it)
        if side == "good":
            kept.append(it)
    pairs, unpaired = [], 0
    for g in groups.values():
        if g["bad"] and not g["good"]:
            unpaired += len(g["bad"])
        for good in g["good"]:
            for bad in g["bad"]:
                pair = {"prompt": good["messages"][:-1], "chosen": [good["messages"][-1]],
                        "rejected": [bad["messages"][-1]]}
                check_record(Record(pair, bad.get("where", "")), "dpo")
                pairs.append(pair)
    stats = {"prompts": len(groups), "pairs": len(pairs), "negatives_without_a_counterpart": unpaired,
             "kept_for_sft": len(kept), "refusals_side": refusals}
    return pairs, kept, stats
