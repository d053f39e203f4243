"""Reward-model measurements on the embedded default (``--model tiny`` and its bundled pairs), CPU:

1. calibration: a reward model (4-head ensemble, LoRA) trained on the bundled training pairs; the
   temperature fitted on one held-out set of pairs (``peftkern rm-calibrate``'s path) and the ECE
   measured before / after on a second held-out set it never saw;
2. ensemble disagreement: the heads' standard deviation on held-out in-distribution pairs (bundled
   skills, unseen questions) against out-of-distribution prompts and answers (other tasks, free text).

    PYTHONPATH=. python benchmarks/reward_experiment.py --out /tmp/reward_exp [--model tiny]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from peftkern.models import tasks
from peftkern.train.calibration import calibrate, expected_calibration_error, pair_nll, plot_reliability
from peftkern.train.config import TrainConfig
from peftkern.train.loading import load_tokenizer
from peftkern.train.rm import collate_rankings, load_reward_model, pair_margins, rm_examples
from peftkern.train.rm_cli import calibrate_reward_model
from peftkern.train.run import BUNDLED_EVAL, BUNDLED_TRAIN, build_trainer

OOD_PROMPTS = ["Translate 'kelo' into French.", "What is 7 * 8?", "Name a colour of the sky.",
               "Write a haiku about rain.", "Who wrote Hamlet?", "Sort the letters of 'dcba'.",
               "What is the capital of Peru?", "Count the vowels in 'banana'.", "Is 17 a prime number?",
               "Spell 'cat' backwards twice."]
OOD_ANSWERS = ["Bonjour", "56", "blue", "Rain falls soft", "Shakespeare", "abcd", "Lima", "3", "yes", "tactac",
               "I do not know.", "42", "KELO", "ok"]


def held_out_items(n: int, seed: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    """n fresh (question, answer, wrong) of the bundled skills, none in ``exclude`` (which grows)."""
    rng, out, tries = random.Random(seed), [], 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        q = tasks.make_question(rng, tasks.SKILLS[len(out) % 2])  # upper, reverse: sums are few and seen
        if q[0] not in exclude:
            exclude.add(q[0])
            out.append(q)
    return out


def write(path: str, records: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/reward_exp")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--ensemble", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=200, help="held-out pairs in each of the fit and test sets")
    ap.add_argument("--ensemble-adapters", action="store_true", help="the ensemble as N adapters (one per head)")
    ap.add_argument("--independent", type=int, default=0, help="also N independent one-head reward models (own "
                    "seed, own bootstrap resample, own LoRA): their disagreement, for comparison with the heads'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    train, held = tasks.split(BUNDLED_TRAIN, BUNDLED_EVAL, 0)
    seen = {q for q, _, _ in train} | {q for q, _, _ in held}
    fit_items, test_items = held_out_items(args.pairs, 101, seen), held_out_items(args.pairs, 202, seen)
    fit_path = write(os.path.join(args.out, "calib_fit.jsonl"), tasks.preference_records(fit_items))
    test_path = write(os.path.join(args.out, "calib_test.jsonl"), tasks.preference_records(test_items))

    cfg = TrainConfig(model=args.model, out=os.path.join(args.out, "rm"), quiet=True, strategy="none", seed=0,
                      lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lr=args.lr, batch_size=16,
                      max_steps=args.steps, warmup_steps=5,
                      ensemble=args.ensemble, ensemble_adapters=args.ensemble_adapters, overwrite=True,
                      log_every=10).check()
    start = time.time()
    torch.manual_seed(0)
    summary = build_trainer("rm", cfg).train()
    train_s = time.time() - start
    rm_dir = os.path.join(cfg.out, "reward_model")
    fit = calibrate_reward_model(rm_dir, fit_path, plot=os.path.join(args.out, "reliability_fit.png"))
    t = fit["temperature"]
    model = load_reward_model(rm_dir, calibrated=False)
    tok_src = load_tokenizer(cfg)
    test_ex = rm_examples(tok_src, test_path, cfg)
    d = pair_margins(model, test_ex, tok_src.pad_token_id)
    plot_reliability(d, t, os.path.join(args.out, "reliability_test.png"),
                     title=f"{args.model} reward model, held-out test pairs (T fitted on other pairs)")
    test = {"pairs": int(d.numel()), "accuracy": float((d > 0).double().mean()),
            "ece_before": expected_calibration_error(d, 1.0), "ece_after": expected_calibration_error(d, t),
            "nll_before": pair_nll(d), "nll_after": pair_nll(d, t), "ece_if_fitted_here": calibrate(d)["ece_after"]}

    # disagreement: in-distribution (unseen bundled questions, right and wrong answers) vs OOD
    def mean_disagreement(prompts, answers, spread=None) -> tuple[float, int]:
        seqs = []
        for p, a in zip(prompts, answers):
            rec = [{"prompt": tasks._prompt(p), "chosen": [{"role": "assistant", "content": a}],
                    "rejected": [{"role": "assistant", "content": a}]}]
            seqs.append(rm_examples(tok_src, rec, cfg)[0]["ranked"][0])
        examples = [{"ranked": seqs[i:i + 2], "margin": 0.0} for i in range(0, len(seqs) - 1, 2)]
        values = []
        with torch.no_grad():
            for i in range(0, len(examples), 16):
                batch = collate_rankings(examples[i:i + 16], tok_src.pad_token_id)
                values += (spread or model.uncertainty)(batch["input_ids"], batch["attention_mask"]).tolist()
        return sum(values) / len(values), len(values)

    id_prompts = [q for q, _, _ in test_items[:100] for _ in range(2)]
    id_answers = [x for _, a, w in test_items[:100] for x in (a, w)]
    rng = random.Random(7)
    ood_prompts = [rng.choice(OOD_PROMPTS) for _ in range(200)]
    ood_answers = [rng.choice(OOD_ANSWERS) for _ in range(200)]
    id_d, id_n = mean_disagreement(id_prompts, id_answers)
    ood_d, ood_n = mean_disagreement(ood_prompts, ood_answers)
    # OOD answers to in-distribution prompts (the answer alone is off-distribution)
    mix_d, _ = mean_disagreement(id_prompts, [rng.choice(OOD_ANSWERS) for _ in id_prompts])
    independent = None
    if args.independent:
        members = []
        records = tasks.preference_records(train)
        for i in range(args.independent):
            picks = random.Random(1000 + i).choices(range(len(records)), k=len(records))
            data = write(os.path.join(args.out, f"member{i}.jsonl"), [records[j] for j in picks])
            member_cfg = TrainConfig(**{**vars(cfg), "ensemble": 1, "ensemble_adapters": False, "seed": i, "data": data,
                                        "out": os.path.join(args.out, f"member{i}")}).check()
            torch.manual_seed(i)
            build_trainer("rm", member_cfg).train()
            members.append(load_reward_model(os.path.join(member_cfg.out, "reward_model")))

        def member_spread(ids, mask):
            return torch.stack([m(ids, mask)["scores"] for m in members], -1).std(-1, correction=0)
        i_id = mean_disagreement(id_prompts, id_answers, member_spread)[0]
        i_ood = mean_disagreement(ood_prompts, ood_answers, member_spread)[0]
        independent = {"members": args.independent, "in_distribution": i_id, "out_of_distribution": i_ood,
                       "ood_over_id": i_ood / i_id}
    report = {"model": args.model, "torch": torch.__version__, "threads": 1, "steps": args.steps,
              "ensemble": args.ensemble, "ensemble_adapters": args.ensemble_adapters, "lr": args.lr, "lora_r": args.lora_r, "train_seconds": round(train_s, 1),
              "eval_after": summary["eval_after"],
              "calibration_fit_set": {k: fit[k] for k in ("temperature", "pairs", "accuracy", "ece_before",
                                                          "ece_after", "nll_before", "nll_after")},
              "calibration_test_set": test,
              "disagreement": {"in_distribution": id_d, "n_id": id_n, "out_of_distribution": ood_d, "n_ood": ood_n,
                               "ood_over_id": ood_d / id_d if id_d else None, "id_prompt_ood_answer": mix_d},
              "independent_members": independent}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
