"""RLAIF labels: the A/B swap mirror, label accuracy of the rule labeller on pairs with a known better
answer, the threshold, and sampled pairs (micro model)."""
import math

import pytest

from peftkern.alignment import rlaif
from peftkern.alignment.constitution import load_constitution
from peftkern.alignment.known_pairs import known_pairs
from peftkern.models import build_byte_tokenizer, build_tiny_model

TASKS = load_constitution("tasks")


@pytest.fixture(scope="module")
def lm():
    return build_tiny_model("micro", seed=2).eval(), build_byte_tokenizer()


def test_swap_gives_the_mirrored_probability(lm):
    model, tok = lm
    pairs = known_pairs(6)
    labeller = rlaif.ModelLabeller(model, tok, TASKS, batch_size=4)
    prompts, a, b = [p for p, _, _ in pairs], [x for _, x, _ in pairs], [y for _, _, y in pairs]
    principles = [TASKS.principles[i % 3] for i in range(len(pairs))]
    ab = labeller.prob_a(prompts, a, b, principles)
    ba = labeller.prob_a(prompts, b, a, principles)
    assert all(0.0 < p < 1.0 for p in ab)
    assert ab == pytest.approx([1.0 - p for p in ba], abs=1e-6)
    # one order: the softmax of the two answers' log-probs, which is not mirrored (position bias)
    one = labeller.one_order(prompts, a, b, principles)
    swapped = labeller.one_order(prompts, b, a, principles)
    assert ab == pytest.approx([(x + 1.0 - y) / 2 for x, y in zip(one, swapped)], abs=1e-9)


def test_rule_labeller_is_right_on_known_pairs():
    pairs = known_pairs(30)
    res = rlaif.label_accuracy(rlaif.RewardLabeller(rlaif.rules_scorer(TASKS)), pairs, TASKS)
    assert res["accuracy"] == 1.0 and res["pairs"] == 30
    # the mirror holds for a reward labeller by construction
    lab = rlaif.RewardLabeller(lambda ps, cs: [float(len(c)) for c in cs], temperature=2.0)
    p = lab.prob_a(["q"], ["abc"], ["a"])[0]
    assert p == pytest.approx(1 / (1 + math.exp(-1.0))) and lab.prob_a(["q"], ["a"], ["abc"])[0] == pytest.approx(1 - p)
    with pytest.raises(ValueError, match="no principle has rule checks"):
        rlaif.rules_scorer(load_constitution("default"))


def test_preference_records_threshold():
    msgs = [{"role": "user", "content": "Reverse 'kel'."}]
    labelled = [{"prompt": msgs, "a": "lek", "b": "LEK", "principle": "x", "p_a": 0.9},
                {"prompt": msgs, "a": "lek", "b": "kel", "principle": "x", "p_a": 0.3},
                {"prompt": msgs, "a": "lek", "b": "lek", "principle": "x", "p_a": 0.9},   # same answer: dropped
                {"prompt": msgs, "a": "lek", "b": "kel", "principle": "x", "p_a": 0.5}]   # no preference: dropped
    recs = rlaif.preference_records(labelled, 0.5)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in recs] == [("lek", "LEK"), ("kel", "lek")]
    assert recs[1]["confidence"] == pytest.approx(0.7)
    assert len(rlaif.preference_records(labelled, 0.8)) == 1
    with pytest.raises(ValueError, match=r"label threshold must be in \[0.5, 1\]"):
        rlaif.preference_records(labelled, 0.3)


def test_sample_and_label_pairs(lm):
    model, tok = lm
    prompts = [p for p, _, _ in known_pairs(4)]
    pairs = rlaif.sample_pairs(model, tok, prompts, max_new_tokens=4, seed=3)
    assert len(pairs) == 4 and pairs == rlaif.sample_pairs(model, tok, prompts, max_new_tokens=4, seed=3)
    labelled = rlaif.label_pairs(rlaif.ModelLabeller(model, tok, TASKS), pairs, TASKS, seed=0)
    assert [r["a"] for r in labelled] == [a for _, a, _ in pairs]
    assert all(0 < r["p_a"] < 1 and r["principle"] in {p.name for p in TASKS.principles} for r in labelled)
