"""RLAIF labeller accuracy on pairs with a known better answer (peftkern.alignment.known_pairs), on the
embedded default: the policy as labeller (the pretrained tiny base; the SFT'd start policy of the
pipeline when a policy directory is given), and the constitution's rule checker as a reward-function
labeller. Prints JSON. Usage: python benchmarks/alignment_experiment.py [POLICY_DIR ...]"""
from __future__ import annotations

import json
import sys
import time

import torch

from peftkern.alignment import rlaif
from peftkern.alignment.constitution import load_constitution
from peftkern.alignment.known_pairs import known_pairs
from peftkern.generate.loading import load_base, load_tokenizer


def main(policies: list[str]) -> dict:
    torch.set_num_threads(1)
    constitution = load_constitution("tasks")
    pairs = known_pairs(60)
    out = {"pairs": len(pairs), "torch": torch.__version__, "threads": 1, "labellers": {}}
    t = time.time()
    out["labellers"]["rules"] = rlaif.label_accuracy(rlaif.RewardLabeller(rlaif.rules_scorer(constitution)), pairs,
                                                     constitution)
    for name in ["tiny", *policies]:
        t = time.time()
        lm, tok = load_base(name), load_tokenizer(name)
        res = rlaif.label_accuracy(rlaif.ModelLabeller(lm, tok, constitution), pairs, constitution)
        res["seconds"] = round(time.time() - t, 2)
        out["labellers"][f"policy:{name}"] = res
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
