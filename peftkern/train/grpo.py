"""GRPO and RLOO: online RL with a group baseline. Each rollout samples G completions per prompt (one
batched, KV-cached decode over the prompts repeated G times), scores them with reward functions or a
reward model, turns the rewards into advantages (group-normalized for GRPO, leave-one-out for RLOO)
and trains on them with the fused losses of ``peftkern.losses`` (no [tokens, V] logits; gradients
formed in the forward pass).

Plan (TRL's, in micro-batches of ``batch_size`` prompts x G completions per process): a rollout holds
``steps_per_generation`` micro-batches (default ``grad_accum``: one optimizer step), each optimizer
step takes ``grad_accum`` of them, and ``num_iterations`` passes go over the rollout, so a rollout
serves (steps_per_generation / grad_accum) x num_iterations optimizer steps.

Old log-probs: used once (one step per rollout), the ratio is the policy's own (TRL's default);
otherwise the log-probs the sampler computed for each drawn token (softmax of the logits divided by the
temperature, as TRL scores), so no extra forward pass over the rollout. The reference (beta > 0) is the
model with its adapters off; with beta = 0 nothing of it runs.
"""
from __future__ import annotations

import copy
import hashlib

import torch

from peftkern.generate import DecodingSettings, ModelStepper, context_length, decode, inverse_cdf_draw
from peftkern.generate.text import eos_ids
from peftkern.losses import (fused_grpo_loss, fused_rloo_loss, group_advantages, rloo_advantages)
from peftkern.losses.grpo import check_grpo_args
from peftkern.train import distributed as D
from peftkern.train.adapters import adapters_disabled, has_lora
from peftkern.train.config import resolve_kind_defaults
from peftkern.train.data import IGNORE_INDEX, DataError, encode_prompt, left_pad, load_records, pad_batch
from peftkern.train.errors import ConfigError
from peftkern.train.loading import is_embedded
from peftkern.train.init_adapter import write_pending_base
from peftkern.train.loop import Trainer
from peftkern.train.model import LMWithHeads, base_causal_lm
from peftkern.train.rewards import Reward, call_rewards, load_rewards


def online_prompts(tokenizer, source, cfg) -> list[dict]:
    """``{"prompt_ids", "prompt", "columns", "index", "where"}`` per record (``prompt`` a string or
    messages; ``columns`` the record's other fields, handed to the reward functions). A prompt that
    leaves no room for ``max_completion_length`` tokens within ``max_length`` is an error naming it."""
    limit = cfg.max_length - cfg.max_completion_length
    if limit < 1:
        raise ConfigError(f"--max-length {cfg.max_length} leaves no room for a prompt before "
                          f"--max-completion-length {cfg.max_completion_length} tokens")
    out = []
    for i, r in enumerate(load_records(source, "ppo")):
        ids = encode_prompt(tokenizer, r.data["prompt"])
        if not ids:
            raise DataError(f"{r.where}: 'prompt' has no tokens: there is nothing to generate from")
        if len(ids) > limit:
            raise DataError(f"{r.where}: the prompt has {len(ids)} tokens; with --max-completion-length "
                            f"{cfg.max_completion_length} its sequences would exceed --max-length {cfg.max_length} "
                            f"(at most {limit} prompt tokens): raise --max-length or shorten the prompt")
        columns = {k: v for k, v in r.data.items() if k != "prompt"}
        out.append({"prompt_ids": ids, "prompt": r.data["prompt"], "columns": columns, "index": i,
                    "where": r.where})
    return out


