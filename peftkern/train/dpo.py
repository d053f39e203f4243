"""Direct preference optimisation: every loss type of TRL 1.16's DPOTrainer (``peftkern.losses.dpo_loss``'s,
``sft`` and ``sigmoid_norm``), several at once with ``--loss-weights``, LD-DPO's ``--ld-alpha``; the
reference log-probs computed once and cached.

As TRL, ``ipo`` and ``sigmoid_norm`` divide the log-ratios by the completion lengths (the cache holds
sums; they are divided per pair), and ``--ld-alpha`` weights the tokens past the shorter completion of a
pair (the reference's shared-span sums are cached beside the full ones: a causal LM's log-probs of the
first tokens do not depend on the later ones).
"""
from __future__ import annotations

import torch

from peftkern.losses.dpo import DPO_LOSS_TYPES, SEPARABLE_DPO_LOSS_TYPES
from peftkern.losses.dpo_mix import fused_dpo_mix_loss, ld_token_weights
from peftkern.train.config import parse_floats, resolve_kind_defaults, split_list
from peftkern.train.data import IGNORE_INDEX, encode_pair, load_records, pad_batch
from peftkern.train.errors import ConfigError
from peftkern.train.init_adapter import write_pending_base
from peftkern.train.loop import Trainer
from peftkern.train.objectives import dpo_head_loss
from peftkern.train.reference import cached_reference_logps


def pair_examples(tokenizer, source, cfg) -> list[dict]:
    """``{"chosen", "rejected", "index"}`` per record of a DPO data source (the reward model's records:
    ``peftkern.train.rm.rm_examples``)."""
    out = []
    for i, rec in enumerate(load_records(source, "dpo")):
        ex = encode_pair(tokenizer, rec, cfg.max_length)
        ex["index"] = i
        out.append(ex)
    return out


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows, padded together: [2B, T], plus ``index`` [B]."""
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    batch = pad_batch(rows, pad_id)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when chosen's implicit reward is higher, 0 when lower, 1/2 on a tie (as at the start,
    where the policy is its reference)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def shared_span(pair: dict) -> tuple[dict, dict]:
    """The pair's sequences with labels only on the first min(chosen, rejected) completion tokens."""
    out = []
    n = min(sum(t != IGNORE_INDEX for t in pair[k]["labels"][1:]) for k in ("chosen", "rejected"))
    for k in ("chosen", "rejected"):
        seen, labels = 0, [IGNORE_INDEX]
        for t in pair[k]["labels"][1:]:
            keep = t != IGNORE_INDEX and seen < n
            seen += t != IGNORE_INDEX
            labels.append(t if keep else IGNORE_INDEX)
        out.append({"input_ids": pair[k]["input_ids"], "labels": labels[:len(pair[k]["labels"])]})
    return out[0], out[1]


def dpo_settings(cfg) -> tuple[list[str], list[float]]:
    """(loss types, weights) of ``--loss-type a,b --loss-weights x,y``, checked."""
    types = split_list(cfg.loss_type) or ["sigmoid"]
    weights = parse_floats(cfg.loss_weights, "loss_weights") or [1.0] * len(types)
    if len(weights) != len(types):
        raise ConfigError(f"--loss-weights has {len(weights)} values for {len(types)} loss types ({cfg.loss_type})")
    known = DPO_LOSS_TYPES + ("sft", "sigmoid_norm")
    for t in types:
        if t not in known:
            raise ConfigError(f"--loss-type {t!r}: choose from {', '.join(known)}")
    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must be in [0, 1], got {cfg.ld_alpha}")
    return types, weights


