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
import math
import os
import time
import warnings

import torch
from torch import nn

from peftkern.train import distributed as D
from peftkern.train import outdir
from peftkern.train.adapter_base import adapter_base
from peftkern.train.adapters import has_lora, save_adapter
from peftkern.train.atomic import atomic_dir, atomic_write_text, with_retries
from peftkern.train.checkpoint import (latest_checkpoint, load_checkpoint, read_state, resolve_resume,
                                       save_checkpoint, set_rng_state)
from peftkern.train.errors import CheckpointError, NonFiniteError, RunWarning
from peftkern.train.fisher import attach_anchors, wants_anchors
from peftkern.train.logs import RunLog, dumps, read_json
from peftkern.train.mixing import add_task_means
from peftkern.train.model import base_causal_lm, load_trainable_state
from peftkern.train.preempt import Preemption
from peftkern.train.resume import check_resume, data_fingerprint, settings_of
from peftkern.train.schedule import make_scheduler


def make_optimizer(params: list[nn.Parameter], cfg):
    """AdamW with fp32 state (torch), or peftkern's 8-bit (optionally paged) AdamW; with --ewc / --l2sp
    peftkern's AdamW (32- or 8-bit as --optim says), which folds the penalty into its step."""
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    betas = (0.9, 0.999)
    if cfg.optim == "adamw" and not wants_anchors(cfg):
        return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    try:
        from peftkern.optim import PagedAdamW
    except ImportError:
        raise ValueError(f"--optim {cfg.optim} needs peftkern.optim.PagedAdamW, which this build lacks") from None
    return PagedAdamW(params, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=cfg.weight_decay,
                      optim_bits=32 if cfg.optim == "adamw" else 8, paged=cfg.optim == "paged_adamw8bit")


