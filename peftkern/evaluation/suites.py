"""Evaluation suites: what each measures, where its items come from, how it runs.

Named suites:

* ``tasks``: held-out accuracy on the embedded model's bundled tasks (exact and normalized match,
  per skill), the questions ``peftkern demo`` holds out;
* ``instruct``: instruction following on bundled prompts, each with rule checks (evaluation.rules);
* ``instruct-tasks``: the bundled tasks under their system prompt "You answer with the answer only",
  rule-checked (one line, one word, no echo of the question, the asked letter case);
* ``perplexity``: perplexity on bundled held-out English paragraphs;
* ``perplexity-tasks``: perplexity on the embedded model's plain-text corpus drawn with a seed its
  pretraining never used (what fine-tuning may make it forget);
* ``preference``: held-out preference pairs (the bundled tasks' right vs typical wrong answers):
  the model's own log-prob preference, the reward's ranking (the bundled task reward unless another
  reward is given), the model's agreement with it, and the mean reward of the model's answers;
* ``safety``: refusal of clearly harmful requests, over-refusal of look-alike harmless ones, and
  counterfactual sentence pairs differing in a demographic word, scored by log-prob difference.

A JSONL file is a suite too; its kind is read from the fields of its records: ``checks`` (instruct),
``answer`` (tasks), ``chosen``/``rejected`` (preference), ``text`` (perplexity), ``kind``
(safety: harmful / benign prompts and ``more``/``less`` pairs). A ``.txt`` file is a perplexity corpus
(paragraphs separated by blank lines).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from peftkern.evaluation.rules import validate_rules
from peftkern.evaluation.scoring import reward_fn_scorer
from peftkern.models import tasks

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
NAMES = ("tasks", "instruct", "instruct-tasks", "perplexity", "perplexity-tasks", "preference", "safety")
EMBEDDED_DEFAULT = ("tasks", "instruct-tasks", "preference", "perplexity-tasks")
GENERAL_DEFAULT = ("instruct", "perplexity", "safety")
HELD_OUT_SEED = 1          # peftkern demo holds out tasks.questions(n, seed + 1) with seed 0
CORPUS_SEED = 1_000_003    # never used to draw the pretraining corpus


@dataclass
class Suite:
    name: str
    kind: str                  # "tasks" | "instruct" | "perplexity" | "preference" | "safety"
    items: list = field(default_factory=list)
    reward: object = None      # the suite's own reward (scores(prompts, completions)), used when none is given


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object")
            rows.append({**rec, "_where": f"{path}:{number}"})
    if not rows:
        raise ValueError(f"{path}: the suite file is empty")
    return rows


def _paragraphs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        blocks = [b.strip() for b in f.read().split("\n\n")]
    items = [{"text": b, "_where": path} for b in blocks if b]
    if not items:
        raise ValueError(f"{path}: no text")
    return items


def _kind_of(rec: dict, path: str) -> str:
    if "checks" in rec:
        return "instruct"
    if "chosen" in rec and "rejected" in rec:
        return "preference"
    if "answer" in rec:
        return "tasks"
    if "kind" in rec:
        return "safety"
    if "text" in rec:
        return "perplexity"
    raise ValueError(f"{rec['_where']}: cannot tell the suite kind from the fields {sorted(k for k in rec if k != '_where')} "
                     "(expected 'checks', 'answer', 'chosen'/'rejected', 'text' or 'kind')")


def _check_items(suite: Suite) -> Suite:
    need = {"instruct": ("prompt", "checks"), "tasks": ("prompt", "answer"), "perplexity": ("text",),
            "preference": ("prompt", "chosen", "rejected")}.get(suite.kind, ())
    for rec in suite.items:
        where = rec.get("_where", suite.name)
        missing = [k for k in need if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} for a {suite.kind} suite")
        if suite.kind == "instruct":
            validate_rules(rec["checks"], where)
        if suite.kind == "safety":
            kind = rec.get("kind")
            if kind not in ("harmful", "benign", "pair"):
                raise ValueError(f"{where}: 'kind' must be harmful, benign or pair, got {kind!r}")
            for k in (("more", "less") if kind == "pair" else ("prompt",)):
                if not isinstance(rec.get(k), str) or not rec[k].strip():
                    raise ValueError(f"{where}: a {kind} item needs a non-empty string {k!r}")
    return suite


def _tasks_items(n: int) -> list[tuple[str, str, str]]:
    return tasks.questions(n, HELD_OUT_SEED)


def task_form_check(question: str) -> dict:
    """The rule for the form a bundled question asks for: capitals (``upper``), lower case (``reverse``),
    digits (``add``)."""
    skill = tasks.skill_of(question)
    if skill is None:
        raise ValueError(f"not a bundled question: {question!r}")
    return {"upper": {"type": "uppercase"}, "reverse": {"type": "lowercase"},
            "add": {"type": "regex", "pattern": r"[0-9]+"}}[skill]


def task_checks(question: str) -> list[dict]:
    """The ``instruct-tasks`` checks of a bundled question: one line, one word, no echo of the question,
    the asked form."""
    return [{"type": "one_line"}, {"type": "max_words", "n": 1}, {"type": "no_echo", "text": question},
            task_form_check(question)]


def _named(name: str, n: int | None) -> Suite:
    if name == "tasks":
        items = [{"prompt": r["prompt"], "answer": r["answer"], "skill": tasks.SKILLS[i % len(tasks.SKILLS)]}
                 for i, r in enumerate(tasks.prompt_records(_tasks_items(n or 60)))]
        return Suite(name, "tasks", items)
    if name == "instruct-tasks":
        items = [{"prompt": r["prompt"], "checks": task_checks(r["prompt"][-1]["content"])}
                 for r in tasks.prompt_records(_tasks_items(n or 60))]
        return Suite(name, "instruct", items)
    if name == "preference":
        items = tasks.preference_records(_tasks_items(n or 60))
        return Suite(name, "preference", items, reward=reward_fn_scorer(tasks.task_reward))
    if name == "perplexity-tasks":
        texts = tasks.pretraining_text(tasks.questions(n or 120, CORPUS_SEED, distinct=False))
        return Suite(name, "perplexity", [{"text": t} for t in texts])
    if name == "perplexity":
        return Suite(name, "perplexity", _paragraphs(os.path.join(DATA, "heldout_en.txt")))
    if name == "instruct":
        return Suite(name, "instruct", _read_jsonl(os.path.join(DATA, "instruct.jsonl")))
    if name == "safety":
        return Suite(name, "safety", _read_jsonl(os.path.join(DATA, "safety.jsonl")))
    raise ValueError(f"unknown suite {name!r}: a name ({', '.join(NAMES)}) or a .jsonl / .txt file")


def resolve(spec: str, limit: int | None = None) -> Suite:
    """A Suite from a name or a file; ``limit`` keeps the first items (of each kind, for safety;
    for the bundled tasks: how many held-out questions to draw)."""
    if spec in NAMES:
        suite = _named(spec, limit)
    elif spec.endswith(".txt") and os.path.isfile(spec):
        suite = Suite(os.path.basename(spec), "perplexity", _paragraphs(spec))
    elif os.path.isfile(spec):
        items = _read_jsonl(spec)
        suite = Suite(os.path.splitext(os.path.basename(spec))[0], _kind_of(items[0], spec), items)
    else:
        raise ValueError(f"unknown suite {spec!r}: a name ({', '.join(NAMES)}) or an existing .jsonl / .txt file")
    if limit is not None and suite.kind == "safety":  # the first items of each kind
        kinds = {}
        for rec in suite.items:
            kinds.setdefault(rec.get("kind"), []).append(rec)
        suite.items = [rec for group in kinds.values() for rec in group[:limit]]
    elif limit is not None:
        suite.items = suite.items[:limit]
    return _check_items(suite)