class DPOTrainer(Trainer):
    kind = "dpo"

    def __init__(self, cfg, model, tokenizer, train_examples, eval_examples=None, callbacks=(),
                 base_model_path=None):
        resolve_kind_defaults(cfg, self.kind)
        super().__init__(cfg, model, tokenizer, train_examples, eval_examples, callbacks, base_model_path)
        self.loss_types, self.loss_weights = dpo_settings(cfg)
        # one plain separable type: the fused DPO loss; anything else: TRL's mixture in one pass
        self.plain = (len(self.loss_types) == 1 and self.loss_types[0] in SEPARABLE_DPO_LOSS_TYPES
                      and self.loss_types[0] != "ipo" and self.loss_weights == [1.0] and cfg.ld_alpha is None)

    def before_train(self):
        write_pending_base(self)
        pad = self.tokenizer.pad_token_id
        groups = {}
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            groups[f"{split}_chosen"] = [e["chosen"] for e in examples]
            groups[f"{split}_rejected"] = [e["rejected"] for e in examples]
            if self.cfg.ld_alpha is not None:
                spans = [shared_span(e) for e in examples]
                groups[f"{split}_chosen_shared"] = [c for c, _ in spans]
                groups[f"{split}_rejected_shared"] = [r for _, r in spans]
        groups = {k: v for k, v in groups.items() if v}
        ref = cached_reference_logps(self.module, groups, pad, self.device, self.cfg.out, write=self.dist.main)
        self.ref = {k: v.to(self.device) for k, v in ref.items()}  # indexed on the device: no host sync per batch

    def collate(self, examples):
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def units(self, batch):
        return torch.tensor(float(batch["index"].numel()))

    def reference(self, split: str, side: str, idx: torch.Tensor) -> torch.Tensor:
        """The reference's sequence log-probs of the pairs ``idx`` (LD-DPO: shared + alpha x tail)."""
        full = self.ref[f"{split}_{side}"][idx]
        if self.cfg.ld_alpha is None:
            return full
        shared = self.ref[f"{split}_{side}_shared"][idx]
        return shared + self.cfg.ld_alpha * (full - shared)

    def _mix_head_loss(self, ref_chosen, ref_rejected):
        cfg = self.cfg

        def head_loss(hidden, targets, head):
            weights = ld_token_weights(targets, cfg.ld_alpha) if cfg.ld_alpha is not None else None
            loss, chosen_rewards, rejected_rewards = fused_dpo_mix_loss(
                hidden, head["weight"], targets, ref_chosen, ref_rejected, cfg.beta, self.loss_types,
                self.loss_weights, cfg.label_smoothing, bias=head["bias"], token_weights=weights, reduction="sum",
                lora_A=head["lora_A"], lora_B=head["lora_B"], lora_scaling=head["lora_scaling"])
            seq = torch.cat([chosen_rewards / cfg.beta + ref_chosen.float(),
                             rejected_rewards / cfg.beta + ref_rejected.float()])
            return loss, chosen_rewards, rejected_rewards, seq
        return head_loss

    def _pair_terms(self, model, batch, split: str):
        b = batch["index"].numel()
        idx = batch["index"]
        rc, rr = self.reference(split, "chosen", idx), self.reference(split, "rejected", idx)
        if self.plain:
            head_loss = dpo_head_loss(rc, rr, self.cfg.beta, self.loss_types[0], self.cfg.label_smoothing)
        else:
            head_loss = self._mix_head_loss(rc, rr)
        loss, chosen_rewards, rejected_rewards, seq = model(batch["input_ids"], batch["attention_mask"],
                                                            batch["labels"], head_loss=head_loss)["head_loss"]
        return (loss, chosen_rewards, rejected_rewards), seq, b

    def loss(self, model, batch):
        (losses, cr, rr), _, _ = self._pair_terms(model, batch, "train")
        metrics = {"reward_chosen": cr.sum(), "reward_rejected": rr.sum(), "reward_margin": (cr - rr).sum(),
                   "preference_accuracy": preference_accuracy(cr, rr).sum()}
        return losses.sum(), metrics

    def evaluate(self):
        totals = {"loss": 0.0, "preference_accuracy": 0.0, "reward_margin": 0.0, "logp_accuracy": 0.0}
        n = len(self.eval_examples)
        bs = self.cfg.batch_size
        for i in range(0, n, bs):
            batch = self.to_device(self.collate(self.eval_examples[i:i + bs]))
            (losses, cr, rr), seq, b = self._pair_terms(self.module, batch, "eval")
            totals["loss"] += losses.sum().item()
            totals["preference_accuracy"] += preference_accuracy(cr, rr).sum().item()
            totals["reward_margin"] += (cr - rr).sum().item()
            totals["logp_accuracy"] += (seq[:b] > seq[b:]).float().sum().item()
        return {k: v / max(n, 1) for k, v in totals.items()}
