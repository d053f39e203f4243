"""Contrastive decoding: the scores against a hand computation, the decoded tokens against a loop
written out by hand over two models' full logits, and the amateur kinds (adapters off, another
adapter, another model) against separate models."""
import copy
import math

import pytest
import torch

import peftkern
from peftkern.generate import DecodingSettings, ModelStepper, decode, generate
from peftkern.generate.contrastive import Contrastive, OneBatchScorer, TwoPassScorer, contrastive_scores
from peftkern.models import build_byte_tokenizer, build_tiny_model
from tests.generate.models import prompts, randomize_adapters, tiny_model


def test_scores_by_hand():
    e = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    a = torch.tensor([[1.0, 2.0, 0.5, 0.0]])
    got = contrastive_scores(e, a, alpha=0.3, beta=0.5)
    pe = [math.exp(x) for x in e[0].tolist()]
    pa = [math.exp(x) for x in a[0].tolist()]
    lpe = [math.log(p / sum(pe)) for p in pe]
    lpa = [math.log(p / sum(pa)) for p in pa]
    for i in range(4):
        if pe[i] / sum(pe) >= 0.3 * max(pe) / sum(pe):
            assert got[0, i].item() == pytest.approx(1.5 * lpe[i] - 0.5 * lpa[i], rel=1e-6)
        else:
            assert got[0, i].item() == float("-inf")
    assert torch.isinf(got[0, 2:]).all() and torch.isfinite(got[0, :2]).all()  # 0.3 cut keeps two


