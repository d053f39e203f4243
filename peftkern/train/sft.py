"""Supervised fine-tuning: next-token cross-entropy on completion tokens, from hidden states."""
from __future__ import annotations

import torch

from peftkern.train.data import IGNORE_INDEX, encode_sft, load_records, pack_examples, pad_batch
from peftkern.train.errors import CheckpointError
from peftkern.train.loop import Trainer
from peftkern.train.mixing import label_tokens, task_metric_sums
from peftkern.train.objectives import sft_head_loss


def sft_examples(tokenizer, source, cfg) -> list[dict]:
    """Tokenized SFT examples (``input_ids``, ``labels``) from a path / dataset / list, packed if asked."""
    records = load_records(source, "sft")
    examples = [encode_sft(tokenizer, r, cfg.max_length, cfg.completion_only) for r in records]
    return pack_examples(examples, cfg.max_length) if cfg.packing else examples


class SFTTrainer(Trainer):
    kind = "sft"

    def collate(self, examples):
        batch = pad_batch(examples, self.tokenizer.pad_token_id)
        if any("task" in e for e in examples):  # multi-task mixing / rehearsal: per-task losses
            batch["tasks"] = [e.get("task", "") for e in examples]
        return batch

    def units(self, batch):
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().float()

    def loss(self, model, batch):
        if "tasks" not in batch:
            nll = model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=sft_head_loss,
                        position_ids=batch.get("position_ids"))
            return nll["head_loss"], {}
        # mixed tasks log each task's loss, which needs per-row log-probs: the statistics path
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], position_ids=batch.get("position_ids"))
        nll = -out["logps"].sum()
        per_row = -out["logps"].detach().sum(dim=1)
        return nll, task_metric_sums(per_row, label_tokens(batch["labels"]), batch["tasks"])

    def evaluate(self):
        pad, bs = self.tokenizer.pad_token_id, self.cfg.batch_size
        out = {"loss": sft_eval_loss(self.module, self.eval_examples, pad, self.device, bs)}
        tasks = sorted({e["task"] for e in self.eval_examples if "task" in e})
        if len(tasks) > 1:
            for name in tasks:
                out[f"loss/{name}"] = sft_eval_loss(self.module, [e for e in self.eval_examples if e.get("task") == name],
                                                    pad, self.device, bs)
        return out

    def extra_state(self):
        """With mixed data: the step the data resumes at and every task's (and the replay set's) position."""
        if self.sampler is None:
            return {}
        step = self.sampler.next_step
        return {"data_step": step, "data_cursors": self.sampler.cursors(step)}

    def load_extra_state(self, state):
        """The positions a resumed run rebuilds from the step must be the ones the checkpoint saved."""
        if self.sampler is None or "data_cursors" not in state:
            return
        rebuilt = self.sampler.cursors(int(state["data_step"]))
        if rebuilt != state["data_cursors"]:
            raise CheckpointError(f"--resume: the mixed data's positions differ from the checkpoint's "
                                  f"({state['data_cursors']} saved, {rebuilt} now): another --data, "
                                  "--rehearsal-data, --rehearsal-ratio or --mix-temperature")


@torch.no_grad()
def sft_eval_loss(model, examples: list[dict], pad_id: int, device, batch_size: int = 16) -> float:
    """Mean next-token NLL over every label token of ``examples``."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_batch(examples[i:i + batch_size], pad_id)
        batch = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], position_ids=batch.get("position_ids"))
        total += -out["logps"].sum().item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)
