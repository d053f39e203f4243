"""Each source format from a hand-written fixture to TRL's formats, and into `peftkern sft`."""
import json

import pytest

from peftkern.cli import main
from peftkern.data import convert
from peftkern.data.converters import convert_records, detect_format, normalize_all
from peftkern.data.io import read_records
from peftkern.train.data import DataError, Record
from tests.data.conftest import fixture

SOURCES = {"alpaca.json": ("alpaca", 5), "sharegpt.json": ("sharegpt", 3), "dolly.jsonl": ("dolly", 4),
           "openorca.jsonl": ("openorca", 3), "flan_tasks.jsonl": ("flan", 5)}


def roles(rec):
    return [m["role"] for m in rec["messages"]]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_each_fixture_converts_with_auto_and_named_format(name):
    fmt, count = SOURCES[name]
    assert {detect_format(r) for r in read_records(fixture(name))} == {fmt}
    named = convert(fixture(name), fmt)
    assert convert(fixture(name)) == named and len(named) == count
    for rec in named:
        assert roles(rec)[-1] == "assistant" and roles(rec)[-2] == "user"


def test_alpaca_fields():
    out = convert(fixture("alpaca.json"), "alpaca")
    assert out[0]["messages"] == [{"role": "user", "content": "Give three tips for keeping houseplants alive."},
                                  {"role": "assistant", "content": out[0]["messages"][1]["content"]}]
    assert out[1]["messages"][0]["content"] == "Translate the sentence into French.\n\nThe library opens at nine."
    assert out[1]["messages"][1]["content"] == "La bibliothèque ouvre à neuf heures."
    assert out[3]["negative"] == "refusal"


def test_sharegpt_roles_system_and_turns():
    out = convert(fixture("sharegpt.json"), "sharegpt")
    assert roles(out[0]) == ["user", "assistant", "user", "assistant"] and out[0]["id"] == "sg-001"
    assert roles(out[1]) == ["system", "user", "assistant"]
    assert out[1]["messages"][0]["content"] == "You are a concise assistant."
    assert out[2]["messages"][0] == {"role": "system", "content": "You are a patient teacher."}


def test_dolly_context_and_category():
    out = convert(fixture("dolly.jsonl"), "dolly")
    assert [r["category"] for r in out] == ["open_qa", "closed_qa", "brainstorming", "summarization"]
    assert out[1]["messages"][0]["content"].startswith("Who wrote the novel, according to the passage?\n\nThe novel")
    assert out[0]["messages"][0]["content"] == "When did the first person walk on the Moon?"


def test_openorca_system_prompt_only_when_given():
    out = convert(fixture("openorca.jsonl"), "openorca")
    assert roles(out[0]) == ["system", "user", "assistant"] and roles(out[1]) == ["user", "assistant"]
    assert out[2]["id"] == "cot.303"


def test_targets_prompt_completion_and_text():
    pc = convert(fixture("sharegpt.json"), to="prompt-completion")
    assert [m["role"] for m in pc[0]["prompt"]] == ["user", "assistant", "user"]
    assert pc[0]["completion"] == [convert(fixture("sharegpt.json"))[0]["messages"][-1]]
    text = convert(fixture("dolly.jsonl"), to="text")
    assert text[2] == {"prompt": "Brainstorm three names for a bakery.",
                       "completion": "Rise and Shine, The Crumb Corner, Flour Power.", "category": "brainstorming"}
    with pytest.raises(DataError, match=r"openorca.jsonl:1: --to text needs exactly one user and one assistant"):
        convert(fixture("openorca.jsonl"), to="text")


def test_dataset_and_list_inputs():
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in open(fixture("dolly.jsonl"))]
    assert convert(datasets.Dataset.from_list(rows)) == convert(rows) == convert(fixture("dolly.jsonl"))


def test_trl_records_pass_through():
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"prompt": "p", "completion": "c"}]
    out = convert(rows)
    assert out[0] == rows[0]
    assert out[1]["messages"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]


