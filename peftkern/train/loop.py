"""The loop every trainer shares: data order, gradient accumulation, clipping, schedule, eval, logs,
checkpoints and resume, one or many processes. A trainer subclasses :class:`Trainer` and fills in how
its examples batch and what its loss is; PPO also replaces :meth:`Trainer.train_step`.

Loss scaling: a micro-batch's loss is a *sum* over its units (tokens for SFT, pairs for DPO, ...)
divided by the units of the whole optimizer step over every process, so accumulation and process
count never change the gradient: one process with ``grad_accum=2`` and two processes with
``grad_accum=1`` at the same global batch take the same step.
"""
from __future__ import annotations

import abc
import json
import math
import os
import time

import torch
from torch import nn

from peftkern.train import distributed as D
from peftkern.train.checkpoint import (atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       set_rng_state)
from peftkern.train.logs import RunLog
from peftkern.train.model import load_trainable_state
from peftkern.train.schedule import make_scheduler


def make_optimizer(params: list[nn.Parameter], cfg):
    """AdamW with fp32 state (torch), or peftkern's 8-bit (optionally paged) AdamW."""
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    betas = (0.9, 0.999)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    try:
        from peftkern.optim import PagedAdamW
    except ImportError:
        raise ValueError(f"--optim {cfg.optim} needs peftkern.optim.PagedAdamW, which this build lacks") from None
    return PagedAdamW(params, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=cfg.weight_decay, optim_bits=8,
                      paged=cfg.optim == "paged_adamw8bit")


