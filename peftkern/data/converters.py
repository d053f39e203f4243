"""Public instruction-data formats -> TRL's formats.

Sources (``--from``):

* ``alpaca``: ``instruction``, ``input`` (may be empty), ``output``; optional ``system``
* ``sharegpt``: ``conversations`` = ``[{"from": "human"|"gpt"|"system", "value": str}, ...]``; optional
  top-level ``system``
* ``dolly``: ``instruction``, ``context`` (may be empty), ``response``, ``category``
* ``openorca``: ``system_prompt`` (may be empty), ``question``, ``response``; ``id``
* ``flan``: a task file of instruction templates and examples, expanded with a seed
  (:mod:`peftkern.data.templates`)
* ``trl``: already ``messages`` or ``prompt`` / ``completion`` (checked and passed through)
* ``auto``: each record's format told from its fields

Targets (``--to``): ``messages`` (conversational), ``prompt-completion`` (the conversation up to the
last assistant turn as ``prompt``, that turn as ``completion``, both message lists) or ``text``
(``prompt`` / ``completion`` plain strings, for single-turn records without a system prompt).

Every record goes through one normal form, ``{"messages": [...], <meta>}``, where meta is whichever of
:data:`META_KEYS` the source had (``category`` from Dolly, ``task`` from a FLAN task file, ``id``,
and ``negative``: ``"refusal"`` or ``"counterexample"``, see :mod:`peftkern.data.negatives`).
Errors name the file, line and field.
"""
from __future__ import annotations

from collections import Counter

from peftkern.data.fields import META_KEYS, meta_of, text_field
from peftkern.data.io import Problem, fail, problem_from, read_records
from peftkern.data.templates import expand_tasks
from peftkern.train.data import DataError, Record, check_record

FORMATS = ("auto", "alpaca", "sharegpt", "dolly", "openorca", "flan", "trl")
TARGETS = ("messages", "prompt-completion", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}

# The fields each source must have (what auto-detection looks for), and those it reads.
_SIGNATURES = {
    "sharegpt": ({"conversations"}, {"conversations", "system"}),
    "trl": ({"messages"}, {"messages"}),
    "flan": ({"templates", "examples"}, {"templates", "examples", "task", "category", "system"}),
    "openorca": ({"question", "response"}, {"system_prompt", "question", "response"}),
    "dolly": ({"instruction", "response"}, {"instruction", "context", "response"}),
    "alpaca": ({"instruction", "output"}, {"instruction", "input", "output", "system"}),
}


def detect_format(rec: Record) -> str:
    """The source format of one record, from its fields; DataError naming the record if none fits."""
    keys = set(rec.data)
    for fmt, (needed, _) in _SIGNATURES.items():
        if needed <= keys:
            return fmt
    if "prompt" in keys and "completion" in keys:
        return "trl"
    raise DataError(f"{rec.where}: cannot tell the format from the fields {sorted(keys)}; expected one of: "
                    + "; ".join(f"{f} ({', '.join(sorted(n))})" for f, (n, _) in _SIGNATURES.items())
                    + "; trl (prompt, completion)")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown source format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def check_target(to: str) -> str:
    if to not in TARGETS:
        raise DataError(f"unknown target format {to!r}; known: {', '.join(TARGETS)}")
    return to


def _join(first: str, second: str) -> str:
    return first if not second.strip() else f"{first}\n\n{second}"


def _turns(system: str, user: str, assistant: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system.strip() else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# -- one reader per source -------------------------------------------------------------------------
def from_alpaca(d: dict, where: str) -> list[dict]:
    user = _join(text_field(d, "instruction", where), text_field(d, "input", where, required=False))
    return _turns(text_field(d, "system", where, False), user, text_field(d, "output", where))


def from_dolly(d: dict, where: str) -> list[dict]:
    user = _join(text_field(d, "instruction", where), text_field(d, "context", where, required=False))
    return _turns("", user, text_field(d, "response", where))


def from_openorca(d: dict, where: str) -> list[dict]:
    return _turns(text_field(d, "system_prompt", where, False), text_field(d, "question", where),
                  text_field(d, "response", where))


def from_sharegpt(d: dict, where: str) -> list[dict]:
    conv = d.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects, "
                        f"got {type(conv).__name__}")
    msgs = []
    system = text_field(d, "system", where, required=False)
    if system.strip():
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field}' must be an object, got {type(turn).__name__}")
        speaker = text_field(turn, "from", f"{where}: {field}")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{where}: field '{field}.from': unknown speaker {speaker!r}; known: "
                            f"{', '.join(SHAREGPT_ROLES)}")
        msgs.append({"role": role, "content": text_field(turn, "value", f"{where}: {field}")})
    return msgs


