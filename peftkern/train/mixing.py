"""Multi-task mixing and rehearsal for SFT: which examples fill each optimizer step's global batch.

``--data a.jsonl:0.5,b.jsonl:0.5`` trains on several tasks at once, each slot of a batch drawn
from task i with probability p_i proportional to w_i^(1/T) (weights after the colon; without
them, to the task's size n_i^(1/T): T = 1 samples in proportion to size, a large T evenly;
``--mix-temperature T``). ``--rehearsal-data FILE --rehearsal-ratio r`` replaces a share r of every
global batch with replayed examples: plain text (``{"text": ...}``, the LM loss on every token)
or records of an earlier task (any SFT format).

Everything is a function of (seed, step): step s's tasks come from a generator seeded with
(seed, s); each task (and the replay set) is read in its own seeded order, one permutation per pass
over it, from a cursor that counts what earlier steps took; the replay count per step is
floor((s + 1) r G) - floor(s r G) for a global batch of G, so the long-run share is exactly r.
A resumed run rebuilds the cursors from the checkpoint's step, so it sees exactly the examples the
uninterrupted run would have (``cursors(step)`` gives them; they are saved in the checkpoint state).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from peftkern.train.data import IGNORE_INDEX, Record, encode_sft, read_jsonl
from peftkern.train.errors import ConfigError, DataError

REHEARSAL = "rehearsal"


@dataclass(frozen=True)
class DataSource:
    """One entry of ``--data``: a path and its weight (None: not given)."""

    path: str
    weight: float | None


def parse_data_spec(spec: str, flag: str = "--data") -> list[DataSource]:
    """``"a.jsonl:0.5,b.jsonl:0.5"`` or ``"a.jsonl,b.jsonl"`` or ``"a.jsonl"`` -> sources. Weights are
    all given or none, each > 0; paths are not checked here."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{flag}: expected FILE or FILE:WEIGHT,FILE:WEIGHT, got {spec!r}")
    sources = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"{flag} {spec}: an empty entry between commas")
        path, weight = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            else:
                path = head
                if not math.isfinite(weight) or weight <= 0:
                    raise ConfigError(f"{flag} {spec}: the weight of {path} must be a number > 0, got {tail!r}")
        sources.append(DataSource(path, weight))
    given = [s.weight is not None for s in sources]
    if any(given) and not all(given):
        raise ConfigError(f"{flag} {spec}: give a weight to every file or to none")
    names = [task_name(s.path) for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {spec}: two files share the task name {sorted(n for n in names if names.count(n) > 1)[0]!r} "
                          "(a task is named after its file)")
    return sources


def task_name(path: str) -> str:
    """A task's name in logs: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0] or path


def is_mixture(cfg) -> bool:
    """Whether ``cfg`` asks for more than plain single-file SFT data: several files, a weight, or
    rehearsal."""
    if cfg.rehearsal_data:
        return True
    if not isinstance(cfg.data, str):
        return False
    sources = parse_data_spec(cfg.data)
    return len(sources) > 1 or sources[0].weight is not None


def task_probabilities(sizes: list[int], weights: list[float | None], temperature: float) -> list[float]:
    """p_i proportional to (w_i or n_i)^(1/T)."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"mix_temperature must be a finite number > 0, got {temperature}")
    base = [w if w is not None else float(n) for w, n in zip(weights, sizes)]
    scaled = [b ** (1.0 / temperature) for b in base]
    total = sum(scaled)
    return [s / total for s in scaled]


def encode_replay(tokenizer, rec: Record, max_length: int, completion_only: bool) -> dict:
    """A replay example: ``{"text": ...}`` -> the LM loss on every token (BOS/EOS as the tokenizer
    adds them); an SFT record -> :func:`encode_sft`."""
    if "text" in rec.data:
        text = rec.data["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{rec.where}: 'text' must be a non-empty string")
        ids = list(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_length]
        if len(ids) < 2:
            raise DataError(f"{rec.where}: 'text' gives fewer than 2 tokens to learn from")
        return {"input_ids": ids, "labels": list(ids)}
    return encode_sft(tokenizer, rec, max_length, completion_only)


