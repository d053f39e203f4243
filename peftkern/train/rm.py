"""Reward model: a scalar head on the last token, trained on pairs (``prompt``/``chosen``/``rejected``,
with an optional per-pair ``margin``) and K-way rankings (``prompt``/``completions``/``ranking``) with
the all-pairs Bradley-Terry or the Plackett-Luce loss (``--rank-loss``; on a pair both are the
Bradley-Terry loss); pairwise accuracy as the metric.

``--ensemble N``: N score heads over the one body, head h trained on its own bootstrap sample of the
records (each record weighted by how often a draw of n with replacement picked it for h). The saved
``reward_model/`` then scores with every head; :class:`peftkern.train.reward_ensemble.RewardModel`
combines them and measures their disagreement.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from peftkern.losses.ranking import pairwise_accuracy, rank_loss
from peftkern.train.calibration import read_temperature
from peftkern.train.data import encode_pair, encode_prompt_completion, encode_sequence, load_records, pad_batch
from peftkern.train.loop import Trainer
from peftkern.train.errors import ConfigError
from peftkern.train.reward_ensemble import ENSEMBLE_FILE, RewardModel, disagreement, scores_by_adapter
from peftkern.tuners import load_adapter

SCORE_HEAD_FILE = "score_head.safetensors"


def rm_examples(tokenizer, source, cfg) -> list[dict]:
    """``{"ranked": [sequence, ...] best first, "margin", "index", "where"}`` per record: a pair is a
    ranking of two (chosen, rejected); a ranking record's completions in its ``ranking`` order."""
    out = []
    for i, rec in enumerate(load_records(source, "rm")):
        d = rec.data
        if "completions" in d:
            seqs = [encode_sequence(*encode_prompt_completion(tokenizer, d["prompt"], c, rec.where), cfg.max_length)
                    for c in d["completions"]]
            ranked, margin = [seqs[j] for j in d["ranking"]], 0.0
        else:
            pair = encode_pair(tokenizer, rec, cfg.max_length)
            ranked, margin = [pair["chosen"], pair["rejected"]], float(d.get("margin", 0.0))
        out.append({"ranked": ranked, "margin": margin, "index": i, "where": rec.where})
    return out


def collate_rankings(examples: list[dict], pad_id: int) -> dict:
    """Every list's sequences padded together as rows [R, T] (list after list, best first), plus
    ``slots`` [B, K] (each list's rows; K the longest list), ``slot_mask`` [B, K] bool, ``margin`` [B]
    fp32 and ``boot`` [B, N] fp32 (bootstrap weights of an ensemble's heads; 1 without them)."""
    rows, slots = [], []
    for e in examples:
        slots.append(list(range(len(rows), len(rows) + len(e["ranked"]))))
        rows += e["ranked"]
    batch = pad_batch(rows, pad_id)
    k = max(len(s) for s in slots)
    batch["slots"] = torch.tensor([s + [0] * (k - len(s)) for s in slots], dtype=torch.long)
    batch["slot_mask"] = torch.tensor([[True] * len(s) + [False] * (k - len(s)) for s in slots])
    batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    heads = max(len(e.get("boot", [1.0])) for e in examples)
    batch["boot"] = torch.tensor([e.get("boot", [1.0] * heads) for e in examples], dtype=torch.float32)
    return batch


