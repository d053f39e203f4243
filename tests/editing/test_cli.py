"""``peftkern edit`` and ``peftkern eval-edits`` on a saved micro model."""
import json

import pytest
import torch

import peftkern
from peftkern.cli import main
from tests.editing.micro import CORPUS, REQUEST, micro_model

SECOND = {"prompt": "{} plays the", "subject": "Mira Tolan", "target_new": "harp", "target_true": "piano"}


@pytest.fixture
def workdir(tmp_path, tok):
    model = micro_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "edits.jsonl").write_text(json.dumps(REQUEST) + "\n" + json.dumps(SECOND) + "\n")
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    return tmp_path


def _common(d):
    return ["--model", str(d / "model"), "--requests", str(d / "edits.jsonl"), "--threads", "1"]


QUICK = ["--corpus", "CORPUS", "--steps", "2", "--prefixes", "2", "--prefix-length", "3"]


def _quick(d):
    return [str(d / "corpus.txt") if a == "CORPUS" else a for a in QUICK]


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edit_writes_an_adapter_that_eval_edits_and_peftkern_load(workdir, method, capsys):
    args = ["edit", *_common(workdir), "--out", str(workdir / "adapter"), "--method", method, *_quick(workdir)]
    args += ["--layer", "1"] if method == "rome" else ["--layers", "0,1", "--mom2-weight", "10"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 request(s)" in out and "adapter written to" in out
    files = sorted(p.name for p in (workdir / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "edit_info.json"]
    config = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    edited = peftkern.load_adapter(AutoModelForCausalLM.from_pretrained(workdir / "model"), workdir / "adapter")
    ids = torch.tensor([[257] + list(b"The capital of Velora is")])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, edited(input_ids=ids).logits)

    assert main(["eval-edits", *_common(workdir), "--adapter", str(workdir / "adapter"), "--json",
                 "--no-fluency"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"base", "edited"} and result["edited"]["n"] == 2
    assert main(["eval-edits", *_common(workdir), "--no-fluency"]) == 0
    table = capsys.readouterr().out
    assert "efficacy" in table and "specificity" in table


def test_edit_errors_exit_2_with_the_reason(workdir, capsys):
    assert main(["edit", *_common(workdir), "--out", str(workdir / "a"), "--layer", "9", *_quick(workdir)]) == 2
    assert "layer 9 is out of range: the model has 3 layers" in capsys.readouterr().err
    assert main(["edit", *_common(workdir), "--out", str(workdir / "a"), "--method", "memit", "--layer", "1"]) == 2
    assert "--layer is for ROME" in capsys.readouterr().err
    (workdir / "bad.jsonl").write_text(json.dumps({**REQUEST, "subject": "Atlantis", "prompt": "x is"}) + "\n")
    assert main(["edit", "--model", str(workdir / "model"), "--requests", str(workdir / "bad.jsonl"),
                 "--out", str(workdir / "a")]) == 2
    assert "bad.jsonl:1: subject 'Atlantis' not found in prompt" in capsys.readouterr().err
    assert not (workdir / "a").exists()
