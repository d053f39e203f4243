"""A LoRA on the output head through the trainers (issue 12): with ``target_modules`` naming the head,
the fused losses train that adapter, with the gradients of the model's own (unfused) forward; a
DoRA head raises instead of being run as plain LoRA."""
import pytest
import torch
import torch.nn.functional as F

from peftkern.train.config import TrainConfig
from peftkern.train.model import base_causal_lm
from peftkern.train.run import build_trainer
from tests.helpers import assert_close
from tests.shared_fixtures import one_thread  # noqa: F401  (autouse)


def _trainer(tmp_path, kind, **kw):
    cfg = TrainConfig(model="tiny-micro", out=str(tmp_path), quiet=True, log_every=1, seed=0, strategy="none",
                      lora_r=4, lora_alpha=8, target_modules="q_proj,v_proj,lm_head", batch_size=4, max_steps=2,
                      lr=1e-2, **kw).check()
    torch.manual_seed(0)
    trainer = build_trainer(kind, cfg)
    trainer.eval_examples = trainer.eval_examples[:4]
    return trainer


def _head(trainer):
    return base_causal_lm(trainer.module.lm).get_output_embeddings()


def _randomize_head_lora(head):
    with torch.no_grad():
        head.lora_B["default"].weight.normal_(0.0, 0.3)  # B starts at 0: make the adapter change the logits


def test_sft_trains_the_head_lora_with_the_models_own_gradients(tmp_path):
    trainer = _trainer(tmp_path, "sft")
    head = _head(trainer)
    assert hasattr(head, "lora_A"), "lm_head should carry a LoRA"
    _randomize_head_lora(head)
    a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
    batch = trainer.to_device(trainer.collate(trainer.train_examples[:4]))

    # the model's own forward (full logits through the LoRA'd head), summed token NLL
    lm = trainer.module.lm
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    want = torch.autograd.grad(expected, [a, b])

    loss, _ = trainer.loss(trainer.module, batch)
    got = torch.autograd.grad(loss, [a, b])
    assert_close(loss, expected.detach(), torch.float32, "sft loss")
    for name, g, w in zip(("lora_A", "lora_B"), got, want):
        assert g.abs().sum() > 0, f"no gradient reaches the head's {name}"
        assert_close(g, w, torch.float32, f"head {name} gradient", factor=4)

    before = b.detach().clone()
    trainer.train()
    assert not torch.equal(b.detach(), before), "the head's LoRA did not train"
    assert "lm_head" in str(trainer.module.lm.peft_config["default"].target_modules)


def test_dpo_and_kto_reference_is_the_head_without_its_lora(tmp_path):
    """The reference pass (adapters off) reads the head without its LoRA; the policy with it."""
    for kind in ("dpo", "kto"):
        trainer = _trainer(tmp_path / kind, kind, beta=0.5)
        _randomize_head_lora(_head(trainer))
        trainer.prepare()  # the reference log-probs, adapters disabled
        batch = trainer.to_device(trainer.collate(trainer.train_examples[:4]))
        loss, metrics = trainer.loss(trainer.module, batch)
        grads = torch.autograd.grad(loss, [_head(trainer).lora_B["default"].weight])
        assert grads[0].abs().sum() > 0
        rewards = metrics["reward_chosen"] if kind == "dpo" else metrics["reward_desirable"]
        assert rewards.abs() > 0, "policy == reference: the head's LoRA was read around"


def test_dora_on_the_head_raises(tmp_path):
    trainer = _trainer(tmp_path, "sft", dora=True)
    batch = trainer.to_device(trainer.collate(trainer.train_examples[:4]))
    with pytest.raises(ValueError, match="DoRA"):
        trainer.loss(trainer.module, batch)


def test_head_parameters_refuses_a_dora_head():
    """peftkern's DoRALinear and PEFT's use_dora layer: never read as a plain LoRA."""
    from peftkern.losses import head_parameters
    from peftkern.nn import DoRALinear

    head = DoRALinear.from_linear(torch.nn.Linear(8, 20), r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="DoRA"):
        head_parameters(head)
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 20)),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        head_parameters(model.base_model.model[0])
    head.disable_adapters = True  # adapters off: the base head alone is exact
    assert head_parameters(head)["lora_A"] is None
