"""Augmentation (rephrasings, input typos) with its risk report; negatives counted and paired."""
import json
import random

import pytest

from peftkern.cli import main
from peftkern.data import augment, build_pairs, convert, count_negatives, looks_like_refusal
from peftkern.data.augmentation import REPHRASINGS, perturb, rephrase
from peftkern.data.converters import normalize_all
from peftkern.data.io import read_records
from peftkern.train.data import DataError
from tests.data.conftest import fixture


def items_of(path):
    return normalize_all(read_records(path))


def test_rephrase_keeps_the_request():
    assert rephrase("Translate the sentence.", "Please {lower}") == "Please translate the sentence."
    assert rephrase("NASA facts, please.", "Please {lower}") == "Please NASA facts, please."  # acronym kept
    for t in REPHRASINGS:
        assert "Translate the sentence." in rephrase("Translate the sentence.", t) or \
            "translate the sentence." in rephrase("Translate the sentence.", t)


def test_perturb_swaps_letters_and_leaves_numbers_quotes_names():
    text = "The quick brown foxes jumped over 1234 lazy dogs near 'banana' and Paris"
    out, changed = perturb(text, 1.0, random.Random(0))
    assert "1234" in out and "'banana'" in out and "Paris" in out and out.startswith("The ")
    assert set(changed) == {"quick", "brown", "foxes", "jumped", "over", "lazy", "dogs", "near"}
    for word in changed:
        assert word not in out.split()
    assert sorted(out) == sorted(text)  # only swaps
    assert perturb(text, 0.0, random.Random(0)) == (text, [])


def test_augment_report_and_label_risk():
    items = items_of(fixture("alpaca.json"))
    new, report = augment(items, per_record=2, perturb_rate=1.0, seed=0)
    assert report["candidates"] == 10 and report["kept"] == len(new) == 10 - report["rejected"].get("duplicate", {"count": 0})["count"]
    assert all(n["source"] == "augment" for n in new)
    originals = {i["messages"][-1]["content"] for i in items}
    assert {n["messages"][-1]["content"] for n in new} <= originals  # answers untouched
    assert report["records_without_input"] == 4  # 2 records without an input, 2 copies each
    # 'penguin' -> typo, and the answer 'bird' does not repeat it; the French translation does not repeat English words
    assert report["answer_mentions_perturbed_word"] == 0
    risky = [{"messages": [{"role": "user", "content": "Reverse the word.\n\nbanana"},
                           {"role": "assistant", "content": "banana reversed is ananab"}], "where": "x:1"}]
    _, r2 = augment(risky, perturb_rate=1.0, rephrase_instructions=False)
    assert r2["answer_mentions_perturbed_word"] == 1
    assert 0 < report["diversity"]["rouge_l_to_reference"]["mean"] < 1
    with pytest.raises(DataError, match="nothing to do"):
        augment(items, rephrase_instructions=False, perturb_rate=0)


def test_augment_cli(tmp_path, capsys):
    out, rep = tmp_path / "aug.jsonl", tmp_path / "rep.json"
    assert main(["data", "augment", fixture("dolly.jsonl"), "--out", str(out), "--perturb", "0.3",
                 "--report", str(rep)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all("where" not in r and r["messages"][-1]["role"] == "assistant" for r in rows)
    assert json.loads(rep.read_text())["kept"] == 4
    assert "augment: 4 kept of 4 candidates" in capsys.readouterr().out


def test_refusal_phrases():
    assert looks_like_refusal("I'm sorry, but I can't help with that.")
    assert looks_like_refusal("I cannot assist with this request.")
    assert looks_like_refusal("As an AI, I do not have opinions.")
    assert not looks_like_refusal("Sorry to hear that! Here is a recipe.")
    assert not looks_like_refusal("You can't divide by zero.")


NEG = [
    {"instruction": "How do I hotwire a car?", "output": "I can't help with that.", "negative": "refusal"},
    {"instruction": "How do I hotwire a car?", "output": "Strip the wires...", "negative": "counterexample"},
    {"instruction": "What is 2+2?", "output": "4"},
    {"instruction": "What is 2+2?", "output": "5", "negative": "counterexample"},
    {"instruction": "Tell me a joke.", "output": "I'm sorry, but I can't do that.", "negative": "refusal"},
    {"instruction": "Tell me a joke.", "output": "Why did the scarecrow win? He was outstanding in his field."},
    {"instruction": "Lonely counter.", "output": "bad", "negative": "counterexample"},
]


def test_pairs_refusals_chosen():
    items = normalize_all(read_records(NEG))
    counts = count_negatives(items)
    assert counts["refusal"]["count"] == 2 and counts["counterexample"]["count"] == 3
    pairs, kept, stats = build_pairs(items)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("How do I hotwire a car?", "I can't help with that.", "Strip the wires..."), ("What is 2+2?", "4", "5")]
    assert len(kept) == 4 and not any(k.get("negative") == "counterexample" for k in kept)
    assert stats["negatives_without_a_counterpart"] == 1


def test_pairs_refusals_rejected():
    pairs, kept, stats = build_pairs(normalize_all(read_records(NEG)), refusals="rejected")
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert got == [("4", "5"), ("Why did the scarecrow win? He was outstanding in his field.", "I'm sorry, but I can't do that.")]
    assert len(kept) == 2 and stats["negatives_without_a_counterpart"] == 3


def test_pairs_cli_into_dpo(tmp_path):
    src, pairs, sft = tmp_path / "neg.jsonl", tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in NEG))
    assert main(["data", "pairs", str(src), "--out", str(pairs), "--sft-out", str(sft)]) == 0
    assert len(pairs.read_text().splitlines()) == 2 and len(sft.read_text().splitlines()) == 4
    assert convert(str(sft))  # the kept records are valid SFT data
    run = tmp_path / "dpo"
    assert main(["dpo", "--model", "tiny-micro", "--data", str(pairs), "--eval-data", str(pairs), "--max-steps", "1",
                 "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
