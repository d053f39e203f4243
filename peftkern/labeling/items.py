"""What raters label: items (a prompt and K >= 2 candidate answers) read from a candidates JSONL file,
and the label values each task takes, checked and mapped between the order a rater saw and the
order of the file.

A candidates line is ``{"prompt", "completions": [K answers]}`` (what ``peftkern sample-pairs``
writes), or a preference pair ``{"prompt", "chosen", "rejected"}`` (relabelled as two answers).
Optional: ``"id"`` (default: a hash of prompt and answers, so the same data gives the same ids) and
``"task"``: ``pairwise`` (K = 2), ``ranking`` or ``rating`` (default: ``--task``, else pairwise for
two answers and ranking for more). Prompts and answers are strings or chat messages.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from peftkern.train.data import read_jsonl
from peftkern.train.errors import DataError

TASKS = ("pairwise", "ranking", "rating")
VERDICTS = ("A", "B", "tie", "both_bad")  # pairwise choices as the rater sees them


class LabelError(ValueError):
    """A label that cannot be stored (unknown item, wrong task, a ranking with repeats, ...)."""


class UnknownItem(LabelError):
    """A label or request for an item id the database does not hold."""


@dataclass
class Item:
    id: str
    prompt: object               # a string or a list of chat messages
    completions: list            # K answers (strings or message lists), in the file's order
    task: str
    position: int = 0            # line order in the candidates file

    @property
    def k(self) -> int:
        return len(self.completions)


def display_text(x) -> str:
    """A prompt or answer as text: a string as is; messages as 'role: content' lines (one assistant
    message: just its content)."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and len(x) == 1 and isinstance(x[0], dict) and x[0].get("role") == "assistant":
        return str(x[0].get("content", ""))
    if isinstance(x, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in x if isinstance(m, dict))
    return json.dumps(x, ensure_ascii=False)


def item_id(prompt, completions) -> str:
    """A stable id from the content (the first 12 hex digits of a SHA-256)."""
    blob = json.dumps([prompt, completions], ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:12]


def item_from_record(data: dict, where: str, position: int, task: str | None = None) -> Item:
    if not isinstance(data.get("prompt"), (str, list)):
        raise DataError(f"{where}: needs 'prompt' (a string or a list of messages)")
    if "completions" in data:
        completions = data["completions"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise DataError(f"{where}: 'completions' must be a list of at least 2 answers, got "
                            f"{len(completions) if isinstance(completions, list) else type(completions).__name__}")
    elif "chosen" in data and "rejected" in data:
        completions = [data["chosen"], data["rejected"]]
    else:
        raise DataError(f"{where}: needs 'completions' (a list of K >= 2 answers) or 'chosen' and 'rejected'")
    for i, c in enumerate(completions):
        if not isinstance(c, (str, list)):
            raise DataError(f"{where}: answer {i} is a {type(c).__name__}; expected a string or a list of messages")
    chosen_task = data.get("task") or task or ("pairwise" if len(completions) == 2 else "ranking")
    if chosen_task not in TASKS:
        raise DataError(f"{where}: task {chosen_task!r} is not one of {', '.join(TASKS)}")
    if chosen_task == "pairwise" and len(completions) != 2:
        raise DataError(f"{where}: a pairwise item needs exactly 2 answers, this one has {len(completions)} "
                        "(use task 'ranking' or 'rating' for more)")
    raw_id = data.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(raw_id).__name__}")
    iid = str(raw_id) if raw_id is not None else item_id(data["prompt"], completions)
    return Item(iid, data["prompt"], list(completions), chosen_task, position)


def read_items(path: str, task: str | None = None) -> list[Item]:
    """Items of a candidates JSONL file; a bad line or a repeated id raises DataError naming file:line."""
    if task is not None and task not in TASKS:
        raise DataError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    items, seen = [], {}
    for position, record in enumerate(read_jsonl(path)):
        item = item_from_record(record.data, record.where, position, task)
        if item.id in seen:
            raise DataError(f"{record.where}: id {item.id!r} is used again (first at {seen[item.id]}); ids must be "
                            "unique (identical prompt and answers twice?)")
        seen[item.id] = record.where
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items (an empty candidates file)")
    return items


def canonical_value(item: Item, kind: str, payload: dict, shown: list[int], scale: int) -> dict:
    """The label in the file's answer order from what the rater sent in the order shown.

    ``shown[j]`` is the file index of the answer shown at position j. Payloads: pairwise
    ``{"choice": "A"|"B"|"tie"|"both_bad"}`` -> ``{"verdict": "0"|"1"|"tie"|"both_bad"}`` (the file
    index of the better answer); ranking ``{"ranks": [rank of shown answer j]}`` (1 = best, each of
    1..K once) -> ``{"ranks": [rank of file answer i]}``; rating ``{"ratings": [1..scale per shown
    answer]}`` -> ``{"ratings": [per file answer]}``. Anything else raises LabelError.
    """
    if kind != item.task:
        raise LabelError(f"item {item.id!r} is a {item.task} item; a {kind} label does not fit it")
    k = item.k
    if kind == "pairwise":
        choice = payload.get("choice")
        if choice not in VERDICTS:
            raise LabelError(f"a pairwise label needs 'choice' one of {', '.join(VERDICTS)}, got {choice!r}")
        if choice in ("A", "B"):
            return {"verdict": str(shown["AB".index(choice)])}
        return {"verdict": choice}
    key = "ranks" if kind == "ranking" else "ratings"
    values = payload.get(key)
    if not isinstance(values, list) or len(values) != k:
        raise LabelError(f"a {kind} label needs '{key}': a list of {k} integers (one per answer shown), got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise LabelError(f"'{key}' must hold integers, got {values!r}")
    if kind == "ranking":
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise LabelError(f"the ranking {values} repeats rank {', '.join(map(str, repeated))}: give each of the "
                             f"{k} answers a different rank from 1 (best) to {k}")
        if sorted(values) != list(range(1, k + 1)):
            raise LabelError(f"the ranking {values} must use each rank from 1 (best) to {k} once")
    elif any(not 1 <= v <= scale for v in values):
        raise LabelError(f"ratings {values} must each be between 1 and {scale}")
    out = [0] * k
    for j, v in enumerate(values):
        out[shown[j]] = v
    return {key: out}


def preferences(kind: str, value: dict) -> dict[tuple[int, int], int]:
    """The pairwise preferences a label implies: ``{(i, j): +1 | -1 | 0}`` for file indices i < j
    (+1: i is better, -1: j is better, 0: neither: a tie, both bad, or equal ratings)."""
    if kind == "pairwise":
        verdict = value["verdict"]
        return {(0, 1): 1 if verdict == "0" else -1 if verdict == "1" else 0}
    if kind == "ranking":
        r = value["ranks"]
        return {(i, j): 1 if r[i] < r[j] else -1 for i in range(len(r)) for j in range(i + 1, len(r))}
    if kind == "rating":
        s = value["ratings"]
        return {(i, j): (s[i] > s[j]) - (s[i] < s[j]) for i in range(len(s)) for j in range(i + 1, len(s))}
    raise LabelError(f"no preferences for a {kind!r} label")
