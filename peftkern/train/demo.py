"""``peftkern demo``: the embedded default end to end on the CPU in a few minutes.

Stages: the base model (the tiny Llama briefly trained on the bundled corpus, cached), LoRA SFT on
the bundled chat tasks, then DPO (a fresh LoRA on the SFT model merged into its base, so the
reference is the SFT model) on correct-versus-wrong answer pairs. Writes to ``out``: ``report.json``,
``<stage>_loss.png``, the adapters in PEFT's format, each naming the base it needs in its
``base_model_name_or_path``: ``sft/adapter`` on ``base_model/`` and ``dpo/adapter`` on ``sft_model/``
(the base with the SFT adapter merged in), both saved with the tokenizer, and sample generations.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time

import torch

from peftkern.models import tasks
from peftkern.models.tokenizer import build_byte_tokenizer
from peftkern.train.atomic import atomic_dir, atomic_write_text
from peftkern.train.config import TrainConfig
from peftkern.train.generate import exact_match, generate
from peftkern.train.model import LMWithHeads, prepare_lm
from peftkern.train.pretrain import build_pretrained_tiny

# Sized for 2 CPU cores: the full demo is a few minutes; "quick" is a seconds-long smoke run.
PLANS = {
    "full": dict(base={}, n_sft=2400, n_pairs=480, n_eval=60, n_samples=6,
                 sft=dict(lr=5e-3, batch_size=16, max_steps=150, warmup_steps=10, lora_r=16, lora_alpha=32.0, eval_every=25),
                 dpo=dict(lr=5e-4, batch_size=8, max_steps=40, warmup_steps=4, lora_r=16, lora_alpha=32.0, beta=0.1,
                          eval_every=10)),
    "quick": dict(base=dict(size="micro", steps=6, warmup=1, questions=300, batch_size=8, seq_len=64), n_sft=48, n_pairs=32,
                  n_eval=12, n_samples=3,
                  sft=dict(lr=1e-2, batch_size=8, max_steps=4, lora_r=4, lora_alpha=8.0),
                  dpo=dict(lr=1e-2, batch_size=8, max_steps=3, lora_r=4, lora_alpha=8.0, beta=0.2)),
}


def _prompts(items):
    return [r["prompt"] for r in tasks.prompt_records(items)]


def _accuracy(lm, tok, items) -> tuple[float, list[str]]:
    preds = generate(lm, tok, _prompts(items), max_new_tokens=8)
    return exact_match(preds, [a for _, a, _ in items]), preds


def _stage_cfg(out: str, name: str, settings: dict, quiet: bool, seed: int) -> TrainConfig:
    return TrainConfig(model="tiny", out=os.path.join(out, name), log_every=1, quiet=quiet, seed=seed,
                       schedule="cosine", keep_last=1, strategy="none", max_length=128, overwrite=True,
                       **settings).check()


def _save_base(model, tokenizer, path: str) -> str:
    """``model`` and ``tokenizer`` in ``path`` (atomically); returns the absolute path adapters name."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return os.path.abspath(path)


