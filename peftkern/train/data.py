"""Training data in TRL's conventions: read, check, tokenize, mask, pad, pack.

Record formats (one JSON object per line, or rows of a ``datasets.Dataset``, or a list of dicts):

* SFT: ``messages`` (a list of ``{"role", "content"}``), or ``prompt`` + ``completion``
* DPO / reward model: ``prompt`` + ``chosen`` + ``rejected``
* KTO: ``prompt`` + ``completion`` + ``label`` (bool)
* PPO: ``prompt``

``prompt`` / ``completion`` / ``chosen`` / ``rejected`` are either plain strings or lists of messages
(conversational); conversational records go through the tokenizer's chat template. A record that does
not fit raises :class:`DataError` naming the file and line (or the record index).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
KINDS = ("sft", "dpo", "rm", "kto", "ppo")


class DataError(ValueError):
    """A training record that does not fit its trainer's format; the message says where and why."""


@dataclass
class Record:
    """One training record and where it came from (``file.jsonl:12`` or ``record 12``)."""
    data: dict
    where: str


# -- reading -------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[Record]:
    """Every non-blank line of ``path`` as a JSON object; bad JSON raises DataError with file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
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
        records = [Record(dict(row), f"record {i}") for i, row in enumerate(source)]
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
    elif kind in ("dpo", "rm"):
        fields = ("prompt", "chosen", "rejected")
    elif kind == "kto":
        fields = ("prompt", "completion")
        if not isinstance(d.get("label"), bool):
            raise DataError(f"{rec.where}: 'label' must be true or false, got {d.get('label')!r}")
    else:
        fields = ("prompt",)
    for field in fields:
        _check_text(rec, field)
    conversational = [isinstance(d[f], list) for f in fields]
    if any(conversational) and not all(conversational):
        raise DataError(f"{rec.where}: fields {list(fields)} mix plain strings and message lists")


# -- tokenizing ----------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational data needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


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
        start = len(_chat(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
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
    return {"input_ids": ids, "labels": labels}


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
    return {"chosen": encode_sequence(p, c, max_length), "rejected": encode_sequence(p2, r, max_length)}


def encode_kto(tokenizer, rec: Record, max_length: int) -> dict:
    d = rec.data
    p, c = encode_prompt_completion(tokenizer, d["prompt"], d["completion"], rec.where)
    out = encode_sequence(p, c, max_length)
    out["label"] = bool(d["label"])
    return out


# -- batching ------------------------------------------------------------------------------------
def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the longest example.

    Returns ``input_ids`` [B, T] int64, ``labels`` [B, T] int64, ``attention_mask`` [B, T] int64.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
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


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples (in order) and cut into rows of exactly ``seq_len`` tokens (the tail that
    does not fill a row is dropped). Labels travel with their tokens, so completion-only masks hold."""
    if seq_len < 2:
        raise ValueError(f"packing seq_len must be >= 2, got {seq_len}")
    ids, labels = [], []
    for e in examples:
        ids += e["input_ids"]
        labels += e["labels"]
    rows = len(ids) // seq_len
    if rows == 0:
        raise DataError(f"packing: {len(ids)} tokens in all do not fill one row of seq_len={seq_len}")
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len], "labels": labels[i * seq_len:(i + 1) * seq_len]}
            for i in range(rows)]
