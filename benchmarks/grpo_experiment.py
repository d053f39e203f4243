"""The GRPO figures of the README: does ``peftkern grpo`` with the bundled exact-answer reward raise
held-out exact match over the SFT model it starts from, on the embedded default (the shipped 2.76M
base), and does the mean reward rise during training?

    python benchmarks/grpo_experiment.py [--seeds 0,1,2] [--grpo-steps 30] [--out benchmarks/results]

Per seed, through the CLI (``python -m peftkern``), as a user runs it:

1. ``peftkern sft``: LoRA (r 16, every linear) on the shipped tiny Llama, the bundled skills as chat
   turns (the demo's split: 2400 SFT questions, none of the 60 held out), lr 3e-3, 150 steps.
2. ``peftkern grpo --init-adapter <sft>/adapter``: a fresh LoRA on the SFT-merged model, 1600 other
   training prompts (with their ``answer``), G 8 completions of 8 prompts per step, reward = exact
   answer (1) + 0.2 x format (the bundled default), loss dapo, beta 0, temperature 1, lr 6e-4 (the
   demo's GRPO stage, fp32 here).
3. Greedy answers to the 60 held-out questions (the demo's held-out split, the same for every seed)
   of the SFT model and of SFT + GRPO (the two adapters stacked), exact match, and the paired count
   of questions that flipped each way; the mean training reward over the first and last fifth of the
   GRPO run (``log.jsonl``).

Also the held-out sampled accuracy (6 samples per question at temperature 1: the expected reward of
the sampling policy, what GRPO maximizes). Writes ``<out>/<date>-grpo-experiment-<steps>steps-lr<lr>.json``
and ``.md``; ``--reuse`` keeps finished runs in ``--work`` (another GRPO setting reuses the SFT runs).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from peftkern.generate.metrics import exact_match  # noqa: E402
from peftkern.models import build_byte_tokenizer, tasks  # noqa: E402
from peftkern.train.demo import greedy_answers, sampled_accuracy  # noqa: E402
from peftkern.train.logs import read_log  # noqa: E402
from peftkern.train.pretrain import build_pretrained_tiny  # noqa: E402
from peftkern.tuners import load_adapter  # noqa: E402

N_SFT, N_RL, N_EVAL = 2400, 1600, 60  # the demo's full plan
SAMPLES_PER_PROMPT = 6  # the demo's held-out sampled accuracy
REUSE = False


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _cli(out: str, *args: str) -> float:
    """Run ``python -m peftkern <args> --out <out>`` (this checkout, one torch thread) unless ``out``
    already holds a finished run's adapter (``--reuse``); returns the run's seconds (metrics.json)."""
    if not (REUSE and os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))):
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "peftkern", *args, "--out", out, "--quiet"], check=True, env=env,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["seconds"]


def _answers(adapters: list[str], tok, items, seed: int) -> tuple[list[str], float]:
    """(greedy answers, sampled accuracy) of the tiny base with ``adapters`` stacked."""
    lm = build_pretrained_tiny(quiet=True)
    for i, path in enumerate(adapters):
        lm = load_adapter(lm, path, adapter_name=f"a{i}", is_trainable=False)
    lm.set_adapter([f"a{i}" for i in range(len(adapters))])
    lm.eval()
    return greedy_answers(lm, tok, items)[1], sampled_accuracy(lm, tok, items, SAMPLES_PER_PROMPT, seed)


def run_seed(seed: int, args, work: str, sft_items, rl_items, held_out, tok) -> dict:
    out = os.path.join(work, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    sft_data, rl_data = os.path.join(out, "sft.jsonl"), os.path.join(out, "rl.jsonl")
    _write_jsonl(sft_data, tasks.sft_records(sft_items))
    _write_jsonl(rl_data, tasks.prompt_records(rl_items))
    common = ["--model", "tiny", "--lora-r", "16", "--lora-alpha", "32", "--max-length", "128", "--seed", str(seed),
              "--strategy", "none", "--overwrite", "--log-every", "1", "--schedule", "cosine", "--keep-last", "1"]
    grpo_dir = os.path.join(out, f"grpo-{args.grpo_steps}steps-lr{args.grpo_lr:g}")
    sft_s = _cli(os.path.join(out, "sft"), "sft", *common, "--data", sft_data, "--lr", "3e-3",
                 "--batch-size", "16", "--max-steps", str(args.sft_steps), "--warmup-steps", str(min(10, args.sft_steps)))
    grpo_s = _cli(grpo_dir, "grpo", *common, "--data", rl_data,
                  "--init-adapter", os.path.join(out, "sft", "adapter"), "--lr", str(args.grpo_lr),
                  "--batch-size", str(args.prompts), "--num-generations", str(args.generations),
                  "--max-completion-length", "8", "--max-steps", str(args.grpo_steps), "--warmup-steps", str(min(2, args.grpo_steps)),
                  "--beta", "0", "--loss-type", "dapo", "--temperature", "1")
    gold = [a for _, a, _ in held_out]
    sft_ans, sft_sampled = _answers([os.path.join(out, "sft", "adapter")], tok, held_out, seed)
    grpo_ans, grpo_sampled = _answers([os.path.join(out, "sft", "adapter"), os.path.join(grpo_dir, "adapter")], tok,
                                      held_out, seed)
    sft_ok = [a.strip() == g for a, g in zip(sft_ans, gold)]
    grpo_ok = [a.strip() == g for a, g in zip(grpo_ans, gold)]
    steps = [r for r in read_log(os.path.join(grpo_dir, "log.jsonl")) if "reward" in r and "loss" in r]
    fifth = max(1, len(steps) // 5)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {
        "seed": seed,
        "exact_match": {"sft": exact_match(sft_ans, gold), "sft+grpo": exact_match(grpo_ans, gold)},
        "sampled_accuracy": {"sft": sft_sampled, "sft+grpo": grpo_sampled},
        "flips": {"wrong_to_right": sum(not a and b for a, b in zip(sft_ok, grpo_ok)),
                  "right_to_wrong": sum(a and not b for a, b in zip(sft_ok, grpo_ok))},
        "train_reward": {"first_fifth": mean(steps[:fifth], "reward"), "last_fifth": mean(steps[-fifth:], "reward"),
                         "exact_first_fifth": mean(steps[:fifth], "rewards/exact_answer"),
                         "exact_last_fifth": mean(steps[-fifth:], "rewards/exact_answer"),
                         "per_step": [round(r["reward"], 4) for r in steps]},
        "seconds": {"sft": round(sft_s, 1), "grpo": round(grpo_s, 1)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--grpo-lr", type=float, default=6e-4)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--reuse", action="store_true", help="keep the runs already finished in --work (evaluate again)")
    args = p.parse_args(argv)
    global REUSE
    REUSE = args.reuse
    torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="grpo-experiment-")
    tok = build_byte_tokenizer()
    train_items, held_out = tasks.split(N_SFT + N_RL, N_EVAL, 0)  # the demo's split
    sft_items, rl_items = train_items[:N_SFT], train_items[N_SFT:]
    started = time.time()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(run_seed(seed, args, work, sft_items, rl_items, held_out, tok))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "train_reward"}), flush=True)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": f"{platform.processor() or platform.machine()}, 1 torch thread per run",
              "torch": torch.__version__, "settings": vars(args), "held_out_questions": N_EVAL, "runs": runs,
              "load_average": os.getloadavg()[0], "seconds": round(time.time() - started, 1)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{dt.date.today().isoformat()}-grpo-experiment-{args.grpo_steps}steps-lr{args.grpo_lr:g}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    up = sum(r["flips"]["wrong_to_right"] for r in runs)
    down = sum(r["flips"]["right_to_wrong"] for r in runs)
    lines = ["# GRPO on the embedded default: held-out exact match over the SFT model (measured, CPU)", "",
             f"`benchmarks/grpo_experiment.py`, {report['date']}: per seed `peftkern sft` (LoRA r 16, lr 3e-3, "
             f"{args.sft_steps} steps) then `peftkern grpo --init-adapter` (exact answer + 0.2 x format, dapo, beta 0, "
             f"{args.prompts} prompts x G {args.generations}, lr {args.grpo_lr:g}, {args.grpo_steps} steps) on the shipped "
             f"2.76M base; greedy exact match on the demo's {N_EVAL} held-out questions (the same for every seed; one "
             f"question = {1 / N_EVAL:.3f}); {report['device']}, torch {torch.__version__}, load average "
             f"{report['load_average']:.1f} at the end.", "",
             "| seed | exact match SFT -> SFT + GRPO | questions wrong -> right / right -> wrong | sampled accuracy "
             f"({SAMPLES_PER_PROMPT} per question) | training reward, first -> last fifth | exact answers, first -> last "
             "fifth | seconds SFT / GRPO |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        e, t = r["exact_match"], r["train_reward"]
        lines.append(f"| {r['seed']} | {e['sft']:.3f} -> {e['sft+grpo']:.3f} | {r['flips']['wrong_to_right']} / "
                     f"{r['flips']['right_to_wrong']} | {r['sampled_accuracy']['sft']:.3f} -> {r['sampled_accuracy']['sft+grpo']:.3f} | {t['first_fifth']:.3f} -> {t['last_fifth']:.3f} | "
                     f"{t['exact_first_fifth']:.3f} -> {t['exact_last_fifth']:.3f} | {r['seconds']['sft']:.0f} / "
                     f"{r['seconds']['grpo']:.0f} |")
    mean_sft = sum(r["exact_match"]["sft"] for r in runs) / len(runs)
    mean_grpo = sum(r["exact_match"]["sft+grpo"] for r in runs) / len(runs)
    lines += ["", f"Mean over seeds: {mean_sft:.3f} -> {mean_grpo:.3f}; flips over all seeds: {up} wrong -> right, "
              f"{down} right -> wrong (a sign test over the {up + down} flipped questions)."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
