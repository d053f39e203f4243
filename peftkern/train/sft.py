"""Supervised fine-tuning: next-token cross-entropy on completion tokens, from hidden states."""
from __future__ import annotations

import torch

from peftkern.train.data import IGNORE_INDEX, encode_sft, load_records, pack, pad_batch
from peftkern.train.loop import Trainer
from peftkern.train.objectives import sft_head_loss


def sft_examples(tokenizer, source, cfg) -> list[dict]:
    """Tokenized SFT examples (``input_ids``, ``labels``) from a path / dataset / list, packed if asked."""
    records = load_records(source, "sft")
    # Packed examples are cut by the packing, not one by one.
    limit = 1 << 30 if cfg.packing else cfg.max_length
    examples = [encode_sft(tokenizer, r, limit, cfg.completion_only) for r in records]
    return pack(examples, cfg.max_length) if cfg.packing else examples


class SFTTrainer(Trainer):
    kind = "sft"

    def collate(self, examples):
        return pad_batch(examples, self.tokenizer.pad_token_id)

    def units(self, batch):
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()

    def loss(self, model, batch):
        nll = model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=sft_head_loss)["head_loss"]
        return nll, {}

    def evaluate(self):
        return {"loss": sft_eval_loss(self.module, self.eval_examples, self.tokenizer.pad_token_id, self.device,
                                      self.cfg.batch_size)}


@torch.no_grad()
def sft_eval_loss(model, examples: list[dict], pad_id: int, device, batch_size: int = 16) -> float:
    """Mean next-token NLL over every label token of ``examples``."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_batch(examples[i:i + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += -out["logps"].sum().item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)
