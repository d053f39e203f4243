"""Constitution files: the bundled ones load, the rule checker scores, and every bad file is an error
naming the file and the key."""
import json

import pytest

from peftkern.alignment.constitution import BUNDLED, ConstitutionError, load_constitution
from peftkern.evaluation.suites import resolve, task_checks
from peftkern.evaluation import rules

Q = [{"role": "system", "content": "You answer with the answer only."}, {"role": "user", "content": "Reverse 'kel'."}]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_load(name):
    c = load_constitution(name)
    assert c.principles and all(p.critique_request and p.revision_request for p in c.principles)
    assert c.has_checks == (name == "tasks")


def test_tasks_rule_checker():
    c = load_constitution("tasks")
    assert c.follows("lek", Q) is True
    assert c.follows("LEK", Q) is False                       # asked form: lower case
    assert c.follows("'kel' reversed is lek.", Q) is False    # answer only
    assert c.follows("Reverse 'kel'.", Q) is False             # echo
    assert c.principle("answer-only").failed("le k", Q) == ["max_words"]
    # the checker agrees with the instruct-tasks suite's checks on its held-out prompts
    for item in resolve("instruct-tasks", 12).items:
        for out in ("ABC", "abc", "12", "'abc' in capitals is ABC.", item["prompt"][-1]["content"]):
            want = all(rules.check(out, r, item["prompt"]) for r in task_checks(item["prompt"][-1]["content"]))
            assert c.follows(out, item["prompt"]) == want


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, needle", [
    ("", "expected a mapping with 'principles', got an empty file"),
    ("principles: []", "principles: expected a non-empty list"),
    ("principles:\n  - {name: a, critique_request: x}\n", "principles[0]: missing 'revision_request'"),
    ("principles:\n  - {critique_request: x, revision_request: ''}\n", "principles[0].revision_request: expected a non-empty"),
    ("principles:\n  - {critique_request: x, revision_request: y, chekcs: []}\n", "principles[0]: unknown key(s) ['chekcs']"),
    ("principles:\n  - {critique_request: x, revision_request: y, checks: [{type: shouting}]}\n", "principles[0].checks"),
    ("principles:\n  - {name: a, critique_request: x, revision_request: y}\n  - {name: a, critique_request: x, "
     "revision_request: y}\n", "principles[1].name: 'a' is used twice"),
    ("principles:\n  - {critique_request: x, revision_request: y}\nexamples: [{prompt: p, answer: a}]\n",
     "examples[0]: missing 'critique'"),
    ("comparison: 'no slots'\nprinciples:\n  - {critique_request: x, revision_request: y}\n", "needs {a}"),
    ("principles: [\n", "c.yaml:"),
    ("princples: []\n", "unknown key(s) ['princples']"),
])
def test_bad_files_name_file_and_key(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConstitutionError) as err:
        load_constitution(path)
    assert path in str(err.value) and needle in str(err.value)


def test_json_and_missing(tmp_path):
    path = _write(tmp_path, json.dumps({"principles": [{"critique_request": "x", "revision_request": "y"}]}), "c.json")
    assert load_constitution(path).principles[0].name == "principle-0"
    with pytest.raises(ConstitutionError, match="no such constitution file"):
        load_constitution(str(tmp_path / "nope.yaml"))