def _hand_loop(expert, amateur, ids, steps, alpha, beta):
    """Greedy contrastive decoding written out: full forward of both models on the whole sequence
    every step (no cache), log-softmax, cut, combine, argmax."""
    seq = ids.clone()
    out = []
    for _ in range(steps):
        with torch.no_grad():
            le = torch.log_softmax(expert(input_ids=seq).logits[:, -1].double(), -1)
            la = torch.log_softmax(amateur(input_ids=seq).logits[:, -1].double(), -1)
        score = (1 + beta) * le - beta * la
        score[le < le.max(-1, keepdim=True).values + math.log(alpha)] = -math.inf
        nxt = score.argmax(-1)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_equal_the_hand_loop(family):
    expert, amateur = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ids = torch.randint(4, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    settings = DecodingSettings(max_new_tokens=10)
    got = decode(TwoPassScorer(ModelStepper(expert), ModelStepper(amateur), 0.1, 0.7), ids, mask, settings,
                 eos_token_ids=[])
    assert torch.equal(got.tokens, _hand_loop(expert, amateur, ids, 10, 0.1, 0.7))


def _adapted(seed=0):
    model = peftkern.get_peft_model(tiny_model("llama", seed), peftkern.LoraConfig(r=4, lora_alpha=8,
                                                                                    target_modules="all-linear"))
    model.add_adapter("other", peftkern.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize_adapters(model)
    return model.eval()


@pytest.mark.parametrize("one_batch", [False, True], ids=["two-pass", "one-batch"])
@pytest.mark.parametrize("amateur", ["__base__", "other"])
def test_same_model_amateur_equals_two_separate_models(amateur, one_batch):
    """The amateur run on the expert's shared weights (adapters off / another adapter) gives the tokens
    of two separate models: a deep copy with the expert's adapter, one with the amateur's."""
    model = _adapted()
    expert_copy = copy.deepcopy(model)
    amateur_copy = copy.deepcopy(model)
    if amateur == "__base__":
        amateur_copy = amateur_copy.unload()
    else:
        amateur_copy.set_adapter("other")
    ids, mask = prompts()
    for settings in (DecodingSettings(max_new_tokens=10),
                     DecodingSettings(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95, seed=3)):
        gen = lambda: torch.Generator().manual_seed(3) if settings.do_sample else None  # noqa: E731
        scorer = Contrastive(amateur, alpha=0.05, beta=0.8, one_batch=one_batch)(model)
        assert isinstance(scorer, OneBatchScorer if one_batch else TwoPassScorer)
        shared = decode(scorer, ids, mask, settings,
                        eos_token_ids=[3], pad_token_id=1, generator=gen())
        separate = decode(TwoPassScorer(ModelStepper(expert_copy), ModelStepper(amateur_copy), 0.05, 0.8), ids,
                          mask, settings, eos_token_ids=[3], pad_token_id=1, generator=gen())
        assert torch.equal(shared.tokens, separate.tokens)
    assert model.active_adapters == ["default"]  # the amateur's switch is undone after each forward


def test_one_batch_on_an_nf4_base_and_by_default():
    base = tiny_model("mistral", 2)
    peftkern.quantize_model(base)
    model = peftkern.get_peft_model(base, peftkern.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    model.eval()
    auto = Contrastive(alpha=0.1, beta=1.0)(model)
    assert isinstance(auto, OneBatchScorer)
    ids, mask = prompts()
    settings = DecodingSettings(max_new_tokens=10)
    one = decode(auto, ids, mask, settings, eos_token_ids=[3], pad_token_id=1)
    two = decode(Contrastive(alpha=0.1, beta=1.0, one_batch=False)(model), ids, mask, settings, eos_token_ids=[3],
                 pad_token_id=1)
    assert torch.equal(one.tokens, two.tokens)


def test_beta_zero_is_the_expert_under_the_cut_and_text_api():
    model, tok = build_tiny_model("micro", seed=1).eval(), build_byte_tokenizer()
    amateur = build_tiny_model("micro", seed=2).eval()
    plain = generate(model, tok, ["Hi", "What is 2 + 2?"], max_new_tokens=8)
    cd0 = generate(model, tok, ["Hi", "What is 2 + 2?"], max_new_tokens=8, scorer=Contrastive(amateur, beta=0.0))
    assert [c.token_ids for c in cd0] == [c.token_ids for c in plain]
    cd = generate(model, tok, ["Hi", "What is 2 + 2?"], max_new_tokens=8, scorer=Contrastive(amateur, beta=2.0))
    assert [c.token_ids for c in cd] != [c.token_ids for c in plain]


def test_bad_settings():
    with pytest.raises(ValueError, match=r"alpha \(plausibility cut\) must be in \(0, 1\]"):
        Contrastive(alpha=0.0)
    with pytest.raises(ValueError, match=r"beta \(strength\) must be a finite number >= 0"):
        Contrastive(beta=-1)
    with pytest.raises(ValueError, match="amateur adapter 'nope' is not loaded"):
        Contrastive("nope")(_adapted())
    with pytest.raises(ValueError, match="needs a model with adapters"):
        Contrastive()(tiny_model("llama"))
    with pytest.raises(ValueError, match="must share one vocabulary"):
        contrastive_scores(torch.zeros(1, 5), torch.zeros(1, 6))


class _Recorded:
    """A scorer that keeps every step's scores."""

    def __init__(self, scorer):
        self.scorer, self.steps = scorer, []

    def start(self, ids, mask):
        self.steps.append(self.scorer.start(ids, mask))
        return self.steps[-1]

    def advance(self, tokens):
        self.steps.append(self.scorer.advance(tokens))
        return self.steps[-1]


def test_one_batch_scores_equal_two_models_step_by_step():
    """The one-batch scorer (base GEMM once over expert and amateur rows, the adapter's rank-r term on
    the expert's rows only) gives every step's contrastive scores of the expert model and a separate
    base model run one after the other, within fp32 rounding, and the same tokens."""
    model = _adapted()
    base = copy.deepcopy(model).unload()
    ids, mask = prompts()
    settings = DecodingSettings(max_new_tokens=8)
    one = _Recorded(Contrastive("__base__", alpha=0.05, beta=0.8, one_batch=True)(model))
    two = _Recorded(TwoPassScorer(ModelStepper(copy.deepcopy(model)), ModelStepper(base), 0.05, 0.8))
    got = decode(one, ids, mask, settings, eos_token_ids=[], pad_token_id=1)
    want = decode(two, ids, mask, settings, eos_token_ids=[], pad_token_id=1)
    assert torch.equal(got.tokens, want.tokens)
    assert len(one.steps) == len(two.steps) == 8
    for g, w in zip(one.steps, two.steps):
        assert torch.equal(torch.isinf(g), torch.isinf(w))
        finite = torch.isfinite(w)
        assert (g[finite] - w[finite]).abs().max().item() < 1e-4
