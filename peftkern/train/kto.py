"""KTO: unpaired desirable / undesirable completions against a reference point (the KL of the policy
from the reference on mismatched prompt-completion pairs, detached), reference log-probs cached."""
from __future__ import annotations

import torch

from peftkern.train.data import encode_prompt_completion, encode_sequence, load_records, pad_batch
from peftkern.train.loop import Trainer
from peftkern.train.objectives import kto_head_loss
from peftkern.train.reference import cached_reference_logps


def kto_examples(tokenizer, source, cfg) -> list[dict]:
    """``{"seq", "kl_seq", "label", "index"}``: the example, and its prompt with the next example's
    completion (the mismatched pair that estimates the KL reference point)."""
    records = load_records(source, "kto")
    parts = [encode_prompt_completion(tokenizer, r.data["prompt"], r.data["completion"], r.where) for r in records]
    out = []
    for i, (p, c) in enumerate(parts):
        other = parts[(i + 1) % len(parts)][1]
        out.append({"seq": encode_sequence(p, c, cfg.max_length), "kl_seq": encode_sequence(p, other, cfg.max_length),
                    "label": bool(records[i].data["label"]), "index": i, "where": records[i].where})
    return out


class KTOTrainer(Trainer):
    kind = "kto"

    def before_train(self):
        groups = {}
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            if examples:
                groups[f"{split}_seq"] = [e["seq"] for e in examples]
                groups[f"{split}_kl"] = [e["kl_seq"] for e in examples]
        ref = cached_reference_logps(self.module, groups, self.tokenizer.pad_token_id, self.device, self.cfg.out,
                                     write=self.dist.main)
        self.ref = {k: v.to(self.device) for k, v in ref.items()}  # indexed on the device: no host sync per batch

    def collate(self, examples):
        batch = pad_batch([e["seq"] for e in examples] + [e["kl_seq"] for e in examples], self.tokenizer.pad_token_id)
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        batch["desirable"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        return batch

    def units(self, batch):
        return torch.tensor(float(batch["index"].numel()))

    def _terms(self, model, batch, split):
        idx = batch["index"]
        ref = self.ref[f"{split}_seq"][idx]
        ref_kl = self.ref[f"{split}_kl"][idx]
        head_loss = kto_head_loss(ref, ref_kl, batch["desirable"], self.cfg.beta, self.cfg.desirable_weight,
                                  self.cfg.undesirable_weight)
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"], head_loss=head_loss)["head_loss"]

    def loss(self, model, batch):
        loss, good, bad, kl = self._terms(model, batch, "train")
        return loss, {"reward_desirable": good.sum(), "reward_undesirable": bad.sum(),
                      "kl": kl * batch["desirable"].numel()}

    def evaluate(self):
        n, bs = len(self.eval_examples), self.cfg.batch_size
        loss = 0.0
        for i in range(0, n, bs):
            batch = self.to_device(self.collate(self.eval_examples[i:i + bs]))
            loss += self._terms(self.module, batch, "eval")[0].item()
        return {"loss": loss / max(n, 1)}
