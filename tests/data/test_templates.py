"""FLAN / T0-style task files: seeded expansion, placeholders checked against the examples."""
import json

import pytest

from peftkern.data import convert
from peftkern.data.templates import expand_tasks, placeholders
from peftkern.train.data import DataError, Record
from tests.data.conftest import fixture


def task(**kw):
    base = {"task": "t", "templates": [["Q: {q}", "{a}"], ["Question: {q}", "A: {a}"], ["{q}?", "{a}!"]],
            "examples": [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)]}
    return Record({**base, **kw}, "tasks.jsonl:3")


def test_seeded_expansion_is_reproducible_and_uses_several_templates():
    one = expand_tasks([task()], seed=1)
    assert one == expand_tasks([task()], seed=1)
    assert one != expand_tasks([task()], seed=2)
    prompts = [it["messages"][0]["content"] for it in one]
    assert len(one) == 20 and {p.split("q")[0] for p in prompts} == {"Q: ", "Question: ", ""}
    for it in one:  # prompt and completion come from the same template
        p, c = (m["content"] for m in it["messages"])
        n = p.split("q")[1].rstrip("?")
        assert c in (f"a{n}", f"A: a{n}", f"a{n}!")
        assert it["task"] == "t" and it["where"].startswith("tasks.jsonl:3: examples[")


def test_templates_per_example_draws_distinct_templates():
    items = expand_tasks([task()], seed=0, per_example=2)
    assert len(items) == 40
    for a, b in zip(items[::2], items[1::2]):
        assert a["messages"][0]["content"] != b["messages"][0]["content"]
    assert len(expand_tasks([task()], seed=0, per_example=9)) == 60  # capped at the 3 templates


def test_fixture_task_file_lists_system_and_literal_braces(tmp_path):
    out = convert(fixture("flan_tasks.jsonl"), seed=0)
    capitals = [r for r in out if r["task"] == "capital_cities"]
    assert [r["messages"][0] for r in capitals] == [{"role": "system", "content": "Answer with one word."}] * 2
    assert {r["messages"][-1]["content"] for r in capitals} == {"Nairobi", "Lima"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"task": "x", "templates": [["{{literal}} {q}", "{a}"]],
                                "examples": [{"q": "1", "a": ["x", "y"]}]}) + "\n")
    rec = convert(str(path))[0]
    assert rec["messages"][0]["content"] == "{literal} 1" and rec["messages"][1]["content"] == "- x\n- y"


def test_unknown_placeholder_names_file_line_and_field(tmp_path):
    path = tmp_path / "tasks.jsonl"
    good = {"task": "ok", "templates": [["{q}", "{a}"]], "examples": [{"q": "1", "a": "2"}]}
    bad = {"task": "typo", "templates": [["{q}", "{a}"], ["Q: {question}", "{a}"]], "examples": [{"q": "1", "a": "2"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"tasks.jsonl:2: field 'templates\[1\].prompt': unknown placeholder "
                                        r"\{question\} \(the examples have: a, q\)"):
        convert(str(path))


def test_other_template_errors():
    with pytest.raises(DataError, match=r"examples\[1\]' has no 'a', used by templates\[0\]"):
        expand_tasks([task(examples=[{"q": "1", "a": "2"}, {"q": "3"}])])
    with pytest.raises(DataError, match=r"field 'templates\[0\].prompt': placeholder \{0\} must be a plain"):
        expand_tasks([task(templates=[["{0}", "x"]])])
    with pytest.raises(DataError, match=r"placeholder \{q:>5\} must be a plain"):
        expand_tasks([task(templates=[["{q:>5}", "x"]])])
    with pytest.raises(DataError, match=r"bad template \(Single '\}'"):
        placeholders("oops }", "f:1", "templates[0].prompt")
    with pytest.raises(DataError, match=r"'templates\[0\]' must be \[prompt, completion\]"):
        expand_tasks([task(templates=[["only one"]])])
    with pytest.raises(DataError, match=r"'examples\[0\].q' must be a string, number or list"):
        expand_tasks([task(examples=[{"q": {"x": 1}, "a": "2"}])])
