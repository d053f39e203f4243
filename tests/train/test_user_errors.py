"""Issues 24 and 28.6/28.8: paths that do not exist or are not what they must be, data that is not
UTF-8 or has a bad RM margin, PPO reward functions, and the smaller defects of item 8. Each is a
clear error naming the path, file and line, record or argument, or now behaves as documented."""
import json
import sys

import pytest

from peftkern.cli import main
from peftkern.models import build_byte_tokenizer
from peftkern.train.data import DataError, encode_sft, load_records, read_jsonl
from peftkern.train.errors import ConfigError, RunWarning
from peftkern.train.logs import read_log
from tests.train.helpers import micro, run


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# -- paths -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent"], "--model /nonexistent: no such directory; --model takes 'tiny' or a local"),
    (["--model", "{file}"], "--model {file}: is a file, expected a directory"),
    (["--model", "{tmp}"], "--model {tmp}: no config.json in it: not a transformers model directory"),
    (["--data", "{tmp}"], "--data {tmp}: is a directory, expected a JSONL data file"),
    (["--data", "{tmp}/none.jsonl"], "--data {tmp}/none.jsonl: no such data file"),
    (["--tokenizer", "{tmp}"], "--tokenizer {tmp}: no tokenizer files in it"),
])
def test_paths_are_checked_before_anything_loads(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    fill = dict(file=tmp_path / "file", tmp=tmp_path)
    args = [a.format(**fill) for a in args]
    code = main(["sft", "--model", "tiny-micro", "--out", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message.format(**fill) in err and "Traceback" not in err, err


# -- data ------------------------------------------------------------------------------------------
def test_non_utf8_data_names_file_and_line_and_a_bom_is_accepted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not UTF-8 text \\(byte 0xe9 at column 16\\)"):
        read_jsonl(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert read_jsonl(str(path))[0].data == {"prompt": "a", "completion": "b"}


@pytest.mark.parametrize("margin", [None, "0.5", True, float("inf")])
def test_rm_margin_must_be_a_number(tmp_path, margin):
    path = _jsonl(tmp_path / "rm.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0},
                                          {"prompt": "p", "chosen": "a", "rejected": "b", "margin": margin}])
    with pytest.raises(DataError, match=f"rm.jsonl:2: 'margin' must be a finite number"):
        load_records(path, "rm")
    load_records(path, "dpo")  # DPO ignores the field


def test_a_conversation_starting_with_the_assistant(tmp_path):
    tok = build_byte_tokenizer()
    rec = load_records([{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "A"}]}], "sft")[0]
    ex = encode_sft(tok, rec, 256)
    trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert trained == "Hi<|end|>A<|end|>"  # not the "<|bos|><|assistant|>" header


# -- PPO reward functions --------------------------------------------------------------------------
@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """The current directory is tmp_path and is not on sys.path (as under the console script)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    saved = dict(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - set(saved):
        if name.startswith("myreward"):
            del sys.modules[name]


def test_reward_fn_from_the_current_directory(in_tmp_cwd):
    from peftkern.train.ppo import load_reward_fn

    (in_tmp_cwd / "myreward_ok.py").write_text("def score(prompt, completion):\n    return float(len(completion))\n")
    fn = load_reward_fn("myreward_ok:score")
    assert fn("p", "abc") == 3.0
    with pytest.raises(ConfigError, match="--reward-fn nomodule:f: no module named 'nomodule' .looked on sys.path "
                                          "and in the current directory"):
        load_reward_fn("nomodule:f")
    with pytest.raises(ConfigError, match="module myreward_ok has no 'nope'"):
        load_reward_fn("myreward_ok:nope")


@pytest.mark.parametrize("body, message", [
    ("return [1.0, 2.0]", "returned list of length 2 for rollout 0; expected one number"),
    ("return 'good'", "returned str of length 4 for rollout 0"),
    ("return float('nan')", "returned nan for rollout 0; expected a finite number"),
    ("import torch; return torch.ones(3)", "returned 3 values for one completion"),
])
def test_reward_fn_returning_the_wrong_thing(in_tmp_cwd, body, message):
    from peftkern.train.ppo import call_reward_fn, load_reward_fn

    name = f"myreward_{abs(hash(body))}"
    (in_tmp_cwd / f"{name}.py").write_text(f"def score(prompt, completion):\n    {body}\n")
    fn = load_reward_fn(f"{name}:score")
    with pytest.raises(ConfigError, match=f"--reward-fn {name}:score {message}"):
        call_reward_fn(fn, f"{name}:score", ["p"], ["c"])


def test_ppo_cli_with_a_reward_fn_in_the_current_directory(in_tmp_cwd, capsys):
    (in_tmp_cwd / "myreward_cli.py").write_text("def score(prompt, completion):\n    return 0.5\n")
    data = _jsonl(in_tmp_cwd / "p.jsonl", [{"prompt": f"q{i}"} for i in range(8)])
    code = main(["ppo", "--model", "tiny-micro", "--data", data, "--reward-fn", "myreward_cli:score", "--max-steps",
                 "1", "--batch-size", "4", "--max-new-tokens", "2", "--out", "o", "--quiet"])
    assert code == 0, capsys.readouterr().err
    empty = _jsonl(in_tmp_cwd / "e.jsonl", [{"prompt": ""}, {"prompt": ""}])
    assert main(["ppo", "--model", "tiny-micro", "--data", empty, "--out", "o2", "--quiet"]) == 2
    assert "e.jsonl:1: 'prompt' is empty: PPO needs a prompt to generate from" in capsys.readouterr().err


# -- item 8 ----------------------------------------------------------------------------------------
def test_the_logged_lr_is_the_steps_own(tmp_path):
    run("sft", micro(tmp_path, lr=0.01, warmup_steps=4, max_steps=6, schedule="constant"))
    rows = {r["step"]: r["lr"] for r in read_log(str(tmp_path / "log.jsonl")) if "lr" in r}
    assert rows == {1: 0.0025, 2: 0.005, 3: 0.0075, 4: 0.01, 5: 0.01, 6: 0.01}


def test_eval_every_without_eval_data(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(16)])
    with pytest.warns(RunWarning, match="--eval-every 2: this run has no eval data"):
        run("sft", micro(tmp_path / "o", data=data, eval_every=2, max_steps=4))
    rows = read_log(str(tmp_path / "o" / "log.jsonl"))
    assert rows and all("loss" in r for r in rows), rows  # no empty eval lines


def test_strategy_none_under_torchrun(monkeypatch):
    from peftkern.train.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--strategy none, but torchrun started 2 processes"):
        setup("none")


def test_only_rank_0_prints_the_summary(tmp_path, capsys, monkeypatch):
    args = ["sft", "--model", "tiny-micro", "--lora-r", "4", "--max-steps", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second process
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("arch, message", [("sm_12", "unknown architecture 'sm_12'; choose from sm_80, sm_90"),
                                           ("", "no architecture given; choose from sm_80, sm_90"),
                                           (" , ", "no architecture given")])
def test_kernels_arch_errors(capsys, arch, message):
    with pytest.raises(SystemExit) as stopped:
        main(["kernels", "--arch", arch])
    assert stopped.value.code == 2
    assert f"peftkern kernels: error: argument --arch: {message}" in capsys.readouterr().err
