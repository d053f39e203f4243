"""Instruction augmentation: templated rephrasings of the instruction and typos in the input.

A record's first user turn is read as ``instruction`` and, after the first blank line, ``input``
(the way the converters join Alpaca's and Dolly's fields). Each augmented copy

* rephrases the instruction with one of :data:`REPHRASINGS` (wrappers that leave the request and its
  expected answer unchanged: "Please ...", "Task: ...");
* with ``perturb_rate`` > 0, swaps two inner letters in that share of the input's words of four or
  more letters. Numbers, quoted spans and capitalised words (names) are left alone.

The answer is kept as it is, which is the risk the report measures: a copy whose changed input word
also appears in the answer probably needs a different answer (``answer_mentions_perturbed_word``).
"""
from __future__ import annotations

import random
import re
from collections import Counter

from peftkern.data.dedup import normalize_text
from peftkern.data.inspection import first_instruction
from peftkern.data.risks import risk_report
from peftkern.train.data import DataError, Record, check_record

REPHRASINGS = (
    "Please {lower}",
    "Task: {instruction}",
    "Instruction: {instruction}",
    "Here is a request. {instruction}",
    "Could you help me with this? {instruction}",
    "{instruction} Thank you.",
)
_WORD = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|[A-Za-z]+|[^A-Za-z'\"]+|['\"]")


def rephrase(instruction: str, template: str) -> str:
    lower = instruction[:1].lower() + instruction[1:] if instruction[1:2].islower() or len(instruction) < 2 \
        else instruction
    return template.format(instruction=instruction, lower=lower)


def perturb(text: str, rate: float, rng: random.Random) -> tuple[str, list[str]]:
    """(text with typos, the original words that were changed)."""
    out, changed = [], []
    for tok in _WORD.findall(text):
        if tok.isalpha() and len(tok) >= 4 and tok[0].islower() and rng.random() < rate:
            i = rng.randrange(1, len(tok) - 2)
            new = tok[:i] + tok[i + 1] + tok[i] + tok[i + 2:]
            if new != tok:
                changed.append(tok)
                tok = new
        out.append(tok)
    return "".join(out), changed


def augment(items: list[dict], per_record: int = 1, rephrase_instructions: bool = True, perturb_rate: float = 0.0,
            seed: int = 0) -> tuple[list[dict], dict]:
    """(augmented normal-form items, risk report) from normal-form items (see peftkern.data.converters)."""
    if per_record < 1:
        raise DataError(f"augment: per_record must be >= 1, got {per_record}")
    if not 0.0 <= perturb_rate <= 1.0:
        raise DataError(f"augment: perturb_rate must be in [0, 1], got {perturb_rate}")
    if not rephrase_instructions and perturb_rate == 0:
        raise DataError("augment: nothing to do (rephrasing off and perturb_rate 0)")
    rng = random.Random(seed)
    seen = {normalize_text(first_instruction(it["messages"])) for it in items}
    out, rejected, failures = [], Counter(), Counter()
    duplicates = label_risk = no_input = 0
    for it in items:
        msgs = it["messages"]
        u = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if u is None:
            continue
        instruction, sep, given = msgs[u]["content"].partition("\n\n")
        for k in range(per_record):
            head = rephrase(instruction, rng.choice(REPHRASINGS)) if rephrase_instructions else instruction
            body, changed = perturb(given, perturb_rate, rng) if (sep and perturb_rate) else (given, [])
            if perturb_rate and not sep:
                no_input += 1
            text = head + sep + body
            if normalize_text(text) in seen:
                duplicates += 1
                rejected["duplicate"] += 1
                continue
            seen.add(normalize_text(text))
            new_msgs = [dict(m) for m in msgs]
            new_msgs[u]["content"] = text
            answers = " ".join(m["content"] for m in msgs[u + 1:] if m["role"] == "assistant")
            if any(re.search(rf"\b{re.escape(w)}\b", answers) for w in changed):
                label_risk += 1
            new = {**{k2: v for k2, v in it.items() if k2 != "messages"}, "messages": new_msgs,
                   "source": "augment", "where": f"{it.get('where', '')} (augmented {k})"}
            try:
                check_record(Record({"messages": new_msgs}, new["where"]), "sft")
            except DataError:
                failures["format"] += 1
                continue
            out.append(new)
    report = risk_report([first_instruction(it["messages"]) for it in out],
                         [first_instruction(it["messages"]) for it in items], len(out) + sum(rejected.values())
                         + sum(failures.values()), rejected, duplicates, failures,
                         len(out) + sum(failures.values()))
    report.update(answer_mentions_perturbed_word=label_risk, records_without_input=no_input,
                  settings={"per_record": per_record, "rephrase": rephrase_instructions, "perturb_rate": perturb_rate,
                            "seed": seed})
    return out, report