class Trainer(abc.ABC):
    """Subclasses set ``kind`` and implement ``collate``, ``units``, ``loss`` and ``evaluate``.

    ``base_model_path``: the directory the saved adapter names as its base (default: the model's own
    directory, the cached tiny base, or ``<out>/base_model`` for ``tiny-micro``)."""

    kind = "base"

    def __init__(self, cfg, model: nn.Module, tokenizer, train_examples: list, eval_examples: list | None = None,
                 callbacks=(), base_model_path: str | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_examples, self.eval_examples = train_examples, eval_examples or []
        self.callbacks = list(callbacks)
        self.base_model_path = base_model_path
        self.dist = D.setup(cfg.strategy)
        self.device = self.dist.device
        self.module = model.to(self.device)  # the unwrapped model
        self.model = model  # DDP / FSDP2-wrapped in train()
        self.history: list[dict] = []
        self.bad_steps = 0  # optimizer steps skipped for a non-finite loss or gradient
        self._bad_in_row = 0
        self._preemption: Preemption | None = None
        self._stop_agreed = False
        self._fingerprint: str | None = None
        self.sampler = None  # mixing.MixedSampler with several tasks or rehearsal (SFT)

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
        into global batches, each split across processes and then into micro-batches (with mixed data:
        the sampler's global batch for the step)."""
        if self.sampler is not None:
            return self.sampler.micro_batches(step, self.dist.rank, self.cfg.batch_size, self.cfg.grad_accum)
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
        loss_sum, metric_sums = self.accumulate(batches, self.dist.world / total)
        return self.finish_step(loss_sum, metric_sums, total)

    def accumulate(self, batches, scale: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Forward and backward of each micro-batch (``loss * scale``; scale = world / total units, as
        DDP / FSDP2 average gradients over processes), gradients synchronized on the last one only.
        Returns the summed detached loss and the summed metrics (fp32)."""
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
        return loss_sum, metric_sums

    def finish_step(self, loss_sum: torch.Tensor, metric_sums: dict, total: torch.Tensor,
                    skip: bool = False) -> dict:
        """Clip, then step the optimizer unless the loss or the gradient norm is not finite (or ``skip``);
        the schedule advances either way. One host sync: the loss, metrics, gradient norm and the
        processes' stop flag (preemption) travel to the host together, after one all-reduce."""
        grad_norm = self.clip_norm()
        keys = sorted(metric_sums)
        stop = float(self._preemption is not None and self._preemption.requested)
        sums = torch.stack([loss_sum.float()] + [torch.as_tensor(metric_sums[k]).float() for k in keys])
        packed = D.all_reduce_sum(torch.cat([sums, torch.full((1,), stop, device=sums.device)]), self.dist)
        values = torch.cat([packed[:-1] / total, packed[-1:], grad_norm.float().reshape(1).to(packed.device)]).tolist()
        loss, norm, stop_votes = values[0], values[-1], values[-2]
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
        finite = math.isfinite(loss) and math.isfinite(norm) and not skip
        if finite:
            self.optimizer.step()
            self._bad_in_row = 0
        else:
            self.bad_steps += 1
            self._bad_in_row += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._stop_agreed = stop_votes > 0
        record = {"loss": loss, "grad_norm": norm, "lr": lr}
        record.update({k: values[i + 1] for i, k in enumerate(keys)})
        if not finite:
            record["skipped"] = True
        return add_task_means(record)

    def clip_norm(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm`` (0: no clipping); the total norm before clipping, as
        a 0-d tensor on the device (no host sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def clip(self) -> float:
        return float(self.clip_norm())

    def step_if_finite(self) -> bool:
        """Clip and step the optimizer when the gradient norm is finite (one host sync); zero the
        gradients either way. PPO's passes before the last one use this."""
        finite = bool(torch.isfinite(self.clip_norm()))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

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
        attach_anchors(self.optimizer, self.module.lm, cfg, self.warn)  # --ewc / --l2sp (a no-op otherwise)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps(), cfg.warmup_steps, cfg.schedule,
                                        cfg.min_lr_ratio)
        self.model.train()

    def warn(self, message: str) -> None:
        """A RunWarning from the main process (the CLI prints it as ``peftkern <kind>: warning: ...``)."""
        if self.dist.main:
            warnings.warn(message, RunWarning, stacklevel=2)

    def train(self) -> dict:
        """Run to ``total_steps``; returns ``{"eval_before", "eval_after", "final_loss", "steps", "seconds",
        "bad_steps"}``, or, when stopped by SIGTERM / SIGINT, ``{"preempted", "signal", "checkpoint",
        "steps", ...}`` after writing a checkpoint."""
        lock = outdir.claim(self.cfg, self.warn) if self.dist.main else None
        try:
            with Preemption(announce=self.dist.main) as preemption:
                self._preemption = preemption
                return self._run(time.time())
        finally:
            self._preemption = None
            if lock is not None:
                lock.release()

    def _resume_point(self) -> str | None:
        """The checkpoint to resume from (None for a new run), its settings checked against this run's."""
        cfg = self.cfg
        if not cfg.resume:
            return None
        ckpt = resolve_resume(cfg.resume, cfg.out, self.warn if self.dist.main else None)
        state = read_state(ckpt)
        changed = check_resume(state, ckpt, cfg, self.kind, self.dist.world, self._fingerprint)
        saved_step, total = state["step"], self.total_steps()
        if saved_step > total:
            raise CheckpointError(f"--resume {ckpt}: the checkpoint is at step {saved_step}, past this run's "
                                  f"{total} steps (--max-steps); raise --max-steps, or start a new run")
        if saved_step == total and _finished_at(cfg.out) == total:
            raise CheckpointError(f"--resume: the run in {cfg.out} already finished at step {total} "
                                  "(metrics.json); raise --max-steps to train further")
        for line in changed:
            self.warn(f"--resume: {line}; the new value applies from step {saved_step} on")
        return ckpt

    def _run(self, start_time: float) -> dict:
        cfg, d = self.cfg, self.dist
        replay = list(getattr(self.sampler, "replay", None) or [])  # --rehearsal-data is training data too
        self._fingerprint = data_fingerprint(self.train_examples + replay)
        ckpt = self._resume_point()  # before the reference pass: a refused resume costs nothing
        self.prepare()
        total = self.total_steps()
        start, eval_before = 0, None
        if ckpt is not None:
            start, eval_before = self.restore(ckpt)
        else:
            eval_before = self.run_eval()
        if cfg.eval_every and not self.eval_examples:
            self.warn(f"--eval-every {cfg.eval_every}: this run has no eval data; no evaluation will be logged")
        log = RunLog(os.path.join(cfg.out, "log.jsonl"), self.kind, total, start, enabled=d.main, quiet=cfg.quiet)
        if ckpt is None and eval_before:
            log.write({"step": 0, **{f"eval_{k}": v for k, v in eval_before.items()}})
        record, saved_at = {}, None
        self.model.train()
        try:
            for step in range(start, total):
                record = self.train_step(step)
                done = step + 1
                self.history.append({"step": done, **record})
                if done % cfg.log_every == 0 or done == total or record.get("skipped"):
                    log.write({"step": done, **record})
                if record.get("skipped"):
                    self._check_bad_steps(done, step)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
                    evals = self.run_eval()
                    if evals:
                        log.write({"step": done, **{f"eval_{k}": v for k, v in evals.items()}})
                if (cfg.save_every and done % cfg.save_every == 0) or done == total or self._stop_agreed:
                    saved_at = self.save(done, {"eval_before": eval_before, "last": record,
                                                "trainer": self.extra_state()})
                log.advance()
                for cb in self.callbacks:
                    cb(self, done, record)
                if self._stop_agreed and done != total:
                    return self._preempted(done, saved_at, start_time, log)
        finally:
            log.close()
        eval_after = self.run_eval()
        if eval_after:
            log.write({"step": total, **{f"eval_{k}": v for k, v in eval_after.items()}})
        summary = {"eval_before": eval_before, "eval_after": eval_after, "final_loss": record.get("loss"),
                   "steps": total, "bad_steps": self.bad_steps, "seconds": round(time.time() - start_time, 2)}
        if start == total:  # resumed from the final checkpoint of a run killed before its outputs were written
            summary["final_loss"] = (read_state(ckpt).get("last") or {}).get("loss")
        self.save_outputs(summary)
        return summary

    def _preempted(self, done: int, saved_at: str | None, start_time: float, log) -> dict:
        own = self._preemption is not None and self._preemption.requested
        summary = {"preempted": True, "signal": self._preemption.name if own else "another process's signal",
                   "steps": done,
                   "checkpoint": saved_at, "seconds": round(time.time() - start_time, 2),
                   "bad_steps": self.bad_steps}
        if self.dist.main:
            log.write({"step": done, "preempted": summary["signal"]})
        return summary

    def _check_bad_steps(self, done: int, step: int) -> None:
        limit = self.cfg.max_bad_steps
        if self._bad_in_row < limit:
            self.warn(f"step {done}: non-finite loss or gradient; the update was skipped "
                      f"({self._bad_in_row} in a row, the run stops at --max-bad-steps {limit})")
            return
        where = [e.get("where") for mb in self.micro_batches(step) for e in mb]
        where = [w if isinstance(w, str) else ", ".join(w) for w in where if w]
        shown = ", ".join(where[:8]) + (f" and {len(where) - 8} more" if len(where) > 8 else "")
        newest = latest_checkpoint(self.cfg.out, warn=None)
        kept = f"the newest checkpoint, {newest}, holds finite weights" if newest else "no checkpoint was written"
        raise NonFiniteError(f"step {done}: the loss or gradients were not finite in {self._bad_in_row} steps in a "
                             f"row (--max-bad-steps {limit}); each was skipped, so the weights stayed finite and "
                             f"{kept}. This process's records of step {done}: {shown or '(unknown)'}")

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
    def save(self, step: int, state: dict) -> str:
        """Checkpoint ``step`` (every process calls: FSDP2 gathers). Refuses weights that are not finite."""
        names = self.trainable_names()
        tensors = D.full_state(self.model, names, self.dist)
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()):
            raise NonFiniteError(f"step {step}: the trainable weights are not finite; no checkpoint written (the "
                                 f"newest one, {latest_checkpoint(self.cfg.out, warn=None)}, is kept)")
        optim_state = self.optimizer_state()
        state = {"kind": self.kind, "world": self.dist.world, "config": settings_of(self.cfg),
                 "data_fingerprint": self._fingerprint, "bad_steps": self.bad_steps, **state}
        state = _json_state(state)
        return save_checkpoint(self.cfg.out, step, tensors, optim_state, self.scheduler.state_dict(), state,
                               self.cfg.keep_last, self.dist.rank, self.dist.world, retries=self.cfg.save_retries,
                               warn=self.warn)

    def optimizer_state(self) -> dict:
        if self.dist.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def restore(self, path: str) -> tuple[int, dict]:
        ck = load_checkpoint(path, self.dist.rank)
        params = dict(self.module.named_parameters())
        for name, t in ck["trainable"].items():
            p = params.get(name)
            if p is not None and tuple(p.shape) != tuple(t.shape):
                raise CheckpointError(f"--resume {path}: {name} has shape {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(p.shape)} in this model: the checkpoint is of another model")
        try:
            if self.dist.strategy == "fsdp2":
                from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                     set_optimizer_state_dict)

                opts = StateDictOptions(full_state_dict=True, strict=False)
                set_model_state_dict(self.model, ck["trainable"], options=opts)
                set_optimizer_state_dict(self.model, self.optimizer, ck["optimizer"], options=opts)
            else:
                load_trainable_state(self.module, ck["trainable"])
                self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"--resume {path}: does not fit this model ({exc})") from None
        self.scheduler.load_state_dict(ck["scheduler"])
        self._apply_changed_rates()
        set_rng_state(ck["rng"])
        state = ck["state"]
        self.bad_steps = int(state.get("bad_steps", 0))
        self.load_extra_state(state.get("trainer") or {})
        return int(state["step"]), state.get("eval_before") or {}

    def _apply_changed_rates(self) -> None:
        """After loading the optimizer and schedule: this run's ``lr`` and ``weight_decay`` (a resume may
        change them, and ``max_steps`` the schedule), the resumed step's rate from this run's schedule.
        With nothing changed this recomputes the very value that was saved."""
        sched = self.scheduler
        sched.base_lrs = [self.cfg.lr for _ in sched.base_lrs]
        for group, lmbda in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * lmbda(sched.last_epoch)
            if "weight_decay" in group:
                group["weight_decay"] = self.cfg.weight_decay
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def save_outputs(self, summary: dict) -> None:
        """The adapter (PEFT format) or the full model, and ``metrics.json``, in ``cfg.out``. Every
        process calls this (FSDP2 gathers the shards); the main one writes, each output atomically (a
        failed write leaves the previous one intact)."""
        cfg, main = self.cfg, self.dist.main
        retry = dict(retries=cfg.save_retries, warn=self.warn)

        def kept(name):
            path = os.path.join(cfg.out, name)
            before = f"The previous {path} is intact" if os.path.exists(path) else f"Nothing was at {path} before"
            return f"{before}; the final checkpoint holds this run's weights (--resume writes the outputs from it)."

        if has_lora(self.module.lm):
            path = os.path.join(cfg.out, "adapter")
            base = self.base_model_path or with_retries(lambda: adapter_base(cfg, cfg.out, main), "the base model",
                                                        kept("base_model"), **retry)
            if not main:
                save_adapter(self.module.lm, path, base_name=base, write=False)
            else:
                def write_adapter():
                    with atomic_dir(path) as tmp:
                        save_adapter(self.module.lm, tmp, base_name=base, write=True)

                # FSDP2 gathers inside save_adapter with every process: no retry by the main one alone
                adapter_retry = retry if self.dist.strategy != "fsdp2" else dict(retries=0, warn=self.warn)
                with_retries(write_adapter, f"the adapter {path}", kept("adapter"), **adapter_retry)
        elif self.kind != "rm":
            lm = base_causal_lm(self.module.lm)
            state = D.full_model_state(lm, self.dist)
            if main:
                path = os.path.join(cfg.out, "model")

                def write_model():
                    with atomic_dir(path) as tmp:
                        lm.save_pretrained(tmp, state_dict=state)
                        if hasattr(self.tokenizer, "save_pretrained"):
                            self.tokenizer.save_pretrained(tmp)

                with_retries(write_model, f"the model {path}", kept("model"), **retry)
        if main:
            with_retries(lambda: atomic_write_text(os.path.join(cfg.out, "metrics.json"), dumps(summary, indent=1)),
                         f"{os.path.join(cfg.out, 'metrics.json')}", kept("metrics.json"), **retry)


def _finished_at(out: str) -> int | None:
    """The step count in ``out/metrics.json`` (written when a run finishes), or None."""
    try:
        steps = read_json(os.path.join(out, "metrics.json")).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def _json_state(state: dict) -> dict:
    """``state`` with non-finite numbers as strings (state.json is strict JSON)."""
    import json

    return json.loads(dumps(state))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
