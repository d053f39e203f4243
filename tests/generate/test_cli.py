"""``peftkern generate`` and ``peftkern chat``: output files, clear errors for bad input, and the chat
driven in a real terminal (tmux: keys sent, the screen read back)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import peftkern
from peftkern.cli import main
from peftkern.generate import generate
from peftkern.generate.constraints import RegexConstraint
from peftkern.models import build_byte_tokenizer, build_tiny_model
from tests.generate.models import randomize_adapters, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter for the tiny-micro model (random, so it changes the answers)."""
    out = tmp_path_factory.mktemp("adapter")
    model = peftkern.get_peft_model(build_tiny_model("micro"), peftkern.LoraConfig(r=4, lora_alpha=8,
                                                                                   target_modules="all-linear"))
    randomize_adapters(model, scale=0.5)
    peftkern.save_adapter(model, str(out))
    return str(out)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_generate_writes_jsonl(tmp_path, adapter_dir, capsys):
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi", "id": 7}),
                                            json.dumps({"messages": [{"role": "user", "content": "2 + 2?"}]})])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", "tiny-micro", "--adapter", adapter_dir, "--prompts", prompts, "--out",
                 str(out), "--max-new-tokens", "6", "--regex", "[a-z]+"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [7, None]
    model = peftkern.load_adapter(build_tiny_model("micro"), adapter_dir, adapter_name=os.path.basename(adapter_dir))
    tok = build_byte_tokenizer()
    expected = generate(model, tok, ["Hi", [{"role": "user", "content": "2 + 2?"}]], max_new_tokens=6,
                        processors=[RegexConstraint(tok, "[a-z]+")])
    assert [r["completion"] for r in rows] == [c.text for c in expected]
    assert all(r["finish_reason"] in ("eos", "length") and r["completion_tokens"] <= 6 for r in rows)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_errors_name_the_problem(tmp_path, capsys):
    good = _write(tmp_path / "good.jsonl", [json.dumps({"prompt": "Hi"})])
    empty = _write(tmp_path / "empty.jsonl", [])
    assert "empty.jsonl: the prompt file is empty" in _error(capsys, ["generate", "--model", "tiny-micro",
                                                                       "--prompts", empty])
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "Hi"}), "{oops"])
    assert "bad.jsonl:2: not valid JSON" in _error(capsys, ["generate", "--model", "tiny-micro", "--prompts", bad])
    nofield = _write(tmp_path / "nofield.jsonl", [json.dumps({"text": "Hi"})])
    assert "nofield.jsonl:1: no 'prompt' field" in _error(capsys, ["generate", "--model", "tiny-micro",
                                                                   "--prompts", nofield])
    err = _error(capsys, ["generate", "--model", "tiny-micro", "--prompts", good, "--regex", "([a-z]"])
    assert "invalid regular expression '([a-z]': missing ), unterminated subpattern" in err
    long = _write(tmp_path / "long.jsonl", [json.dumps({"prompt": "x" * 300})])
    err = _error(capsys, ["generate", "--model", "tiny-micro", "--prompts", long])
    assert "long.jsonl:1: the prompt has 300 tokens, longer than the model's context of 256 positions" in err
    err = _error(capsys, ["generate", "--model", "tiny-micro", "--prompts", good, "--max-new-tokens", "300"])
    assert "exceed the model's context of 256 positions" in err
    err = _error(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompts", good])
    assert "not 'tiny' and not a local model directory" in err


def test_adapter_for_another_base_is_an_error(tmp_path, capsys):
    other = peftkern.get_peft_model(tiny_model("llama"), peftkern.LoraConfig(r=4, target_modules="all-linear"))
    peftkern.save_adapter(other, str(tmp_path / "other"))
    good = _write(tmp_path / "good.jsonl", [json.dumps({"prompt": "Hi"})])
    err = _error(capsys, ["generate", "--model", "tiny-micro", "--adapter", str(tmp_path / "other"), "--prompts", good])
    assert f"--adapter {tmp_path / 'other'} does not fit this model" in err
    assert "has shape" in err


PATTERN = "[a-z ]{40,60}"  # printable, and long enough to be seen part-way


def _expected_chat(adapter_dir, messages, adapters_on=True):
    model = peftkern.load_adapter(build_tiny_model("micro"), adapter_dir)
    tok = build_byte_tokenizer()
    kwargs = dict(max_new_tokens=60, processors=[RegexConstraint(tok, PATTERN)])
    if adapters_on:
        return generate(model, tok, [messages], **kwargs)[0].text
    with model.disable_adapter():
        return generate(model, tok, [messages], **kwargs)[0].text


class Tmux:
    def __init__(self, name, command):
        self.name = name
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "220", "-y", "50", command], check=True)

    def screen(self) -> list[str]:
        out = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", self.name], capture_output=True, text=True)
        return out.stdout.rstrip("\n").splitlines()

    def send(self, text):
        subprocess.run(["tmux", "send-keys", "-t", self.name, text, "Enter"], check=True)

    def close(self):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def _wait_for_prompt(tmux, count, timeout=120.0, watch=None):
    """Wait until the screen shows its ``count``-th 'you>' prompt, empty and waiting for input;
    meanwhile record the last 'bot> ' line (what streaming shows part-way)."""
    end = time.time() + timeout
    while time.time() < end:
        lines = tmux.screen()
        bots = [line for line in lines if line.startswith("bot> ")]
        if watch is not None and bots:
            watch.append(bots[-1])
        if lines and lines[-1].rstrip() == "you>" and sum(line.startswith("you>") for line in lines) >= count:
            return lines
        time.sleep(0.01)
    raise AssertionError("timed out; screen:\n" + "\n".join(tmux.screen()))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_terminal_answers_streams_and_resets(adapter_dir):
    command = (f"cd {REPO} && PYTHONPATH={REPO} OMP_NUM_THREADS=1 {sys.executable} -m peftkern chat --model tiny-micro "
               f"--adapter {adapter_dir} --max-new-tokens 60 --regex '{PATTERN}'")
    tmux = Tmux(f"peftkern-chat-{os.getpid()}", command)
    try:
        _wait_for_prompt(tmux, 1)
        seen = []
        tmux.send("hello")
        lines = _wait_for_prompt(tmux, 2, watch=seen)
        answer = [line for line in lines if line.startswith("bot> ")][-1][5:]
        assert answer == _expected_chat(adapter_dir, [{"role": "user", "content": "hello"}])
        assert len(answer) >= 40
        partial = {s for s in seen if len(s) - 5 < len(answer)}
        assert partial, "the answer was never seen part-way: no streaming"

        tmux.send("and then")  # a second turn: the history is in the prompt
        lines = _wait_for_prompt(tmux, 3)
        second = [line for line in lines if line.startswith("bot> ")][-1][5:]
        history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": answer},
                   {"role": "user", "content": "and then"}]
        assert second == _expected_chat(adapter_dir, history)

        tmux.send("/reset")  # each line is sent at a ready prompt: typed-ahead text would echo out of order
        assert "(conversation reset)" in _wait_for_prompt(tmux, 4)
        tmux.send("hello")
        lines = _wait_for_prompt(tmux, 5)
        assert [line for line in lines if line.startswith("bot> ")][-1][5:] == answer

        tmux.send("/adapter off")
        assert "(adapters off)" in _wait_for_prompt(tmux, 6)
        tmux.send("/reset")
        _wait_for_prompt(tmux, 7)
        tmux.send("hello")
        lines = _wait_for_prompt(tmux, 8)
        base = _expected_chat(adapter_dir, [{"role": "user", "content": "hello"}], adapters_on=False)
        assert base != answer
        assert [line for line in lines if line.startswith("bot> ")][-1][5:] == base
    finally:
        tmux.close()


