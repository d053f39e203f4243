"""Small runs on the embedded micro model shared by the fault tests (a second or two each)."""
import json
import os

import torch

from peftkern.train.config import TrainConfig
from peftkern.train.run import build_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def micro(out, **kw) -> TrainConfig:
    """SFT-sized settings on tiny-micro: LoRA r 4, batch 4, 6 steps, a checkpoint every 2."""
    base = dict(model="tiny-micro", lora_r=4, lora_alpha=8, lr=1e-2, batch_size=4, max_steps=6, save_every=2,
                keep_last=2, out=str(out), quiet=True, log_every=1, strategy="none")
    base.update(kw)
    return TrainConfig(**base).check()


def trainer(kind, cfg, callbacks=(), n_eval=4):
    t = build_trainer(kind, cfg, callbacks=callbacks)
    t.eval_examples = t.eval_examples[:n_eval]
    return t


def run(kind, cfg, callbacks=(), n_eval=4):
    return trainer(kind, cfg, callbacks, n_eval).train()


def losses(out) -> dict[int, float]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def checkpoints(out) -> list[str]:
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def temp_entries(out) -> list[str]:
    """Every ``.tmp-*`` left anywhere under ``out``."""
    found = []
    for root, dirs, files in os.walk(out):
        found += [os.path.join(root, n) for n in dirs + files if n.startswith(".tmp-")]
    return found


def env():
    environ = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    environ.pop("TRITON_INTERPRET", None)
    return environ


def poison(t, steps, where="loss"):
    """Make the loss (or one LoRA gradient) NaN at the given 0-based optimizer steps."""
    real_loss, state = t.loss, {"step": 0}
    real_step = t.train_step

    def train_step(step):
        state["step"] = step
        return real_step(step)

    def loss(model, batch):
        value, metrics = real_loss(model, batch)
        if state["step"] in steps:
            if where == "loss":
                value = value * torch.tensor(float("nan"))
            else:
                p = next(p for n, p in t.module.named_parameters() if p.requires_grad and "lora_B" in n)
                q = p * 1.0
                q.register_hook(lambda g: torch.full_like(g, float("nan")))
                value = value + (q * 0).sum()  # the loss stays finite; one gradient is NaN
        return value, metrics

    t.loss, t.train_step = loss, train_step
    return t
