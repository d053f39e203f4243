"""The GRPO figures of the README: does ``peftkern grpo`` with the bundled exact-answer reward raise
held-out exact match over the SFT model it starts from, on the embedded default?

    python benchmarks/grpo_experiment.py [--out benchmarks/results] [--grpo-steps 120] [--seed 0]

1. SFT: LoRA (r 16, every linear) on the pretrained tiny Llama, the bundled skills as chat turns
   (``--sft-examples`` drawn by ``tasks.split``, none of them held out), as ``peftkern demo``'s stage.
2. GRPO: the SFT adapter merged in (``--init-adapter``'s path), a fresh LoRA, the bundled prompts (the
   trainers' bundled training split), G completions per prompt, reward = exact answer (1) + 0.2 x format,
   loss ``dapo``, beta 0 (no reference pass), through ``peftkern.train.run.build_trainer`` as the CLI.
3. Held-out exact match of the SFT model and of SFT + GRPO (the two adapters stacked) by
   ``peftkern.evaluation.evaluate`` (suite ``tasks`` limited to the trainers' 48 held-out questions,
   greedy), plus the mean training reward over the first and last tenth of the run.

Writes ``<out>/<date>-grpo-experiment.json`` and ``.md``; the same commands by hand are in docs/grpo.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from peftkern.evaluation import evaluate  # noqa: E402
from peftkern.models import build_byte_tokenizer, tasks  # noqa: E402
from peftkern.train.config import TrainConfig  # noqa: E402
from peftkern.train.logs import read_log  # noqa: E402
from peftkern.train.run import BUNDLED_EVAL, build_trainer  # noqa: E402
from peftkern.train.pretrain import build_pretrained_tiny  # noqa: E402
from peftkern.tuners import load_adapter  # noqa: E402


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _exact_match(adapters: list[str], tok, limit: int) -> float:
    lm = build_pretrained_tiny(quiet=True)
    for i, path in enumerate(adapters):
        lm = load_adapter(lm, path, adapter_name=f"a{i}", is_trainable=False)
    if adapters:
        lm.set_adapter([f"a{i}" for i in range(len(adapters))])
    result = evaluate(lm, tok, ["tasks"], limit=limit)
    return result["suites"]["tasks"]["metrics"]["exact_match"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-examples", type=int, default=2400)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--grpo-steps", type=int, default=120)
    p.add_argument("--grpo-lr", type=float, default=1e-3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--sft-adapter", default=None, help="reuse this SFT adapter (an earlier run's) instead of training")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="grpo-experiment-")
    os.makedirs(work, exist_ok=True)
    tok = build_byte_tokenizer()
    started = time.time()

    # 1. SFT on many bundled questions, none of the 48 held out (as peftkern demo)
    train_items, _ = tasks.split(args.sft_examples, BUNDLED_EVAL, args.seed)
    sft_data = os.path.join(work, "sft.jsonl")
    _write_jsonl(sft_data, tasks.sft_records(train_items))
    common = dict(model="tiny", lora_r=16, lora_alpha=32.0, max_length=128, quiet=True, strategy="none",
                  overwrite=True, seed=args.seed, log_every=1)
    t = time.time()
    sft_out = os.path.join(work, "sft")
    sft_adapter = args.sft_adapter or os.path.join(sft_out, "adapter")
    if not args.sft_adapter:
        build_trainer("sft", TrainConfig(out=sft_out, data=sft_data, lr=5e-3, batch_size=16,
                                         max_steps=args.sft_steps, warmup_steps=10, **common).check()).train()
    sft_seconds = time.time() - t

    # 2. GRPO on the bundled prompts (the trainers' training split), from the SFT model
    t = time.time()
    grpo_out = os.path.join(work, "grpo")
    cfg = TrainConfig(out=grpo_out, init_adapter=sft_adapter, lr=args.grpo_lr,
                      batch_size=args.prompts, num_generations=args.generations, max_completion_length=8,
                      max_steps=args.grpo_steps, temperature=args.temperature, **common).check()
    trainer = build_trainer("grpo", cfg)
    summary = trainer.train()
    grpo_seconds = time.time() - t

    # 3. held-out exact match, SFT vs SFT + GRPO, by peftkern.evaluation
    sft_em = _exact_match([sft_adapter], tok, BUNDLED_EVAL)
    grpo_em = _exact_match([sft_adapter, os.path.join(grpo_out, "adapter")], tok, BUNDLED_EVAL)
    steps = [r for r in read_log(os.path.join(grpo_out, "log.jsonl")) if "loss" in r]
    tenth = max(1, len(steps) // 10)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, 1 torch thread", "torch": torch.__version__,
        "settings": vars(args),
        "held_out_exact_match": {"sft": sft_em, "sft+grpo": grpo_em, "questions": BUNDLED_EVAL},
        "train_reward": {"first_tenth": mean(steps[:tenth], "reward"), "last_tenth": mean(steps[-tenth:], "reward"),
                         "exact_first_tenth": mean(steps[:tenth], "rewards/exact_answer"),
                         "exact_last_tenth": mean(steps[-tenth:], "rewards/exact_answer")},
        "eval_reward": {"before": summary["eval_before"], "after": summary["eval_after"]},
        "seconds": {"sft": round(sft_seconds, 1), "grpo": round(grpo_seconds, 1),
                    "total": round(time.time() - started, 1)},
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{dt.date.today().isoformat()}-grpo-experiment")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    r = report
    lines = [f"# GRPO on the embedded default ({r['date']}, {r['device']})", "",
             "| | SFT | SFT + GRPO |", "|---|---|---|",
             f"| held-out exact match ({BUNDLED_EVAL} questions, greedy) | {sft_em:.3f} | {grpo_em:.3f} |",
             f"| training reward, first / last tenth of the GRPO run | | {r['train_reward']['first_tenth']:.3f} -> "
             f"{r['train_reward']['last_tenth']:.3f} |",
             f"| training exact answers, first / last tenth | | {r['train_reward']['exact_first_tenth']:.3f} -> "
             f"{r['train_reward']['exact_last_tenth']:.3f} |", "",
             f"settings: {json.dumps(r['settings'])}; seconds: {json.dumps(r['seconds'])}"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