class Trainer(abc.ABC):
    """Subclasses set ``kind`` and implement ``collate``, ``units``, ``loss`` and ``evaluate``."""

    kind = "base"

    def __init__(self, cfg, model: nn.Module, tokenizer, train_examples: list, eval_examples: list | None = None,
                 callbacks=()):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_examples, self.eval_examples = train_examples, eval_examples or []
        self.callbacks = list(callbacks)
        self.dist = D.setup(cfg.strategy)
        self.device = self.dist.device
        self.module = model.to(self.device)  # the unwrapped model
        self.model = model  # DDP / FSDP2-wrapped in train()
        self.history: list[dict] = []

    # -- what a trainer provides ----------------------------------------------------------------
    @abc.abstractmethod
    def collate(self, examples: list) -> dict:
        """A micro-batch (tensors on the CPU) from a list of examples."""

    @abc.abstractmethod
    def units(self, batch: dict) -> torch.Tensor:
        """How many loss units (tokens, pairs, ...) the micro-batch holds, as a float tensor."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of the loss over the batch's units, metric sums over the same units)."""

    def evaluate(self) -> dict:
        return {}

    def before_train(self) -> None:
        """Work before the first step (DPO / KTO: reference log-probs)."""

    def extra_state(self) -> dict:
        """JSON-able trainer state a resume must restore (PPO: the KL coefficient)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    # -- plan -----------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def steps_per_epoch(self) -> int:
        n = len(self.train_examples) // self.global_batch
        if n == 0:
            raise ValueError(f"{len(self.train_examples)} training examples do not fill one global batch of "
                             f"{self.global_batch} (batch_size x grad_accum x processes)")
        return n

    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch()

    def micro_batches(self, step: int) -> list[list]:
        """This process's micro-batches for optimizer step ``step``: a seeded permutation per epoch, cut
        into global batches, each split across processes and then into micro-batches."""
        spe = self.steps_per_epoch()
        epoch, pos = divmod(step, spe)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=gen)
        g = order[pos * self.global_batch:(pos + 1) * self.global_batch].tolist()
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        mine = g[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        b = self.cfg.batch_size
        return [[self.train_examples[i] for i in mine[m * b:(m + 1) * b]] for m in range(self.cfg.grad_accum)]

    def to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # -- one optimizer step ---------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        batches = [self.to_device(self.collate(mb)) for mb in self.micro_batches(step)]
        units = [self.units(b) for b in batches]
        total = D.all_reduce_sum(torch.stack(units).sum().to(self.device).float(), self.dist).clamp_min(1.0)
        scale = self.dist.world / total  # DDP / FSDP2 average gradients over processes
        loss_sum, metric_sums = torch.zeros((), device=self.device), {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = self.model.no_sync() if (hasattr(self.model, "no_sync") and not last) else _null()
            with sync:
                loss, metrics = self.loss(self.model, batch)
                (loss * scale).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
        return self.finish_step(loss_sum, metric_sums, total)

    def finish_step(self, loss_sum: torch.Tensor, metric_sums: dict, total: torch.Tensor) -> dict:
        grad_norm = self.clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(metric_sums)
        packed = torch.stack([loss_sum] + [metric_sums[k] for k in keys]).float()
        packed = D.all_reduce_sum(packed, self.dist) / total
        record = {"loss": packed[0].item(), "grad_norm": grad_norm}
        record.update({k: packed[i + 1].item() for i, k in enumerate(keys)})
        return record

    def clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- the run --------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def prepare(self) -> None:
        """Seed, reference log-probs (``before_train``), DDP / FSDP2 wrapping, optimizer and schedule:
        after this, :meth:`train_step` runs (the end-to-end benchmark times it alone)."""
        cfg, d = self.cfg, self.dist
        torch.manual_seed(cfg.seed + d.rank)
        self.before_train()
        self.model = D.wrap(self.module, d)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, cfg)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps(), cfg.warmup_steps, cfg.schedule,
                                        cfg.min_lr_ratio)
        self.model.train()

    def train(self) -> dict:
        """Run to ``total_steps``; returns ``{"eval_before", "eval_after", "final_loss", "steps", "seconds"}``."""
        cfg, d = self.cfg, self.dist
        start_time = time.time()
        self.prepare()
        total = self.total_steps()
        start, eval_before = 0, None
        ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
        if ckpt is not None:
            start, eval_before = self.restore(ckpt)
        if ckpt is None:
            eval_before = self.run_eval()
        log = RunLog(os.path.join(cfg.out, "log.jsonl"), self.kind, total, start, enabled=d.main, quiet=cfg.quiet)
        if ckpt is None:
            log.write({"step": 0, **{f"eval_{k}": v for k, v in eval_before.items()}})
        record = {}
        self.model.train()
        for step in range(start, total):
            record = self.train_step(step)
            record["lr"] = self.scheduler.get_last_lr()[0]
            done = step + 1
            self.history.append({"step": done, **record})
            if done % cfg.log_every == 0 or done == total:
                log.write({"step": done, **record})
            if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                log.write({"step": done, **{f"eval_{k}": v for k, v in self.run_eval().items()}})
            if (cfg.save_every and done % cfg.save_every == 0) or done == total:
                self.save(done, {"eval_before": eval_before, "last": record, "trainer": self.extra_state()})
            log.advance()
            for cb in self.callbacks:
                cb(self, done, record)
        eval_after = self.run_eval()
        log.write({"step": total, **{f"eval_{k}": v for k, v in eval_after.items()}})
        log.close()
        summary = {"eval_before": eval_before, "eval_after": eval_after, "final_loss": record.get("loss"),
                   "steps": total, "seconds": round(time.time() - start_time, 2)}
        self.save_outputs(summary)
        return summary

    def run_eval(self) -> dict:
        if not self.eval_examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            out = self.evaluate()
        self.model.train(was_training)
        return out

    # -- persistence ----------------------------------------------------------------------------
    def save(self, step: int, state: dict) -> None:
        names = self.trainable_names()
        tensors = D.full_state(self.model, names, self.dist)
        optim_state = self.optimizer_state()
        save_checkpoint(self.cfg.out, step, tensors, optim_state, self.scheduler.state_dict(), state,
                        self.cfg.keep_last, self.dist.rank, self.dist.world)

    def optimizer_state(self) -> dict:
        if self.dist.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def restore(self, path: str) -> tuple[int, dict]:
        ck = load_checkpoint(path, self.dist.rank)
        if self.dist.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, ck["trainable"], options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, ck["optimizer"], options=opts)
        else:
            load_trainable_state(self.module, ck["trainable"])
            self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        state = ck["state"]
        self.load_extra_state(state.get("trainer") or {})
        return int(state["step"]), state.get("eval_before") or {}

    def save_outputs(self, summary: dict) -> None:
        """The adapter (PEFT format) or the full model, and ``metrics.json``, in ``cfg.out``. Every
        process calls this (FSDP2 gathers the shards); the main one writes."""
        from peftkern.train.adapters import has_lora, save_adapter
        from peftkern.train.model import base_causal_lm

        out, main = self.cfg.out, self.dist.main
        if has_lora(self.module.lm):
            save_adapter(self.module.lm, os.path.join(out, "adapter"), base_name=self.cfg.model, write=main)
        elif self.kind != "rm":
            state = D.full_model_state(base_causal_lm(self.module.lm), self.dist)
            if main:
                base_causal_lm(self.module.lm).save_pretrained(os.path.join(out, "model"), state_dict=state)
        if main:
            atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(summary, indent=1))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
