"""``peftkern sft --multi-adapter NAME=FILE ...``: the run settings (TrainConfig) -> one
:func:`peftkern.train.multi_adapter.train_adapters` job: one LoRA adapter per entry, trained on its
own SFT JSONL, all in one batch per step over one copy of the base; each adapter saved in PEFT's
files under ``<out>/adapter/<NAME>``, the per-step losses in ``<out>/log.jsonl`` and the last
ones in ``<out>/metrics.json``.

Every adapter takes the run's LoRA settings (--lora-r, --lora-alpha, --lora-dropout,
--target-modules) and optimizer settings; checkpoints go to ``<out>/checkpoints`` (--save-every,
--keep-last; --resume continues the run). Settings the joint loop does not implement (packing,
rehearsal, gradient accumulation, evaluation, other adapter methods, ...) are refused by name
rather than ignored."""
from __future__ import annotations

import dataclasses
import json
import os
import re

from peftkern.train import outdir
from peftkern.train.adapters import peft_config
from peftkern.train.atomic import atomic_write_text
from peftkern.train.config import TrainConfig, resolve_kind_defaults, split_list
from peftkern.train.errors import ConfigError, PathError
from peftkern.train.loading import check_paths, load_lm, load_tokenizer
from peftkern.train.multi_adapter import MultiAdapterSettings, train_adapters

# TrainConfig fields a --multi-adapter run reads; any other field set away from its default is refused.
SUPPORTED = ("model", "tokenizer", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "quant", "dtype",
             "chat_template", "max_length", "completion_only", "lr", "weight_decay", "batch_size", "epochs",
             "max_steps", "schedule", "warmup_steps", "min_lr_ratio", "max_grad_norm", "seed", "out", "overwrite",
             "quiet", "multi_adapter", "bf16", "strategy", "resume", "save_every", "keep_last")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def adapter_files(spec: str) -> dict[str, str]:
    """``--multi-adapter`` entries ("NAME=FILE", comma-joined when repeated) -> {name: file}, in order.
    Names: letters, digits, ``_ . -``, each once; files must exist (PathError names the entry)."""
    out: dict[str, str] = {}
    for entry in split_list(spec):
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--multi-adapter {entry!r}: expected NAME=FILE (an adapter name and its SFT JSONL)")
        if not _NAME.match(name) or name in (".", ".."):
            raise ConfigError(f"--multi-adapter {entry!r}: adapter name {name!r} may hold only letters, digits, "
                              "'_', '.' and '-'")
        if name in out:
            raise ConfigError(f"--multi-adapter: adapter {name!r} given twice")
        if not os.path.isfile(path):
            raise PathError(f"--multi-adapter {entry!r}: no such file {path!r}")
        out[name] = path
    if not out:
        raise ConfigError("--multi-adapter: expected at least one NAME=FILE entry")
    return out


def check_supported(cfg: TrainConfig) -> None:
    """ConfigError naming every setting the joint loop would otherwise ignore."""
    defaults = TrainConfig()
    refused = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in SUPPORTED and "sft" in f.metadata["kinds"]
               and getattr(cfg, f.name) != getattr(defaults, f.name)]
    if cfg.lora_r == 0:
        refused.insert(0, "lora_r")
    if cfg.strategy not in ("auto", "none"):
        refused.append("strategy")
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        raise ConfigError(f"--multi-adapter trains LoRA adapters (lora_r > 0) in one process with the settings "
                          f"{', '.join('--' + n.replace('_', '-') for n in SUPPORTED if n != 'multi_adapter')}; "
                          f"not supported here: {flags}")


def settings_of(cfg: TrainConfig) -> MultiAdapterSettings:
    return MultiAdapterSettings(steps=cfg.max_steps, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or None,
                                max_length=cfg.max_length, completion_only=cfg.completion_only, seed=cfg.seed,
                                schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                                save_every=cfg.save_every, keep_last=cfg.keep_last)


def run_multi_adapter(cfg: TrainConfig) -> dict:
    """Train the adapters ``cfg.multi_adapter`` names; returns the run's summary (printed by the CLI)."""
    resolve_kind_defaults(cfg, "sft")
    files = adapter_files(cfg.multi_adapter)
    check_supported(cfg)
    check_paths(cfg, "sft")
    outdir.preflight(cfg)
    if cfg.overwrite:
        outdir.clear_previous_run(cfg.out)
    tokenizer = load_tokenizer(cfg)
    lm = load_lm(cfg, quiet=cfg.quiet)
    try:
        _, losses = train_adapters(lm, files, peft_config(cfg, lm), settings_of(cfg), tokenizer=tokenizer,
                                   out=os.path.join(cfg.out, "adapter"), checkpoints=cfg.out, resume=cfg.resume)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    steps = len(next(iter(losses.values())))
    log = "".join(json.dumps({"step": i + 1, **{f"loss/{n}": losses[n][i] for n in files}}) + "\n" for i in range(steps))
    atomic_write_text(os.path.join(cfg.out, "log.jsonl"), log)
    metrics = {"kind": "sft", "multi_adapter": list(files), "steps": steps,
               "final_loss": {n: losses[n][-1] for n in files},
               "adapters": {n: os.path.join(cfg.out, "adapter", n) for n in files}}
    atomic_write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    return metrics