def load_replay(tokenizer, path: str, cfg) -> list[dict]:
    """The replay examples of ``--rehearsal-data``, tagged ``task="rehearsal"``."""
    from peftkern.train.data import check_record

    examples = []
    for rec in read_jsonl(path):
        if "text" not in rec.data:
            check_record(rec, "sft")
        ex = encode_replay(tokenizer, rec, cfg.max_length, cfg.completion_only)
        ex["task"] = REHEARSAL
        ex["where"] = rec.where
        examples.append(ex)
    return examples


class MixedSampler:
    """Fills each optimizer step's global batch from several tasks and a replay set.

    ``tasks``: {name: examples}; ``probabilities``: {name: p}; ``replay``: examples or None;
    ``ratio``: the replay share of each global batch; ``global_batch``: examples per step over every
    process. ``global_examples(step)`` lists the step's examples, deterministic in (seed, step).
    """

    def __init__(self, tasks: dict[str, list], probabilities: dict[str, float], replay: list | None, ratio: float,
                 global_batch: int, seed: int):
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"rehearsal_ratio must be in [0, 1), got {ratio}")
        if ratio > 0 and not replay:
            raise ConfigError("rehearsal_ratio > 0 needs --rehearsal-data")
        self.tasks = {name: list(examples) for name, examples in tasks.items()}
        for name, examples in self.tasks.items():
            if not examples:
                raise ConfigError(f"task {name!r} has no examples")
        self.names = list(self.tasks)
        self.p = torch.tensor([probabilities[n] for n in self.names], dtype=torch.float64)
        self.replay = list(replay or [])
        self.ratio = float(ratio)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.next_step = 0  # the step after the last one handed out (what a checkpoint resumes at)
        self._cursor_cache: dict[int, dict[str, int]] = {0: {n: 0 for n in self.names + [REHEARSAL]}}
        self._orders: dict[tuple[str, int], list[int]] = {}

    # -- how many of each per step -----------------------------------------------------------------
    def replay_count(self, step: int) -> int:
        g = self.global_batch
        return math.floor((step + 1) * self.ratio * g) - math.floor(step * self.ratio * g)

    def task_draws(self, step: int) -> list[str]:
        """The task of each non-replay slot of ``step``, in slot order."""
        n = self.global_batch - self.replay_count(step)
        if len(self.names) == 1:
            return [self.names[0]] * n
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 17)
        picks = torch.multinomial(self.p, n, replacement=True, generator=gen).tolist()
        return [self.names[i] for i in picks]

    def cursors(self, step: int) -> dict[str, int]:
        """How many examples of each task (and of the replay set) steps 0 .. step-1 took."""
        known = max(s for s in self._cursor_cache if s <= step)
        cur = dict(self._cursor_cache[known])
        for s in range(known, step):
            for name in self.task_draws(s):
                cur[name] += 1
            cur[REHEARSAL] += self.replay_count(s)
            if (s + 1) % 256 == 0:
                self._cursor_cache[s + 1] = dict(cur)
        self._cursor_cache[step] = dict(cur)
        return cur

    def _take(self, name: str, examples: list, start: int, count: int) -> list:
        """Examples ``start`` .. ``start + count`` of ``name``'s stream: one seeded permutation per pass."""
        n = len(examples)
        out, tag = [], sum(name.encode())
        for k in range(start, start + count):
            epoch, pos = divmod(k, n)
            order = self._order(name, tag, epoch, n)
            out.append(examples[order[pos]])
        return out

    def _order(self, name: str, tag: int, epoch: int, n: int) -> list[int]:
        key = (name, epoch)
        if key not in self._orders:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * tag + epoch)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != name or k[1] >= epoch - 1}
            self._orders[key] = torch.randperm(n, generator=gen).tolist()
        return self._orders[key]

    def global_examples(self, step: int) -> list:
        """Step ``step``'s global batch: its task draws, then its replay examples, shuffled together
        (so micro-batches and processes get a mix)."""
        cur = self.cursors(step)
        draws = self.task_draws(step)
        out = []
        for name in self.names:
            count = draws.count(name)
            out += self._take(name, self.tasks[name], cur[name], count)
        if self.replay:
            out += self._take(REHEARSAL, self.replay, cur[REHEARSAL], self.replay_count(step))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * step + 31)
        self.next_step = step + 1
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]

    def micro_batches(self, step: int, rank: int, batch_size: int, grad_accum: int) -> list[list]:
        """This process's micro-batches of ``step`` (as the loop cuts a global batch)."""
        mine = self.global_examples(step)[rank * batch_size * grad_accum:(rank + 1) * batch_size * grad_accum]
        return [mine[m * batch_size:(m + 1) * batch_size] for m in range(grad_accum)]


