"""Reward model: a scalar head on the last token, Bradley-Terry loss with an optional per-pair margin
(a ``margin`` field in the data), pairwise accuracy as the metric."""
from __future__ import annotations

import copy
import os

import torch

from peftkern.train.dpo import collate_pairs
from peftkern.train.loop import Trainer
from peftkern.train.objectives import reward_loss_sum

SCORE_HEAD_FILE = "score_head.safetensors"


class RewardTrainer(Trainer):
    kind = "rm"

    def collate(self, examples):
        batch = collate_pairs(examples, self.tokenizer.pad_token_id)
        batch["margin"] = torch.tensor([e.get("margin", 0.0) for e in examples], dtype=torch.float32)
        return batch

    def units(self, batch):
        return torch.tensor(float(batch["index"].numel()))

    def _scores(self, model, batch):
        b = batch["index"].numel()
        scores = model(batch["input_ids"], batch["attention_mask"])["scores"]
        return scores[:b], scores[b:]

    def loss(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        loss = reward_loss_sum(chosen, rejected, batch["margin"])
        return loss, {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum()}

    def evaluate(self):
        n, bs = len(self.eval_examples), self.cfg.batch_size
        loss = acc = margin = 0.0
        for i in range(0, n, bs):
            batch = self.to_device(self.collate(self.eval_examples[i:i + bs]))
            chosen, rejected = self._scores(self.module, batch)
            loss += reward_loss_sum(chosen, rejected, batch["margin"]).item()
            acc += (chosen > rejected).float().sum().item()
            margin += (chosen - rejected).sum().item()
        return {"loss": loss / max(n, 1), "accuracy": acc / max(n, 1), "margin": margin / max(n, 1)}

    def save_outputs(self, summary):
        """Besides the adapter and metrics: ``reward_model/`` (the LM with adapters merged, and the score
        head), which ``peftkern ppo --reward-model`` loads."""
        super().save_outputs(summary)
        save_reward_model(self.module, os.path.join(self.cfg.out, "reward_model"))


def save_reward_model(module, out_dir: str) -> None:
    from safetensors.torch import save_file

    from peftkern.train.adapters import merge
    from peftkern.train.checkpoint import atomic_dir
    from peftkern.train.model import base_causal_lm

    lm = base_causal_lm(merge(copy.deepcopy(module.lm)))
    head = module.score_head
    with atomic_dir(out_dir) as tmp:
        lm.save_pretrained(tmp)
        save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
                  os.path.join(tmp, SCORE_HEAD_FILE))


def load_reward_model(path: str):
    """(LMWithHeads with a score head, in eval mode) from a ``reward_model/`` directory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from peftkern.train.model import LMWithHeads

    head_path = os.path.join(path, SCORE_HEAD_FILE)
    if not os.path.isfile(head_path):
        raise FileNotFoundError(f"{path}: not a reward model directory (no {SCORE_HEAD_FILE}); "
                                "train one with 'peftkern rm'")
    model = LMWithHeads(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), score_head=True)
    state = load_file(head_path)
    with torch.no_grad():
        model.score_head.weight.copy_(state["weight"])
        model.score_head.bias.copy_(state["bias"])
    return model.eval().requires_grad_(False)
