"""What a checkpoint records about its run, and what ``--resume`` accepts.

Each checkpoint's ``state.json`` holds the trainer kind, the resolved settings, the number of
processes and a fingerprint of the training data. On resume:

* another trainer kind, another number of processes, other training data, or a changed setting that
  shapes the model, the data or the objective (``lora_r``, ``lora_alpha``, ``batch_size``, ``seed``,
  ``beta``, ...) is refused, naming the setting and both values;
* settings of the schedule and the loop (:data:`CHANGEABLE`: ``lr``, ``max_steps``, ``save_every``, ...)
  may change: they apply from the resumed step on, each reported by a warning.

A setting added to :class:`~peftkern.train.config.TrainConfig` later is refused when it changes
unless it is listed in :data:`CHANGEABLE`; one missing from an older checkpoint is compared with its
default.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from peftkern.train.errors import CheckpointError

CHANGEABLE = frozenset({
    "lr", "max_steps", "epochs", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "max_grad_norm",
    "log_every", "eval_every", "save_every", "keep_last", "resume", "overwrite", "save_retries", "max_bad_steps",
    "strategy", "quiet", "out", "data", "eval_data", "grad_checkpointing", "bf16", "config",
})


def settings_of(cfg) -> dict:
    """The resolved settings as a JSON-able dict."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def data_fingerprint(examples: list) -> str:
    """sha256 over the tokenized training examples (their token ids and labels, in order)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(_without_where(ex), sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _without_where(value):
    if isinstance(value, dict):
        return {k: _without_where(v) for k, v in value.items() if k != "where"}
    return value


def check_resume(state: dict, path: str, cfg, kind: str, world: int, fingerprint: str) -> list[str]:
    """Raise CheckpointError when the run in ``cfg`` cannot continue the checkpoint at ``path``; return
    one line per setting that changed and will apply (for the caller to report)."""
    saved_kind = state.get("kind")
    if saved_kind != kind:
        raise CheckpointError(f"--resume {path}: written by peftkern {saved_kind or '(unknown trainer)'}, not "
                              f"peftkern {kind}; resume it with 'peftkern {saved_kind}', or start a new run")
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume {path}: the checkpoint records no settings (written by an older peftkern)")
    if state.get("world", 1) != world:
        raise CheckpointError(f"--resume {path}: written by {state.get('world', 1)} process(es), this run has {world}; "
                              "the data order and batches depend on it: resume with the same number")
    now = settings_of(cfg)
    defaults = settings_of(type(cfg)())
    refused, changed = [], []
    for name, value in now.items():
        before = saved.get(name, defaults.get(name))
        if before == value:
            continue
        line = f"{name}: {json.dumps(before)} in the checkpoint, {json.dumps(value)} now"
        (changed if name in CHANGEABLE else refused).append(line)
    if state.get("data_fingerprint") not in (None, fingerprint):
        refused.append("the training data: its tokenized examples differ from the checkpoint's (another --data, "
                       "or the file changed)")
    if refused:
        raise CheckpointError(f"--resume {path}: this run differs from the checkpoint's in what shapes the model, the "
                              "data or the objective:\n  " + "\n  ".join(refused) +
                              "\nresume with the same settings, or start a new run (--overwrite, or another --out)")
    return [c for c in changed if not c.startswith(("resume:", "overwrite:", "quiet:", "out:", "config:"))]
