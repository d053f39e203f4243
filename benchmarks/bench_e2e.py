"""One SFT step and one DPO step end to end on the CPU: peftkern's trainers against PEFT + TRL's
``SFTTrainer`` / ``DPOTrainer`` on the same tiny Llama (the embedded default's demo size, random
weights), the same tokenizer and the same batch of bundled examples, LoRA r=16 on every linear.

* measured-cpu time: one optimizer step (collate where the trainer does it, forward, backward,
  optimizer), interleaved medians in one process, 1 thread.
* measured-cpu memory: peak extra RSS of one step in a fresh process over a warm baseline (the
  trainer built and one step already taken), ``MALLOC_MMAP_THRESHOLD_`` set by the harness.

Both sides put the loss on every token of the SFT examples (TRL's default for conversations without
generation markers in the template, so ours runs with ``completion_only=False``); DPO on completion
tokens, reference log-probs precomputed by both (``precompute_ref_log_probs=True`` for TRL), beta 0.1.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

from benchmarks import memory
from benchmarks.harness import pick

SFT_BATCH, DPO_BATCH = pick(16, 4), pick(8, 2)
ROUNDS = pick(10, 2)
SIZE = pick("demo", "micro")
LORA = dict(r=16, lora_alpha=32)


def _records(kind: str, n: int):
    from peftkern.models import tasks

    train, _ = tasks.split(n, 4)
    return tasks.sft_records(train) if kind == "sft" else tasks.preference_records(train)


def _ours(kind: str, size: str):
    from peftkern.models import build_byte_tokenizer, build_tiny_model
    from peftkern.train.config import TrainConfig
    from peftkern.train.dpo import DPOTrainer, pair_examples
    from peftkern.train.model import LMWithHeads, prepare_lm
    from peftkern.train.sft import SFTTrainer, sft_examples

    batch = SFT_BATCH if kind == "sft" else DPO_BATCH
    cfg = TrainConfig(model="tiny", lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], batch_size=batch, lr=1e-3,
                      max_steps=1000, completion_only=False, max_length=128, beta=0.1, out=tempfile.mkdtemp(),
                      quiet=True, strategy="none").check()
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = LMWithHeads(prepare_lm(cfg, build_tiny_model(size)))
    records = _records(kind, batch)
    if kind == "sft":
        trainer = SFTTrainer(cfg, model, tok, sft_examples(tok, records, cfg))
    else:
        trainer = DPOTrainer(cfg, model, tok, pair_examples(tok, records, cfg))
    trainer.prepare()
    return lambda: trainer.train_step(0)


def _trl(kind: str, size: str):
    import logging

    from datasets import Dataset
    from peft import LoraConfig
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from peftkern.models import build_byte_tokenizer, build_tiny_model

    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    batch = SFT_BATCH if kind == "sft" else DPO_BATCH
    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(size)
    peft_config = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **LORA)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=128, report_to="none",
                  use_cpu=True, save_strategy="no", learning_rate=1e-3, dataloader_num_workers=0,
                  disable_tqdm=True)
    data = Dataset.from_list(_records(kind, batch))
    if kind == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                             peft_config=peft_config)
    else:
        trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, precompute_ref_log_probs=True, **common),
                             train_dataset=data, processing_class=tok, peft_config=peft_config)
    loader = trainer.get_train_dataloader()
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()

    def step():
        batch_ = next(iter(loader))
        trainer.training_step(trainer.model, batch_)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def build_step(impl: str, kind: str, size: str):
    """The step callable of ``impl`` ("ours" or "trl") for ``kind`` ("sft" or "dpo"), one step taken."""
    step = _ours(kind, size) if impl == "ours" else _trl(kind, size)
    step()  # warm: lazy allocations (optimizer state, caches) happen here, not in the measured step
    return step


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_step_time(kind, timer, record):
    pytest.importorskip("trl")
    contenders = {"ours": build_step("ours", kind, SIZE), "trl": build_step("trl", kind, SIZE)}
    medians = timer(contenders, rounds=ROUNDS)
    batch = SFT_BATCH if kind == "sft" else DPO_BATCH
    record(kind="measured-cpu", case=f"{kind} step, LoRA r=16 all-linear", shape={"model": SIZE, "batch": batch},
           dtype="float32", metric="time", unit="s", ours=medians["ours"], peer=medians["trl"],
           peer_name=f"PEFT + TRL {'SFTTrainer' if kind == 'sft' else 'DPOTrainer'}",
           target="<= 0.80" if kind == "sft" else None)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_step_peak_memory(kind, record):
    pytest.importorskip("trl")
    peaks = {impl: memory.peak_rss("benchmarks.bench_e2e:build_step", {"impl": impl, "kind": kind, "size": SIZE},
                                   preload=("trl", "peft", "transformers"))["extra_bytes"]
             for impl in ("ours", "trl")}
    batch = SFT_BATCH if kind == "sft" else DPO_BATCH
    record(kind="measured-cpu", case=f"{kind} step, LoRA r=16 all-linear", shape={"model": SIZE, "batch": batch},
           dtype="float32", metric="peak_memory", unit="bytes", ours=peaks["ours"], peer=peaks["trl"],
           peer_name=f"PEFT + TRL {'SFTTrainer' if kind == 'sft' else 'DPOTrainer'}",
           target="<= 0.70" if kind == "sft" else None)
