"""Diversity of a set of instructions: distinct n-grams and verb-object pairs.

Self-Instruct's analysis parses each instruction and takes the verb closest to the root with its
first direct noun object. No parser model is downloaded here; :func:`verb_object` is a light
heuristic for English imperatives instead: skip courtesy openers ("please", "can you"), take the
first word as the verb unless it is a question word, auxiliary, pronoun or determiner, then the
first following word that is not a function word, number or quoted span as its object (a trailing
plural "s" removed). Questions ("What is ...?") give no pair and are counted apart.
"""
from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+|'[^']*'|\"[^\"]*\"")
_OPENERS = ("please", "kindly", "now", "then", "also", "next", "first", "finally", "just")
_COURTESY = (("can", "you"), ("could", "you"), ("would", "you"), ("will", "you"), ("i", "want", "you", "to"),
             ("i", "need", "you", "to"), ("help", "me"), ("you", "should"), ("you", "must"), ("you", "need", "to"))
NOT_VERBS = frozenset(
    "what which who whom whose when where why how is are was were am be been do does did can could would will "
    "shall should may might must has have had i you he she it we they this that these those the a an there here "
    "if in on at for of to from by with as my your our their its not no yes".split())
FUNCTION_WORDS = frozenset(
    "a an the this that these those some any each every all both few many much several such its it them me us "
    "him her my your our their his of to in on at for from by with into onto about as and or but so than then "
    "up down out over under between among through given following below above short long brief simple new "
    "list set number piece couple kind type sort few more most one two three four five ten".split())


def words(text: str) -> list[str]:
    return [w.lower() for w in re.findall(r"[A-Za-z0-9']+", text)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams over ``texts`` (0 if none)."""
    grams: Counter = Counter()
    for t in texts:
        w = words(t)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def verb_object(instruction: str) -> tuple[str, str | None] | None:
    """(verb, object or None) of an imperative instruction, or None when it does not start with a verb."""
    tokens = _WORD.findall(instruction.strip())
    low = [t.lower() for t in tokens]
    i = 0
    while i < len(low) and low[i] in _OPENERS:
        i += 1
    for phrase in _COURTESY:
        if tuple(low[i:i + len(phrase)]) == phrase:
            i += len(phrase)
            break
    while i < len(low) and low[i] in _OPENERS:
        i += 1
    if i >= len(low) or not low[i].isalpha() or low[i] in NOT_VERBS:
        return None
    verb = low[i]
    for tok in low[i + 1:]:
        if tok[0] in "'\"" or tok.isdigit() or tok in FUNCTION_WORDS or tok in NOT_VERBS:
            continue
        obj = tok[:-1] if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss") else tok
        return verb, obj
    return verb, None


def diversity_summary(instructions: list[str], top: int = 15) -> dict:
    """Distinct-1/2/3, verb-object pairs (count, share of instructions with one, most common pairs and
    verbs) of a list of instructions."""
    pairs = [verb_object(t) for t in instructions]
    found = [p for p in pairs if p is not None]
    verbs = Counter(v for v, _ in found)
    vo = Counter(f"{v} {o}" for v, o in found if o is not None)
    n = max(len(instructions), 1)
    return {
        "instructions": len(instructions),
        "distinct_1": distinct_n(instructions, 1),
        "distinct_2": distinct_n(instructions, 2),
        "distinct_3": distinct_n(instructions, 3),
        "with_verb": len(found) / n,
        "unique_verbs": len(verbs),
        "unique_verb_object_pairs": len(vo),
        "top_verbs": verbs.most_common(top),
        "top_verb_object_pairs": vo.most_common(top),
    }
