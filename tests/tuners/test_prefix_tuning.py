"""Prefix tuning against the real peft: PEFT's files both ways with PEFT's logits (grouped-query
attention on Llama / Qwen2 / Mistral, GPT-2), with and without the MLP reparameterization (folded
into the file as PEFT saves it), PEFT's gradients, greedy tokens through the cache, refusals."""
import copy

import pytest
import torch
from torch import nn

from peftkern import PrefixTuningConfig, get_peft_model
from tests.tuners import soft_prompts as checks
from tests.tuners.tiny_models import FAMILIES, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def configs(n=4, **kw):
    return (peft.PrefixTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM", **kw),
            PrefixTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_files_both_ways_with_peft(tmp_path, family, projection):
    theirs, mine = checks.check_files_both_ways(tmp_path, tiny_model(family),
                                                *configs(prefix_projection=projection, encoder_hidden_size=12))
    width = 2 * 2 * (16 if family != "gpt2" else 32)  # layers x (key, value) x KV width (GQA: 2 heads of 8)
    assert tuple(mine.adapter_state_dict("default")["prompt_embeddings"].shape) == (4, width)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection", [False, True])
def test_training_loss_and_gradients_match_peft(family, projection):
    checks.check_training_matches_peft(tiny_model(family), *configs(prefix_projection=projection,
                                                                    encoder_hidden_size=12))


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_greedy_generate_gives_pefts_tokens(family):
    checks.check_greedy_generate(tiny_model(family), *configs())


def test_model_level_behaviour():
    checks.check_model_level_behaviour(tiny_model("llama"), configs()[1])


def test_zero_init_is_the_base_model_values():
    base = tiny_model("llama")
    model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=3, init_weights="zero",
                                                                    prefix_projection=True))
    assert model.model.prompt_encoder["default"].output().abs().max() == 0


class NoCacheLM(nn.Module):
    """A causal LM whose forward takes no KV cache."""

    def __init__(self, base):
        super().__init__()
        self.inner = base
        self.config = base.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          labels=labels)


def test_bad_input():
    checks.check_bad_input_leaves_model(tiny_model("gpt2"), lambda **kw: PrefixTuningConfig(**kw),
                                        dict(num_layers=5), "num_layers = 5 but GPT2LMHeadModel has 2 layers")
    model = NoCacheLM(tiny_model("llama"))
    with pytest.raises(TypeError, match="NoCacheLM.forward takes no KV cache"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=2))
    assert not hasattr(model, "prompt_encoder")

    class NoEmbedsLM(NoCacheLM):
        def forward(self, input_ids=None, attention_mask=None, cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, cache=cache)

    from peftkern import PromptTuningConfig
    with pytest.raises(TypeError, match="NoEmbedsLM.forward takes no inputs_embeds"):
        get_peft_model(NoEmbedsLM(tiny_model("llama")), PromptTuningConfig(num_virtual_tokens=2))
    get_peft_model(NoEmbedsLM(tiny_model("llama")), PrefixTuningConfig(num_virtual_tokens=2))  # needs only the cache
    with pytest.raises(ValueError, match="init_weights must be None or 'zero'"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="ones")
