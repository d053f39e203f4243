"""The trainers with every method: ``--peft lora|ia3|adalora|bitfit`` (flags and YAML keys), a loss
that falls on the embedded micro model, the adapter saved in PEFT's files, AdaLoRA's allocation run
by the loop (through the optimizer's step hooks)."""
import json

import pytest
import torch

from peftkern.train.config import TrainConfig
from peftkern.train.run import build_trainer
from tests.shared_fixtures import one_thread  # noqa: F401  (autouse)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-micro", out=str(tmp_path), quiet=True, log_every=1, seed=0, strategy="none",
                batch_size=16, max_steps=12)
    base.update(kw)
    return TrainConfig(**base).check()


METHODS = {
    "ia3": dict(peft="ia3", lr=0.5),
    "adalora": dict(peft="adalora", lr=2e-2, adalora_init_r=8, adalora_target_r=4, adalora_tinit=2,
                    adalora_tfinal=3),
    "bitfit": dict(peft="bitfit", lr=5e-2),
    "lora": dict(peft="lora", lora_r=8, lora_alpha=16, lr=2e-2),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_sft_loss_falls_with_each_method(tmp_path, method):
    torch.manual_seed(0)
    trainer = build_trainer("sft", _cfg(tmp_path, **METHODS[method]))
    trainer.eval_examples = trainer.eval_examples[:24]
    summary = trainer.train()
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 0.02, summary
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    model = trainer.module.lm
    assert all(n.startswith("model.") for n, p in model.named_parameters() if p.requires_grad)
    if method == "adalora":
        pattern = config["rank_pattern"]
        assert pattern and sum(map(sum, pattern.values())) == 4 * len(pattern)  # the final budget
        assert all(not k.endswith(".default") for k in pattern)


def test_options_of_another_method_are_refused_and_yaml_keys_work(tmp_path):
    with pytest.raises(ValueError, match="--adalora-init-r: options of --peft adalora, but --peft is 'ia3'"):
        _cfg(tmp_path, peft="ia3", adalora_init_r=4)
    with pytest.raises(ValueError, match="--dora is a LoRA option"):
        _cfg(tmp_path, peft="bitfit", dora=True)
    with pytest.raises(ValueError, match="--peft adalora needs --max-steps"):
        _cfg(tmp_path, peft="adalora", max_steps=0)
    with pytest.raises(ValueError, match="peft must be one of"):
        _cfg(tmp_path, peft="lokr")
    with pytest.raises(ValueError, match="--peft adalora: AdaLoraConfig.beta1 must be < 1"):
        build_trainer("sft", _cfg(tmp_path, peft="adalora", adalora_beta1=1.5))

    import argparse

    from peftkern.train.config import add_arguments, config_from_args
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("peft: ia3\nia3_target_modules: k_proj,down_proj\nia3_feedforward_modules: down_proj\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, "sft")
    cfg = config_from_args(parser.parse_args(["--config", str(yaml_file), "--model", "tiny-micro"]), "sft")
    assert (cfg.peft, cfg.ia3_target_modules, cfg.ia3_feedforward_modules) == ("ia3", "k_proj,down_proj", "down_proj")
    args = parser.parse_args(["--peft", "bitfit", "--bitfit-target-modules", "o_proj"])
    assert config_from_args(args, "sft").bitfit_target_modules == "o_proj"


@pytest.mark.parametrize("method", ["ia3", "bitfit"])
def test_dpo_reference_is_the_base_model_for_any_method(tmp_path, method):
    cfg = _cfg(tmp_path, **METHODS[method], max_steps=4, batch_size=8)
    torch.manual_seed(0)
    trainer = build_trainer("dpo", cfg)
    trainer.eval_examples = trainer.eval_examples[:8]
    summary = trainer.train()
    assert summary["final_loss"] is not None and (tmp_path / "adapter" / "adapter_config.json").is_file()
    first = trainer.history[0]
    assert abs(first["loss"] - 0.6931) < 1e-3  # policy == reference at step 1: the adapter starts as the base
