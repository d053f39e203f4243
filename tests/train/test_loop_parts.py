"""Schedules, config files and flags, checkpoints (atomic, keep-last-N, RNG), fused log-probs."""
import argparse
import os
import random

import numpy as np
import pytest
import torch

from peftkern.train import checkpoint as ck
from peftkern.train.config import TrainConfig, add_arguments, config_from_args
from peftkern.train.errors import RunWarning
from peftkern.train.logprobs import chunked_logprobs, token_logprobs
from peftkern.train.schedule import lr_factor


def test_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "linear", 0.1) == pytest.approx(0.1 + 0.9 / 90, rel=1e-6)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 10, 0, "step")


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.001\nlora-r: 4\nbeta: 0.3\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, "dpo")
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--lora-r", "8", "--resume"])
    cfg = config_from_args(args, "dpo")
    assert (cfg.lr, cfg.lora_r, cfg.beta, cfg.resume) == (0.001, 8, 0.3, True)
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]), "dpo")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(batch_size=0).check()


def test_help_documents_every_flag():
    import dataclasses

    from peftkern.cli import _parser

    for kind in ("sft", "rm", "dpo", "kto", "ppo"):
        sub = _parser()._subparsers._group_actions[0].choices[kind]
        text = sub.format_help()
        for f in dataclasses.fields(TrainConfig):
            if kind in f.metadata["kinds"]:
                assert "--" + f.name.replace("_", "-") in text, (kind, f.name)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    out = str(tmp_path)
    w = {"a": torch.randn(3, 2)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])
    for step in (1, 2, 3):
        ck.save_checkpoint(out, step, w, opt.state_dict(), {"last_epoch": step}, {"x": step}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(out)] == [2, 3]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith(".")]
    # a half-written checkpoint (a temp dir, no rename) is never picked up
    os.makedirs(tmp_path / "checkpoints" / ".tmp-abc")
    os.makedirs(tmp_path / "checkpoints" / "step-000009")  # no manifest: incomplete
    with pytest.warns(RunWarning, match="step-000009 is damaged .no manifest.json"):
        assert ck.latest_checkpoint(out).endswith("step-000003")
    loaded = ck.load_checkpoint(ck.latest_checkpoint(out, warn=None))
    assert torch.equal(loaded["trainable"]["a"], w["a"]) and loaded["state"]["x"] == 3


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    ck.save_checkpoint(str(tmp_path), 1, {}, {}, {}, {}, keep_last=1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    ck.set_rng_state(ck.load_checkpoint(ck.latest_checkpoint(str(tmp_path)))["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_atomic_dir_replaces_whole(tmp_path):
    final = tmp_path / "adapter"
    with ck.atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    with pytest.raises(RuntimeError):
        with ck.atomic_dir(str(final)) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(final)) == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (3, 5)])
def test_token_logprobs_match_log_softmax(shape):
    torch.manual_seed(0)
    hidden = torch.randn(*shape, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, shape)
    targets[0, 0] = -100
    logp, ent = token_logprobs(hidden.float(), weight.float(), targets, return_entropy=True)
    ref_all = torch.log_softmax(hidden @ weight.t(), -1)
    ref = ref_all.gather(-1, targets.clamp_min(0)[..., None])[..., 0].masked_fill(targets == -100, 0)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1).masked_fill(targets == -100, 0)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-4, atol=1e-4)
    # the chunked fallback path too, gradients included
    flat_h, flat_t = hidden.reshape(-1, 16), targets.reshape(-1)
    lp, _ = chunked_logprobs(flat_h, weight, flat_t, chunk=3)
    torch.testing.assert_close(lp.double(), ref.reshape(-1), rtol=1e-5, atol=1e-5)  # fp32 math
    lp.sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref.sum().backward()
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-4, atol=1e-5)


def test_a_step_reads_the_device_once(tmp_path, monkeypatch):
    """Issue 24: the loss, metrics, gradient norm and the stop flag reach the host in one transfer per
    optimizer step (counted as the tensor-to-Python conversions finish_step makes; the optimizer's own
    update is replaced by a no-op here, as it is the same with or without the check)."""
    from tests.train.helpers import micro, trainer

    t = trainer("dpo", micro(tmp_path, max_steps=2))
    t.prepare()
    batches = [t.to_device(t.collate(mb)) for mb in t.micro_batches(0)]
    total = torch.stack([t.units(b) for b in batches]).sum().float()
    loss_sum, metric_sums = torch.zeros(()), {}
    for b in batches:
        loss, metrics = t.loss(t.model, b)
        loss.backward()
        loss_sum = loss_sum + loss.detach()
        metric_sums = {k: metric_sums.get(k, 0.0) + v.detach() for k, v in metrics.items()}
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            (reads.append(_name), _real(self, *a, **k))[1])
    monkeypatch.setattr(t.optimizer, "step", lambda *a, **k: None)
    record = t.finish_step(loss_sum, metric_sums, total)
    monkeypatch.undo()
    assert reads == ["tolist"], reads
    assert {"loss", "grad_norm", "lr", "reward_margin", "preference_accuracy"} <= set(record)
