"""``--chat-template FILE``: the tokenizer's template replaced, the assistant-token mask found from how
the template renders (no generation markers needed), bad templates named by file and line."""
import json

import pytest

from peftkern.train.config import TrainConfig
from peftkern.train.data import DataError, Record, encode_sft
from peftkern.train.loading import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]


def _tok(tmp_path, text, name="chatml.jinja"):
    path = tmp_path / name
    path.write_text(text)
    return load_tokenizer(TrainConfig(model="tiny-micro", chat_template=str(path)))


def _trained_text(tok, ids, labels) -> list[str]:
    """The label spans as text, one per maximal run of labelled tokens."""
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_template_without_generation_markers_masks_the_assistant_turns(tmp_path):
    tok = _tok(tmp_path, CHATML)
    assert tok.chat_template == CHATML
    ex = encode_sft(tok, Record({"messages": CONVERSATION}, "rec 1"), max_length=512)
    assert "<|im_start|>user\n2+2?" in tok.decode(ex["input_ids"])
    assert _trained_text(tok, ex["input_ids"], ex["labels"]) == ["4<|im_end|>\n", "6<|im_end|>\n"]


def test_json_template_file_and_first_turn_by_the_assistant(tmp_path):
    tok = _tok(tmp_path, json.dumps({"chat_template": CHATML}), "tokenizer_config.json")
    ex = encode_sft(tok, Record({"messages": [{"role": "assistant", "content": "hello"}]}, "rec 2"), max_length=64)
    assert _trained_text(tok, ex["input_ids"], ex["labels"]) == ["hello<|im_end|>\n"]


def test_bad_templates_are_named(tmp_path):
    with pytest.raises(DataError, match=r"bad.jinja:2: the template does not render \(TemplateSyntaxError"):
        _tok(tmp_path, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", "bad.jinja")
    with pytest.raises(DataError, match="does not render the messages' 'content'"):
        _tok(tmp_path, "{% for m in messages %}{{ m['role'] }}{% endfor %}", "nocontent.jinja")
    with pytest.raises(DataError, match="empty"):
        _tok(tmp_path, "  \n", "empty.jinja")
    with pytest.raises(DataError, match="'chat_template' string"):
        _tok(tmp_path, json.dumps({"template": CHATML}), "x.json")
