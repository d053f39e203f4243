"""Reference-model sequence log-probs, computed once before training and cached on disk.

With adapters the reference is the model with its adapters switched off; without, it is the model
as it stands before the first step (so the cache is what lets a full fine-tune resume). The cache
file (``<out>/reference_logps.safetensors``) records a fingerprint of the tokens and the reference
weights and is recomputed when either changes.
"""
from __future__ import annotations

import hashlib
import os
import warnings

import torch

from peftkern.train.adapters import adapters_disabled
from peftkern.train.data import pad_batch
from peftkern.train.errors import RunWarning

CACHE_NAME = "reference_logps.safetensors"


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
    """``{group: [N] reference log-probs}`` for each list of sequences, read from or written to the cache.
    A cache that is missing, damaged (truncated, empty), of an older format or of other inputs is a
    miss: the log-probs are computed again and the cache rewritten."""
    from peftkern.losses.ref_cache import RefLogpCache

    all_seqs = [s for name in sorted(groups) for s in groups[name]]
    cache = RefLogpCache(os.path.join(out_dir, CACHE_NAME), {"fingerprint": fingerprint(model, all_seqs)}) \
        if out_dir else None
    if cache is not None:
        stored, why = cache.read()
        if why is None and set(stored) == set(groups) and all(stored[k].shape[0] == len(v) for k, v in groups.items()):
            return stored
        if why is not None and why.startswith("unreadable") and write:
            warnings.warn(f"{why.split(': ', 1)[1]}; computing the reference log-probs again", RunWarning,
                          stacklevel=2)
    with adapters_disabled(model.lm):
        result = {name: sequence_logps(model, seqs, pad_id, device) for name, seqs in groups.items()}
    if cache is not None and write and result:
        cache.save(result)
    return result