# -- per-task losses ----------------------------------------------------------------------------------

def task_metric_sums(per_example_nll: torch.Tensor, per_example_tokens: torch.Tensor, tasks: list[str]) -> dict:
    """{"task_nll/<t>": sum NLL, "task_tokens/<t>": token count} over a micro-batch's rows of each task."""
    out = {}
    for name in sorted(set(tasks)):
        rows = torch.tensor([t == name for t in tasks], device=per_example_nll.device)
        out[f"task_nll/{name}"] = per_example_nll[rows].sum()
        out[f"task_tokens/{name}"] = per_example_tokens[rows].sum().float()
    return out


def add_task_means(record: dict) -> dict:
    """Per-task mean losses ``loss/<t>`` from the step's ``task_nll/<t>`` and ``task_tokens/<t>``
    (each the same fraction of the step's tokens, so their ratio is the task's mean)."""
    for key in [k for k in record if k.startswith("task_tokens/")]:
        name = key.split("/", 1)[1]
        tokens, nll = record[key], record.get(f"task_nll/{name}")
        if nll is not None and tokens:
            record[f"loss/{name}"] = nll / tokens
    return record


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Label tokens per row of a [B, T] labels tensor (the shifted positions SFT scores)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


# -- building it for a run ------------------------------------------------------------------------------

def tagged(examples: list[dict], name: str) -> list[dict]:
    return [dict(e, task=name) for e in examples]


def task_examples(tokenizer, spec: str | None, default, cfg, make_examples, flag: str = "--data"):
    """({task: tagged examples}, {task: weight or None}) of ``spec`` (``--data`` / ``--eval-data``), or of
    ``default`` (the bundled records) as one task "train" when ``spec`` is None."""
    if spec is None:
        return {"train": tagged(make_examples(tokenizer, default, cfg), "train")}, {"train": None}
    tasks, weights = {}, {}
    for source in parse_data_spec(spec, flag):
        name = task_name(source.path)
        tasks[name] = tagged(make_examples(tokenizer, source.path, cfg), name)
        weights[name] = source.weight
    return tasks, weights


def attach_mixture(trainer, tokenizer, cfg, default_train, make_examples) -> None:
    """Give an SFT trainer its mixed data: the tasks' examples (what an epoch counts) and a
    :class:`MixedSampler` that fills every step, replay included."""
    tasks, weights = task_examples(tokenizer, cfg.data, default_train, cfg, make_examples)
    probs = task_probabilities([len(tasks[n]) for n in tasks], [weights[n] for n in tasks], cfg.mix_temperature)
    replay = load_replay(tokenizer, cfg.rehearsal_data, cfg) if cfg.rehearsal_data else None
    trainer.train_examples = [e for examples in tasks.values() for e in examples]
    trainer.sampler = MixedSampler(tasks, dict(zip(tasks, probs)), replay, cfg.rehearsal_ratio if replay else 0.0,
                                   trainer.global_batch, cfg.seed)
