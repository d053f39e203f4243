"""Token ids for editing: prompts with the subject's token range, targets, and right-padded batches.

Every text is encoded the same way (:func:`encode`): the tokenizer's own special tokens, plus the
BOS token in front when the tokenizer has one distinct from EOS and did not add it (the embedded
byte tokenizer: the tiny model was trained on ``<|bos|>sentence<|end|>``). Llama and Mistral
tokenizers add BOS themselves; GPT-2 (BOS = EOS) and Qwen2 (no BOS) get nothing added.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkern.editing.requests import EditError, join_target


def _needs_bos(tok, ids: list[int]) -> bool:
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    return bos is not None and bos != eos and (not ids or ids[0] != bos)


def encode(tok, text: str) -> list[int]:
    """Token ids of ``text`` as every editing step sees it (BOS rule in the module docstring)."""
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    return [tok.bos_token_id] + ids if _needs_bos(tok, ids) else ids


def subject_tokens(tok, text: str, span: tuple[int, int]) -> tuple[int, int]:
    """(first, last) token index of the characters ``text[span[0]:span[1]]`` in :func:`encode` (text)."""
    if not getattr(tok, "is_fast", False):
        raise EditError(f"editing needs a fast tokenizer (character offsets); got {type(tok).__name__}: load it "
                        "with AutoTokenizer.from_pretrained(..., use_fast=True)")
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    shift = 1 if _needs_bos(tok, list(enc["input_ids"])) else 0
    start, end = span
    hits = [i + shift for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hits:
        raise EditError(f"subject {text[start:end]!r} covers no token of {text!r}")
    return hits[0], hits[-1]


def target_ids(tok, prompt_text: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) for ``prompt_text`` continued by ``target`` (see ``join_target``).

    The prompt's ids are a prefix of the whole text's ids for the usual tokenizers; when they are
    not (a merge across the boundary), the target is encoded on its own after the prompt."""
    if not tok(target.strip(), add_special_tokens=False)["input_ids"]:
        raise EditError(f"target {target!r} tokenizes to nothing (prompt {prompt_text!r})")
    prompt = encode(tok, prompt_text)
    full = encode(tok, join_target(prompt_text, target))
    if full[:len(prompt)] == prompt:
        tail = full[len(prompt):]
    else:
        sep = join_target(prompt_text, target)[len(prompt_text):]
        tail = list(tok(sep, add_special_tokens=False)["input_ids"])
    if not tail:
        raise EditError(f"target {target!r} tokenizes to nothing after prompt {prompt_text!r}")
    return prompt, tail


@dataclass
class Batch:
    """Right-padded ids [n, T] and attention mask [n, T] (int64, CPU until moved)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))

    def as_kwargs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def pad(tok, rows: list[list[int]], device=None) -> Batch:
    """Right-pad ``rows`` (positions stay as in each unpadded row)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    batch = Batch(ids, mask)
    return batch.to(device) if device is not None else batch


def model_device(model) -> torch.device:
    return next(model.parameters()).device