class SamplingLogps:
    """A decoding scorer around another (``ModelStepper``) that keeps log p(drawn token) under
    softmax(logits / temperature) at every step: the sampling policy's token log-probs, for free.
    With ``keep=False`` it only counts the forward calls (a rollout used once needs no old log-probs)."""

    def __init__(self, inner, temperature: float, keep: bool = True):
        self.inner, self.temperature, self.keep = inner, temperature, keep
        self.calls = 0
        self._logp = None
        self.taken: list[torch.Tensor] = []

    def _keep(self, scores):
        self.calls += 1
        if self.keep:
            self._logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def start(self, input_ids, attention_mask):
        return self._keep(self.inner.start(input_ids, attention_mask))

    def advance(self, tokens):
        if self.keep:
            self.taken.append(self._logp.gather(1, tokens[:, None]).squeeze(1))
        return self._keep(self.inner.advance(tokens))

    def token_logps(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """[B, n] log-probs of the drawn ``tokens`` [B, n] (after decoding ended); None without ``keep``."""
        if not self.keep:
            return None
        last = self._logp.gather(1, tokens[:, -1:]).squeeze(1)
        return torch.stack(self.taken + [last], dim=1)[:, :tokens.shape[1]]


class SharedPrefill:
    """A ``ModelStepper`` over rows that come in groups of ``group`` copies of one prompt: each prompt is
    prefilled once and its KV cache repeated for its copies (transformers' ``Cache.batch_repeat_interleave``),
    so the prompt costs one forward row instead of G."""

    def __init__(self, stepper: ModelStepper, group: int):
        self.inner, self.group = stepper, group

    def start(self, input_ids, attention_mask):
        g = self.group
        scores = self.inner.start(input_ids[::g], attention_mask[::g])
        self.inner.cache.batch_repeat_interleave(g)
        self.inner.mask = attention_mask
        self.inner.positions = self.inner.positions.repeat_interleave(g, dim=0)
        return scores.repeat_interleave(g, dim=0)

    def advance(self, tokens):
        return self.inner.advance(tokens)


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gather(x: torch.Tensor, d) -> torch.Tensor:
    """``x`` of every process concatenated in rank order (itself with one process)."""
    if d.world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _serial(t: torch.Tensor | None):
    return None if t is None else {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                   "values": t.reshape(-1).tolist()}


def _tensor(s, device):
    if s is None:
        return None
    return torch.tensor(s["values"], dtype=getattr(torch, s["dtype"]), device=device).reshape(s["shape"])


class GRPOTrainer(Trainer):
    """``peftkern grpo``: TRL 1.16's GRPO (loss types grpo, bnpo, dr_grpo, dapo, cispo; token or
    sequence importance sampling; delta; k3 KL with beta; entropy masking) from hidden states."""

    kind = "grpo"
    TENSORS = ("input_ids", "attention_mask", "labels", "advantages", "old_logps", "ref_logps", "prompt_lengths")

    def __init__(self, cfg, model, tokenizer, train_examples, eval_examples=None, callbacks=(),
                 base_model_path=None):
        resolve_kind_defaults(cfg, self.kind)
        super().__init__(cfg, model, tokenizer, train_examples, eval_examples, callbacks, base_model_path)
        self.check_settings()
        per = cfg.steps_per_generation or cfg.grad_accum
        if per % cfg.grad_accum:
            raise ConfigError(f"--steps-per-generation {per} must be a multiple of --grad-accum {cfg.grad_accum} "
                              "(a rollout is cut into whole optimizer steps)")
        self.micro_per_rollout = per
        self.slices = per // cfg.grad_accum  # optimizer steps per pass over a rollout
        self.steps_per_rollout = self.slices * cfg.num_iterations
        self.rewards: list[Reward] = load_rewards(cfg, is_embedded(cfg.model))
        self.reward_model = None
        self.reference = None
        self.rollout: dict | None = None
        self.eos = eos_ids(base_causal_lm(self.module.lm), tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        context = context_length(self.module.lm)
        if context is not None and cfg.max_length > context:
            raise ConfigError(f"--max-length {cfg.max_length} exceeds the model's context of {context} positions")

    def check_settings(self) -> None:
        cfg = self.cfg
        check_grpo_args(f"peftkern {self.kind}", cfg.loss_type, cfg.importance_sampling_level, cfg.epsilon,
                        cfg.epsilon_high, cfg.delta, cfg.beta, cfg.top_entropy_quantile)
        if cfg.loss_type == "dr_grpo" and cfg.max_completion_length < 1:
            raise ConfigError("--loss-type dr_grpo divides by --max-completion-length, which must be positive")

    # -- the plan --------------------------------------------------------------------------------
    @property
    def global_prompts(self) -> int:
        return self.cfg.batch_size * self.micro_per_rollout * self.dist.world

    def rollouts_per_epoch(self) -> int:
        n = len(self.train_examples) // self.global_prompts
        if n == 0:
            raise ValueError(f"{len(self.train_examples)} prompts do not fill one rollout of {self.global_prompts} "
                             "(batch_size x steps_per_generation x processes)")
        return n

    def steps_per_epoch(self) -> int:
        return self.rollouts_per_epoch() * self.steps_per_rollout

    def rollout_examples(self, r: int) -> list[dict]:
        """This process's prompts of rollout ``r``: a seeded permutation per epoch, cut into rollouts."""
        per_epoch = self.rollouts_per_epoch()
        epoch, pos = divmod(r, per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_examples), generator=gen)
        g = order[pos * self.global_prompts:(pos + 1) * self.global_prompts].tolist()
        per_rank = self.global_prompts // self.dist.world
        return [self.train_examples[i] for i in g[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]]

    def _position(self, step: int) -> tuple[int, int, int]:
        """(rollout, pass, slice) of optimizer step ``step``."""
        r, j = divmod(step, self.steps_per_rollout)
        return (r, *divmod(j, self.slices))

    def micro_batches(self, step: int) -> list[list]:
        r, _, s = self._position(step)
        examples = self.rollout_examples(r)
        b, ga = self.cfg.batch_size, self.cfg.grad_accum
        first = s * ga * b
        return [examples[first + m * b:first + (m + 1) * b] for m in range(ga)]

    # the loop's hooks; batches come from rollouts in train_step
    def collate(self, examples):
        return {}

    def units(self, batch):
        return torch.tensor(float(batch["input_ids"].shape[0]))

    # -- setup -----------------------------------------------------------------------------------
    def before_train(self):
        write_pending_base(self)
        cfg = self.cfg
        if cfg.beta and not has_lora(self.module.lm):  # full fine-tuning: a frozen copy is the reference
            self.reference = LMWithHeads(copy.deepcopy(self.module.lm)).eval().requires_grad_(False)
        if cfg.reward_model:
            from peftkern.train.rm import load_reward_model

            self.reward_model = load_reward_model(cfg.reward_model, cfg.reward_aggregate,
                                                  cfg.reward_std_coef).to(self.device)

    def prepare(self) -> None:
        super().prepare()
        if self.dist.strategy == "fsdp2":  # one forward through the root first, so it initializes as FSDP's
            with torch.no_grad():  # root (decoding calls the inner LM, whose layers would claim the role)
                ids = torch.full((1, 2), self.pad, dtype=torch.long, device=self.device)
                self.model(ids, torch.ones_like(ids))

    def extra_state(self) -> dict:
        """The rollout in use when the next step still needs it (a resume mid-rollout reuses it)."""
        ro = self.rollout
        if ro is None or ro.get("next_step") is None or ro["next_step"] // self.steps_per_rollout != ro["index"]:
            return {}
        saved = {k: _serial(ro[k]) for k in self.TENSORS}
        saved.update(index=ro["index"], stats=ro["stats"], tokens=ro["tokens"])
        return {"rollout": saved}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get("rollout")
        if not saved:
            return
        ro = {k: _tensor(saved.get(k), self.device) for k in self.TENSORS}
        ro.update(index=saved["index"], stats=saved["stats"], tokens=saved["tokens"])
        self.rollout = ro

    # -- rollouts --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_rows: list[list[int]], settings: DecodingSettings, generator=None, group: int = 1,
               keep_logps: bool = False):
        """Decode every row in one batch -> (completion token lists, finish reasons, sampling log-probs
        [N, n] of the drawn tokens with ``keep_logps``, else None). Rows in consecutive groups of
        ``group`` copies of a prompt share its prefill. Under FSDP2 every process runs as many forwards
        as the longest."""
        lm = self.module.lm
        ids, mask = left_pad(prompt_rows, self.pad)
        stepper = ModelStepper(lm) if group == 1 else SharedPrefill(ModelStepper(lm), group)
        scorer = SamplingLogps(stepper, settings.temperature if settings.do_sample else 1.0, keep=keep_logps)
        was = lm.training
        lm.eval()
        fsdp = self.dist.strategy == "fsdp2"
        if fsdp:  # the root's own parameters (embeddings, head): decoding calls the LM, not the root's forward
            self.model.unshard()
        try:
            result = decode(scorer, ids.to(self.device), mask.to(self.device), settings, eos_token_ids=self.eos,
                            pad_token_id=self.pad, generator=generator, draw=inverse_cdf_draw)
            if fsdp:  # sharded layers gather in every forward: every process runs as many
                most = _gather(torch.tensor([float(scorer.calls)], device=self.device), self.dist).max()
                filler = torch.full((ids.shape[0],), self.pad, dtype=torch.long, device=self.device)
                for _ in range(int(most.item()) - scorer.calls):
                    scorer.inner.advance(filler)
        finally:
            lm.train(was)
            if fsdp:
                self.model.reshard()
        logps = scorer.token_logps(result.tokens)
        completions = [result.tokens[i, :n].tolist() for i, n in enumerate(result.lengths)]
        return completions, result.finish_reasons, logps

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        """[N, T-1] the reference's token log-probs at the sampling temperature (no gradients)."""
        temperature = self.cfg.temperature

        def score(hidden, targets, head):
            from peftkern.ops.logprobs import fused_linear_logprobs

            return fused_linear_logprobs(hidden, head["weight"], targets, bias=head["bias"], temperature=temperature,
                                         lora_A=head["lora_A"], lora_B=head["lora_B"],
                                         lora_scaling=head["lora_scaling"])
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        shared = self.shared_prompts(batch)
        if self.reference is not None:
            return self.reference(*args, head_loss=score, shared_prompts=shared)["head_loss"]
        with adapters_disabled(self.module.lm):
            return self.module(*args, head_loss=score, shared_prompts=shared)["head_loss"]

    def shared_prompts(self, batch: dict):
        """(prompt lengths [N], G) when the G completions of a prompt can share its forward (rows of a batch
        are whole groups; not under FSDP2, whose sharded layers the two calls would gather twice), else None."""
        lengths, G = batch.get("prompt_lengths"), self.cfg.num_generations
        if lengths is None or G < 2 or self.dist.strategy == "fsdp2":
            return None
        return lengths, G

    def _completion_texts(self, examples, completions):
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        if isinstance(examples[0]["prompt"], list):  # conversational, as TRL hands them to reward functions
            return [[{"role": "assistant", "content": t}] for t in texts]
        return texts

    def score(self, examples: list[dict], completions: list[list[int]], batch: dict) -> torch.Tensor:
        """[N] fp32 weighted rewards (NaN: no function could score it) and [N, F] per function."""
        G = len(completions) // len(examples)
        rows = [e for e in examples for _ in range(G)]
        keys = sorted({k for e in examples for k in e["columns"]})
        columns = {k: [e["columns"].get(k) for e in rows] for k in keys}
        per_fn = call_rewards(self.rewards, [e["prompt"] for e in rows], self._completion_texts(rows, completions),
                              completions, columns, [e["where"] for e in rows]).to(self.device)
        weights = [r.weight for r in self.rewards]
        if self.reward_model is not None:
            scores = self.reward_model(batch["input_ids"], batch["attention_mask"])["scores"].float()
            per_fn = torch.cat([per_fn, scores[:, None]], dim=1)
            weights.append(self.reward_model_weight())
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)
        total = torch.nansum(per_fn * w, dim=1)
        total[torch.isnan(per_fn).all(dim=1)] = float("nan")
        return total, per_fn

    def reward_model_weight(self) -> float:
        from peftkern.train.config import parse_floats

        weights = parse_floats(self.cfg.reward_weights, "reward_weights")
        return weights[-1] if weights and len(weights) > len(self.rewards) else 1.0

    def advantages(self, rewards: torch.Tensor, old_logps, ref_logps, mask) -> tuple[torch.Tensor, dict]:
        """This process's advantages [N] from its rewards (statistics over every process where the
        batch is their scope)."""
        cfg, G = self.cfg, self.cfg.num_generations
        everyone = _gather(rewards, self.dist)
        mine = slice(self.dist.rank * rewards.numel(), (self.dist.rank + 1) * rewards.numel())
        return group_advantages(everyone, G, cfg.scale_rewards)[mine], {}

    @torch.no_grad()
    def make_rollout(self, r: int) -> dict:
        cfg, G = self.cfg, self.cfg.num_generations
        examples = self.rollout_examples(r)
        rows = [e["prompt_ids"] for e in examples for _ in range(G)]
        settings = DecodingSettings(max_new_tokens=cfg.max_completion_length, do_sample=True,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p).check()
        generator = torch.Generator(device=self.device).manual_seed(_seed(cfg.seed, r, self.dist.rank))
        # the sampler's log-probs serve as old log-probs (a rollout used more than once) and RLOO's KL
        need_old = self.steps_per_rollout > 1 or (self.kind == "rloo" and bool(cfg.beta))
        completions, reasons, sampled = self.sample(rows, settings, generator, group=G, keep_logps=need_old)
        truncated = torch.tensor([why == "length" and (not c or c[-1] not in self.eos)
                                  for why, c in zip(reasons, completions)], device=self.device)
        seqs = []
        for prompt, completion, cut in zip(rows, completions, truncated.tolist()):
            label = [IGNORE_INDEX] * len(completion) if (cut and cfg.mask_truncated_completions) else completion
            seqs.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + label})
        batch = {k: v.to(self.device) for k, v in pad_batch(seqs, self.pad).items()}
        batch["prompt_lengths"] = torch.tensor([len(p) for p in rows], device=self.device)
        T = batch["input_ids"].shape[1]
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        old = None
        if sampled is not None:
            old = torch.zeros(len(rows), T - 1, device=self.device)
            for i, (prompt, completion) in enumerate(zip(rows, completions)):
                old[i, len(prompt) - 1:len(prompt) - 1 + len(completion)] = sampled[i, :len(completion)]
            old = old * mask
        ref = self._reference_logps(batch) if cfg.beta else None
        rewards, per_fn = self.score(examples, completions, batch)
        advantages, extra = self.advantages(rewards, old, ref, mask)
        ro = dict(batch, advantages=advantages, ref_logps=ref,
                  old_logps=old if self.steps_per_rollout > 1 else None, index=r)
        ro["tokens"] = float(D.all_reduce_sum(mask.sum().float(), self.dist))
        ro["stats"] = self.rollout_stats(rewards, per_fn, completions, truncated, extra)
        return ro

    def rollout_stats(self, rewards, per_fn, completions, truncated, extra) -> dict:
        """Rollout metrics over every process: reward mean / std (and per function), the share of
        groups whose rewards are all equal (no signal), completion length, the share truncated."""
        G = self.cfg.num_generations
        everyone = _gather(rewards, self.dist)
        groups = everyone.view(-1, G)
        lengths = torch.tensor([float(len(c)) for c in completions], device=self.device)
        sums = D.all_reduce_sum(torch.stack([lengths.sum(), truncated.float().sum(),
                                             torch.tensor(float(len(completions)), device=self.device)]), self.dist)
        stats = {"reward": torch.nanmean(everyone).item(),
                 "reward_std": float(torch.std(everyone[~torch.isnan(everyone)])) if everyone.numel() > 1 else 0.0,
                 "frac_reward_zero_std": float((groups.amax(1) - groups.amin(1) == 0).float().mean()),
                 "completion_length": (sums[0] / sums[2]).item(), "clipped_ratio": (sums[1] / sums[2]).item()}
        names = [r.name.rsplit(":", 1)[-1] for r in self.rewards] + (["reward_model"] if self.reward_model else [])
        all_fn = _gather(per_fn, self.dist)
        for j, name in enumerate(names):
            stats[f"rewards/{name}"] = torch.nanmean(all_fn[:, j]).item()
        stats.update(extra)
        return stats

    # -- one optimizer step ----------------------------------------------------------------------
    def step_units(self) -> torch.Tensor:
        """The normalizer of one optimizer step over every process, such that the loss is TRL's."""
        cfg = self.cfg
        if cfg.loss_type in ("dapo", "cispo"):  # tokens of the rollout, scaled to one step (TRL's num_items)
            tokens = max(self.rollout["tokens"], 1.0)  # every completion masked (truncated): no loss, no NaN
            return torch.tensor(tokens * cfg.grad_accum / self.micro_per_rollout, device=self.device)
        if cfg.loss_type == "bnpo":  # each micro-batch's token mean, averaged
            return torch.tensor(float(cfg.grad_accum * self.dist.world), device=self.device)
        rows = cfg.batch_size * cfg.num_generations * cfg.grad_accum * self.dist.world
        return torch.tensor(float(rows), device=self.device)

    def loss(self, model, batch):
        """(the micro-batch's loss in sum form, {metric: value}) through the fused GRPO loss."""
        cfg = self.cfg
        sums = cfg.loss_type in ("dapo", "cispo")

        def head_loss(hidden, targets, head):
            return fused_grpo_loss(
                hidden, head["weight"], targets, batch["advantages"], batch.get("old_logps"), batch.get("ref_logps"),
                loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                bias=head["bias"], temperature=cfg.temperature, delta=cfg.delta,
                importance_sampling_level=cfg.importance_sampling_level,
                max_completion_length=cfg.max_completion_length, num_items_in_batch=1 if sums else None,
                top_entropy_quantile=cfg.top_entropy_quantile, return_entropy=True, lora_A=head["lora_A"],
                lora_B=head["lora_B"], lora_scaling=head["lora_scaling"])
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=head_loss,
                    shared_prompts=self.shared_prompts(batch))["head_loss"]
        rows = batch["input_ids"].shape[0]
        loss = out.loss * (1.0 if cfg.loss_type in ("bnpo", "dapo", "cispo") else rows)
        return loss, self.loss_metrics(out, batch)

    def loss_metrics(self, out, batch) -> dict:
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
        metrics = {"clip_ratio": out.clip_ratio_region, "clip_ratio_low": out.clip_ratio_low,
                   "clip_ratio_high": out.clip_ratio_high,
                   "entropy": (out.entropy * mask).sum() / mask.sum().clamp(min=1.0)}
        if out.kl is not None:
            metrics["kl"] = out.kl
        return metrics

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        r, _, s = self._position(step)
        if self.rollout is None or self.rollout["index"] != r:
            self.rollout = self.make_rollout(r)
        ro = self.rollout
        ro["next_step"] = step + 1
        rows = cfg.batch_size * cfg.num_generations
        first = s * cfg.grad_accum * rows
        total = self.step_units()
        parts = [slice(first + m * rows, first + (m + 1) * rows) for m in range(cfg.grad_accum)]
        batches = [{k: (ro[k][part] if ro.get(k) is not None else None) for k in self.TENSORS} for part in parts]
        loss_sum, metric_sums = self.accumulate(batches, self.dist.world / total)
        # the loop divides metric sums by ``total``: hand it the mean over micro-batches times total
        per = total / (cfg.grad_accum * self.dist.world)
        record = self.finish_step(loss_sum, {k: v * per for k, v in metric_sums.items()}, total)
        record.update(ro["stats"])
        return record

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Mean rewards (weighted, and per function) of greedy completions to the held-out prompts."""
        if not self.eval_examples:
            return {}
        settings = DecodingSettings(max_new_tokens=self.cfg.max_completion_length).check()
        totals, per_totals, count = 0.0, None, 0
        for i in range(0, len(self.eval_examples), 32):
            examples = self.eval_examples[i:i + 32]
            completions, _, _ = self.sample([e["prompt_ids"] for e in examples], settings)
            seqs = [{"input_ids": e["prompt_ids"] + c, "labels": [IGNORE_INDEX] * (len(e["prompt_ids"]) + len(c))}
                    for e, c in zip(examples, completions)]
            batch = {k: v.to(self.device) for k, v in pad_batch(seqs, self.pad).items()}
            rewards, per_fn = self.score(examples, completions, batch)
            totals += float(torch.nansum(rewards))
            part = torch.nansum(per_fn, dim=0)
            per_totals = part if per_totals is None else per_totals + part
            count += len(examples)
        names = [r.name.rsplit(":", 1)[-1] for r in self.rewards] + (["reward_model"] if self.reward_model else [])
        out = {"reward": totals / max(count, 1)}
        out.update({f"rewards/{n}": float(v) / max(count, 1) for n, v in zip(names, per_totals.tolist())})
        return out


class RLOOTrainer(GRPOTrainer):
    """``peftkern rloo``: TRL 1.16's RLOO: leave-one-out baseline over the G completions of a prompt,
    one importance ratio per completion from its summed log-probs, the clipped surrogate, and the KL
    to the reference (beta, k1 on the sampled tokens) subtracted from the reward."""

    kind = "rloo"

    def check_settings(self) -> None:
        cfg = self.cfg
        check_grpo_args("peftkern rloo", "grpo", "sequence", cfg.epsilon, cfg.epsilon_high, None, cfg.beta)

    def advantages(self, rewards, old_logps, ref_logps, mask):
        extra = {}
        if self.cfg.beta:
            kl = ((old_logps - ref_logps) * mask).sum(-1)
            rewards = rewards - self.cfg.beta * kl
            stats = D.all_reduce_sum(torch.stack([((old_logps - ref_logps) * mask).sum(), mask.sum().float()]),
                                     self.dist)
            extra["kl"] = (stats[0] / stats[1].clamp(min=1.0)).item()
        everyone = _gather(rewards, self.dist)
        mine = slice(self.dist.rank * rewards.numel(), (self.dist.rank + 1) * rewards.numel())
        return rloo_advantages(everyone, self.cfg.num_generations, self.cfg.normalize_advantages)[mine], extra

    def make_rollout(self, r: int) -> dict:
        ro = super().make_rollout(r)
        if ro["old_logps"] is not None:  # RLOO's ratio is per sequence: the summed old log-probs
            ro["old_logps"] = ro["old_logps"].sum(-1)
        return ro

    def step_units(self) -> torch.Tensor:
        cfg = self.cfg
        return torch.tensor(float(cfg.batch_size * cfg.num_generations * cfg.grad_accum * self.dist.world),
                            device=self.device)

    def loss(self, model, batch):
        cfg = self.cfg

        def head_loss(hidden, targets, head):
            return fused_rloo_loss(hidden, head["weight"], targets, batch["advantages"], batch.get("old_logps"),
                                   epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, bias=head["bias"],
                                   temperature=cfg.temperature, scale=1.0, return_entropy=True,
                                   lora_A=head["lora_A"], lora_B=head["lora_B"], lora_scaling=head["lora_scaling"])
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=head_loss,
                    shared_prompts=self.shared_prompts(batch))["head_loss"]
        return out.loss, self.loss_metrics(out, batch)
