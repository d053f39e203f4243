"""The bundled facts: 100 invented (subject, relation, object) triples in three relations (a
country's capital, the instrument a person plays, what a company makes), each relation with three
phrasings. Nothing here exists in the world, so no pretrained model knows them: the embedded tiny
model learns them first (:func:`fact_sentences` is its training text), then the edits rewrite them.

Subjects come in families of five whose names differ only in their last letter (Velora, Velore,
... Veloru): a byte-level model can then tell them apart only at the subject's last token, which is
where ROME and MEMIT write (a word-level tokenizer would see each as one token).

From them come edit requests in the CounterFact style (:func:`bundled_requests`): the first
phrasing is the edit prompt, the others are its paraphrases, the new object is another subject's
object in the same relation, and the five neighbourhood prompts are facts about other subjects of
the relation whose answer is not the new object: two of the subject's own family (the hardest
case: one letter apart), then those sharing its old object (CounterFact's choice), then others.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

from peftkern.editing.requests import EditRequest, Neighbour, join_target
from peftkern.models import tasks

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
FACTS_PATH = os.path.join(DATA_DIR, "facts.json")
REQUESTS_PATH = os.path.join(DATA_DIR, "edits.jsonl")
N_NEIGHBOURS = 5


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@lru_cache(maxsize=1)
def _data() -> dict:
    with open(FACTS_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def bundled_facts() -> list[Fact]:
    return [Fact(**f) for f in _data()["facts"]]


def templates(relation: str) -> list[str]:
    """The phrasings of ``relation`` (``{}`` for the subject); the first is the edit prompt."""
    return list(_data()["relations"][relation]["templates"])


def fact_sentences(facts: list[Fact] | None = None) -> list[str]:
    """Every fact in every phrasing, as a sentence: "The capital of Velora is Tamsk."."""
    out = []
    for f in facts if facts is not None else bundled_facts():
        for t in templates(f.relation):
            out.append(join_target(t.replace("{}", f.subject), f.object) + ".")
    return out


def _new_object(fact: Fact, facts: list[Fact]) -> str:
    """Another object of the same relation, by a fixed rule: 7 steps on in the relation's list of
    distinct objects (in order of first use)."""
    objects = list(dict.fromkeys(f.object for f in facts if f.relation == fact.relation))
    return objects[(objects.index(fact.object) + 7) % len(objects)]


def _interleave(queues: list[list[int]]) -> list[int]:
    order = []
    queues = [list(q) for q in queues]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def bundled_requests(n: int | None = None) -> list[EditRequest]:
    """Edit requests for the bundled facts: all 100, or the first ``n`` in a fixed order that takes
    the relations in turn and, within a relation, one subject of each family before the second."""
    facts = bundled_facts()
    families: dict[str, dict[str, list[int]]] = {}
    for i, f in enumerate(facts):
        families.setdefault(f.relation, {}).setdefault(f.subject[:-1], []).append(i)
    order = _interleave([_interleave(list(fams.values())) for fams in families.values()])
    out = []
    for i in order[:n]:
        f = facts[i]
        phrasings = templates(f.relation)
        new = _new_object(f, facts)
        others = [g for g in facts if g.relation == f.relation and g.subject != f.subject and g.object != new]
        kin = [g for g in others if g.subject[:-1] == f.subject[:-1]]  # differ only in the last letter
        family = kin[:2]
        same_answer = [g for g in others if g.object == f.object and g not in kin]  # as CounterFact's
        rest = [g for g in others if g not in kin and g not in same_answer]
        rest = rest[i % max(len(rest), 1):] + rest[:i % max(len(rest), 1)]  # i: the fact's index
        neighbours = (family + same_answer + rest)[:N_NEIGHBOURS]
        out.append(EditRequest(
            prompt=phrasings[0], subject=f.subject, target_new=new, target_true=f.object,
            paraphrase_prompts=tuple(t.replace("{}", f.subject) for t in phrasings[1:]),
            neighborhood_prompts=tuple(Neighbour(phrasings[0].replace("{}", g.subject), g.object) for g in neighbours),
            generation_prompts=(phrasings[0].replace("{}", f.subject), f"{f.subject} is"),
            case_id=i))
    return out


def bundled_corpus(n_sentences: int = 2000, seed: int = 0) -> list[str]:
    """The default text for key statistics: what the embedded model has read (its plain-text
    corpus of the bundled skills, ``n_sentences`` of them, and every fact sentence). For any other
    model pass text like its training data instead (the papers use Wikipedia)."""
    return tasks.pretraining_text(tasks.questions(n_sentences, seed + 7, distinct=False)) + fact_sentences()
