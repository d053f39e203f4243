"""``peftkern sft --multi-adapter NAME=FILE ...``: the CLI over train_adapters, adapters in PEFT's files."""
import json

import pytest
import torch
from safetensors.torch import load_file

from peftkern.cli import main
from peftkern.models import tasks
from peftkern.train.adapters import peft_config
from peftkern.train.config import TrainConfig
from peftkern.train.loading import load_lm, load_tokenizer
from peftkern.train.multi_adapter import train_adapters
from peftkern.train.multi_adapter_run import settings_of

FLAGS = ["--model", "tiny-micro", "--lora-r", "4", "--lr", "0.01", "--batch-size", "2", "--max-steps", "2",
         "--schedule", "cosine", "--warmup-steps", "1", "--quiet"]


def _files(tmp_path):
    paths = {}
    for seed, name in enumerate(("math", "chat")):
        train, _ = tasks.split(6, 2, seed=seed)
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in tasks.sft_records(train)))
    return paths


def _weights(out, name):
    return load_file(str(out / "adapter" / name / "adapter_model.safetensors"))


def test_cli_trains_each_adapter_as_the_python_api_does(tmp_path, capsys):
    files = _files(tmp_path)
    out = tmp_path / "out"
    code = main(["sft", *FLAGS, "--multi-adapter", f"math={files['math']}", "--multi-adapter",
                 f"chat={files['chat']}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["multi_adapter"] == ["math", "chat"] and summary["steps"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss/math"] > 0 and r["loss/chat"] > 0 for r in log)
    for name in ("math", "chat"):
        config = json.loads((out / "adapter" / name / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["peft_type"] == "LORA"
    # the same job through the Python API with the same settings ends with the same weights
    cfg = TrainConfig(model="tiny-micro", lora_r=4, lr=0.01, batch_size=2, max_steps=2, schedule="cosine",
                      warmup_steps=1).check()
    lm = load_lm(cfg, quiet=True)
    train_adapters(lm, {n: str(p) for n, p in files.items()}, peft_config(cfg, lm), settings_of(cfg),
                   tokenizer=load_tokenizer(cfg), out=tmp_path / "api" / "adapter")
    for name in ("math", "chat"):
        got, expected = _weights(out, name), _weights(tmp_path / "api", name)
        assert got.keys() == expected.keys() and got
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)
    # a YAML list is the repeated flag
    (tmp_path / "run.yaml").write_text(f"multi_adapter:\n  - math={files['math']}\n  - chat={files['chat']}\n")
    assert main(["sft", *FLAGS, "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "yaml")]) == 0
    for name in ("math", "chat"):
        assert all(torch.equal(v, _weights(out, name)[k]) for k, v in _weights(tmp_path / "yaml", name).items())


@pytest.mark.parametrize("extra,message", [
    (["--multi-adapter", "math"], "--multi-adapter 'math': expected NAME=FILE"),
    (["--multi-adapter", "math=nowhere.jsonl"], "no such file 'nowhere.jsonl'"),
    (["--multi-adapter", "a/b=FILE"], "adapter name 'a/b' may hold only"),
    (["--multi-adapter", "math=FILE", "--multi-adapter", "math=FILE"], "adapter 'math' given twice"),
    (["--multi-adapter", "math=FILE", "--packing", "--grad-accum", "2"], "not supported here: --packing, --grad-accum"),
    (["--multi-adapter", "math=FILE", "--lora-r", "0"], "not supported here: --lora-r"),
])
def test_bad_multi_adapter_settings_are_named(tmp_path, capsys, extra, message):
    files = _files(tmp_path)
    extra = [e.replace("FILE", str(files["math"])) for e in extra]
    code = main(["sft", "--model", "tiny-micro", "--quiet", "--out", str(tmp_path / "o"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_resume_continues_the_multi_adapter_run(tmp_path, capsys):
    files = _files(tmp_path)
    data = ["--multi-adapter", f"math={files['math']}", "--multi-adapter", f"chat={files['chat']}"]
    flags = ["--model", "tiny-micro", "--lora-r", "4", "--lr", "0.01", "--batch-size", "2", "--schedule", "constant",
             "--save-every", "1", "--quiet", *data]
    assert main(["sft", *flags, "--max-steps", "3", "--out", str(tmp_path / "straight")]) == 0
    assert main(["sft", *flags, "--max-steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main(["sft", *flags, "--max-steps", "3", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    capsys.readouterr()
    logs = [(tmp_path / run / "log.jsonl").read_text() for run in ("straight", "cut")]
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 3
    for name in ("math", "chat"):
        got, expected = _weights(tmp_path / "cut", name), _weights(tmp_path / "straight", name)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