def bootstrap_counts(n: int, heads: int, seed: int) -> torch.Tensor:
    """[n, heads] fp32: how many times each of n records is drawn in head h's bootstrap sample (n draws
    with replacement, from a generator seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (heads, n), generator=gen)
    return torch.stack([torch.bincount(d, minlength=n) for d in draws], dim=1).float()


class RewardTrainer(Trainer):
    kind = "rm"

    def before_train(self):
        # --calibrate-on's records are read now: a bad file fails before training, not after it
        self.calibration_examples = (rm_examples(self.tokenizer, self.cfg.calibrate_on, self.cfg)
                                     if self.cfg.calibrate_on else None)
        heads = self.module.score_head.out_features
        self.adapters = add_member_adapters(self.module.lm, heads) if self.cfg.ensemble_adapters else None
        if heads > 1:  # each train record remembers its weight in every head's bootstrap sample
            counts = bootstrap_counts(len(self.train_examples), heads, self.cfg.seed * 7919 + 17)
            for e, c in zip(self.train_examples, counts.tolist()):
                e["boot"] = c

    def collate(self, examples):
        return collate_rankings(examples, self.tokenizer.pad_token_id)

    def units(self, batch):
        return torch.tensor(float(batch["slots"].shape[0]))

    def _ranked(self, model, batch) -> torch.Tensor:
        """[B, K, N] the heads' scores of each list's completions, best first."""
        if self.adapters:
            scores = scores_by_adapter(model, batch["input_ids"], batch["attention_mask"], self.adapters)
        else:
            scores = model(batch["input_ids"], batch["attention_mask"])["scores"]
            scores = scores.reshape(scores.shape[0], -1)  # [R, N]
        return scores[batch["slots"]]

    def _terms(self, ranked: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss summed over the lists and averaged over the heads, weighted by the bootstrap counts;
        metric sums) from ranked [B, K, N]."""
        b, k, n = ranked.shape
        per_head = ranked.permute(0, 2, 1).reshape(b * n, k)
        mask = batch["slot_mask"].repeat_interleave(n, dim=0)
        losses = rank_loss(per_head, mask, batch["margin"].repeat_interleave(n), self.cfg.rank_loss,
                           reduction="none").reshape(b, n)
        loss = (losses * batch["boot"].to(losses.dtype)).sum() / n
        mean = ranked.float().mean(-1)
        last = batch["slot_mask"].sum(-1) - 1
        rows = torch.arange(b, device=ranked.device)
        metrics = {"accuracy": pairwise_accuracy(mean, batch["slot_mask"]).sum(),
                   "margin": (mean[:, 0] - mean[rows, last]).sum()}
        if n > 1:
            metrics["disagreement"] = (disagreement(ranked.float().reshape(b * k, n)).reshape(b, k)
                                       * batch["slot_mask"]).sum(-1).div(last + 1).sum()
            metrics["head_loss"] = losses.detach().mean(-1).sum()
        return loss, metrics

    def loss(self, model, batch):
        loss, metrics = self._terms(self._ranked(model, batch), batch)
        return loss, {k: v.detach() for k, v in metrics.items()}

    def evaluate(self):
        """Mean over the held-out lists of the loss (every head, unweighted), pairwise accuracy and margin
        (best minus worst score) of the heads' mean score, and the heads' disagreement."""
        n, bs = len(self.eval_examples), self.cfg.batch_size
        sums: dict[str, float] = {}
        for i in range(0, n, bs):
            batch = self.to_device(self.collate([{k: v for k, v in e.items() if k != "boot"}
                                                 for e in self.eval_examples[i:i + bs]]))
            loss, metrics = self._terms(self._ranked(self.module, batch), batch)
            for key, value in {"loss": loss, **metrics}.items():
                if key != "head_loss":
                    sums[key] = sums.get(key, 0.0) + float(value)
        return {k: v / max(n, 1) for k, v in sums.items()}

    def save_outputs(self, summary):
        """Besides the adapter and metrics: ``reward_model/`` (the LM with adapters merged, the score
        head(s) and the tokenizer), which ``peftkern ppo|grpo|rloo --reward-model`` load; with
        ``--calibrate-on``, its temperature fitted on that data (``calibration.json``, ``reliability.png``,
        and ``summary["calibration"]``)."""
        path = os.path.join(self.cfg.out, "reward_model")
        save_reward_model(self.module, path, self.tokenizer, getattr(self, "adapters", None))
        examples = getattr(self, "calibration_examples", None)
        if examples is not None and self.dist.main:
            summary["calibration"] = calibrate_saved(path, examples, self.tokenizer.pad_token_id, self.cfg.calibrate_on,
                                                     batch_size=self.cfg.batch_size, device=self.device)
        super().save_outputs(summary)


def add_member_adapters(lm, members: int) -> list[str]:
    """``--ensemble-adapters``: N - 1 more adapters like ``lm``'s "default" (fresh initialisations), every
    one active and trainable; their names in head order."""
    names = ["default"] + [f"member{h}" for h in range(1, members)]
    for name in names[1:]:
        lm.add_adapter(name, copy.deepcopy(lm.peft_config["default"]))
    lm.set_adapter(names)
    return names


def save_reward_model(module, out_dir: str, tokenizer=None, adapters: list[str] | None = None) -> None:
    """``out_dir``: the LM (adapters merged) as transformers writes it, ``score_head.safetensors`` (weight
    [N, H], bias [N]) and the tokenizer when given; written atomically. With ``adapters`` (one per head)
    the LM is the base without them and the adapters go to ``adapters/`` (PEFT's files: "default" there,
    the others in ``adapters/<name>``), named in ``ensemble.json``."""
    from safetensors.torch import save_file

    from peftkern.train.adapters import merge
    from peftkern.train.checkpoint import atomic_dir
    from peftkern.train.model import base_causal_lm
    from peftkern.tuners import save_adapter

    head = module.score_head
    with atomic_dir(out_dir) as tmp:
        if adapters:
            save_adapter(module.lm, os.path.join(tmp, "adapters"))
            lm = copy.deepcopy(module.lm).unload()
            with open(os.path.join(tmp, ENSEMBLE_FILE), "w") as f:
                json.dump({"adapters": adapters}, f)
        else:
            lm = base_causal_lm(merge(copy.deepcopy(module.lm)))
        lm.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  os.path.join(tmp, SCORE_HEAD_FILE))


