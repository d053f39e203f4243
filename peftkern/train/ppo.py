"""PPO for language models: a policy with a value head, rollouts sampled with ``generate``, a reward
from a reward model or a Python function, a per-token KL penalty against the reference (the model
with its adapters off), GAE, clipped policy and value losses, an entropy bonus, and a fixed or
adaptive KL coefficient.

One step of the loop = one rollout of ``batch_size x grad_accum`` prompts per process, kept in a
replay buffer with the ``replay_rollouts - 1`` rollouts before it, then ``ppo_epochs`` passes over
the buffer's samples: each pass shuffles them into mini-batches of ``ppo_mini_batch_size`` (0: one
mini-batch of them all), one optimizer update per mini-batch (over micro-batches of ``batch_size``).
Every sample keeps the log-probs, values, advantages and returns of the policy that drew it (the
behaviour policy), so the ratio and both clips are taken against that policy; the replayed samples'
advantages are those of when they were drawn. A resumed run starts with an empty buffer.
"""
from __future__ import annotations

import copy
import importlib
import math
import numbers
import os
import sys

import torch

from peftkern.train import distributed as D
from peftkern.train.adapters import adapters_disabled, has_lora
from peftkern.train.data import (IGNORE_INDEX, DataError, encode_prompt, encode_sequence, left_pad, load_records,
                                 pad_batch)
from peftkern.train.errors import ConfigError
from peftkern.train.loading import is_embedded
from peftkern.train.loop import Trainer
from peftkern.train.model import base_causal_lm
from peftkern.train.objectives import kl_rewards, ppo_loss_sums


def ppo_prompts(tokenizer, source, cfg) -> list[dict]:
    """``{"prompt_ids", "prompt", "index", "where"}`` per record (``prompt``: the raw prompt, for the reward)."""
    out = []
    for i, r in enumerate(load_records(source, "ppo")):
        ids = encode_prompt(tokenizer, r.data["prompt"])
        if not ids:
            raise DataError(f"{r.where}: 'prompt' has no tokens: PPO needs a prompt to generate from")
        out.append({"prompt_ids": ids, "prompt": r.data["prompt"], "index": i, "where": r.where})
    return out


def load_reward_fn(spec: str):
    """``"package.module:function"`` -> the function, called as f(prompt, completion_text) -> float. The
    module is looked up on ``sys.path`` and then in the current directory (a console script, unlike
    ``python -m``, does not put it on the path)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--reward-fn must look like 'module:function', got {spec!r}")
    try:
        module = _import_from_path_or_cwd(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"--reward-fn {spec}: no module named {exc.name!r} (looked on sys.path and in the "
                              f"current directory {os.getcwd()})") from None
        raise
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"--reward-fn {spec}: module {module_name} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def _import_from_path_or_cwd(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if exc.name != top or cwd in sys.path or not (os.path.isfile(os.path.join(cwd, top + ".py"))
                                                        or os.path.isdir(os.path.join(cwd, top))):
            raise
    sys.path.append(cwd)
    return importlib.import_module(module_name)


def call_reward_fn(fn, spec: str, prompts: list, texts: list[str]) -> torch.Tensor:
    """[B] fp32 rewards from ``fn(prompt, completion)`` per rollout; a value that is not one finite
    number is a ConfigError naming the function, the rollout and what came back."""
    out = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        value = fn(p, t)
        if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":  # a tensor / array / NumPy scalar
            n = value.numel() if isinstance(value, torch.Tensor) else int(value.size)
            if n != 1:
                raise ConfigError(f"--reward-fn {spec} returned {n} values for one completion (rollout {i}); it "
                                  "is called once per (prompt, completion) and must return one number")
            value = value.item() if hasattr(value, "item") else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            length = f" of length {len(value)}" if hasattr(value, "__len__") else ""
            raise ConfigError(f"--reward-fn {spec} returned {type(value).__name__}{length} for rollout {i}; "
                              "expected one number per (prompt, completion)")
        if not math.isfinite(float(value)):
            raise ConfigError(f"--reward-fn {spec} returned {float(value)} for rollout {i}; expected a finite number")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float32)


class AdaptiveKL:
    """Ziegler et al.'s controller: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, coef: float, target: float, horizon: int, adaptive: bool):
        self.coef, self.target, self.horizon, self.adaptive = coef, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.coef *= 1.0 + error * n / self.horizon


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns [B, T] over the masked (response) positions, right to left; values past a
    row's last response token count as 0."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros_like(last)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, last)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, last, torch.zeros_like(last))
    return adv, adv + values


