"""Rule checks, suite resolution (names, files, kinds) and their errors."""
import json

import pytest

from peftkern.evaluation import check, is_refusal, resolve
from peftkern.evaluation.suites import NAMES
from peftkern.models import tasks


@pytest.mark.parametrize("rule,good,bad", [
    ({"type": "max_words", "n": 2}, "two words", "three words here"),
    ({"type": "min_words", "n": 2}, "two words", "one"),
    ({"type": "max_chars", "n": 3}, " abc ", "abcd"),
    ({"type": "sentences", "n": 2}, "It rains. It pours!", "It rains."),
    ({"type": "uppercase"}, "ABC 12", "AbC"),
    ({"type": "lowercase"}, "abc, d", "abC"),
    ({"type": "title_case"}, "The Lost Key of Time", "the lost key"),
    ({"type": "one_line"}, "a b", "a\nb"),
    ({"type": "contains", "words": ["cat", "dog"]}, "a cat and a dog", "a cat"),
    ({"type": "contains", "words": ["Cat"], "case_sensitive": False}, "a cat", "a dog"),
    ({"type": "excludes", "words": ["e"]}, "a cat", "the cat"),
    ({"type": "starts_with", "text": "Sure:"}, "Sure: Mars", "Mars"),
    ({"type": "ends_with", "text": "done", "strip_punctuation": True}, "4, done.", "done 4"),
    ({"type": "regex", "pattern": r"(yes|no)"}, " yes ", "yes!"),
    ({"type": "json", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
     '{"a": 3}', '{"a": "3"}'),
    ({"type": "json"}, "[1, 2]", "[1, 2"),
])
def test_rules(rule, good, bad):
    assert check(good, rule) and not check(bad, rule)


def test_no_echo_uses_the_user_turn():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse 'abc'."}]
    assert check("cba", {"type": "no_echo"}, prompt)
    assert not check("Reverse 'abc'. cba", {"type": "no_echo"}, prompt)


def test_refusal_detector():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot assist with this request.")
    assert not is_refusal("Mix flour, water and yeast, then bake.")


def test_named_suites_resolve_and_hold_out_the_demo_training_questions():
    for name in NAMES:
        suite = resolve(name, limit=9)
        assert suite.items and len(suite.items) <= 9 * (3 if name == "safety" else 1)
    held_out = {r["prompt"][-1]["content"] for r in resolve("tasks", 60).items}
    train, demo_held_out = tasks.split(2880, 60, 0)  # the demo's split at seed 0
    assert held_out == {q for q, _, _ in demo_held_out}
    assert not held_out & {q for q, _, _ in train}


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_file_suites_infer_their_kind(tmp_path):
    assert resolve(_file(tmp_path, "a.jsonl", [{"prompt": "Hi", "answer": "x"}])).kind == "tasks"
    assert resolve(_file(tmp_path, "b.jsonl", [{"prompt": "Hi", "checks": [{"type": "one_line"}]}])).kind == "instruct"
    assert resolve(_file(tmp_path, "c.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])).kind == "preference"
    assert resolve(_file(tmp_path, "d.jsonl", [{"text": "Some text."}])).kind == "perplexity"
    assert resolve(_file(tmp_path, "e.jsonl", [{"kind": "pair", "more": "a b", "less": "a c"}])).kind == "safety"
    txt = tmp_path / "f.txt"
    txt.write_text("One paragraph.\n\nAnother one.\n")
    assert [r["text"] for r in resolve(str(txt)).items] == ["One paragraph.", "Another one."]


def test_suite_errors_name_file_and_line(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        resolve("nope")
    with pytest.raises(ValueError, match=r"x.jsonl:2: rule \{'type': 'shout'\} has no known 'type'"):
        resolve(_file(tmp_path, "x.jsonl", [{"prompt": "a", "checks": [{"type": "one_line"}]},
                                            {"prompt": "b", "checks": [{"type": "shout"}]}]))
    with pytest.raises(ValueError, match=r"y.jsonl:1: invalid regular expression '\('"):
        resolve(_file(tmp_path, "y.jsonl", [{"prompt": "a", "checks": [{"type": "regex", "pattern": "("}]}]))
    with pytest.raises(ValueError, match=r"z.jsonl:2: missing field\(s\) \['answer'\]"):
        resolve(_file(tmp_path, "z.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}]))
    with pytest.raises(ValueError, match="w.jsonl: the suite file is empty"):
        resolve(_file(tmp_path, "w.jsonl", []))
    with pytest.raises(ValueError, match=r"v.jsonl:1: cannot tell the suite kind"):
        resolve(_file(tmp_path, "v.jsonl", [{"question": "a"}]))
