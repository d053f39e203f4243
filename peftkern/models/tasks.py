"""The bundled data: small rule-made tasks with one right answer, so exact match means something.

Three skills, each a question with a short answer computed by a rule:

* ``upper``: "Write 'lamp' in capitals." -> "LAMP"
* ``reverse``: "Reverse 'cat'." -> "tac"
* ``add``: "What is 7 + 8?" -> "15"

The words come from :data:`WORDS` (169 common English words of 3 to 5 letters; reverse takes the 64
three-letter ones), so the facts are few enough for the tiny base to learn from its corpus (about 330:
every word in capitals and reversed, every sum of two digits) in a few minutes of CPU; random strings
would ask it to learn copying, which a model of this size needs far longer to pick up.

Everything is made by ``random.Random(seed)``, so the same seed gives the same data on every
machine. Train and held-out splits never share a question. The rejected answers of preference pairs
are the mistakes of a model without the skill (echoing the input, the wrong letter case), so a
model that learns to avoid them has learnt something about the rule.

Formats follow TRL's conventions (conversational): ``messages`` for SFT, ``prompt`` / ``chosen`` /
``rejected`` for DPO and reward models, ``prompt`` / ``completion`` / ``label`` for KTO, ``prompt``
for PPO (with :func:`task_reward` as the reward function).
"""
from __future__ import annotations

import random
import re

SYSTEM_PROMPT = "You answer with the answer only."
SKILLS = ("upper", "reverse", "add")
WORDS = tuple("""cat dog sun map cup pen box fox hat jam bed bag bus car cow egg fan fig gum hen ink jar key kit
leg lip log mud net nut owl pig pot rat rug sky tea toy van web yak zip ant bee arm axe bat cab cod dot elf gem
hut ice job lab mop oak pin ram rib sea tub wig bird fish frog lamp milk rain road rock rose salt ship shoe sock
star tree wind wolf bell boat book cake coin corn desk door drum duck farm fire flag gate gold hill horn kite
lake leaf lion moon nest note park pear rope sand seed snow soap song tent town wall wave wing yarn apple beach
bread brick chair cloud crown dance dream earth field flame ghost glass grape heart horse house juice knife
lemon light mango money mouse night ocean paint piano plant queen river robot sheep shirt smile snake spoon
stone storm sugar table tiger toast torch train water whale wheel world""".split())
_POOLS: dict[tuple[int, int], tuple[str, ...]] = {}


def _word(rng: random.Random, low: int = 3, high: int = 5) -> str:
    """A word of :data:`WORDS` with ``low`` to ``high`` letters."""
    pool = _POOLS.get((low, high))
    if pool is None:
        pool = _POOLS[(low, high)] = tuple(w for w in WORDS if low <= len(w) <= high)
    return rng.choice(pool)


def make_question(rng: random.Random, skill: str) -> tuple[str, str, str]:
    """(question, right answer, a typical wrong answer) for one draw of ``skill``.

    The wrong answers are the mistakes a model makes before it has the skill: echoing the input
    (the word as given, the digits side by side) or getting the letter case wrong."""
    if skill == "upper":
        w = _word(rng)
        return f"Write '{w}' in capitals.", w.upper(), rng.choice([w, w.capitalize()])
    if skill == "reverse":
        w = _word(rng, 3, 3)
        while w == w[::-1]:
            w = _word(rng, 3, 3)
        return f"Reverse '{w}'.", w[::-1], rng.choice([w, w[::-1].upper()])
    if skill == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} + {b}?", str(a + b), f"{a}{b}"
    raise ValueError(f"unknown skill {skill!r}; expected one of {SKILLS}")


def questions(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset(),
              distinct: bool = True) -> list[tuple[str, str, str]]:
    """``n`` questions, skills in turn, none of them in ``exclude`` (and no repeats when ``distinct``)."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} {'distinct ' if distinct else ''}questions outside the "
                             f"{len(exclude)} excluded ones")
        q = make_question(rng, SKILLS[len(out) % len(SKILLS)])
        if q[0] in seen:
            continue
        if distinct:
            seen.add(q[0])
        out.append(q)
    return out


def split(n_train: int, n_eval: int, seed: int = 0):
    """(train, held_out) lists of (question, answer, wrong); held-out questions never appear in train
    (train may repeat a question: there are only 100 sums of two digits)."""
    held_out = questions(n_eval, seed + 1)
    train = questions(n_train, seed, exclude={q for q, _, _ in held_out}, distinct=False)
    return train, held_out


def _prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def sft_records(items) -> list[dict]:
    """``{"messages": [system, user, assistant]}`` per question."""
    return [{"messages": _prompt(q) + [{"role": "assistant", "content": a}]} for q, a, _ in items]


def preference_records(items) -> list[dict]:
    """``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}`` per question."""
    return [{"prompt": _prompt(q), "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": w}]} for q, a, w in items]


def kto_records(items) -> list[dict]:
    """Unpaired labelled completions: the right answer (True) for even items, the wrong (False) for odd."""
    out = []
    for i, (q, a, w) in enumerate(items):
        good = i % 2 == 0
        out.append({"prompt": _prompt(q), "completion": [{"role": "assistant", "content": a if good else w}],
                    "label": good})
    return out


def prompt_records(items) -> list[dict]:
    """``{"prompt": [...], "answer": str}`` per question, for PPO and generation."""
    return [{"prompt": _prompt(q), "answer": a} for q, a, _ in items]


def pretraining_text(items) -> list[str]:
    """The base model's corpus: each question followed by its answer as plain text ("Reverse 'cat'. tac"),
    with no chat format: the base reads questions and answers, as pretraining data has them; SFT then
    teaches it the chat turns."""
    return [f"{q} {a}" for q, a, _ in items]


def skill_of(question: str) -> str | None:
    """The skill a bundled question asks for (``upper``, ``reverse``, ``add``), None if it is not one of ours."""
    for skill, pattern in (("upper", r"Write '[a-z]+' in capitals\."), ("reverse", r"Reverse '[a-z]+'\."),
                           ("add", r"What is \d+ \+ \d+\?")):
        if re.fullmatch(pattern, question):
            return skill
    return None


def answer_for(question: str) -> str | None:
    """The right answer to a bundled question (None if it is not one of ours)."""
    m = re.fullmatch(r"Write '([a-z]+)' in capitals\.", question)
    if m:
        return m.group(1).upper()
    m = re.fullmatch(r"Reverse '([a-z]+)'\.", question)
    if m:
        return m.group(1)[::-1]
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
    if m:
        return str(int(m.group(1)) + int(m.group(2)))
    return None


def task_reward(prompt, completion: str) -> float:
    """The rule-based reward for PPO: 1 for the right answer; otherwise partial credit for each
    leading character that matches (at most 0.5), minus 0.1 for an empty or overlong answer."""
    question = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
    answer = answer_for(question)
    if answer is None:
        raise ValueError(f"task_reward: not a bundled question: {question!r}")
    got = completion.strip()
    if got == answer:
        return 1.0
    match = 0
    for x, y in zip(got, answer):
        if x != y:
            break
        match += 1
    penalty = 0.1 if (not got or len(got) > 2 * len(answer)) else 0.0
    return 0.5 * match / len(answer) - penalty
