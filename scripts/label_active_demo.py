"""The labelling loop on the embedded default, with simulated raters, measured (docs/labeling.md).

    python scripts/label_active_demo.py OUT_DIR [--train 180] [--held 90] [--max-steps 40]

1. candidates: the bundled tasks' questions, each with its right answer and a typical wrong one, in a
   random order per item (train and held-out questions disjoint);
2. two simulated raters (right 90% and 80% of the time, independently) label every train item through
   the labels database, two raters per item; agreement statistics;
3. export (pooled pairs) and `peftkern rm --model tiny` on them;
4. the reward model's uncertainty on the held-out items, and its accuracy on the most and the least
   uncertain ones: what active learning would serve first. Writes OUT_DIR/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

from peftkern.cli import main as peftkern_main
from peftkern.evaluation.scoring import reward_model_scorer
from peftkern.labeling import LabelDB, agreement_report, export_pairs, read_items, uncertainties
from peftkern.models import build_byte_tokenizer, tasks


def write_candidates(path: str, questions, rng: random.Random) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q, right, wrong in questions:
            answers = [[{"role": "assistant", "content": right}], [{"role": "assistant", "content": wrong}]]
            flip = rng.randrange(2)
            if flip:
                answers.reverse()
            prompt = [{"role": "system", "content": tasks.SYSTEM_PROMPT}, {"role": "user", "content": q}]
            f.write(json.dumps({"prompt": prompt, "completions": answers, "right": flip}) + "\n")


def rights(path: str) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["right"] for line in f if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=180)
    p.add_argument("--held", type=int, default=90)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(args.out, name)

    held_q = tasks.questions(args.held, seed=args.seed + 6)
    train_q = tasks.questions(args.train, seed=args.seed + 5, exclude={q for q, _, _ in held_q})
    order = random.Random(args.seed + 1)
    write_candidates(path("train_cands.jsonl"), train_q, order)
    write_candidates(path("held_cands.jsonl"), held_q, order)

    items = read_items(path("train_cands.jsonl"))
    truth = dict(zip((it.id for it in items), rights(path("train_cands.jsonl"))))
    db_path = path("labels.sqlite")
    if os.path.exists(db_path):
        os.unlink(db_path)
    db = LabelDB.create_or_open(db_path, items, raters_per_item=2)
    rng = random.Random(args.seed)
    for name, accuracy in (("alice", 0.9), ("bob", 0.8)):
        while (got := db.next_item(name)) is not None:
            item, shown = got
            pick = truth[item.id] if rng.random() < accuracy else 1 - truth[item.id]
            db.save_label(name, item.id, "pairwise", {"choice": "AB"[shown.index(pick)]})
    stats = agreement_report(db.labels())["pairwise"]
    pairs = export_pairs(db)
    with open(path("prefs.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs)

    held_items = read_items(path("held_cands.jsonl"))
    held_truth = rights(path("held_cands.jsonl"))
    with open(path("held_prefs.jsonl"), "w", encoding="utf-8") as f:
        for it, k in zip(held_items, held_truth):
            f.write(json.dumps({"prompt": it.prompt, "chosen": it.completions[k], "rejected": it.completions[1 - k]})
                    + "\n")
    rm_dir = path("rm")
    code = peftkern_main(["rm", "--model", "tiny", "--data", path("prefs.jsonl"), "--eval-data", path("held_prefs.jsonl"),
                          "--lr", "5e-3", "--max-steps", str(args.max_steps), "--batch-size", "16", "--out", rm_dir,
                          "--quiet"])
    if code:
        return code

    score = reward_model_scorer(os.path.join(rm_dir, "reward_model"), build_byte_tokenizer())
    values = score([it.prompt for it in held_items for _ in it.completions],
                   [c for it in held_items for c in it.completions])
    unc = uncertainties(held_items, lambda prompts, completions: values)
    rows = sorted(((unc[it.id], (values[2 * n] > values[2 * n + 1]) == (held_truth[n] == 0))
                   for n, it in enumerate(held_items)), key=lambda r: -r[0])
    report = {"labels": len(db.labels()), "cohen_kappa": stats["cohen_kappa"]["alice|bob"]["kappa"],
              "fleiss_kappa": stats["fleiss_kappa"], "alpha_nominal": stats["alpha_nominal"],
              "pairs_exported": len(pairs),
              "pairs_right": sum(r["chosen_index"] == truth[r["item_id"]] for r in pairs),
              "rm_accuracy_held_out": sum(c for _, c in rows) / len(rows), "by_uncertainty": {}}
    for k in (len(rows) // 6, len(rows) // 3, len(rows) // 2):
        report["by_uncertainty"][k] = {"most_uncertain": sum(c for _, c in rows[:k]) / k,
                                       "most_certain": sum(c for _, c in rows[-k:]) / k}
    with open(path("report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
