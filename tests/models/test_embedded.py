"""The embedded default: byte tokenizer with chat tokens, tiny Llama, bundled tasks, cached base."""
import json

import pytest
import torch

from peftkern.models import build_byte_tokenizer, build_tiny_model, tasks, tiny_config
from peftkern.models.tiny import BOS_ID, END_ID, PAD_ID, VOCAB_SIZE


def test_tokenizer_bytes_round_trip_and_special_tokens():
    tok = build_byte_tokenizer()
    assert len(tok) == VOCAB_SIZE
    text = "Héllo, wörld! 7 + 8 = 15\n\ttab"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one id per byte, id = byte value
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, END_ID)
    ids = tok("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("<|user|>"), ord("h"), ord("i"), END_ID]


def test_chat_template_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = build_byte_tokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U?"},
                {"role": "assistant", "content": "A"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|system|>S<|end|><|user|>U?<|end|><|assistant|>A<|end|>"
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, tokenize=False) == text
    assert again("abc", add_special_tokens=False)["input_ids"] == [97, 98, 99]


def test_tiny_models_build_deterministically():
    a, b = build_tiny_model("micro", seed=3), build_tiny_model("micro", seed=3)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    demo_params = sum(p.numel() for p in build_tiny_model("demo").parameters())
    assert 300_000 < demo_params < 5_000_000
    out = a(input_ids=torch.tensor([[BOS_ID, 97, 98]])).logits
    assert out.shape == (1, 3, VOCAB_SIZE)
    with pytest.raises(ValueError, match="size must be one of"):
        tiny_config("huge")


def test_tasks_are_deterministic_and_held_out_is_disjoint():
    train, held = tasks.split(300, 60, seed=0)
    assert (train, held) == tasks.split(300, 60, seed=0)
    assert tasks.split(300, 60, seed=1) != (train, held)
    assert not {q for q, _, _ in held} & {q for q, _, _ in train}
    for q, a, wrong in train + held:
        assert tasks.answer_for(q) == a and wrong != a


def test_record_formats_follow_trl():
    train, _ = tasks.split(6, 3)
    sft = tasks.sft_records(train)[0]
    assert [m["role"] for m in sft["messages"]] == ["system", "user", "assistant"]
    pair = tasks.preference_records(train)[0]
    assert set(pair) == {"prompt", "chosen", "rejected"} and pair["chosen"][0]["role"] == "assistant"
    kto = tasks.kto_records(train)
    assert {r["label"] for r in kto} == {True, False}
    json.dumps([sft, pair, kto])  # JSONL-ready


def test_task_reward():
    prompt = [{"role": "user", "content": "What is 7 + 8?"}]
    assert tasks.task_reward(prompt, "15") == 1.0
    assert tasks.task_reward(prompt, "1") == pytest.approx(0.25)
    assert tasks.task_reward(prompt, "") < 0
    with pytest.raises(ValueError, match="not a bundled question"):
        tasks.task_reward([{"role": "user", "content": "Hi"}], "x")


def test_pretrained_base_is_cached(tmp_path, monkeypatch):
    from peftkern.models import pretrained_tiny as load_only
    from peftkern.train.pretrain import build_pretrained_tiny as pretrained_tiny

    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path))
    settings = dict(size="micro", steps=2, warmup=1, questions=60, batch_size=4, seq_len=32)
    with pytest.raises(FileNotFoundError, match="the embedded tiny base is not built yet .* 'peftkern pretrain'"):
        load_only(settings=settings)  # models/ loads; building is training, train/'s job
    first = pretrained_tiny(quiet=True, settings=settings)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert (cached[0] / "tokenizer.json").is_file()  # a complete base an adapter can name
    second = pretrained_tiny(quiet=True, settings=settings)
    for (n, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(first.lm_head.weight, build_tiny_model("micro").lm_head.weight)  # it trained
    assert torch.equal(load_only(settings=settings).lm_head.weight, first.lm_head.weight)


def test_models_import_nothing_above_them():
    """models/ sits at the bottom of the import order (issue 22): no import of train/ or any layer above,
    not even inside a function."""
    import ast
    import pathlib

    import peftkern.models

    above = ("peftkern.train", "peftkern.cli", "peftkern.tuners", "peftkern.losses", "peftkern.optim",
             "peftkern.nn", "peftkern.generate", "peftkern.evaluation", "peftkern.alignment", "peftkern.editing")
    for path in pathlib.Path(peftkern.models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(above), f"{path.name}:{node.lineno} imports {name}"


def test_peftkern_pretrain_builds_what_models_loads(tmp_path, monkeypatch, capsys):
    from peftkern.cli import main
    from peftkern.models import base, pretrained_tiny

    monkeypatch.setenv("PEFTKERN_CACHE", str(tmp_path))
    for key, value in dict(size="micro", steps=2, warmup=1, questions=60, batch_size=4, seq_len=32).items():
        monkeypatch.setitem(base.PRETRAIN, key, value)
    assert main(["pretrain", "--quiet"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == base.cached_path() and (tmp_path / path).joinpath("tokenizer.json").is_file()
    assert pretrained_tiny().config.hidden_size == 32
