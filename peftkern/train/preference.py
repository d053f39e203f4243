"""The reference-free preference trainers: ORPO, SimPO and CPO over pairs (``prompt`` / ``chosen`` /
``rejected``), through the fused losses of ``peftkern.losses`` (no reference pass, no reference
cache; gradients formed in the forward pass).

* ``peftkern orpo``: the chosen completions' NLL (mean over their tokens) + beta (TRL's lambda) times
  the odds-ratio term on average log-probs (TRL's ORPOTrainer).
* ``peftkern simpo``: -log s(beta (avg chosen - avg rejected) - gamma), label smoothing as TRL's
  CPOTrainer with loss_type "simpo" and cpo_alpha 0.
* ``peftkern cpo``: TRL's CPOTrainer: sigmoid / hinge / ipo / simpo pair loss (summed log-probs, or
  averaged for ipo and simpo) plus ``cpo_alpha`` times the chosen completions' NLL.
"""
from __future__ import annotations

import torch

from peftkern.losses import fused_cpo_loss, fused_orpo_loss, fused_simpo_loss
from peftkern.train.config import resolve_kind_defaults
from peftkern.train.dpo import collate_pairs, preference_accuracy
from peftkern.train.init_adapter import write_pending_base
from peftkern.train.loop import Trainer


class PreferenceTrainer(Trainer):
    """Pairs in, one fused reference-free loss; subclasses give :meth:`pair_loss`."""

    def __init__(self, cfg, model, tokenizer, train_examples, eval_examples=None, callbacks=(),
                 base_model_path=None):
        resolve_kind_defaults(cfg, self.kind)
        super().__init__(cfg, model, tokenizer, train_examples, eval_examples, callbacks, base_model_path)

    def before_train(self):
        write_pending_base(self)

    def collate(self, examples):
        return collate_pairs(examples, self.tokenizer.pad_token_id)

    def units(self, batch):
        return torch.tensor(float(batch["index"].numel()))

    def pair_loss(self, hidden, targets, head) -> tuple:
        """(mean loss over the pairs, chosen_rewards [B], rejected_rewards [B])."""
        raise NotImplementedError

    def _terms(self, model, batch):
        def head_loss(hidden, targets, head):
            return self.pair_loss(hidden, targets, head)
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=head_loss)["head_loss"]

    def loss(self, model, batch):
        loss, cr, rr = self._terms(model, batch)
        pairs = batch["index"].numel()
        metrics = {"reward_chosen": cr.sum(), "reward_rejected": rr.sum(), "reward_margin": (cr - rr).sum(),
                   "preference_accuracy": preference_accuracy(cr, rr).sum()}
        return loss * pairs, metrics

    def evaluate(self):
        totals = {"loss": 0.0, "preference_accuracy": 0.0, "reward_margin": 0.0}
        n, bs = len(self.eval_examples), self.cfg.batch_size
        for i in range(0, n, bs):
            batch = self.to_device(self.collate(self.eval_examples[i:i + bs]))
            loss, cr, rr = self._terms(self.module, batch)
            totals["loss"] += loss.item() * batch["index"].numel()
            totals["preference_accuracy"] += preference_accuracy(cr, rr).sum().item()
            totals["reward_margin"] += (cr - rr).sum().item()
        return {k: v / max(n, 1) for k, v in totals.items()}


def _head(head: dict) -> dict:
    return {"bias": head["bias"], "lora_A": head["lora_A"], "lora_B": head["lora_B"],
            "lora_scaling": head["lora_scaling"]}


class ORPOTrainer(PreferenceTrainer):
    kind = "orpo"

    def pair_loss(self, hidden, targets, head):
        return fused_orpo_loss(hidden, head["weight"], targets, beta=self.cfg.beta, **_head(head))


class SimPOTrainer(PreferenceTrainer):
    kind = "simpo"

    def pair_loss(self, hidden, targets, head):
        cfg = self.cfg
        return fused_simpo_loss(hidden, head["weight"], targets, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                label_smoothing=cfg.label_smoothing, **_head(head))


class CPOTrainer(PreferenceTrainer):
    kind = "cpo"

    def pair_loss(self, hidden, targets, head):
        cfg = self.cfg
        return fused_cpo_loss(hidden, head["weight"], targets, beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                              cpo_alpha=cfg.cpo_alpha, **_head(head))


TRAINERS = {"orpo": ORPOTrainer, "simpo": SimPOTrainer, "cpo": CPOTrainer}
