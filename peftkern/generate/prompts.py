"""Prompts to token ids: plain strings through the tokenizer, conversations through its chat template,
left-padded into a batch; and prompt files (JSONL) read with errors naming the file and line."""
from __future__ import annotations

import json
import os

import torch


class PromptError(ValueError):
    """A prompt or prompt file that cannot be used; the message names it."""


def as_messages(prompt, system: str | None = None) -> list[dict]:
    """A conversation for ``prompt``: a string becomes one user turn (after ``system``, if given)."""
    if isinstance(prompt, str):
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": prompt}]
    return list(prompt)


def encode_prompt(tokenizer, prompt, where: str = "prompt") -> list[int]:
    """Token ids that generation continues from.

    A string is tokenized as is (with the tokenizer's own special tokens, a BOS for most); a list of
    ``{"role", "content"}`` messages goes through the tokenizer's chat template with the generation
    prompt (the assistant's turn opened)."""
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, (list, tuple)):
        _check_messages(prompt, where)
        if getattr(tokenizer, "chat_template", None) is None:
            raise PromptError(f"{where}: a conversation needs a tokenizer with a chat template, and this tokenizer "
                              "has none (give plain-text prompts instead)")
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        raise PromptError(f"{where}: a prompt is a string or a list of messages, got {type(prompt).__name__}")
    if not ids:
        raise PromptError(f"{where}: the prompt is empty (no tokens)")
    return ids


def _check_messages(messages, where: str) -> None:
    if not messages:
        raise PromptError(f"{where}: the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError(f"{where}: message {i} must be {{'role': str, 'content': str}}, got {m!r}")


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """(input_ids, attention_mask) [B, T], each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def read_prompt_file(path: str) -> list[dict]:
    """Records of a JSONL prompt file: each line an object with ``prompt`` (a string or a list of
    messages) or ``messages``; other keys are kept. Raises PromptError naming ``path:line``."""
    if not os.path.isfile(path):
        raise PromptError(f"{path}: no such prompt file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise PromptError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
            if "prompt" not in rec and "messages" in rec:
                rec = {**rec, "prompt": rec["messages"]}
            if "prompt" not in rec:
                raise PromptError(f"{where}: no 'prompt' field (keys: {sorted(rec)})")
            prompt = rec["prompt"]
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise PromptError(f"{where}: 'prompt' is an empty string")
            elif isinstance(prompt, list):
                _check_messages(prompt, where)
            else:
                raise PromptError(f"{where}: 'prompt' must be a string or a list of messages, "
                                  f"got {type(prompt).__name__}")
            records.append({**rec, "_where": where})
    if not records:
        raise PromptError(f"{path}: the prompt file is empty (no JSON lines)")
    return records
