"""Direct preference optimisation (every loss_type of ``peftkern.losses.dpo_loss``), with the
reference log-probs computed once and cached."""
from __future__ import annotations

import torch

from peftkern.train.data import encode_pair, load_records, pad_batch
from peftkern.train.loop import Trainer
from peftkern.train.objectives import dpo_head_loss
from peftkern.train.reference import cached_reference_logps


def pair_examples(tokenizer, source, cfg, kind: str = "dpo") -> list[dict]:
    """``{"chosen", "rejected", "index"}`` per record of a DPO / RM data source."""
    out = []
    for i, rec in enumerate(load_records(source, kind)):
        ex = encode_pair(tokenizer, rec, cfg.max_length)
        ex["index"] = i
        if kind == "rm" and "margin" in rec.data:  # checked by load_records
            ex["margin"] = float(rec.data["margin"])
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


class DPOTrainer(Trainer):
    kind = "dpo"

    def before_train(self):
        pad = self.tokenizer.pad_token_id
        groups = {}
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            groups[f"{split}_chosen"] = [e["chosen"] for e in examples]
            groups[f"{split}_rejected"] = [e["rejected"] for e in examples]
        groups = {k: v for k, v in groups.items() if v}
        ref = cached_reference_logps(self.module, groups, pad, self.device, self.cfg.out, write=self.dist.main)
        self.ref = {k: v.to(self.device) for k, v in ref.items()}  # indexed on the device: no host sync per batch

    def collate(self, examples):
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def units(self, batch):
        return torch.tensor(float(batch["index"].numel()))

    def _pair_terms(self, model, batch, split: str):
        b = batch["index"].numel()
        idx = batch["index"]
        rc = self.ref[f"{split}_chosen"][idx]
        rr = self.ref[f"{split}_rejected"][idx]
        head_loss = dpo_head_loss(rc, rr, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing)
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
