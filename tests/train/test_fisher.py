"""peftkern.train.fisher and ``peftkern fisher``: the diagonal Fisher equals per-example squared
gradients computed by hand (the model's own logits, cross-entropy, autograd) on a micro model,
empirical and true, full weights and LoRA factors; the file round-trips; bad files are named."""

import pytest
import torch

from peftkern.train import fisher as fisher_mod
from peftkern.train.config import TrainConfig
from peftkern.train.data import IGNORE_INDEX
from peftkern.train.forgetting_cli import fisher_for_config
from peftkern.train.loading import load_lm, load_tokenizer
from peftkern.train.model import LMWithHeads, prepare_lm
from peftkern.train.run import bundled_records
from peftkern.train.sft import sft_examples


def _setup(lora_r, seed=0):
    cfg = TrainConfig(model="tiny-micro", lora_r=lora_r, lora_alpha=8.0, seed=seed, strategy="none").check()
    tok = load_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    lm = prepare_lm(cfg, load_lm(cfg))
    examples = sft_examples(tok, bundled_records("sft", seed)[0][:12], cfg)
    return cfg, lm, examples


def _by_hand(lm, examples, order, kind, gen):
    """mean over examples of (d/dtheta mean-token CE of the LM's full logits)^2."""
    params = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in order:
        ids = torch.tensor([examples[i]["input_ids"]])
        labels = torch.tensor([examples[i]["labels"]])[:, 1:]
        logits = lm(input_ids=ids).logits[:, :-1].float()
        where = labels != IGNORE_INDEX
        if kind == "true":
            with torch.no_grad():
                probs = torch.softmax(logits[where], dim=-1)
                labels = labels.clone()
                labels[where] = torch.multinomial(probs, 1, generator=gen).view(-1)
        loss = torch.nn.functional.cross_entropy(logits[where], labels[where])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                sums[n] += g ** 2
    return {n: s / len(order) for n, s in sums.items()}


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("kind", ["empirical", "true"])
def test_fisher_equals_per_example_squared_gradients_by_hand(lora_r, kind):
    _, lm, examples = _setup(lora_r)
    lm.eval()
    ours = fisher_mod.estimate_fisher(LMWithHeads(lm), examples, kind=kind, samples=7, seed=3)
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(len(examples), generator=gen).tolist()[:7]
    expected = _by_hand(lm, examples, order, kind, gen)
    assert set(ours) == set(expected)
    total = sum(e.sum() for e in expected.values())
    assert total > 0
    for name, e in expected.items():
        scale = max(e.abs().max().item(), 1e-30)
        assert (ours[name] - e).abs().max().item() <= 1e-4 * scale + 1e-12, name
    if lora_r:  # at B = 0 a factor A gets no gradient; B gets it all
        assert all(ours[n].abs().max() == 0 for n in ours if "lora_A" in n)
        assert all(ours[n].abs().max() > 0 for n in ours if "lora_B" in n)


def test_true_fisher_differs_from_empirical():
    _, lm, examples = _setup(0)
    model = LMWithHeads(lm)
    emp = fisher_mod.estimate_fisher(model, examples, "empirical", samples=4)
    true = fisher_mod.estimate_fisher(model, examples, "true", samples=4)
    assert any(not torch.allclose(emp[n], true[n]) for n in emp)


def test_the_cli_writes_what_the_api_computes(tmp_path, capsys):
    from peftkern.cli import main

    out = tmp_path / "fisher.safetensors"
    assert main(["fisher", "--model", "tiny-micro", "--lora-r", "4", "--samples", "5", "--out", str(out),
                 "--quiet"]) == 0
    assert "over 5 examples" in capsys.readouterr().out
    tensors, meta = fisher_mod.load_fisher(str(out))
    assert meta["kind"] == "empirical" and meta["samples"] == "5" and meta["format"] == fisher_mod.FORMAT
    cfg = TrainConfig(model="tiny-micro", lora_r=4, strategy="none").check()
    expected, fingerprint, used = fisher_for_config(cfg, "empirical", 5)
    assert meta["anchor_sha256"] == fingerprint and used == 5
    for name, t in expected.items():
        assert torch.equal(tensors[name], t)


def test_the_cli_names_bad_input(tmp_path, capsys):
    from peftkern.cli import main

    assert main(["fisher", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.st")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["fisher", "--model", "tiny-micro", "--samples", "0", "--out", str(tmp_path / "f.st")]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["fisher", "--model", "tiny-micro", "--out", str(tmp_path / "no" / "dir" / "f.st"), "--samples",
                 "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_match_fisher_names_other_parameters_and_shapes(tmp_path):
    params = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    with pytest.raises(fisher_mod.ConfigError, match=r"other parameters .* 1 trained parameter\(s\) have none "
                                                     r"\(e.g. \['b'\]\), 1 Fisher tensor\(s\) match no"):
        fisher_mod.match_fisher({"a": torch.ones(3, 4), "c": torch.ones(5)}, params, "F")
    with pytest.raises(fisher_mod.ConfigError, match=r"a has shape \(4, 3\) in the Fisher file but \(3, 4\)"):
        fisher_mod.match_fisher({"a": torch.ones(4, 3), "b": torch.ones(5)}, params, "F")
    with pytest.raises(fisher_mod.ConfigError, match="not finite and >= 0"):
        fisher_mod.match_fisher({"a": -torch.ones(3, 4), "b": torch.ones(5)}, params, "F")
    good = fisher_mod.match_fisher({"a": torch.ones(3, 4), "b": torch.ones(5)}, params, "F")
    assert list(good) == ["a", "b"]


def test_load_fisher_names_missing_and_foreign_files(tmp_path):
    with pytest.raises(fisher_mod.PathError, match="no such Fisher file"):
        fisher_mod.load_fisher(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(fisher_mod.ConfigError, match="not a readable safetensors file"):
        fisher_mod.load_fisher(str(junk))
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    with pytest.raises(fisher_mod.ConfigError, match="not a Fisher file"):
        fisher_mod.load_fisher(str(other))


def test_estimate_rejects_bad_arguments():
    _, lm, examples = _setup(0)
    with pytest.raises(fisher_mod.ConfigError, match="kind must be one of"):
        fisher_mod.estimate_fisher(LMWithHeads(lm), examples, kind="diagonal")
    with pytest.raises(fisher_mod.ConfigError, match="no examples"):
        fisher_mod.estimate_fisher(LMWithHeads(lm), [], kind="empirical")
