"""Data layer: TRL-format records, errors naming file:line, completion-only masks, padding, packing."""
import json

import pytest

from peftkern.models import build_byte_tokenizer
from peftkern.train.data import (IGNORE_INDEX, DataError, encode_pair, encode_sft, load_records, pack, pad_batch,
                                 read_jsonl)

TOK = build_byte_tokenizer()


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("line, kind, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "sft", "not valid JSON"),
    ('[1, 2]', "sft", "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "sft", "no assistant turn"),
    ('{"text": "hi"}', "sft", "needs 'messages' or 'prompt' \\+ 'completion'"),
    ('{"prompt": "a", "chosen": "b"}', "dpo", "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "rm", "'chosen' must be a string or a list of messages"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}', "kto", "'label' must be true or false"),
    ('{"prompt": [{"role": "user"}]}', "ppo", "'prompt'\\[0\\] must be an object with string 'role' and 'content'"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}', "dpo", "mix plain strings"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, kind, message):
    good = {"sft": {"prompt": "a", "completion": "b"}, "dpo": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "rm": {"prompt": "a", "chosen": "b", "rejected": "c"}, "kto": {"prompt": "a", "completion": "b", "label": True},
            "ppo": {"prompt": "a"}}[kind]
    path = _write(tmp_path / "data.jsonl", [good, "", line])
    with pytest.raises(DataError, match=f"data.jsonl:3: .*{message}"):
        load_records(path, kind)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(str(tmp_path / "empty.jsonl"))


def test_datasets_and_lists_are_sources():
    Dataset = pytest.importorskip("datasets").Dataset

    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": "d"}]
    assert [r.data for r in load_records(Dataset.from_list(rows), "sft")] == rows
    with pytest.raises(DataError, match="record 1: "):
        load_records([rows[0], {"prompt": 1, "completion": "x"}], "sft")


def _text(ids):
    return TOK.decode([i for i in ids if i != IGNORE_INDEX])


def test_completion_only_mask_on_every_assistant_turn():
    rec = load_records([{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "one"}, {"role": "assistant", "content": "AB"},
        {"role": "user", "content": "two"}, {"role": "assistant", "content": "CD"}]}], "sft")[0]
    ex = encode_sft(TOK, rec, max_length=256)
    full = TOK.decode(ex["input_ids"])
    assert full == "<|bos|><|system|>S<|end|><|user|>one<|end|><|assistant|>AB<|end|><|user|>two<|end|><|assistant|>CD<|end|>"
    trained = TOK.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert trained == "AB<|end|>CD<|end|>"
    everything = encode_sft(TOK, rec, max_length=256, completion_only=False)
    assert everything["labels"] == everything["input_ids"]


def test_plain_prompt_completion_gets_eos_and_truncation():
    rec = load_records([{"prompt": "Q: 2+2?", "completion": " 4"}], "sft")[0]
    ex = encode_sft(TOK, rec, max_length=256)
    assert TOK.decode(ex["input_ids"]) == "Q: 2+2? 4<|end|>"
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == [ord(" "), ord("4"), TOK.eos_token_id]
    with pytest.raises(DataError, match="no completion token left"):
        encode_sft(TOK, rec, max_length=5)


def test_pairs_share_the_prompt_and_keep_completions():
    rec = load_records([{"prompt": [{"role": "user", "content": "x" * 50}],
                         "chosen": [{"role": "assistant", "content": "good"}],
                         "rejected": [{"role": "assistant", "content": "bad"}]}], "dpo")[0]
    ex = encode_pair(TOK, rec, max_length=24)
    for side, answer in (("chosen", "good"), ("rejected", "bad")):
        assert len(ex[side]["input_ids"]) <= 24
        assert _text(ex[side]["labels"]) == answer + "<|end|>"  # prompt cut on the left, completion kept


def test_pad_and_pack():
    a = {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}
    b = {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]}
    batch = pad_batch([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    rows = pack([a, b, a], seq_len=4)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4], [5, 1, 2, 3]]
    assert rows[1]["labels"] == [5, IGNORE_INDEX, 2, 3]
