"""Comparing generated answers with reference answers: exact match and normalized match."""
from __future__ import annotations

import re
import string
import unicodedata

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, Unicode NFKC, punctuation and the articles a/an/the removed, whitespace collapsed
    (the SQuAD convention)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _ARTICLES.sub(" ", _PUNCT.sub(" ", text))
    return " ".join(text.split())


def _check(predictions, answers) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer after stripping surrounding whitespace."""
    _check(predictions, answers)
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / max(len(answers), 1)


def normalized_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`normalize_answer` on both."""
    _check(predictions, answers)
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / max(len(answers), 1)
