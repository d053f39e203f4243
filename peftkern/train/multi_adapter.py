"""K LoRA adapters trained on K datasets in one job, over one copy of the base model.

Every step takes ``batch_size`` examples from each adapter's dataset and runs them as one batch,
each row through its own adapter (``nn.mixed_batch.row_adapters``: the LoRA layers run
``ops.multi_lora_linear``, one pass over each base weight). The loss is the sum over adapters of
each adapter's mean token loss over its own rows, so adapter e's gradient is exactly the gradient
its own run would see; AdamW (one parameter group per adapter) and per-adapter gradient clipping
are elementwise / per group, so K adapters trained together end where K separate runs end (same
seeds; tests/train/test_multi_adapter.py holds it to 1e-5). Each adapter's initialisation and data
order come from a seed of (seed, adapter name), so a run of one adapter alone reproduces its
share of a joint run.

Not here: LoRA dropout makes the joint and separate runs draw different masks (the mask is a hash
of the row's position in the batch), so they agree in distribution, not elementwise.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from peftkern.nn.mixed_batch import row_adapters
from peftkern.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, set_rng_state
from peftkern.train.data import IGNORE_INDEX, encode_sft, load_records, pad_batch
from peftkern.train.model import LMWithHeads
from peftkern.train.schedule import SCHEDULES, lr_factor
from peftkern.tuners import LoraConfig, get_peft_model, save_adapter


@dataclass
class MultiAdapterSettings:
    """Settings shared by every adapter of a joint run (per-adapter LoRA settings are LoraConfigs)."""
    steps: int = 100  # optimizer steps; 0: ``epochs`` passes over the largest dataset
    epochs: int = 1
    batch_size: int = 4  # examples per adapter per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # per adapter; None: no clipping
    max_length: int = 512
    completion_only: bool = True
    seed: int = 0
    schedule: str = "constant"  # learning-rate decay after warm-up: cosine, linear or constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    save_every: int = 0  # checkpoint every N steps under train_adapters(checkpoints=...) (0: only at the end)
    keep_last: int = 2  # checkpoints kept

    def check(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train_adapters: {name} must be a positive integer, got {value!r}")
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"train_adapters: keep_last must be a positive integer, got {self.keep_last!r}")
        for name in ("steps", "warmup_steps", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train_adapters: {name} must be an integer >= 0, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train_adapters: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train_adapters: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"train_adapters: {name} must be a finite number >= 0, got {value!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm > 0):
            raise ValueError(f"train_adapters: max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


def adapter_seed(seed: int, name: str) -> int:
    """The seed of adapter ``name`` in a run seeded ``seed``: the same in a joint run and alone."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _examples(source, tokenizer, settings: MultiAdapterSettings, name: str) -> list[dict]:
    """Tokenized examples: already encoded dicts (``input_ids``, ``labels``) pass through; records
    (a JSONL path or a list of SFT records) are encoded with ``tokenizer``."""
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], dict) and "input_ids" in source[0]:
        examples = list(source)
    else:
        if tokenizer is None:
            raise ValueError(f"train_adapters: adapter {name!r} has records to encode; pass a tokenizer")
        examples = [encode_sft(tokenizer, r, settings.max_length, settings.completion_only)
                    for r in load_records(source, "sft")]
    if not examples:
        raise ValueError(f"train_adapters: adapter {name!r} has no examples")
    return examples


class _Stream:
    """An adapter's examples in a seeded order, reshuffled each epoch, ``batch_size`` at a time."""

    def __init__(self, examples: list[dict], seed: int):
        self.examples = examples
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def state(self) -> dict:
        """Where the stream stands (JSON: the generator's bytes and the rest of this epoch's order)."""
        return {"generator": self.generator.get_state().tolist(), "order": list(self.order)}

    def restore(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.order = [int(i) for i in state["order"]]

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            out.append(self.examples[self.order.pop(0)])
        return out


def _configs(names: list[str], config) -> dict[str, LoraConfig]:
    configs = config if isinstance(config, dict) else {n: config for n in names}
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"train_adapters: no LoraConfig for adapter(s) {missing}")
    return {n: configs[n] for n in names}


