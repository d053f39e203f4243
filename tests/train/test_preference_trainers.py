"""The preference trainers' loss on a batch against the real TRL 1.16 on the same model and batch (the
trainer path, not only the loss function): ``peftkern dpo`` for every loss type, TRL's ``sft`` and
``sigmoid_norm``, a weighted mixture and LD-DPO against DPOTrainer._compute_loss (and its reference
pass, compute_ref_log_probs); ``peftkern orpo`` / ``simpo`` / ``cpo`` against TRL's ORPOTrainer /
CPOTrainer loss code. Loss and every LoRA gradient; per-token log-probs for TRL come from the
model's full logits."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from peftkern.losses import DPO_LOSS_TYPES
from peftkern.train.adapters import adapters_disabled
from peftkern.train.config import TrainConfig
from peftkern.train.data import IGNORE_INDEX
from peftkern.train.errors import ConfigError
from peftkern.train.run import build_trainer
from tests.losses import _peers

pytest.importorskip("trl")
SMOOTHING = {"robust": 0.2, "exo_pair": 1e-3}


def _trainer(kind, tmp_path, **kw):
    base = dict(model="tiny-micro", lora_r=4, lora_alpha=8, lr=1e-2, batch_size=4, max_steps=1, out=str(tmp_path),
                quiet=True, strategy="none")
    base.update(kw)
    t = build_trainer(kind, TrainConfig(**base).check())
    t.eval_examples = t.eval_examples[:4]
    torch.manual_seed(0)
    t.prepare()
    with torch.no_grad():  # LoRA B starts at 0: move it so the policy differs from the reference
        for n, p in t.module.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return t


def _token_logps(lm, batch):
    """[2B, T-1] label log-probs from full logits (0 off the completions)."""
    logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (labels != IGNORE_INDEX)


def _grads(t):
    out = {n: p.grad.clone() for n, p in t.module.named_parameters() if p.requires_grad and p.grad is not None}
    t.module.zero_grad(set_to_none=True)
    return out


def _compare(t, ours_loss, expected):
    (ours_loss).backward()
    ours = _grads(t)
    expected.backward()
    theirs = _grads(t)
    assert abs(float(ours_loss) - float(expected)) <= 2e-5 * max(1.0, abs(float(expected))), \
        (float(ours_loss), float(expected))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        err = (ours[name] - theirs[name]).norm() / theirs[name].norm().clamp(min=1e-12)
        assert err < 2e-4, (name, float(err))


def _trl_dpo(t, batch, loss_types, loss_weights=None, ld_alpha=None):
    from trl.trainer.dpo_trainer import DPOTrainer

    lm = t.module.lm
    cfg = t.cfg
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}

    def model_of(fn):
        return lambda **kw: _peers._outputs(fn())
    fake = _peers._trainer_self(beta=cfg.beta, precompute_ref_logps=True, loss_types=loss_types,
                                loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=ld_alpha,
                                f_divergence_type="reverse_kl", label_smoothing=cfg.label_smoothing,
                                use_weighting=False, ref_model=None,
                                args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None))
    fake.accelerator = SimpleNamespace(**vars(fake.accelerator), autocast=contextlib.nullcontext)
    fake.model = torch.nn.Module()  # a plain module: not a PEFT model, no gradient checkpointing
    fake.model.is_gradient_checkpointing = False
    with torch.no_grad(), adapters_disabled(lm):  # TRL's own reference pass (adapters off)
        ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(fake, model_of(lambda: _token_logps(lm, batch)),
                                                                    inputs)
    inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    return DPOTrainer._compute_loss(fake, model_of(lambda: _token_logps(lm, batch)), inputs, return_outputs=False)


DPO_CASES = [([t], None, None) for t in DPO_LOSS_TYPES + ("sft", "sigmoid_norm")] + [
    (["sigmoid", "sft"], [1.0, 0.5], None), (["ipo", "bco_pair", "sft"], [0.3, 1.0, 2.0], None),
    (["sigmoid"], None, 0.5), (["ipo"], None, 0.3), (["aot", "sft"], [1.0, 0.1], 0.5)]


@pytest.mark.parametrize("types,weights,ld_alpha", DPO_CASES,
                         ids=["+".join(c[0]) + (f"-ld{c[2]}" if c[2] else "") + ("-w" if c[1] else "")
                              for c in DPO_CASES])
def test_dpo_trainer_matches_trl(tmp_path, types, weights, ld_alpha):
    eps = SMOOTHING.get(types[0], 0.0)
    t = _trainer("dpo", tmp_path, loss_type=",".join(types), beta=0.3, label_smoothing=eps, ld_alpha=ld_alpha,
                 loss_weights=None if weights is None else ",".join(map(str, weights)))
    batch = t.to_device(t.collate(t.train_examples[:4]))
    loss_sum, _ = t.loss(t.model, batch)
    _compare(t, loss_sum / 4, _trl_dpo(t, batch, types, weights, ld_alpha))


def test_ipo_averages_over_completion_tokens(tmp_path):
    """The reported bug: IPO must see length-averaged log-ratios (TRL), not sums."""
    t = _trainer("dpo", tmp_path, loss_type="ipo", beta=0.1)
    assert not t.plain
    batch = t.to_device(t.collate(t.train_examples[:4]))
    loss_sum, _ = t.loss(t.model, batch)
    with torch.no_grad():
        expected = _trl_dpo(t, batch, ["ipo"])
    assert abs(float(loss_sum) / 4 - float(expected)) < 1e-4 * abs(float(expected))


def _nll(token, mask, pairs):
    return -(token[:pairs] * mask[:pairs]).sum() / mask[:pairs].sum()


@pytest.mark.parametrize("kind,loss_type", [("orpo", None), ("simpo", None), ("cpo", "sigmoid"), ("cpo", "hinge"),
                                            ("cpo", "ipo"), ("cpo", "simpo")])
def test_reference_free_trainers_match_trl(tmp_path, kind, loss_type):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    extra = dict(loss_type=loss_type) if loss_type else {}
    if kind == "simpo":
        extra.update(label_smoothing=0.1, simpo_gamma=0.4)
    if kind == "cpo":
        extra.update(cpo_alpha=0.7, beta=0.2)
    t = _trainer(kind, tmp_path, **extra)
    cfg = t.cfg
    batch = t.to_device(t.collate(t.train_examples[:4]))
    loss_sum, _ = t.loss(t.model, batch)
    token = _token_logps(t.module.lm, batch)
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).float()
    average = kind in ("orpo", "simpo") or loss_type in ("ipo", "simpo")
    seq = (token * mask).sum(-1) / (mask.sum(-1) if average else 1.0)
    chosen, rejected = seq[:4], seq[4:]
    fake = _peers._trainer_self(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                                alpha=0.0, loss_type="simpo" if kind == "simpo" else loss_type)
    if kind == "orpo":
        losses = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)[0]
        expected = _nll(token, mask, 4) - losses.mean()
    else:
        losses = CPOTrainer.cpo_loss(fake, chosen, rejected)[0]
        expected = losses.mean() + (cfg.cpo_alpha * _nll(token, mask, 4) if kind == "cpo" else 0.0)
    _compare(t, loss_sum / 4, expected)


def test_runs_and_settings(tmp_path):
    for kind in ("orpo", "simpo", "cpo"):
        summary = build_trainer(kind, TrainConfig(model="tiny-micro", lora_r=4, lora_alpha=8, batch_size=4,
                                                  max_steps=2, out=str(tmp_path / kind), quiet=True,
                                                  strategy="none").check()).train()
        assert summary["steps"] == 2 and "preference_accuracy" in summary["eval_after"]
    with pytest.raises(ConfigError, match="--loss-weights has 1 values for 2 loss types"):
        build_trainer("dpo", TrainConfig(model="tiny-micro", out=str(tmp_path / "w"), loss_type="sigmoid,sft",
                                         loss_weights="1", strategy="none").check())
    with pytest.raises(ConfigError, match="--loss-type 'nope'"):
        build_trainer("dpo", TrainConfig(model="tiny-micro", out=str(tmp_path / "n"), loss_type="nope",
                                         strategy="none").check())