def test_round_trip_into_sft(tmp_path):
    """Every fixture converted, concatenated, and trained on by `peftkern sft` (micro model, 2 steps)."""
    data = tmp_path / "all.jsonl"
    for name in sorted(SOURCES):
        out = tmp_path / (name + ".jsonl")
        assert main(["data", "convert", fixture(name), "--out", str(out)]) == 0
        data.write_text(data.read_text() + out.read_text() if data.exists() else out.read_text())
    pc = tmp_path / "pc.jsonl"
    assert main(["data", "convert", fixture("sharegpt.json"), "--to", "prompt-completion", "--out", str(pc)]) == 0
    assert len(data.read_text().splitlines()) == 20
    for path in (data, pc):
        run = tmp_path / ("run-" + path.stem)
        assert main(["sft", "--model", "tiny-micro", "--data", str(path), "--eval-data", str(path), "--max-steps", "2",
                     "--batch-size", "2", "--max-length", "256", "--out", str(run), "--quiet"]) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["eval_after"]["loss"] > 0


# -- bad input: file, line and field named ----------------------------------------------------------
def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown source format 'xml'; known: auto, alpaca"):
        convert(fixture("dolly.jsonl"), "xml")
    with pytest.raises(DataError, match="unknown target format"):
        convert(fixture("dolly.jsonl"), to="chatml")


def test_record_of_no_known_format_names_file_line_and_fields(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"query": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:3: cannot tell the format from the fields \['answer', 'query'\]"):
        convert(str(path))


def test_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        convert(str(path))
    arr = tmp_path / "bad.json"
    arr.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad.json:3: not valid JSON \(Expecting ',' delimiter"):
        convert(str(arr))
    (tmp_path / "text.txt").write_text("just some words\n")
    with pytest.raises(DataError, match=r"text.txt:1: not valid JSON"):
        convert(str(tmp_path / "text.txt"))


def test_json_array_elements_keep_their_lines():
    records = read_records(fixture("alpaca.json"))
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["2", "7", "12", "17", "23"]


def test_bad_fields_name_record_and_field(tmp_path):
    cases = [
        ('{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}',
         r"x.jsonl:1: field 'conversations\[1\].from': unknown speaker 'robot'"),
        ('{"instruction": "a", "output": 3}', r"x.jsonl:1: field 'output' must be a string, got int"),
        ('{"instruction": "a", "response": "b", "context": ["c"]}', r"x.jsonl:1: field 'context' must be a string"),
        ('{"instruction": "a", "output": "b", "negative": "bad"}', r"x.jsonl:1: field 'negative' must be one of"),
        ('{"messages": [{"role": "human", "content": "a"}]}', r"x.jsonl:1: field 'messages\[0\].role': unknown role"),
        ('{"question": "a", "response": "b", "system_prompt": 1}', r"x.jsonl:1: field 'system_prompt' must be a string"),
    ]
    for line, pattern in cases:
        (tmp_path / "x.jsonl").write_text(line + "\n")
        with pytest.raises(DataError, match=pattern):
            convert(str(tmp_path / "x.jsonl"))


def test_tolerant_normalize_collects_every_problem():
    problems = []
    items = normalize_all([Record({"instruction": "a", "output": "b"}, "f:1"), Record({"x": 1}, "f:2"),
                           Record({"instruction": "a", "output": 1}, "f:3")], "auto", problems)
    assert len(items) == 1 and [p.where for p in problems] == ["f:2", "f:3"]


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "outputs": "b"}\n')
    assert main(["data", "convert", str(tmp_path / "x.jsonl"), "--from", "alpaca", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "peftkern data convert: error:" in err and "x.jsonl:1: missing field 'output'" in err
    assert not (tmp_path / "o").exists()


def test_cli_names_dropped_fields(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"instruction": "a", "output": "b", "text": "a b"}\n')
    assert main(["data", "convert", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert "fields not carried over: text (1)" in capsys.readouterr().out
    assert convert_records(read_records(str(tmp_path / "o.jsonl")))[0]["messages"][0]["content"] == "a"


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at column 21\)"):
        convert(str(path))
    arr = tmp_path / "latin1.json"
    arr.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf\xe9", "output": "b"}]\n')
    with pytest.raises(DataError, match=r"latin1.json:3: not UTF-8 text \(byte 0xe9\)"):
        convert(str(arr))
