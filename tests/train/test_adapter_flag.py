"""``--adapter DIR``: training continues from an existing adapter (PEFT's or ours, any method, on a
16-bit or NF4 base): the first step's loss is the adapter model's loss on the same data, as PEFT
computes it; an adapter that does not fit the model is refused, naming the file and tensor."""
import json
import math

import pytest
import torch

from peftkern.cli import main
from tests.train.checkpoints import tiny_gpt2, tiny_llama, write_sft_data
from tests.train.helpers import losses

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_adapter(base_dir, out, config, seed=1):
    """A PEFT adapter with non-zero weights everywhere (as after training), saved by PEFT."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return model


def _peft_loss(model, tok, data_path, max_length=256) -> float:
    """Mean next-token NLL over the completion tokens, from PEFT's model and transformers' logits."""
    total, count = 0.0, 0
    for line in open(data_path):
        rec = json.loads(line)
        prompt = tok(rec["prompt"])["input_ids"]
        completion = tok(rec["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        lp = logp.gather(1, targets[:, None])[:, 0][len(prompt) - 1:]
        total -= float(lp.sum())
        count += lp.numel()
    return total / count


def _train(tmp_path, base, adapter, *extra):
    data = write_sft_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    argv = ["sft", "--model", str(base), "--adapter", str(adapter), "--data", data, "--eval-data", data,
            "--batch-size", "8", "--max-steps", "1", "--log-every", "1", "--lr", "1e-3", "--out", str(out), "--quiet",
            "--strategy", "none", *extra]
    assert main(argv) == 0
    summary = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    return losses(out)[1], summary, data


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_first_step_loss_is_the_peft_adapters_loss(tmp_path, method):
    base = tiny_llama(tmp_path / "base", dtype=torch.float32)
    del base
    config = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
              "dora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                      use_dora=True, lora_dropout=0.0),
              "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])}[method]
    model = _peft_adapter(tmp_path / "base", tmp_path / "adapter", config)
    first, _, data = _train(tmp_path, tmp_path / "base", tmp_path / "adapter")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    expected = _peft_loss(model.eval(), tok, data)
    assert math.isclose(first, expected, rel_tol=1e-5), (first, expected)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type.value


def test_continue_from_our_own_adapter_on_an_nf4_base(tmp_path):
    tiny_llama(tmp_path / "base")
    data = write_sft_data(tmp_path / "data.jsonl")
    first_run = ["sft", "--model", str(tmp_path / "base"), "--quant", "nf4", "--lora-r", "4", "--data", data,
                 "--eval-data", data, "--batch-size", "8", "--max-steps", "3", "--lr", "1e-2", "--out",
                 str(tmp_path / "a"), "--quiet", "--strategy", "none"]
    assert main(first_run) == 0
    after = json.loads(open(tmp_path / "a" / "log.jsonl").readlines()[-1])
    first, _, _ = _train(tmp_path, tmp_path / "base", tmp_path / "a" / "adapter", "--quant", "nf4")
    evals = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if "eval_loss" in line]
    assert math.isclose(first, evals[0]["eval_loss"], rel_tol=1e-5)
    assert after  # the first run logged


def test_adapter_that_does_not_fit_is_named(tmp_path, capsys):
    tiny_llama(tmp_path / "base", dtype=torch.float32)
    tiny_llama(tmp_path / "wide", dtype=torch.float32, hidden_size=96, intermediate_size=192, seed=2)
    tiny_gpt2(tmp_path / "gpt2")
    _peft_adapter(tmp_path / "wide", tmp_path / "wide_adapter", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    first, _, data = None, None, write_sft_data(tmp_path / "data.jsonl")
    base_args = ["sft", "--model", str(tmp_path / "base"), "--data", data, "--max-steps", "1", "--quiet", "--strategy",
                 "none"]
    assert main(base_args + ["--adapter", str(tmp_path / "wide_adapter"), "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "adapter_model.safetensors" in err and "q_proj" in err and "96" in err, err
    _peft_adapter(tmp_path / "gpt2", tmp_path / "gpt2_adapter", peft.LoraConfig(r=4, target_modules=["c_attn"]))
    assert main(base_args + ["--adapter", str(tmp_path / "gpt2_adapter"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "c_attn" in err, err
    assert main(base_args + ["--adapter", str(tmp_path / "wide_adapter"), "--lora-r", "8", "--out",
                             str(tmp_path / "r3")]) == 2
    assert "drop --lora-r" in capsys.readouterr().err
    assert main(base_args + ["--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "r4")]) == 2
    assert "--adapter" in capsys.readouterr().err