def _whiten(x: torch.Tensor, mask: torch.Tensor, d) -> torch.Tensor:
    stats = D.all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).float(), d)
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean).clamp_min(1e-8)
    return (x - mean) * torch.rsqrt(var) * mask


class PPOTrainer(Trainer):
    kind = "ppo"

    def before_train(self):
        cfg = self.cfg
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, cfg.adaptive_kl)
        self.reference = None if has_lora(self.module.lm) else copy.deepcopy(self.module.lm).eval().requires_grad_(False)
        self.buffer = RolloutBuffer(cfg.replay_rollouts, self.tokenizer.pad_token_id)
        self.updates: list[dict] = []  # the last step's mini-batch updates (epoch, ratio, ...)
        self.disagreement = None
        if cfg.reward_model:
            from peftkern.train.rm import load_reward_model

            rm = load_reward_model(cfg.reward_model, cfg.reward_aggregate, cfg.reward_std_coef).to(self.device)

            def reward(prompts, texts, seqs):
                out = rm(seqs["input_ids"], seqs["attention_mask"])
                self.disagreement = out["disagreement"] if rm.heads > 1 else None
                return out["scores"]
            self.reward = reward
        else:
            if cfg.reward_fn:
                fn, spec = load_reward_fn(cfg.reward_fn), cfg.reward_fn
            elif is_embedded(cfg.model):
                from peftkern.models.tasks import task_reward as fn

                spec = "peftkern.models.tasks:task_reward"
            else:
                raise ConfigError("peftkern ppo needs --reward-model or --reward-fn")
            self.reward = lambda prompts, texts, seqs: call_reward_fn(fn, spec, prompts, texts)

    def extra_state(self):
        return {"kl_coef": self.kl.coef}

    def load_extra_state(self, state):
        if "kl_coef" in state:
            self.kl.coef = float(state["kl_coef"])

    # the base loop's hooks; PPO's batches are built from rollouts in train_step
    def collate(self, examples):
        return {"prompt_ids": [e["prompt_ids"] for e in examples], "prompt": [e["prompt"] for e in examples]}

    def units(self, batch):
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()

    def loss(self, model, batch):
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], want_entropy=True)
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        values = out["values"][:, :-1]
        pg, vf, clipped = ppo_loss_sums(out["logps"], batch["old_logps"], values, batch["old_values"],
                                     batch["advantages"], batch["returns"], mask, self.cfg.cliprange,
                                     self.cfg.cliprange_value)
        entropy = (out["entropy"] * mask).sum()
        total = pg + self.cfg.vf_coef * vf - self.cfg.ent_coef * entropy
        with torch.no_grad():
            ratio = torch.exp(out["logps"] - batch["old_logps"]) * mask
        return total, {"policy_loss": pg.detach(), "value_loss": vf.detach(), "entropy": entropy.detach(),
                       "clip_fraction": clipped.detach(), "ratio": ratio.sum(),
                       "ratio_max_dev": ((ratio - 1).abs() * mask).max()}

    # -- rollouts -------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, examples: list[dict], sample: bool = True) -> tuple[dict, list[str]]:
        """Sample responses and score them: a padded batch with labels on the response tokens, and
        the response texts."""
        tok, cfg = self.tokenizer, self.cfg
        lm = base_causal_lm(self.module.lm)
        ids, mask = left_pad([e["prompt_ids"] for e in examples], tok.pad_token_id)
        was = lm.training
        lm.eval()
        gen = lm.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                          temperature=cfg.temperature if sample else None, top_k=0 if sample else None,
                          top_p=1.0 if sample else None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        lm.train(was)
        seqs, texts = [], []
        for e, row in zip(examples, gen[:, ids.shape[1]:].tolist()):
            response = []
            for t in row:
                if t == tok.pad_token_id:
                    break
                response.append(t)
                if t == tok.eos_token_id:
                    break
            if not response:
                response = [tok.eos_token_id]
            texts.append(tok.decode(response, skip_special_tokens=True))
            seqs.append(encode_sequence(e["prompt_ids"], response, len(e["prompt_ids"]) + len(response)))
        batch = {k: v.to(self.device) for k, v in pad_batch(seqs, tok.pad_token_id).items()}
        return batch, texts

    @torch.no_grad()
    def score_rollout(self, batch: dict, prompts: list, texts: list[str]) -> dict:
        """Adds old log-probs and values, reference log-probs, rewards, advantages and returns to ``batch``."""
        cfg = self.cfg
        out = self.module(batch["input_ids"], batch["attention_mask"], batch["labels"])
        if self.reference is None:
            with adapters_disabled(self.module.lm):
                ref = self.module(batch["input_ids"], batch["attention_mask"], batch["labels"])["logps"]
        else:
            from peftkern.train.model import LMWithHeads

            ref = LMWithHeads(self.reference)(batch["input_ids"], batch["attention_mask"], batch["labels"])["logps"]
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        scores = self.reward(prompts, texts, batch).to(self.device).float()
        kl = (out["logps"] - ref) * mask
        rewards = kl_rewards(scores, out["logps"], ref, mask, self.kl.coef)
        values = out["values"][:, :-1] * mask
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        batch.update(old_logps=out["logps"], old_values=values, advantages=_whiten(adv, mask.float(), self.dist),
                     returns=returns, scores=scores, kl=kl.sum(1))
        return batch

    def train_step(self, step):
        examples = [e for mb in self.micro_batches(step) for e in mb]
        batch, texts = self.rollout(examples)
        batch = self.score_rollout(batch, [e["prompt"] for e in examples], texts)
        self.buffer.add(batch)
        n = len(examples)
        size = len(self.buffer)
        mini = self.cfg.ppo_mini_batch_size or size
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)  # the same order on every process
        plan = []
        for epoch in range(self.cfg.ppo_epochs):
            order = torch.randperm(size, generator=gen) if mini < size else torch.arange(size)
            plan += [(epoch, order[i:i + mini]) for i in range(0, size, mini)]
        sums: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros((), device=self.device)
        last_epoch_units = torch.zeros((), device=self.device)
        finite = True  # every update before the last stepped on finite gradients
        per_update = []  # [ratio sum, tokens, max |ratio - 1|, fresh samples] per update, read in one sync
        for u, (epoch, rows) in enumerate(plan):
            minibatch = self.buffer.take(rows.to(self.buffer.device))
            loss, metrics, units = self._update(minibatch)
            per_update.append(torch.stack([metrics["ratio"], units, metrics["ratio_max_dev"],
                                           (minibatch["age"] == 0).sum().float()]))
            if epoch == self.cfg.ppo_epochs - 1:
                loss_sum += loss
                last_epoch_units += units
                for k, v in metrics.items():
                    if k != "ratio_max_dev":
                        sums[k] = sums.get(k, 0.0) + v
            if u < len(plan) - 1:
                finite = self.step_if_finite() and finite
        total = D.all_reduce_sum(last_epoch_units, self.dist).clamp_min(1.0)
        record = self.finish_step(loss_sum, sums, total, skip=not finite)
        self.updates = [{"epoch": plan[u][0], "samples": len(plan[u][1]), "ratio_mean": r / max(c, 1.0),
                         "ratio_max_dev": dev, "fresh": int(fresh)}
                        for u, (r, c, dev, fresh) in enumerate(torch.stack(per_update).tolist())]
        extra = [batch["scores"].sum(), batch["kl"].sum(), torch.tensor(float(n), device=self.device)]
        if self.disagreement is not None:
            extra.append(self.disagreement.sum())
        stats = D.all_reduce_sum(torch.stack(extra).float(), self.dist)
        record["reward"] = (stats[0] / stats[2]).item()
        record["kl"] = (stats[1] / stats[2]).item()
        if self.disagreement is not None:
            record["reward_disagreement"] = (stats[3] / stats[2]).item()
        record["kl_coef"] = self.kl.coef
        record["updates"] = len(plan)
        record["replayed"] = size - n
        self.kl.update(record["kl"], int(stats[2].item()))
        return record

    def _update(self, minibatch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Backward of one mini-batch (micro-batches of batch_size, the loss over the mini-batch's tokens
        on every process): (loss sum, metric sums, this process's token count), detached."""
        total = D.all_reduce_sum(self.units(minibatch).to(self.device), self.dist).clamp_min(1.0)
        scale = self.dist.world / total
        m, b = minibatch["input_ids"].shape[0], self.cfg.batch_size
        loss_sum, sums = torch.zeros((), device=self.device), {}
        for i in range(0, m, b):
            micro = {k: v[i:i + b] for k, v in minibatch.items()}
            last = i + b >= m
            sync = self.model.no_sync() if (hasattr(self.model, "no_sync") and not last) else _Null()
            with sync:
                loss, metrics = self.loss(self.model, micro)
                (loss * scale).backward()
            loss_sum += loss.detach()
            for k, v in metrics.items():
                sums[k] = torch.maximum(sums[k], v) if (k == "ratio_max_dev" and k in sums) else sums.get(k, 0.0) + v
        return loss_sum, sums, self.units(minibatch).to(self.device)

    def evaluate(self):
        """Mean reward of greedy responses to the held-out prompts."""
        total = 0.0
        for i in range(0, len(self.eval_examples), 32):
            examples = self.eval_examples[i:i + 32]
            batch, texts = self.rollout(examples, sample=False)
            total += float(self.reward([e["prompt"] for e in examples], texts, batch).sum())
        return {"reward": total / max(len(self.eval_examples), 1)}


class RolloutBuffer:
    """The samples of the last ``capacity`` rollouts with what the behaviour policy gave them, right-padded
    to one width: ``take(rows)`` -> the keys of :attr:`KEYS` plus ``age`` [S] (0: the newest rollout)."""

    KEYS = ("input_ids", "attention_mask", "labels", "old_logps", "old_values", "advantages", "returns")
    PAD = {"input_ids": None, "labels": IGNORE_INDEX}  # None: the pad token; other keys pad with 0

    def __init__(self, capacity: int, pad_id: int):
        self.capacity, self.pad_id = capacity, pad_id
        self.rollouts: list[dict] = []
        self.samples: dict[str, torch.Tensor] = {}
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return 0 if not self.samples else self.samples["input_ids"].shape[0]

    def add(self, batch: dict) -> None:
        self.rollouts = (self.rollouts + [{k: batch[k].detach() for k in self.KEYS}])[-self.capacity:]
        width = max(r["input_ids"].shape[1] for r in self.rollouts)
        out: dict[str, list] = {k: [] for k in self.KEYS + ("age",)}
        for age, r in enumerate(reversed(self.rollouts)):
            for k in self.KEYS:
                t = r[k]
                pad = width - (1 if t.shape[1] < r["input_ids"].shape[1] else 0) - t.shape[1]
                fill = self.PAD.get(k, 0)
                out[k].append(torch.nn.functional.pad(t, (0, pad), value=self.pad_id if fill is None else fill))
            out["age"].append(torch.full((r["input_ids"].shape[0],), age, dtype=torch.long, device=t.device))
        self.samples = {k: torch.cat(v) for k, v in out.items()}
        self.device = self.samples["input_ids"].device

    def take(self, rows: torch.Tensor) -> dict:
        """The samples ``rows`` [M], their columns cut to the longest one's length."""
        picked = {k: v[rows] for k, v in self.samples.items()}
        width = int(picked["attention_mask"].sum(1).max())
        for k in self.KEYS:
            cut = width if picked[k].shape[1] == self.samples["input_ids"].shape[1] else width - 1
            picked[k] = picked[k][:, :cut]
        return picked


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
