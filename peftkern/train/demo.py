"""``peftkern demo``: the embedded default end to end on the CPU in a few minutes.

Stages, each measured on held-out prompts never trained on:

1. **base**: the tiny Llama pretrained on the bundled plain-text corpus (shipped in the package; from
   the cache, or trained now with ``fresh_base``). It knows the skills as sentences, not the chat format.
2. **sft**: QLoRA: the base quantized to NF4 (frozen), LoRA adapters trained on the chat-format tasks
   with the fused log-prob loss and 8-bit AdamW. Target: exact match of greedy answers.
3. **grpo**: the same adapter trained further with GRPO on the exact-answer reward (samples of the
   policy scored by the task's rule; the fused GRPO loss, 8-bit AdamW). Target: the share of *sampled*
   answers that are right; greedy exact match is shown beside it and must not fall.

Writes to ``out``: ``report.json``, PNG plots, ``index.html`` (everything on one page), the adapters in
PEFT's format (``sft/adapter``, ``grpo/adapter``), both naming ``base_model/`` (the NF4 base
dequantized to fp32: the exact weights they were trained on) saved with the tokenizer.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time

import torch
from torch import nn

from peftkern.generate import DecodingSettings
from peftkern.generate.text import generate_text
from peftkern.models import tasks
from peftkern.models.base import is_cached
from peftkern.models.tokenizer import build_byte_tokenizer
from peftkern.nn import NF4Linear
from peftkern.train.atomic import atomic_dir, atomic_write_text
from peftkern.train.config import TrainConfig
from peftkern.train.demo_report import plot_metrics, plot_rewards, write_html
from peftkern.train.generate import exact_match
from peftkern.train.grpo import GRPOTrainer, online_prompts
from peftkern.train.model import LMWithHeads, prepare_lm, quantize_nf4
from peftkern.train.plots import plot_losses
from peftkern.train.pretrain import build_pretrained_tiny
from peftkern.train.rewards import BUNDLED
from peftkern.train.sft import SFTTrainer, sft_examples
from peftkern.train.stage_meter import StageMeter, module_bytes, optimizer_state_bytes

# Sized for 2 CPU cores (measured: docs/demo.md). "quick" runs the same stages on the shipped base with
# fewer steps and prompts (its test asserts learning); "smoke" is a seconds-long pipeline check on a
# random micro model (shows no learning).
PLANS = {
    "full": dict(base={}, n_sft=2400, n_rl=1600, n_eval=60, n_samples=6, samples_per_prompt=8,
                 sft=dict(lr=3e-3, batch_size=16, max_steps=150, warmup_steps=10, eval_every=25),
                 grpo=dict(lr=6e-4, batch_size=8, max_steps=30, warmup_steps=2)),
    "quick": dict(base={}, n_sft=640, n_rl=160, n_eval=24, n_samples=3, samples_per_prompt=4,
                  sft=dict(lr=3e-3, batch_size=16, max_steps=40, warmup_steps=4),
                  grpo=dict(lr=3e-4, batch_size=8, max_steps=6, warmup_steps=1)),
    "smoke": dict(base=dict(size="micro", steps=6, warmup=1, questions=300, batch_size=8, seq_len=64), n_sft=48,
                  n_rl=16, n_eval=12, n_samples=3, samples_per_prompt=2,
                  sft=dict(lr=1e-2, batch_size=8, max_steps=4),
                  grpo=dict(lr=1e-2, batch_size=4, max_steps=2, num_generations=4)),
}
ADAPTER = dict(lora_r=16, lora_alpha=32.0, target_modules="all-linear")
GRPO = dict(num_generations=8, max_completion_length=8, beta=0.0, temperature=1.0, loss_type="dapo")
MAX_NEW_TOKENS = 8


def _prompts(items) -> list:
    return [r["prompt"] for r in tasks.prompt_records(items)]


def greedy_answers(lm, tok, items) -> tuple[float, list[str]]:
    """(exact match, answers) of greedy decoding on ``items`` (question, answer, wrong)."""
    preds = generate_text(lm, tok, _prompts(items), DecodingSettings(max_new_tokens=MAX_NEW_TOKENS), batch_size=64)
    return exact_match(preds, [a for _, a, _ in items]), preds


def held_out_reward(items, answers: list[str]) -> float:
    """GRPO's own held-out metric (what ``GRPOTrainer.evaluate`` reports): the mean weighted bundled
    reward (exact answer 1, answer format 0.2) of the greedy answers."""
    prompts = _prompts(items)
    total = [0.0] * len(items)
    for r in BUNDLED:
        for i, v in enumerate(r.fn(prompts, answers, answer=[a for _, a, _ in items])):
            total[i] += r.weight * v
    return sum(total) / max(len(total), 1)


def sampled_accuracy(lm, tok, items, per_prompt: int, seed: int) -> float:
    """The share of right answers among ``per_prompt`` samples (temperature 1) per prompt: the expected
    exact-answer reward of the sampling policy, what GRPO maximizes."""
    prompts = [p for p in _prompts(items) for _ in range(per_prompt)]
    answers = [a for _, a, _ in items for _ in range(per_prompt)]
    settings = DecodingSettings(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.0, seed=seed)
    return exact_match(generate_text(lm, tok, prompts, settings, batch_size=96), answers)


def _stage_cfg(out: str, name: str, settings: dict, quiet: bool, seed: int) -> TrainConfig:
    return TrainConfig(model="tiny", out=os.path.join(out, name), log_every=1, quiet=quiet, seed=seed,
                       schedule="cosine", keep_last=1, strategy="none", max_length=128, overwrite=True,
                       optim="adamw8bit", **settings).check()


def dequantized(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every NF4Linear replaced by an fp32 ``nn.Linear`` of its dequantized weight."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    return model


def all_states_8bit(trainer):
    """Have ``trainer``'s 8-bit AdamW keep every state tensor in 8 bits, the small ones too (the optimizer
    keeps tensors under 4096 elements, as bitsandbytes, in fp32 by default: here most LoRA factors)."""
    prepare = trainer.prepare

    def prepare_8bit():
        prepare()
        for group in trainer.optimizer.param_groups:
            group["min_8bit_size"] = 0

    trainer.prepare = prepare_8bit
    return trainer


def _save_base(model, tokenizer, path: str) -> str:
    """``model`` and ``tokenizer`` in ``path`` (atomically); returns the absolute path adapters name."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return os.path.abspath(path)


