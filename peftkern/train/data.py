"""Training data in TRL's conventions: read, check, tokenize, mask, pad, pack.

Record formats (one JSON object per line, or rows of a ``datasets.Dataset``, or a list of dicts):

* SFT: ``messages`` (a list of ``{"role", "content"}``), or ``prompt`` + ``completion``
* DPO / reward model: ``prompt`` + ``chosen`` + ``rejected``
* reward model, K-way: ``prompt`` + ``completions`` (K >= 2) + ``ranking`` (indices, best first)
* KTO: ``prompt`` + ``completion`` + ``label`` (bool)
* PPO: ``prompt``

``prompt`` / ``completion`` / ``chosen`` / ``rejected`` are either plain strings or lists of messages
(conversational); conversational records go through the tokenizer's chat template. A record that does
not fit raises :class:`DataError` naming the file and line (or the record index).
"""
from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass

import torch

from peftkern.train.errors import DataError

IGNORE_INDEX = -100
KINDS = ("sft", "dpo", "rm", "kto", "ppo")
__all__ = ["DataError", "Record", "read_jsonl", "load_records", "check_record"]


@dataclass
class Record:
    """One training record and where it came from (``file.jsonl:12`` or ``record 12``)."""
    data: dict
    where: str


# -- reading -------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[Record]:
    """Every non-blank line of ``path`` as a JSON object (UTF-8, a leading byte-order mark allowed);
    bad JSON or bytes that are not UTF-8 raise DataError with file:line."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such data file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a JSONL data file")
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_records(source, kind: str) -> list[Record]:
    """Records from a JSONL path, a ``datasets.Dataset`` or a list of dicts, checked for ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"data kind must be one of {KINDS}, got {kind!r}")
    if isinstance(source, (str, os.PathLike)):
        records = read_jsonl(os.fspath(source))
    else:
        records = []
        for i, row in enumerate(source):
            if not isinstance(row, dict) and not hasattr(row, "keys"):
                raise DataError(f"record {i}: expected a mapping of field: value, got {type(row).__name__}")
            records.append(Record(dict(row), f"record {i}"))
        if not records:
            raise DataError("the dataset has no records")
    for rec in records:
        check_record(rec, kind)
    return records


