"""FLAN / T0-style templated tasks: a task file holds, per task, several instruction templates and
the examples to fill them with; expansion picks templates per example with a seeded RNG.

A task file is JSONL (one task per line) or a JSON array of tasks::

    {"task": "sentiment", "category": "classification",
     "system": "optional system prompt",
     "templates": [["Review: {text}\\nIs it positive or negative?", "{label}"],
                   {"prompt": "{text}\\nSentiment:", "completion": "{label}"}],
     "examples": [{"text": "Great film.", "label": "positive"}, ...]}

Placeholders are ``{name}`` (``{{`` and ``}}`` for literal braces), each naming a field of the
examples; a list value is written one ``- item`` per line (FLAN's options). A placeholder that no
example has, or an example missing one that a template uses, is an error naming the file, line
and field.
"""
from __future__ import annotations

import random
import string

from peftkern.data.fields import meta_of, text_field
from peftkern.data.io import Problem, fail, problem_from
from peftkern.train.data import DataError, Record


def placeholders(template: str, where: str, field: str) -> list[str]:
    """The ``{name}`` fields of ``template``; DataError for bad braces or anything but a plain name."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{where}: field '{field}': bad template ({exc})") from None
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise DataError(f"{where}: field '{field}': placeholder {{{name}{'!' + conversion if conversion else ''}"
                            f"{':' + spec if spec else ''}}} must be a plain {{name}}")
        names.append(name)
    return names


def _templates(task: dict, where: str) -> list[tuple[str, str]]:
    raw = task.get("templates")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'templates' must be a non-empty list of [prompt, completion] pairs "
                        f"or {{prompt, completion}} objects")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, dict):
            out.append((text_field(t, "prompt", f"{where}: templates[{i}]"),
                        text_field(t, "completion", f"{where}: templates[{i}]")))
        elif isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t):
            out.append((t[0], t[1]))
        else:
            raise DataError(f"{where}: field 'templates[{i}]' must be [prompt, completion] strings or "
                            f"{{prompt, completion}}, got {t!r}")
    return out


def _value(v, where: str, field: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, bool)):
        return str(v)
    if isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
        return "\n".join(f"- {x}" for x in v)
    raise DataError(f"{where}: field '{field}' must be a string, number or list of them, got {type(v).__name__}")


def _checked_task(rec: Record):
    """(templates with their placeholders, examples) of one task, every placeholder resolved."""
    task, where = rec.data, rec.where
    templates = _templates(task, where)
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        raise DataError(f"{where}: field 'examples' must be a non-empty list of objects")
    known = set().union(*(e.keys() for e in examples))
    used = []
    for i, (p, c) in enumerate(templates):
        names = []
        for part, text in (("prompt", p), ("completion", c)):
            field = f"templates[{i}].{part}"
            for name in placeholders(text, where, field):
                if name not in known:
                    raise DataError(f"{where}: field '{field}': unknown placeholder {{{name}}} (the examples "
                                    f"have: {', '.join(sorted(known))})")
                names.append(name)
        used.append(names)
    for j, e in enumerate(examples):
        for i, names in enumerate(used):
            missing = [n for n in names if n not in e]
            if missing:
                raise DataError(f"{where}: field 'examples[{j}]' has no {missing[0]!r}, used by templates[{i}]")
    return templates, examples


def expand_tasks(records: list[Record], seed: int = 0, per_example: int = 1,
                 problems: list[Problem] | None = None) -> list[dict]:
    """Normal-form items (``{"messages", "task", "category"?, "where"}``) from task records: for each
    example, ``per_example`` distinct templates drawn by ``random.Random(seed)`` (all of them when the
    task has fewer). Same file and seed, same output."""
    if per_example < 1:
        raise DataError(f"templates per example must be >= 1, got {per_example}")
    rng = random.Random(seed)
    out = []
    for rec in records:
        try:
            out += _expand(rec, rng, per_example)
        except DataError as exc:
            fail(problem_from(exc, rec.where), problems)
    return out


def _expand(rec: Record, rng: random.Random, per_example: int) -> list[dict]:
    templates, examples = _checked_task(rec)
    meta = meta_of(rec.data, rec.where)
    meta.setdefault("task", text_field(rec.data, "name", rec.where, required=False) or "unnamed")
    system = text_field(rec.data, "system", rec.where, required=False)
    out = []
    for j, example in enumerate(examples):
        where = f"{rec.where}: examples[{j}]"
        values = {k: _value(v, rec.where, f"examples[{j}].{k}") for k, v in example.items()}
        for t in rng.sample(range(len(templates)), min(per_example, len(templates))):
            prompt, completion = templates[t]
            msgs = [{"role": "system", "content": system}] if system.strip() else []
            msgs += [{"role": "user", "content": prompt.format(**values)},
                     {"role": "assistant", "content": completion.format(**values)}]
            out.append({"messages": msgs, **meta, "where": where})
    return out
