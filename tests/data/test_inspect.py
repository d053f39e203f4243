"""`data inspect` on files with planted problems: every finding at its line."""
import json

import pytest

from peftkern.cli import main
from peftkern.data.dedup import jaccard, shingles
from peftkern.data.inspection import full_text, inspect_data, prompt_text, role_issues
from peftkern.data.io import read_records
from peftkern.models import build_byte_tokenizer
from tests.data.conftest import fixture

TRAIN, EVAL = fixture("inspect_train.jsonl"), fixture("inspect_eval.jsonl")


def at(line, path=TRAIN):
    return f"{path}:{line}"


@pytest.fixture(scope="module")
def report():
    return inspect_data(TRAIN, EVAL, tokenizer=build_byte_tokenizer(), max_length=200)


def test_format_errors_at_their_lines(report):
    errors = report["train"]["format_errors"]["errors"]
    assert [e["where"] for e in errors] == [at(4), at(8), at(9)]
    assert "not valid JSON" in errors[0]["message"]
    assert "missing field 'content'" in errors[1]["message"] and "unknown role 'bot'" in errors[2]["message"]
    assert report["train"]["records"] == 10 and report["eval"]["format_errors"]["count"] == 0


def test_structure(report):
    st = report["train"]["structure"]
    assert st["role_order"]["issues"] == [{"where": at(6), "message": "the conversation starts with 'assistant', not 'user'"}]
    assert st["empty_turns"]["issues"] == [{"where": at(7), "message": "empty 'assistant' turn at turn 2"}]
    assert st["system_prompt"] == {"with": 9, "without": 1, "distinct": 1, "top": [["You are a helpful assistant.", 9]],
                                   "consistent": False}
    assert report["eval"]["structure"]["system_prompt"]["consistent"]
    assert role_issues([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                        {"role": "user", "content": "c"}]) == [
        "system message at turn 1 (only the first turn may be the system prompt)", "two 'user' turns in a row",
        "no assistant turn"]


def test_exact_and_near_duplicates(report):
    d = report["train"]["duplicates"]
    assert d["exact"]["groups"] == 1 and d["exact"]["where"] == [[at(1), at(3)]]
    near = d["near"]["where"]
    assert [(p["record"], p["like"]) for p in near] == [(at(5), at(2))]  # 13/14 differ by a counter-example mark


def test_near_duplicate_found_exactly_at_the_threshold():
    recs = {r.where: r for r in read_records(TRAIN, [])}
    a, b = (full_text(recs[at(n)].data["messages"]) for n in (2, 5))
    sim = jaccard(shingles(a), shingles(b))
    assert 0.9 < sim < 1
    at_threshold = inspect_data(TRAIN, threshold=sim)["train"]["duplicates"]["near"]["where"]
    assert [(p["record"], p["like"]) for p in at_threshold] == [(at(5), at(2))]
    assert at_threshold[0]["similarity"] == round(sim, 4)
    above = inspect_data(TRAIN, threshold=sim + 1e-9)["train"]["duplicates"]["near"]
    assert above["records"] == 0


def test_leakage_across_train_and_eval(report):
    lk = report["leakage"]
    assert lk["exact"]["where"] == [{"eval": at(1, EVAL), "train": at(11)}]
    assert [(p["eval"], p["train"]) for p in lk["near"]["where"]] == [(at(2, EVAL), at(2))]  # the closer of 2 and 5
    assert lk["eval_records_leaked"] == 2


def test_truncation_with_tokenizer(report):
    t = report["train"]["truncation"]
    assert [r["where"] for r in t["truncated"]["records"]] == [at(11)]
    assert t["truncated"]["records"][0]["tokens"] > 200 and t["truncated"]["records"][0]["assistant_tokens_cut"] > 0
    assert t["nothing_to_learn"]["count"] == 0
    tiny = inspect_data(TRAIN, tokenizer=build_byte_tokenizer(), max_length=40)["train"]["truncation"]
    assert tiny["nothing_to_learn"]["count"] == 9  # 40 tokens: no answer left in every record but the one without system
    assert report["train"]["length_unit"] == "tokens"


def test_distributions_mix_diversity_negatives(report):
    r = report["train"]
    assert r["categories"] == {"open_qa": 4, "math": 3, "creative_writing": 2, "safety": 1}
    assert r["turns"]["max"] == 3 and r["turns"]["min"] == 2 and sum(r["length_histogram"]["counts"]) == 10
    dv = r["diversity"]
    assert ("write poem", 2) in [tuple(x) for x in dv["top_verb_object_pairs"]]
    assert 0 < dv["distinct_2"] <= 1
    n = r["negatives"]
    assert n["counterexample"] == {"count": 1, "where": [at(13)]}
    assert n["unmarked_refusal_like"] == {"count": 1, "where": [at(12)]}


def test_prompt_text_stops_before_last_answer():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert prompt_text(msgs) == "user: q\nassistant: a\nuser: q2"


def test_cli_table_json_png_and_exit_code(tmp_path, capsys):
    j, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["data", "inspect", TRAIN, "--eval", EVAL, "--tokenizer", "tiny", "--max-length", "200",
                 "--json", str(j), "--png", str(png)])
    out = capsys.readouterr().out
    assert code == 1  # format errors and leakage
    assert f"{at(4)}: not valid JSON" in out and f"{at(1, EVAL)} = {at(11)}" in out
    assert json.loads(j.read_text())["leakage"]["exact"]["count"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(line for i, line in enumerate(open(TRAIN), 1) if i in (1, 2, 11)))
    assert main(["data", "inspect", str(clean)]) == 0
    assert main(["data", "inspect", str(clean), "--max-length", "10"]) == 2
    assert "--max-length needs --tokenizer" in capsys.readouterr().err