# -- checking ------------------------------------------------------------------------------------
def _check_messages(value, where: str, field: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: '{field}'[{i}] must be an object with string 'role' and 'content', got {m!r}")


def _check_text(rec: Record, field: str) -> None:
    if field not in rec.data:
        raise DataError(f"{rec.where}: missing field '{field}' (has {sorted(rec.data)})")
    value = rec.data[field]
    if isinstance(value, list):
        _check_messages(value, rec.where, field)
    elif not isinstance(value, str):
        raise DataError(f"{rec.where}: '{field}' must be a string or a list of messages, got {type(value).__name__}")


def check_record(rec: Record, kind: str) -> None:
    """Raise DataError (with ``rec.where``) unless ``rec`` has the fields ``kind`` needs, well typed."""
    d = rec.data
    if kind == "sft":
        if "messages" in d:
            _check_messages(d["messages"], rec.where, "messages")
            if not any(m["role"] == "assistant" for m in d["messages"]):
                raise DataError(f"{rec.where}: 'messages' has no assistant turn to learn from")
            return
        if "prompt" not in d and "completion" not in d:
            raise DataError(f"{rec.where}: an SFT record needs 'messages' or 'prompt' + 'completion' "
                            f"(has {sorted(d)})")
        fields = ("prompt", "completion")
    elif kind == "rm" and ("completions" in d or "ranking" in d):
        check_ranking_record(rec)
        return
    elif kind in ("dpo", "rm"):
        fields = ("prompt", "chosen", "rejected")
        if kind == "rm" and "margin" in d:
            m = d["margin"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not _finite(m):
                raise DataError(f"{rec.where}: 'margin' must be a finite number (or left out), got {m!r}")
    elif kind == "kto":
        fields = ("prompt", "completion")
        if not isinstance(d.get("label"), bool):
            raise DataError(f"{rec.where}: 'label' must be true or false, got {d.get('label')!r}")
    else:
        fields = ("prompt",)
    for field in fields:
        _check_text(rec, field)
    if kind == "ppo" and not d["prompt"]:
        raise DataError(f"{rec.where}: 'prompt' is empty: PPO needs a prompt to generate from")
    conversational = [isinstance(d[f], list) for f in fields]
    if any(conversational) and not all(conversational):
        raise DataError(f"{rec.where}: fields {list(fields)} mix plain strings and message lists")


def check_ranking_record(rec: Record) -> None:
    """A K-way reward-model record: ``prompt``, ``completions`` (K >= 2 texts, or message lists when the
    prompt is one) and ``ranking`` (the completions' indices, best first: a permutation of 0..K-1)."""
    d, where = rec.data, rec.where
    for other in ("chosen", "rejected", "margin"):
        if other in d:
            raise DataError(f"{where}: a ranking record ('completions' + 'ranking') cannot also have '{other}' "
                            "(that is the pairwise format: 'prompt'/'chosen'/'rejected' with an optional 'margin')")
    for field in ("completions", "ranking"):
        if field not in d:
            raise DataError(f"{where}: missing field '{field}' (a ranking record needs 'prompt', 'completions' and "
                            f"'ranking'; has {sorted(d)})")
    _check_text(rec, "prompt")
    completions, ranking = d["completions"], d["ranking"]
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"a list of {len(completions)}" if isinstance(completions, list) else type(completions).__name__
        raise DataError(f"{where}: 'completions' must be a list of at least 2 completions, got {got}")
    conversational = isinstance(d["prompt"], list)
    for i, c in enumerate(completions):
        if conversational and isinstance(c, list):
            _check_messages(c, where, f"completions[{i}]")
        elif conversational or not isinstance(c, str):
            want = "a list of messages (the prompt is one)" if conversational else "a string (the prompt is one)"
            raise DataError(f"{where}: 'completions'[{i}] must be {want}, got {type(c).__name__}")
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise DataError(f"{where}: 'ranking' must be a list of completion indices (integers, best first), got "
                        f"{ranking!r}")
    if len(ranking) != len(completions):
        raise DataError(f"{where}: 'ranking' has {len(ranking)} entries for {len(completions)} completions; it must "
                        "rank every completion once (indices into 'completions', best first)")
    repeated = sorted({r for r in ranking if ranking.count(r) > 1})
    if repeated:
        raise DataError(f"{where}: 'ranking' {ranking} repeats completion {', '.join(map(str, repeated))}; each "
                        "completion is ranked once (ties are not supported: give pairs instead)")
    outside = [r for r in ranking if not 0 <= r < len(completions)]
    if outside:
        raise DataError(f"{where}: 'ranking' {ranking} has index {outside[0]}, outside 0..{len(completions) - 1} "
                        "(indices into 'completions', counted from 0)")


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond the float range (JSON allows any)
        return False


# -- tokenizing ----------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational data needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def read_chat_template(path: str, tokenizer=None) -> str:
    """The Jinja chat template in ``path`` (the template text itself, or a JSON file with a
    ``chat_template`` string, as tokenizer_config.json has), checked by rendering a short
    conversation with ``tokenizer`` when given. Errors name the file (and the template's line)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"--chat-template {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"--chat-template {path}: not UTF-8 text") from None
    if path.endswith(".json"):
        try:
            text = json.loads(text)["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"--chat-template {path}: a .json template file must be an object with a "
                            "'chat_template' string") from None
        if not isinstance(text, str):
            raise DataError(f"--chat-template {path}: 'chat_template' must be one template string")
    if not text.strip():
        raise DataError(f"--chat-template {path}: the file is empty")
    if tokenizer is not None:
        probe = [{"role": "user", "content": "\x01question\x01"}, {"role": "assistant", "content": "\x02answer\x02"}]
        try:
            rendered = tokenizer.apply_chat_template(probe, chat_template=text, tokenize=False)
        except Exception as exc:  # jinja2's TemplateSyntaxError / TemplateError, or an exception the template raises
            line = getattr(exc, "lineno", None)
            raise DataError(f"--chat-template {path}{f':{line}' if line else ''}: the template does not render "
                            f"({type(exc).__name__}: {exc})") from None
        if "\x02answer\x02" not in rendered or "\x01question\x01" not in rendered:
            raise DataError(f"--chat-template {path}: the template does not render the messages' 'content'")
    return text


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def encode_prompt_completion(tokenizer, prompt, completion, where: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids). Plain strings: the tokenizer's own special tokens around the prompt,
    EOS after the completion. Messages: the chat template, the completion being what the template adds
    after the prompt rendered with its generation prompt."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"]), _encode(tokenizer, completion) + _eos(tokenizer)
    prompt_text = _chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = _chat(tokenizer, list(prompt) + list(completion))
    if not full_text.startswith(prompt_text):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of prompt + completion")
    return _encode(tokenizer, prompt_text), _encode(tokenizer, full_text[len(prompt_text):])


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Prompt ids ready for generation (chat template with its generation prompt, when conversational)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return _encode(tokenizer, _chat(tokenizer, prompt, add_generation_prompt=True))


def encode_messages(tokenizer, messages, where: str = "") -> tuple[list[int], list[bool]]:
    """(ids, trainable) for a conversation: ``trainable`` is True on every assistant turn's tokens
    (its content and the template's end-of-turn), False elsewhere."""
    full = _chat(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_chat(tokenizer, messages[:i], add_generation_prompt=True)) if i else \
            _first_turn_header(tokenizer, full, where)
        end = len(_chat(tokenizer, messages[:i + 1]))
        if not full.startswith(_chat(tokenizer, messages[:i + 1])):
            raise DataError(f"{where}: the chat template does not render turns as prefixes of the conversation; "
                            "cannot find the assistant tokens")
        spans.append((start, end))
    ids, trainable, pos = [], [], 0
    for start, end in spans:
        piece = _encode(tokenizer, full[pos:start])
        ids += piece
        trainable += [False] * len(piece)
        piece = _encode(tokenizer, full[start:end])
        ids += piece
        trainable += [True] * len(piece)
        pos = end
    piece = _encode(tokenizer, full[pos:])
    ids += piece
    trainable += [False] * len(piece)
    return ids, trainable


def _first_turn_header(tokenizer, full: str, where: str) -> int:
    """Characters of ``full`` before the content of a conversation's first turn when that turn is the
    assistant's: the template's start and the assistant header, which are not the assistant's to learn."""
    marker = "\x00peftkern-content\x00"
    rendered = _chat(tokenizer, [{"role": "assistant", "content": marker}])
    cut = rendered.find(marker)
    if cut < 0 or not full.startswith(rendered[:cut]):
        raise DataError(f"{where}: the chat template does not render the assistant's first turn as header + "
                        "content; cannot find the assistant tokens")
    return cut


def encode_sft(tokenizer, rec: Record, max_length: int, completion_only: bool = True) -> dict:
    """``{"input_ids", "labels"}`` (lists): labels are -100 outside the completion when
    ``completion_only``; truncated on the right to ``max_length``."""
    d = rec.data
    if "messages" in d:
        ids, trainable = encode_messages(tokenizer, d["messages"], rec.where)
    else:
        p, c = encode_prompt_completion(tokenizer, d["prompt"], d["completion"], rec.where)
        ids, trainable = p + c, [False] * len(p) + [True] * len(c)
    labels = [t if (keep or not completion_only) else IGNORE_INDEX for t, keep in zip(ids, trainable)]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(t == IGNORE_INDEX for t in labels[1:]):
        raise DataError(f"{rec.where}: no completion token left to learn from within max_length={max_length}")
    return {"input_ids": ids, "labels": labels, "where": rec.where}


def _fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the completion's start and the prompt's end: prompt cut on the left, completion on the right."""
    room = max(max_length - len(completion), max_length // 2)
    prompt = prompt[-room:] if len(prompt) > room else prompt
    return prompt, completion[:max_length - len(prompt)]


def encode_sequence(prompt: list[int], completion: list[int], max_length: int) -> dict:
    """``{"input_ids", "labels"}`` for prompt + completion with labels only on the completion."""
    prompt, completion = _fit(prompt, completion, max_length)
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


def encode_pair(tokenizer, rec: Record, max_length: int) -> dict:
    """``{"chosen": {...}, "rejected": {...}}``, each an :func:`encode_sequence` of the shared prompt."""
    d = rec.data
    p, c = encode_prompt_completion(tokenizer, d["prompt"], d["chosen"], rec.where)
    p2, r = encode_prompt_completion(tokenizer, d["prompt"], d["rejected"], rec.where)
    return {"chosen": encode_sequence(p, c, max_length), "rejected": encode_sequence(p2, r, max_length),
            "where": rec.where}


def encode_kto(tokenizer, rec: Record, max_length: int) -> dict:
    d = rec.data
    p, c = encode_prompt_completion(tokenizer, d["prompt"], d["completion"], rec.where)
    out = encode_sequence(p, c, max_length)
    out["label"] = bool(d["label"])
    out["where"] = rec.where
    return out


# -- batching ------------------------------------------------------------------------------------
def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the longest example.

    Returns ``input_ids`` [B, T] int64, ``labels`` [B, T] int64, ``attention_mask`` [B, T] int64.
    Packed rows (:func:`pack_examples`, carrying ``position_ids``) give ``position_ids`` [B, T] int64
    and ``attention_mask`` None instead: transformers' padding-free convention, where a position
    that does not follow its predecessor starts a new sequence that attends only within itself. A
    row's padding is such a sequence of its own (positions 0, 1, ...), with no label.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = any("position_ids" in e for e in examples)
    positions = torch.arange(width, dtype=torch.long).repeat(len(examples), 1) if packed else None
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
        if packed:
            positions[i, :n] = torch.tensor(e.get("position_ids", range(n)), dtype=torch.long)
            positions[i, n:] = torch.arange(width - n, dtype=torch.long)
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": None}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T], left-padded for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """SFT packing without cross-contamination: whole examples (each at most ``max_length`` tokens)
    placed into rows of at most ``max_length`` tokens, longest first, each into the fullest row it
    still fits (best-fit decreasing, as TRL's ``bfd`` packing). A row carries ``position_ids`` that
    restart at 0 for every example, so the model (transformers' padding-free convention, as TRL's
    ``padding_free``) attends within each example and numbers its positions from 0: every example's
    loss is what it would be unpacked. ``where`` lists the records of the row."""
    if max_length < 2:
        raise ValueError(f"packing max_length must be >= 2, got {max_length}")
    too_long = [e.get("where", f"example {i}") for i, e in enumerate(examples) if len(e["input_ids"]) > max_length]
    if too_long:
        raise ValueError(f"packing: {too_long[0]} has more than max_length={max_length} tokens; truncate first")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is the first with room >= n
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            rows.append([])
            room, r = max_length, len(rows) - 1
        rows[r].append(i)
        bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        members.sort()  # the data's own order inside a row
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            e = examples[i]
            row["input_ids"] += e["input_ids"]
            row["labels"] += e["labels"]
            row["position_ids"] += list(range(len(e["input_ids"])))
        held = [examples[i]["where"] for i in members if examples[i].get("where")]
        if held:
            row["where"] = held
        out.append(row)
    return out


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Pretraining packing: concatenate examples (in order) and cut into rows of exactly ``seq_len``
    tokens (the tail that does not fill a row is dropped); a row's tokens attend across document
    boundaries, as in pretraining. Labels travel with their tokens. Each row's ``where`` lists the
    records it holds tokens of (when the examples carry ``where``). SFT packs with
    :func:`pack_examples` instead."""
    if seq_len < 2:
        raise ValueError(f"packing seq_len must be >= 2, got {seq_len}")
    ids, labels, starts, wheres = [], [], [], []
    for e in examples:
        starts.append(len(ids))
        wheres.append(e.get("where"))
        ids += e["input_ids"]
        labels += e["labels"]
    rows = len(ids) // seq_len
    if rows == 0:
        raise DataError(f"packing: {len(ids)} tokens in all do not fill one row of seq_len={seq_len}")
    out = []
    for i in range(rows):
        row = {"input_ids": ids[i * seq_len:(i + 1) * seq_len], "labels": labels[i * seq_len:(i + 1) * seq_len]}
        first = bisect.bisect_right(starts, i * seq_len) - 1
        last = bisect.bisect_left(starts, (i + 1) * seq_len) - 1
        held = [w for w in wheres[first:last + 1] if w]
        if held:
            row["where"] = held
        out.append(row)
    return out
