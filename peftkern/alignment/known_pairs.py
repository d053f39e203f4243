"""Pairs with a known better answer, for measuring a labeller: held-out bundled questions, the right
answer against one that breaks a principle of the ``tasks`` constitution (the answer said as a
sentence, the question echoed, the answer in the wrong form)."""
from __future__ import annotations

from peftkern.models import tasks


def worse_answer(question: str, answer: str, kind: int) -> str:
    """A principle-breaking answer: 0 a sentence (answer-only), 1 the question echoed (no-echo),
    2 the wrong form (asked-form: the other letter case, or the sum with a full stop)."""
    if kind == 0:
        return tasks.pretraining_text([(question, answer, "")])[0]
    if kind == 1:
        return question
    skill = tasks.skill_of(question)
    if skill == "upper":
        return answer.lower()
    if skill == "reverse":
        return answer.upper()
    return answer + "."


def known_pairs(n: int = 60, seed: int = 1) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, better, worse) for ``n`` held-out questions (seed 1: the evaluation's)."""
    items = tasks.questions(n, seed)
    records = tasks.prompt_records(items)
    return [(r["prompt"], a, worse_answer(q, a, i % 3)) for i, (r, (q, a, _)) in enumerate(zip(records, items))]
