"""The GRPO figures of the README: does ``peftkern grpo`` with the bundled exact-answer reward raise
held-out exact match over the SFT model it starts from, on the embedded default (the shipped 2.76M
base), and does the mean reward rise during training?

    python benchmarks/grpo_experiment.py [--seeds 0,1,...,9] [--split disjoint] [--grpo-steps 120]
        [--grpo-lr 1e-3] [--rl-skills upper,reverse] [--work DIR --reuse] [--out benchmarks/results]

(the defaults are the README's setting: ~6 CPU-minutes per seed at 1 thread)

Per seed, through the CLI (``python -m peftkern``), as a user runs it:

1. ``peftkern sft``: LoRA (r 16, every linear) on the shipped tiny Llama, the bundled skills as chat
   turns, lr 3e-3, batch 16, ``--sft-steps`` (150: the demo's SFT stage, fp32 here).
2. ``peftkern grpo --init-adapter <sft>/adapter``: a fresh LoRA on the SFT-merged model, G 8
   completions of 8 prompts per step, reward = exact answer (1) + 0.2 x format (the bundled default),
   loss dapo, beta 0, temperature 1, ``--grpo-lr``, ``--grpo-steps``.
3. Greedy answers to the 60 held-out questions (the demo's held-out split, the same for every seed)
   of the SFT model and of SFT + GRPO (the two adapters stacked): exact match (overall and per skill),
   the paired count of questions that flipped each way; the mean training reward over the first and
   last fifth of the GRPO run (``log.jsonl``); greedy exact match on GRPO's own (distinct) prompts.

``--split`` picks the SFT and GRPO questions among the ~270 distinct non-held-out ones (the bundled
tasks have only ~330 questions in all): ``demo`` as the demo (SFT's 2400 and GRPO's 1600 draws come
from the same questions, so GRPO re-trains what SFT already fitted); ``disjoint`` (default) gives
each distinct question to one stage only (alternating per skill), so GRPO's prompts are questions the
SFT model has never seen, like the held-out ones. ``--rl-skills`` keeps only those skills' GRPO prompts
(default upper and reverse: the base never learnt the sums, docs/grpo.md "Results").

Also the held-out sampled accuracy (6 samples per question at temperature 1: the expected reward of
the sampling policy, what GRPO maximizes). Writes ``<out>/<date>-grpo-experiment-<setting>.json``
and ``.md``; ``--reuse`` keeps finished runs in ``--work`` (another GRPO setting reuses the SFT runs;
seeds may be trained by parallel invocations and then evaluated together).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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


def _distinct(items) -> list:
    seen, out = set(), []
    for it in items:
        if it[0] not in seen:
            seen.add(it[0])
            out.append(it)
    return out


def stage_items(split: str, rl_skills: tuple[str, ...]):
    """(SFT items, GRPO items, held-out items) of (question, answer, wrong). ``demo``: the demo's split
    (both stages draw from the same questions); ``disjoint``: each distinct non-held-out question goes
    to one stage, alternating per skill in order of first appearance."""
    train, held_out = tasks.split(N_SFT + N_RL, N_EVAL, 0)  # the demo's split
    if split == "demo":
        sft, rl = train[:N_SFT], train[N_SFT:]
    else:
        seen: dict[str, int] = {}
        side = {}
        for q, _, _ in _distinct(train):
            skill = tasks.skill_of(q)
            side[q] = seen.get(skill, 0) % 2
            seen[skill] = seen.get(skill, 0) + 1
        sft = [it for it in train if side[it[0]] == 0][:N_SFT]
        rl = [it for it in train if side[it[0]] == 1][:N_RL]
    return sft, [it for it in rl if tasks.skill_of(it[0]) in rl_skills], held_out


def _cli(out: str, *args: str) -> float:
    """Run ``python -m peftkern <args> --out <out>`` (this checkout, one torch thread) unless ``out``
    already holds a finished run's adapter (``--reuse``); returns the run's seconds (metrics.json)."""
    if not (REUSE and os.path.isfile(os.path.join(out, "adapter", "adapter_config.json"))):
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "peftkern", *args, "--out", out, "--quiet"], check=True, env=env,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["seconds"]


def _model(adapters: list[str]):
    """The tiny base with ``adapters`` stacked, in eval mode."""
    lm = build_pretrained_tiny(quiet=True)
    for i, path in enumerate(adapters):
        lm = load_adapter(lm, path, adapter_name=f"a{i}", is_trainable=False)
    lm.set_adapter([f"a{i}" for i in range(len(adapters))])
    return lm.eval()


def _right(answers: list[str], items) -> list[bool]:
    return [a.strip() == gold for a, (_, gold, _) in zip(answers, items)]


def _per_skill(ok: list[bool], items) -> dict:
    out = {}
    for skill in tasks.SKILLS:
        rows = [o for o, (q, _, _) in zip(ok, items) if tasks.skill_of(q) == skill]
        if rows:
            out[skill] = round(sum(rows) / len(rows), 4)
    return out


def _flips(before: list[bool], after: list[bool], items, skill: str | None = None) -> list[int]:
    """[wrong -> right, right -> wrong] counts over ``items`` (of ``skill`` only, when given)."""
    pairs = [(a, b) for a, b, (q, _, _) in zip(before, after, items) if skill is None or tasks.skill_of(q) == skill]
    return [sum(not a and b for a, b in pairs), sum(a and not b for a, b in pairs)]


def evaluate(adapters: list[str], tok, held_out, rl_distinct, seed: int) -> dict:
    lm = _model(adapters)
    answers = greedy_answers(lm, tok, held_out)[1]
    ok = _right(answers, held_out)
    rl_ok = _right(greedy_answers(lm, tok, rl_distinct)[1], rl_distinct)
    return {"answers": answers, "ok": ok, "exact_match": exact_match(answers, [a for _, a, _ in held_out]),
            "per_skill": _per_skill(ok, held_out), "grpo_prompts_exact_match": sum(rl_ok) / len(rl_ok),
            "sampled_accuracy": sampled_accuracy(lm, tok, held_out, SAMPLES_PER_PROMPT, seed)}


def run_seed(seed: int, args, work: str, items, tok) -> dict:
    sft_items, rl_items, held_out = items
    out = os.path.join(work, f"seed{seed}", args.split)
    os.makedirs(out, exist_ok=True)
    skills = "" if set(args.rl_skills) == set(tasks.SKILLS) else "-" + "+".join(args.rl_skills)
    sft_dir = os.path.join(out, f"sft{args.sft_steps}")
    grpo_dir = os.path.join(out, f"sft{args.sft_steps}-grpo{args.grpo_steps}-lr{args.grpo_lr:g}{skills}")
    sft_data, rl_data = os.path.join(out, "sft.jsonl"), os.path.join(out, f"rl{skills}.jsonl")
    _write_jsonl(sft_data, tasks.sft_records(sft_items))
    _write_jsonl(rl_data, tasks.prompt_records(rl_items))
    common = ["--model", "tiny", "--lora-r", "16", "--lora-alpha", "32", "--max-length", "128", "--seed", str(seed),
              "--strategy", "none", "--overwrite", "--log-every", "1", "--schedule", "cosine", "--keep-last", "1"]
    sft_s = _cli(sft_dir, "sft", *common, "--data", sft_data, "--lr", "3e-3", "--batch-size", "16",
                 "--max-steps", str(args.sft_steps), "--warmup-steps", str(min(10, args.sft_steps)))
    grpo_s = _cli(grpo_dir, "grpo", *common, "--data", rl_data,
                  "--init-adapter", os.path.join(sft_dir, "adapter"), "--lr", str(args.grpo_lr),
                  "--batch-size", str(args.prompts), "--num-generations", str(args.generations),
                  "--max-completion-length", "8", "--max-steps", str(args.grpo_steps), "--warmup-steps", str(min(2, args.grpo_steps)),
                  "--beta", "0", "--loss-type", "dapo", "--temperature", "1")
    if args.train_only:
        return {}
    rl_distinct = _distinct(rl_items)
    sft = evaluate([os.path.join(sft_dir, "adapter")], tok, held_out, rl_distinct, seed)
    grpo = evaluate([os.path.join(sft_dir, "adapter"), os.path.join(grpo_dir, "adapter")], tok, held_out, rl_distinct,
                    seed)
    steps = [r for r in read_log(os.path.join(grpo_dir, "log.jsonl")) if "reward" in r and "loss" in r]
    fifth = max(1, len(steps) // 5)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    pick = lambda k: {"sft": sft[k], "sft+grpo": grpo[k]}  # noqa: E731
    return {
        "seed": seed,
        "exact_match": pick("exact_match"), "per_skill": pick("per_skill"),
        "sampled_accuracy": pick("sampled_accuracy"), "grpo_prompts_exact_match": pick("grpo_prompts_exact_match"),
        "grpo_prompts": len(rl_distinct),
        "flips": dict(zip(("wrong_to_right", "right_to_wrong"), _flips(sft["ok"], grpo["ok"], held_out))),
        "flips_per_skill": {k: _flips(sft["ok"], grpo["ok"], held_out, k) for k in tasks.SKILLS},
        "flipped": [{"question": q, "answer": g, "sft": a, "sft+grpo": b}
                    for (q, g, _), a, b, x, y in zip(held_out, sft["answers"], grpo["answers"], sft["ok"], grpo["ok"])
                    if x != y],
        "train_reward": {"first_fifth": mean(steps[:fifth], "reward"), "last_fifth": mean(steps[-fifth:], "reward"),
                         "exact_first_fifth": mean(steps[:fifth], "rewards/exact_answer"),
                         "exact_last_fifth": mean(steps[-fifth:], "rewards/exact_answer"),
                         "per_step": [round(r["reward"], 4) for r in steps]},
        "seconds": {"sft": round(sft_s, 1), "grpo": round(grpo_s, 1)},
    }


def sign_test(up: int, down: int) -> float:
    """Two-sided exact binomial p-value of ``up`` vs ``down`` flips under no effect (p = 1/2)."""
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(up, down) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _setting(args) -> str:
    skills = "" if set(args.rl_skills) == set(tasks.SKILLS) else "-" + "+".join(args.rl_skills)
    return f"{args.split}-sft{args.sft_steps}-grpo{args.grpo_steps}-lr{args.grpo_lr:g}{skills}"


def report_md(report: dict, args) -> str:
    runs = report["runs"]
    up = sum(r["flips"]["wrong_to_right"] for r in runs)
    down = sum(r["flips"]["right_to_wrong"] for r in runs)
    n = len(runs)
    avg = lambda f: sum(f(r) for r in runs) / n  # noqa: E731
    split = {"demo": "the demo's split (SFT and GRPO draw from the same questions)",
             "disjoint": "disjoint split (GRPO's prompts are questions SFT never saw)"}[args.split]
    lines = ["# GRPO on the embedded default: held-out exact match over the SFT model (measured, CPU)", "",
             f"`benchmarks/grpo_experiment.py {report['command']}`, {report['date']}: per seed `peftkern sft` (LoRA r 16, "
             f"lr 3e-3, {args.sft_steps} steps) then `peftkern grpo --init-adapter` (exact answer + 0.2 x format, dapo, "
             f"beta 0, {args.prompts} prompts x G {args.generations}, lr {args.grpo_lr:g}, {args.grpo_steps} steps, "
             f"GRPO prompts: {', '.join(args.rl_skills)}) on the shipped 2.76M base, {split}; greedy exact match on the "
             f"demo's {N_EVAL} held-out questions (20 per skill, the same for every seed; one question = "
             f"{1 / N_EVAL:.3f}); {report['device']}, torch {torch.__version__}, load average "
             f"{report['load_average']:.1f} at the end.", "",
             "| seed | held-out exact match SFT -> SFT + GRPO | upper / reverse / add | wrong -> right / right -> wrong "
             f"| held-out sampled accuracy ({SAMPLES_PER_PROMPT}/question) | GRPO prompts' exact match | training "
             "reward, first -> last fifth | exact answers, first -> last fifth | seconds SFT / GRPO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e, t, s, g = r["exact_match"], r["train_reward"], r["sampled_accuracy"], r["grpo_prompts_exact_match"]
        skills = " / ".join(f"{r['per_skill']['sft'][k]:.2f} -> {r['per_skill']['sft+grpo'][k]:.2f}" for k in tasks.SKILLS)
        lines.append(f"| {r['seed']} | {e['sft']:.3f} -> {e['sft+grpo']:.3f} ({e['sft+grpo'] - e['sft']:+.3f}) | {skills} | "
                     f"{r['flips']['wrong_to_right']} / {r['flips']['right_to_wrong']} | {s['sft']:.3f} -> "
                     f"{s['sft+grpo']:.3f} | {g['sft']:.3f} -> {g['sft+grpo']:.3f} | {t['first_fifth']:.3f} -> "
                     f"{t['last_fifth']:.3f} | {t['exact_first_fifth']:.3f} -> {t['exact_last_fifth']:.3f} | "
                     f"{r['seconds']['sft']:.0f} / {r['seconds']['grpo']:.0f} |")
    gains = [r["exact_match"]["sft+grpo"] - r["exact_match"]["sft"] for r in runs]
    per_skill = {k: [sum(r["flips_per_skill"][k][i] for r in runs) for i in (0, 1)] for k in tasks.SKILLS}
    by_skill = "; ".join(f"{k} {u} / {d}" for k, (u, d) in per_skill.items())
    rises = sum(r["train_reward"]["last_fifth"] > r["train_reward"]["first_fifth"] for r in runs)
    lines += ["", f"Mean over {n} seeds: held-out exact match {avg(lambda r: r['exact_match']['sft']):.3f} -> "
              f"{avg(lambda r: r['exact_match']['sft+grpo']):.3f} ({sum(gains) / n:+.3f}; per seed "
              f"{', '.join(f'{g:+.3f}' for g in gains)}); flips over all seeds: {up} wrong -> right, {down} right -> "
              f"wrong (two-sided sign test p = {sign_test(up, down):.3f}; per skill {by_skill}); held-out sampled accuracy "
              f"{avg(lambda r: r['sampled_accuracy']['sft']):.3f} -> {avg(lambda r: r['sampled_accuracy']['sft+grpo']):.3f}; "
              f"GRPO prompts' greedy exact match {avg(lambda r: r['grpo_prompts_exact_match']['sft']):.3f} -> "
              f"{avg(lambda r: r['grpo_prompts_exact_match']['sft+grpo']):.3f}; training reward first -> last fifth "
              f"{avg(lambda r: r['train_reward']['first_fifth']):.3f} -> {avg(lambda r: r['train_reward']['last_fifth']):.3f} "
              f"(rose in {rises} of {n} seeds)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--split", choices=("demo", "disjoint"), default="disjoint")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--grpo-steps", type=int, default=120)
    p.add_argument("--grpo-lr", type=float, default=1e-3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--rl-skills", default="upper,reverse", help="skills of GRPO's prompts (comma-separated)")
    p.add_argument("--reuse", action="store_true", help="keep the runs already finished in --work (evaluate again)")
    p.add_argument("--train-only", action="store_true", help="train the seeds' runs, evaluate and write nothing")
    args = p.parse_args(argv)
    args.rl_skills = tuple(s for s in args.rl_skills.split(",") if s)
    unknown = set(args.rl_skills) - set(tasks.SKILLS)
    if unknown or not args.rl_skills:
        p.error(f"--rl-skills: {sorted(unknown) or 'none given'}; expected some of {', '.join(tasks.SKILLS)}")
    global REUSE
    REUSE = args.reuse
    torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="grpo-experiment-")
    tok = build_byte_tokenizer()
    items = stage_items(args.split, args.rl_skills)
    started = time.time()
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs.append(run_seed(seed, args, work, items, tok))
        if runs[-1]:
            print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("train_reward", "flipped")}), flush=True)
    if args.train_only:
        return 0
    command = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
              "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread per run",
              "torch": torch.__version__, "settings": vars(args), "held_out_questions": N_EVAL, "runs": runs,
              "load_average": os.getloadavg()[0], "seconds": round(time.time() - started, 1)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{dt.date.today().isoformat()}-grpo-experiment-{_setting(args)}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    text = report_md(report, args)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