def run_demo(out: str, plan: str = "full", quiet: bool = False, seed: int = 0) -> dict:
    """Run every stage and write ``out/report.json``; returns the report."""
    from peftkern.models.base import is_cached
    from peftkern.train.adapters import merge
    from peftkern.train.dpo import DPOTrainer, pair_examples
    from peftkern.train.plots import plot_losses
    from peftkern.train.sft import SFTTrainer, sft_examples

    p = PLANS[plan]
    os.makedirs(out, exist_ok=True)
    tok = build_byte_tokenizer()
    report = {"plan": plan, "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "stages": [], "samples": []}
    started = time.time()

    # -- base ------------------------------------------------------------------------------------
    t = time.time()
    cached = plan == "full" and is_cached(p["base"])
    base = build_pretrained_tiny(quiet=quiet, settings=p["base"], cache=plan == "full").eval()
    base_dir = _save_base(base, tok, os.path.join(out, "base_model"))
    report["model"] = {"parameters": sum(x.numel() for x in base.parameters()),
                       "config": {k: getattr(base.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                       "intermediate_size", "vocab_size")}}
    report["stages"].append({"name": "base", "from_cache": cached, "seconds": round(time.time() - t, 2)})

    train_items, held_out = tasks.split(p["n_sft"] + p["n_pairs"], p["n_eval"], seed)
    sft_items, pair_items = train_items[:p["n_sft"]], train_items[p["n_sft"]:]
    sample_items = held_out[:p["n_samples"]]

    # -- SFT -------------------------------------------------------------------------------------
    t = time.time()
    acc_before, preds_base = _accuracy(base, tok, held_out)
    cfg = _stage_cfg(out, "sft", p["sft"], quiet, seed)
    torch.manual_seed(seed)  # the adapter's initialisation: the same whether the base was cached or just trained
    lm = prepare_lm(cfg, copy.deepcopy(base))
    trainer = SFTTrainer(cfg, LMWithHeads(lm), tok, sft_examples(tok, tasks.sft_records(sft_items), cfg),
                         sft_examples(tok, tasks.sft_records(held_out), cfg), base_model_path=base_dir)
    summary = trainer.train()
    acc_after, preds_sft = _accuracy(lm, tok, held_out)
    report["stages"].append({
        "name": "sft", "eval_loss_before": summary["eval_before"]["loss"], "eval_loss_after": summary["eval_after"]["loss"],
        "eval_accuracy_before": acc_before, "eval_accuracy_after": acc_after, "steps": summary["steps"],
        "train_examples": len(sft_items), "held_out_prompts": len(held_out), "seconds": round(time.time() - t, 2)})
    plot_losses(os.path.join(cfg.out, "log.jsonl"), os.path.join(out, "sft_loss.png"), "LoRA SFT")

    # -- DPO -------------------------------------------------------------------------------------
    t = time.time()
    sft_model = merge(lm)
    sft_dir = _save_base(sft_model, tok, os.path.join(out, "sft_model"))  # DPO's base and reference
    cfg = _stage_cfg(out, "dpo", p["dpo"], quiet, seed)
    torch.manual_seed(seed)
    lm = prepare_lm(cfg, sft_model)
    trainer = DPOTrainer(cfg, LMWithHeads(lm), tok, pair_examples(tok, tasks.preference_records(pair_items), cfg),
                         pair_examples(tok, tasks.preference_records(held_out), cfg), base_model_path=sft_dir)
    summary = trainer.train()
    acc_dpo, preds_dpo = _accuracy(lm, tok, held_out)
    before, after = summary["eval_before"], summary["eval_after"]
    report["stages"].append({
        "name": "dpo", "preference_accuracy_before": before["preference_accuracy"],
        "preference_accuracy_after": after["preference_accuracy"], "reward_margin_after": after["reward_margin"],
        "likelihood_preference_before": before["logp_accuracy"], "likelihood_preference_after": after["logp_accuracy"],
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"], "eval_accuracy_after": acc_dpo,
        "steps": summary["steps"], "train_pairs": len(pair_items), "held_out_pairs": len(held_out),
        "seconds": round(time.time() - t, 2)})
    plot_losses(os.path.join(cfg.out, "log.jsonl"), os.path.join(out, "dpo_loss.png"), "DPO (LoRA on the SFT model)")

    for i, (q, a, _) in enumerate(sample_items):
        report["samples"].append({"prompt": q, "answer": a, "base": preds_base[i], "after_sft": preds_sft[i],
                                  "after_dpo": preds_dpo[i]})
    report["seconds"] = round(time.time() - started, 2)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    """The report as a few lines for the terminal."""
    lines = []
    for s in report["stages"]:
        if s["name"] == "sft":
            lines.append(f"sft   eval loss {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}   "
                         f"exact match {s['eval_accuracy_before']:.2f} -> {s['eval_accuracy_after']:.2f}   "
                         f"({s['seconds']:.0f} s)")
        elif s["name"] == "dpo":
            lines.append(f"dpo   preference accuracy {s['preference_accuracy_before']:.2f} -> "
                         f"{s['preference_accuracy_after']:.2f}   reward margin {s['reward_margin_after']:.3f}   "
                         f"exact match {s['eval_accuracy_after']:.2f}   ({s['seconds']:.0f} s)")
        else:
            how = "read from the cache" if s.get("from_cache") else "trained on the bundled corpus"
            lines.append(f"{s['name']:<5} {how}   ({s['seconds']:.0f} s)")
    for smp in report["samples"]:
        lines.append(f"  {smp['prompt']!r}: base {smp['base']!r} | sft {smp['after_sft']!r} | "
                     f"dpo {smp['after_dpo']!r} (answer {smp['answer']!r})")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)