def train_adapters(model: nn.Module, datasets: dict, config, settings: MultiAdapterSettings | None = None,
                   tokenizer=None, out: str | os.PathLike | None = None, device=None,
                   checkpoints: str | os.PathLike | None = None, resume: bool | str = False):
    """Train one LoRA adapter per entry of ``datasets`` ({adapter name: SFT records, a JSONL path,
    or encoded examples}) together, over one copy of ``model`` (a transformers causal LM, changed in
    place). ``config``: one LoraConfig for all, or {name: LoraConfig} (ranks, alphas, targets may
    differ). With ``out``, each adapter is saved in PEFT's files under ``out/<name>``.

    ``checkpoints``: a run directory; every ``settings.save_every`` steps and at the end the adapters,
    the optimizer, the data streams' positions, the RNG and the losses so far are saved under
    ``checkpoints/checkpoints/step-N`` (peftkern.train.checkpoint: atomic, verified on load).
    ``resume``: True (the newest complete checkpoint there) or a checkpoint path: the run continues
    from it and ends as an uninterrupted run would (same losses and weights).

    Returns (the PeftKernModel holding every adapter, {name: [loss per step]})."""
    settings = settings or MultiAdapterSettings()
    settings.check()
    if not isinstance(datasets, dict) or not datasets:
        raise ValueError("train_adapters: datasets must be a non-empty {adapter name: data} dict")
    names = list(datasets)
    configs = _configs(names, config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    streams = {n: _Stream(_examples(datasets[n], tokenizer, settings, n), adapter_seed(settings.seed, n) + 1)
               for n in names}
    peft_model = None
    for n in names:  # each adapter initialised from its own seed, as it would be alone
        torch.manual_seed(adapter_seed(settings.seed, n))
        if peft_model is None:
            peft_model = get_peft_model(model, configs[n], adapter_name=n)
        else:
            peft_model.add_adapter(n, configs[n])
    peft_model.set_adapter(names)  # every adapter trainable; each row still runs its own adapter alone
    peft_model.to(device).train()
    params = {n: [p for key, p in peft_model.named_parameters() if p.requires_grad and f".{n}." in f"{key}."]
              for n in names}
    optimizer = torch.optim.AdamW([{"params": params[n]} for n in names], lr=settings.lr,
                                  weight_decay=settings.weight_decay, foreach=False)
    total_steps = settings.steps or settings.epochs * max(math.ceil(len(st.examples) / settings.batch_size)
                                                          for st in streams.values())
    if settings.warmup_steps > total_steps:
        raise ValueError(f"train_adapters: warmup_steps must be in [0, {total_steps}], got {settings.warmup_steps}")
    lm = LMWithHeads(peft_model.get_base_model())
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    losses = {n: [] for n in names}
    trainable = {key: p for key, p in peft_model.named_parameters() if p.requires_grad}
    start = 0
    if resume:
        if checkpoints is None:
            raise ValueError("train_adapters: resume needs the run directory: pass checkpoints=")
        start, losses = _restore(resolve_resume(resume, str(checkpoints)), names, trainable, optimizer, streams)
    for step in range(start, total_steps):
        rows, examples = [], []
        for n in names:
            batch = streams[n].take(settings.batch_size)
            examples += batch
            rows += [n] * len(batch)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in pad_batch(examples, pad_id).items()}
        with row_adapters(rows):
            logps = lm(batch["input_ids"], batch["attention_mask"], batch["labels"],
                       position_ids=batch.get("position_ids"))["logps"]
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
        total = 0.0
        for e, n in enumerate(names):
            part = slice(e * settings.batch_size, (e + 1) * settings.batch_size)
            loss = -logps[part].sum() / tokens[part].sum().clamp_min(1)
            losses[n].append(float(loss.detach()))
            total = total + loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if settings.max_grad_norm is not None:
            for n in names:
                torch.nn.utils.clip_grad_norm_(params[n], settings.max_grad_norm, foreach=False)
        factor = lr_factor(step, total_steps, settings.warmup_steps, settings.schedule, settings.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor
        optimizer.step()
        done = step + 1
        if checkpoints is not None and (done == total_steps or (settings.save_every and done % settings.save_every == 0)):
            state = {"adapters": names, "losses": losses, "streams": {n: streams[n].state() for n in names}}
            save_checkpoint(str(checkpoints), done, trainable, optimizer.state_dict(), {}, state, settings.keep_last)
    if out is not None:
        for n in names:
            save_adapter(peft_model, out, n)
    return peft_model, losses


def _restore(path: str, names: list[str], trainable: dict, optimizer, streams: dict) -> tuple[int, dict]:
    """Load the checkpoint at ``path`` into the adapters, the optimizer, the streams and the RNG;
    returns (the step it was written after, the losses so far)."""
    ckpt = load_checkpoint(path)
    state = ckpt["state"]
    if state.get("adapters") != names:
        raise ValueError(f"train_adapters: {path} holds adapters {state.get('adapters')}, this run trains {names}")
    missing = sorted(set(trainable) ^ set(ckpt["trainable"]))
    if missing:
        raise ValueError(f"train_adapters: {path} does not match this run's adapters (differing tensors: "
                         f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    with torch.no_grad():
        for key, p in trainable.items():
            p.copy_(ckpt["trainable"][key])
    optimizer.load_state_dict(ckpt["optimizer"])
    for n in names:
        streams[n].restore(state["streams"][n])
    set_rng_state(ckpt["rng"])
    return state["step"], {n: [float(v) for v in state["losses"][n]] for n in names}