def from_trl(d: dict, where: str) -> list[dict]:
    if "messages" in d:
        return _checked_messages(d["messages"], where, "messages")
    prompt, completion = d.get("prompt"), d.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise DataError(f"{where}: missing field '{name}' (has {sorted(d)})")
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        _checked_messages(prompt, where, "prompt")
    tail = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else \
        _checked_messages(completion, where, "completion")
    return head + tail


def _checked_messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{field}[{i}]' must be an object, got {type(m).__name__}")
        role = text_field(m, "role", f"{where}: {field}[{i}]")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field '{field}[{i}].role': unknown role {role!r}; known: system, user, assistant")
        out.append({"role": role, "content": text_field(m, "content", f"{where}: {field}[{i}]")})
    return out


_READERS = {"alpaca": from_alpaca, "dolly": from_dolly, "openorca": from_openorca, "sharegpt": from_sharegpt,
            "trl": from_trl}


def normalize(rec: Record, fmt: str = "auto") -> list[dict]:
    """One source record -> its normal forms ``{"messages", <meta>, "where"}`` (a FLAN task gives one per
    example, a chat record one)."""
    fmt = detect_format(rec) if check_format(fmt) == "auto" else fmt
    if fmt == "flan":
        return expand_tasks([rec])
    msgs = _READERS[fmt](rec.data, rec.where)
    return [{"messages": msgs, **meta_of(rec.data, rec.where), "where": rec.where}]


def normalize_all(records: list[Record], fmt: str = "auto", problems: list[Problem] | None = None,
                  seed: int = 0, templates_per_example: int = 1) -> list[dict]:
    """Every record in normal form; FLAN tasks are expanded with ``seed`` (see templates.expand_tasks).
    Strict (``problems`` None) or tolerant (bad records collected in ``problems`` and skipped)."""
    out, tasks = [], []
    for rec in records:
        try:
            kind = detect_format(rec) if check_format(fmt) == "auto" else fmt
            if kind == "flan":
                tasks.append(rec)
                continue
            out += normalize(rec, kind)
        except DataError as exc:
            fail(problem_from(exc, rec.where), problems)
    if tasks:
        out += expand_tasks(tasks, seed=seed, per_example=templates_per_example, problems=problems)
    return out


def dropped_fields(records: list[Record], fmt: str = "auto") -> Counter:
    """Fields of the source records that the conversion does not carry over, with their counts."""
    counts: Counter = Counter()
    for rec in records:
        try:
            kind = detect_format(rec) if fmt == "auto" else fmt
        except DataError:
            continue
        read = set(_SIGNATURES[kind][1]) | ({"prompt", "completion"} if kind == "trl" else set())
        counts.update(k for k in rec.data if k not in read and k not in META_KEYS)
    return counts


# -- TRL output ----------------------------------------------------------------------------------
def to_trl(item: dict, to: str = "messages") -> dict:
    """A normal-form item as a TRL record of format ``to``, checked as ``peftkern sft`` will check it."""
    where, msgs = item.get("where", ""), item["messages"]
    meta = {k: item[k] for k in META_KEYS if k in item}
    if to == "messages":
        out = {"messages": msgs}
    else:
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last turn is {msgs[-1]['role']!r}, not 'assistant': no completion")
        if to == "prompt-completion":
            out = {"prompt": msgs[:-1], "completion": [msgs[-1]]}
        elif to == "text":
            if [m["role"] for m in msgs] != ["user", "assistant"]:
                raise DataError(f"{where}: --to text needs exactly one user and one assistant turn, got roles "
                                f"{[m['role'] for m in msgs]}; use --to messages or prompt-completion")
            out = {"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}
        else:
            check_target(to)
    out.update(meta)
    check_record(Record(out, where), "sft")
    return out


def convert(source, fmt: str = "auto", to: str = "messages", seed: int = 0, templates_per_example: int = 1) -> list[dict]:
    """Records of ``source`` (path, ``datasets.Dataset`` or list of dicts) in TRL format ``to``.
    The first bad record raises DataError naming file, line and field."""
    check_format(fmt)
    check_target(to)
    out = convert_records(read_records(source), fmt, to, seed, templates_per_example)
    if not out:
        raise DataError(f"{source if isinstance(source, str) else 'the dataset'}: no records")
    return out


def convert_records(records: list[Record], fmt: str = "auto", to: str = "messages", seed: int = 0,
                    templates_per_example: int = 1) -> list[dict]:
    """:func:`convert` on records already read (``read_records``)."""
    check_format(fmt)
    check_target(to)
    return [to_trl(item, to) for item in normalize_all(records, fmt, None, seed, templates_per_example)]
