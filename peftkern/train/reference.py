"""Reference-model sequence log-probs, computed once before training and cached on disk.

With adapters the reference is the model with its adapters switched off; without, it is the model
as it stands before the first step (so the cache is what lets a full fine-tune resume). The cache
file (``<out>/reference_logps.safetensors``) records a fingerprint of the tokens and the reference
weights and is recomputed when either changes.
"""
from __future__ import annotations

import hashlib
import os

import torch

from peftkern.train.adapters import adapters_disabled
from peftkern.train.data import pad_batch


@torch.no_grad()
def sequence_logps(model, sequences: list[dict], pad_id: int, device, batch_size: int = 16) -> torch.Tensor:
    """Sum of label log-probs of each sequence (``input_ids``, ``labels``) -> [N] fp32 on the CPU."""
    out = []
    was = model.training
    model.eval()
    for i in range(0, len(sequences), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(sequences[i:i + batch_size], pad_id).items()}
        out.append(model(batch["input_ids"], batch["attention_mask"], batch["labels"])["logps"].sum(1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def fingerprint(model, sequences: list[dict]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(repr((s["input_ids"], s["labels"])).encode())
    with adapters_disabled(model.lm):
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_" in name:
                continue
            h.update(name.encode())
            h.update(repr(round(float(p.detach().double().sum()), 6)).encode())
    return h.hexdigest()


def cached_reference_logps(model, groups: dict[str, list[dict]], pad_id: int, device, out_dir: str | None,
                           write: bool = True) -> dict[str, torch.Tensor]:
    """``{group: [N] reference log-probs}`` for each list of sequences, read from or written to the cache."""
    from safetensors.torch import load_file, safe_open, save_file

    path = os.path.join(out_dir, "reference_logps.safetensors") if out_dir else None
    all_seqs = [s for name in sorted(groups) for s in groups[name]]
    key = fingerprint(model, all_seqs)
    if path and os.path.isfile(path):
        with safe_open(path, "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        if stored == key:
            return load_file(path)
    with adapters_disabled(model.lm):
        result = {name: sequence_logps(model, seqs, pad_id, device) for name, seqs in groups.items()}
    if path and write:
        os.makedirs(out_dir, exist_ok=True)
        tmp = path + ".tmp"
        save_file({k: v.contiguous() for k, v in result.items()}, tmp, metadata={"fingerprint": key})
        os.replace(tmp, path)
    return result
