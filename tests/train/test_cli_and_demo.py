"""The CLI on JSONL files and the demo's quick plan (the pipeline and report format, not the learning:
``make demo`` shows that)."""
import json
import os

import pytest

from peftkern.cli import main
from peftkern.models import tasks


def test_cli_sft_on_jsonl_with_yaml_config(tmp_path, capsys):
    train, held = tasks.split(32, 8)
    for name, rows in (("train.jsonl", tasks.sft_records(train)), ("eval.jsonl", tasks.sft_records(held))):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(f"model: tiny-micro\nlora_r: 4\nlr: 0.01\nbatch_size: 8\nmax_steps: 3\n"
                                       f"out: {tmp_path / 'out'}\n")
    code = main(["sft", "--config", str(tmp_path / "run.yaml"), "--data", str(tmp_path / "train.jsonl"),
                 "--eval-data", str(tmp_path / "eval.jsonl"), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_cli_reports_malformed_data_by_file_and_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    code = main(["dpo", "--model", "tiny-micro", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "bad.jsonl:2: missing field 'chosen'" in capsys.readouterr().err


def test_demo_quick_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["base", "sft", "dpo"]
    sft, dpo = report["stages"][1], report["stages"][2]
    for key in ("eval_loss_before", "eval_loss_after", "eval_accuracy_before", "eval_accuracy_after", "seconds"):
        assert isinstance(sft[key], float), key
    for key in ("preference_accuracy_before", "preference_accuracy_after", "reward_margin_after", "seconds"):
        assert isinstance(dpo[key], float), key
    assert report["samples"] and {"prompt", "answer", "base", "after_sft", "after_dpo"} <= set(report["samples"][0])
    for path in ("sft_loss.png", "dpo_loss.png", "sft/adapter/adapter_model.safetensors",
                 "dpo/adapter/adapter_config.json", "base_model/config.json", "base_model/tokenizer.json"):
        assert os.path.isfile(out / path), path
    assert "preference accuracy" in capsys.readouterr().out
    # Issue 28.7: each adapter names the base it was trained on, and PEFT, loading it through that
    # name, gives what the demo's own model generated
    for stage, base in (("sft", "base_model"), ("dpo", "sft_model")):
        config = json.loads((out / stage / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((out / base).resolve()), stage
        assert (out / base / "config.json").is_file() and (out / base / "tokenizer.json").is_file()
    peft = pytest.importorskip("peft")
    from peftkern.models import build_byte_tokenizer
    from peftkern.train.generate import generate

    prompts = [tasks.prompt_records([(s["prompt"], s["answer"], "")])[0]["prompt"] for s in report["samples"]]
    for stage, key in (("sft", "after_sft"), ("dpo", "after_dpo")):
        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out / stage / "adapter")).eval()
        got = generate(model, build_byte_tokenizer(), prompts, max_new_tokens=8)
        assert got == [s[key] for s in report["samples"]], stage


def test_cli_trains_a_local_model_directory(tmp_path, capsys):
    from peftkern.models import build_byte_tokenizer, build_tiny_model

    model_dir = tmp_path / "model"
    build_tiny_model("micro").save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    train, _ = tasks.split(16, 2)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tasks.preference_records(train)))
    code = main(["dpo", "--model", str(model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--max-steps", "2",
                 "--batch-size", "4", "--target-modules", "q_proj,v_proj", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert main(["sft", "--model", str(model_dir), "--out", str(tmp_path / "o2")]) == 2
    assert "--data is required" in capsys.readouterr().err
