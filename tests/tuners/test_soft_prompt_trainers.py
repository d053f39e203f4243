"""The trainers with soft prompts: ``--peft prompt|prefix|ptuning --num-virtual-tokens N``. The
hidden-state log-prob path (fused head) gives the log-probs of the model's own forward at the
right positions; the loss falls; DPO's reference is the model without the soft prompt; the
adapter is saved in PEFT's files and loads in PEFT."""
import copy
import json

import pytest
import torch

from peftkern import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from peftkern.train.model import LMWithHeads
from peftkern.train.run import build_trainer
from tests.tuners.test_trainer_methods import _cfg, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from tests.tuners.tiny_models import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SOFT = {"prompt": dict(peft="prompt", num_virtual_tokens=4, lr=0.3, prompt_tuning_init="SAMPLE_VOCAB"),
        "prefix": dict(peft="prefix", num_virtual_tokens=4, lr=0.2),
        "ptuning": dict(peft="ptuning", num_virtual_tokens=4, lr=1e-2)}
# On the untrained micro model (eval loss ~ log(vocab)) input-side prompts move the loss little
FALL = {"prompt": 0.005, "prefix": 0.05, "ptuning": 0.005}


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3),
                                    PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8)],
                         ids=["prompt", "prefix", "ptuning"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hidden_state_logprobs_are_the_forwards_at_shifted_positions(config, family):
    base = tiny_model(family)
    lm = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in lm.model.prompt_encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    module = LMWithHeads(lm)
    got = module(ids, mask, labels)["logps"]
    logits = lm(input_ids=ids, attention_mask=mask).logits[:, -7:]  # virtual positions first
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    want = want.masked_fill(labels[:, 1:] == -100, 0.0)
    assert (got - want).abs().max().item() < 1e-5
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lm.model.prompt_encoder.parameters())
    assert all(p.grad is None for n, p in lm.named_parameters() if "prompt_encoder" not in n)
    with lm.disable_adapter():  # the reference: the base model
        ref = module(ids, mask, labels)["logps"]
    plain = LMWithHeads(base)(ids, mask, labels)["logps"]
    assert (ref - plain).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", list(SOFT))
def test_sft_loss_falls_and_the_adapter_loads_in_peft(tmp_path, method):
    torch.manual_seed(0)
    trainer = build_trainer("sft", _cfg(tmp_path, **SOFT[method]))
    trainer.eval_examples = trainer.eval_examples[:24]
    summary = trainer.train()
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - FALL[method], summary
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning": "P_TUNING"}[method]
    assert config["num_virtual_tokens"] == 4
    peft = pytest.importorskip("peft")
    lm = trainer.module.lm.eval()
    plain = copy.deepcopy(lm).unload()
    back = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
    ids = torch.randint(0, 200, (2, 6))
    with torch.no_grad():
        assert (back(input_ids=ids).logits - lm(input_ids=ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_trainers_take_soft_prompts(tmp_path, method, kind):
    cfg = _cfg(tmp_path, **SOFT[method], max_steps=3, batch_size=8)
    torch.manual_seed(0)
    trainer = build_trainer(kind, cfg)
    trainer.eval_examples = trainer.eval_examples[:8]
    summary = trainer.train()
    assert summary["final_loss"] is not None and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)


def test_flags_and_refusals(tmp_path):
    with pytest.raises(ValueError, match="--num-virtual-tokens: options of --peft prompt|prefix|ptuning"):
        _cfg(tmp_path, num_virtual_tokens=8)
    with pytest.raises(ValueError, match="--prefix-projection: options of --peft prefix, but --peft is 'prompt'"):
        _cfg(tmp_path, peft="prompt", prefix_projection=True)
    with pytest.raises(ValueError, match="--packing with --peft prefix"):
        _cfg(tmp_path, peft="prefix", packing=True)
    with pytest.raises(ValueError, match="--peft prompt: PromptTuningConfig.num_virtual_tokens must be a positive"):
        build_trainer("sft", _cfg(tmp_path, peft="prompt", num_virtual_tokens=0))
    import argparse

    from peftkern.train.config import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser, "sft")
    args = parser.parse_args(["--peft", "ptuning", "--num-virtual-tokens", "6", "--ptuning-encoder-type", "LSTM"])
    cfg = config_from_args(args, "sft")
    assert (cfg.peft, cfg.num_virtual_tokens, cfg.ptuning_encoder_type) == ("ptuning", 6, "LSTM")


@pytest.mark.parametrize("config", [PromptTuningConfig(num_virtual_tokens=3), PrefixTuningConfig(num_virtual_tokens=3),
                                    PromptEncoderConfig(num_virtual_tokens=3)], ids=["prompt", "prefix", "ptuning"])
def test_peftkerns_decoding_loop_gives_generates_tokens(config):
    """The rollouts' KV-cached loop (peftkern.generate.ModelStepper) continues a sequence the soft
    prompt started: left-padded prompts give transformers' generate() tokens."""
    from peftkern.generate import ModelStepper

    model = get_peft_model(tiny_model("llama"), config).eval()
    with torch.no_grad():
        for p in model.model.prompt_encoder.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    stepper, tokens = ModelStepper(model), []
    logits = stepper.start(ids, mask)
    for _ in range(5):
        tokens.append(logits.argmax(-1))
        logits = stepper.advance(tokens[-1])
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    assert torch.cat([ids, torch.stack(tokens, 1)], 1).tolist() == expected.tolist()