def run_demo(out: str, plan: str = "full", quiet: bool = False, seed: int = 0, fresh_base: bool = False,
             html: bool = True) -> dict:
    """Run every stage and write ``out/report.json`` (and the plots and ``index.html``); returns the report."""
    if plan not in PLANS:
        raise ValueError(f"demo plan must be one of {sorted(PLANS)}, got {plan!r}")
    p = PLANS[plan]
    os.makedirs(out, exist_ok=True)
    tok = build_byte_tokenizer()
    report = {"plan": plan, "seed": seed, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "stages": [], "samples": []}
    started = time.perf_counter()
    train_items, held_out = tasks.split(p["n_sft"] + p["n_rl"], p["n_eval"], seed)
    sft_items, rl_items = train_items[:p["n_sft"]], train_items[p["n_sft"]:]
    n_show = p["n_samples"]
    answers = {}

    # -- base ------------------------------------------------------------------------------------
    smoke = plan == "smoke"
    source = "trained now" if (fresh_base or smoke or not is_cached(p["base"])) else "shipped / cached"
    with StageMeter() as meter:
        base = build_pretrained_tiny(quiet=quiet, settings=p["base"], cache=not smoke, fresh=fresh_base).eval()
        acc_base, answers["base"] = greedy_answers(base, tok, held_out)
    report["model"] = {"parameters": sum(x.numel() for x in base.parameters()),
                       "config": {k: getattr(base.config, k) for k in ("hidden_size", "num_hidden_layers",
                                                                       "intermediate_size", "vocab_size")}}
    report["stages"].append({"name": "base", "what": f"pretrained tiny Llama ({source})",
                             "exact_match": acc_base, **meter.result()})

    # -- SFT: QLoRA (NF4 base, LoRA, fused loss, 8-bit AdamW) ---------------------------------------
    with StageMeter() as meter:
        cfg = _stage_cfg(out, "sft", {**ADAPTER, "quant": "nf4", **p["sft"]}, quiet, seed)
        quantized = quantize_nf4(copy.deepcopy(base))
        nf4_bytes = module_bytes(quantized)
        base_dir = _save_base(dequantized(quantized), tok, os.path.join(out, "base_model"))
        torch.manual_seed(seed)  # the adapters' initialisation
        lm = prepare_lm(cfg, quantized)
        trainable = sum(x.numel() for x in lm.parameters() if x.requires_grad)
        trainer = all_states_8bit(SFTTrainer(cfg, LMWithHeads(lm), tok,
                                             sft_examples(tok, tasks.sft_records(sft_items), cfg),
                                             sft_examples(tok, tasks.sft_records(held_out), cfg), base_model_path=base_dir))
        summary = trainer.train()
        acc_sft, answers["sft"] = greedy_answers(lm, tok, held_out)
        sampled_sft = sampled_accuracy(lm, tok, held_out, p["samples_per_prompt"], seed)
    report["stages"].append({
        "name": "sft", "what": "QLoRA SFT: NF4 base, LoRA r16, fused log-prob loss, 8-bit AdamW",
        "eval_loss_before": summary["eval_before"]["loss"], "eval_loss_after": summary["eval_after"]["loss"],
        "exact_match_before": acc_base, "exact_match": acc_sft, "sampled_accuracy": sampled_sft,
        "steps": summary["steps"], "train_examples": len(sft_items), "held_out_prompts": len(held_out),
        "model_mb_fp32": round(module_bytes(base) / 2**20, 2), "model_mb_nf4": round(nf4_bytes / 2**20, 2),
        "optimizer_state_mb": round(optimizer_state_bytes(trainer.optimizer) / 2**20, 3),
        "optimizer_state_mb_fp32": round(8 * trainable / 2**20, 3),  # two fp32 moments per parameter
        "trainable_parameters": trainable, **meter.result()})
    plot_losses(os.path.join(cfg.out, "log.jsonl"), os.path.join(out, "sft_loss.png"), "QLoRA SFT (NF4 base)")

    # -- GRPO on the exact-answer reward (the same adapter, trained further) ------------------------
    with StageMeter() as meter:
        cfg = _stage_cfg(out, "grpo", {**ADAPTER, "quant": "nf4", **GRPO, **p["grpo"]}, quiet, seed)
        # no eval set: the held-out metrics are measured below, the same way for every stage. The 8-bit
        # AdamW keeps its default rule (tensors of 4096+ elements in 8 bits): the setting measured here
        trainer = GRPOTrainer(cfg, LMWithHeads(lm), tok, online_prompts(tok, tasks.prompt_records(rl_items), cfg),
                              base_model_path=base_dir)
        summary = trainer.train()
        acc_grpo, answers["grpo"] = greedy_answers(lm, tok, held_out)
        sampled_grpo = sampled_accuracy(lm, tok, held_out, p["samples_per_prompt"], seed)
    report["stages"].append({
        "name": "grpo", "what": "GRPO on the exact-answer reward: fused GRPO loss, 8-bit AdamW",
        "sampled_accuracy_before": sampled_sft, "sampled_accuracy": sampled_grpo,
        "reward_before": held_out_reward(held_out, answers["sft"]), "reward": held_out_reward(held_out, answers["grpo"]),
        "exact_match_before": acc_sft, "exact_match": acc_grpo,
        "steps": summary["steps"], "train_prompts": len(rl_items), "held_out_prompts": len(held_out),
        "samples_per_prompt": p["samples_per_prompt"], **meter.result()})
    plot_rewards(os.path.join(cfg.out, "log.jsonl"), os.path.join(out, "grpo_reward.png"))
    plot_metrics(report, os.path.join(out, "metrics.png"))

    for i, (q, a, _) in enumerate(held_out[:n_show]):
        report["samples"].append({"prompt": q, "answer": a, "base": answers["base"][i], "after_sft": answers["sft"][i],
                                  "after_grpo": answers["grpo"][i]})
    report["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    if html:
        write_html(report, out)
    return report