def load_scorer(path: str):
    """(LMWithHeads with the saved score head(s), in eval mode) from a ``reward_model/`` directory, the
    raw scores: no temperature."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftkern.train.model import LMWithHeads

    head_path = os.path.join(path, SCORE_HEAD_FILE)
    if not os.path.isfile(head_path):
        raise FileNotFoundError(f"{path}: not a reward model directory (no {SCORE_HEAD_FILE}); "
                                "train one with 'peftkern rm'")
    state = load_file(head_path)
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or weight.dim() != 2 or bias.shape != weight.shape[:1]:
        raise ConfigError(f"{head_path}: expected 'weight' [N, H] and 'bias' [N], got "
                          f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapters = member_adapters(path)
    if adapters:
        if len(adapters) != weight.shape[0]:
            raise ConfigError(f"{os.path.join(path, ENSEMBLE_FILE)}: {len(adapters)} adapters for {weight.shape[0]} "
                              "heads")
        for name in adapters:
            folder = os.path.join(path, "adapters", "" if name == "default" else name)
            lm = load_adapter(lm, folder, adapter_name=name)
        lm.set_adapter(adapters)
    model = LMWithHeads(lm, score_head=weight.shape[0])
    if model.score_head.in_features != weight.shape[1]:
        raise ConfigError(f"{head_path}: the head reads {weight.shape[1]} features; the model in {path} has "
                          f"{model.score_head.in_features}")
    with torch.no_grad():
        model.score_head.weight.copy_(weight)
        model.score_head.bias.copy_(bias)
    return model.eval().requires_grad_(False)


def load_reward_model(path: str, aggregate: str = "mean", std_coef: float = 1.0,
                      calibrated: bool = True) -> RewardModel:
    """The reward model in a ``reward_model/`` directory as a :class:`RewardModel` (eval mode): its heads'
    scores over the temperature of its ``calibration.json`` (1 when absent, or ``calibrated=False``),
    combined by ``aggregate``; ``out["scores"]`` [B] is the reward."""
    temperature = read_temperature(path) if calibrated else 1.0
    return RewardModel(load_scorer(path), temperature, aggregate, std_coef, where=path,
                       adapters=member_adapters(path)).eval()


def member_adapters(path: str) -> list[str] | None:
    """The adapter names (head order) of a reward model of N adapters (``ensemble.json``), else None."""
    file = os.path.join(path, ENSEMBLE_FILE)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            names = json.load(f)["adapters"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{file}: not an ensemble file written by 'peftkern rm' ({exc})") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{file}: 'adapters' must be a non-empty list of adapter names, got {names!r}")
    return names


@torch.no_grad()
def pair_margins(model: RewardModel, examples: list[dict], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """[P] fp64: for every pair a list implies (i ranked above j), the reward s_i - s_j of ``model``
    (its aggregated score; :func:`rm_examples`' lists)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_rankings(examples[i:i + batch_size], pad_id)
        scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))["scores"].double().cpu()
        ranked, mask = scores[batch["slots"]], batch["slot_mask"]
        k = ranked.shape[1]
        pairs = torch.ones(k, k, dtype=torch.bool).triu(1) & mask[:, :, None] & mask[:, None, :]
        out.append((ranked[:, :, None] - ranked[:, None, :])[pairs])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def calibrate_saved(path: str, examples: list[dict], pad_id: int, data: str, plot: str | None = None, bins: int = 10,
                    batch_size: int = 16, save: bool = True, device=None) -> dict:
    """Fit the temperature of the reward model saved in ``path`` on ``examples`` (:func:`rm_examples` of the
    file ``data``), draw the reliability PNG (default ``path/reliability.png``) and (``save``) write
    ``calibration.json``; returns the record (``peftkern.train.calibration.calibrate``'s, plus ``data``
    and ``plot``)."""
    from peftkern.train.calibration import calibrate, plot_reliability, write_calibration

    model = load_reward_model(path, calibrated=False)
    if device is not None:
        model = model.to(device)
    margins = pair_margins(model, examples, pad_id, batch_size)
    record = {**calibrate(margins, bins), "data": os.path.abspath(data)}
    name = os.path.basename(os.path.normpath(path))
    record["plot"] = plot_reliability(margins, record["temperature"], plot or os.path.join(path, "reliability.png"),
                                      bins, title=f"{name} on {os.path.basename(data)}")
    if save:
        write_calibration(path, record)
    return record