def test_generate_serves_different_adapters_in_one_batch(tmp_path, adapter_dir, capsys):
    """Records naming their adapter run in the same batch, each row through its own adapter: the same
    completions as running each adapter's prompts alone."""
    second = tmp_path / "second"
    model = peftkern.get_peft_model(build_tiny_model("micro"), peftkern.LoraConfig(r=2, target_modules="all-linear"))
    randomize_adapters(model, seed=9, scale=0.5)
    peftkern.save_adapter(model, str(second))
    rows = [{"prompt": "Hi", "adapter": "a"}, {"prompt": "Hello there", "adapter": "b"},
            {"prompt": "Hey", "adapter": "__base__"}, {"prompt": "Yo", "adapter": "a"}]
    prompts = _write(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", "tiny-micro", "--adapter", f"a={adapter_dir}", "--adapter", f"b={second}",
            "--prompts", prompts, "--out", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 0
    got = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    tok = build_byte_tokenizer()
    for row, text in zip(rows, got):
        lm = build_tiny_model("micro")
        if row["adapter"] != "__base__":
            lm = peftkern.load_adapter(lm, adapter_dir if row["adapter"] == "a" else str(second))
        assert text == generate(lm, tok, [row["prompt"]], max_new_tokens=8)[0].text
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "Hi", "adapter": "a"}), json.dumps({"prompt": "x"})])
    assert "bad.jsonl:2: some records name an 'adapter', so every record must" in _error(
        capsys, argv[:7] + ["--prompts", bad])
    unknown = _write(tmp_path / "unknown.jsonl", [json.dumps({"prompt": "Hi", "adapter": "zzz"})])
    assert "unknown.jsonl:1: adapter 'zzz' is not loaded" in _error(capsys, argv[:7] + ["--prompts", unknown])
