"""Prompt tuning against the real peft: PEFT's files both ways with PEFT's logits, PEFT's gradients,
greedy tokens, the three initializations, refusals; and a soft prompt together with LoRA."""
import copy

import pytest
import torch

from peftkern import LoraConfig, PromptTuningConfig, get_peft_model, load_adapter
from tests.tuners import soft_prompts as checks
from tests.tuners.tiny_models import FAMILIES, tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def configs(n=4, **kw):
    return (peft.PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM", **kw),
            PromptTuningConfig(num_virtual_tokens=n, task_type="CAUSAL_LM", **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_files_both_ways_with_peft(tmp_path, family):
    checks.check_files_both_ways(tmp_path, tiny_model(family), *configs())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_gradients_match_peft(family):
    checks.check_training_matches_peft(tiny_model(family), *configs())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_gives_pefts_tokens(family):
    checks.check_greedy_generate(tiny_model(family), *configs())


def test_model_level_behaviour():
    checks.check_model_level_behaviour(tiny_model("qwen2"), configs()[1])


def test_bad_input():
    checks.check_bad_input_leaves_model(tiny_model("llama"), lambda **kw: PromptTuningConfig(**kw),
                                        dict(token_dim=7), "token_dim = 7 but .* input embeddings are 32 wide")
    with pytest.raises(ValueError, match="'TEXT' needs PromptTuningConfig.tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="'TEXT' needs PromptTuningConfig.prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", tokenizer_name_or_path="tiny")
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="text")
    with pytest.raises(ValueError, match="decoder-only"):
        PromptTuningConfig(num_virtual_tokens=3, num_transformer_submodules=2)
    with pytest.raises(ValueError, match="modules_to_save"):
        PromptTuningConfig.from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "modules_to_save": ["x"]})


def test_text_and_vocab_inits_match_peft(tmp_path):
    from peftkern.models.tokenizer import build_byte_tokenizer

    build_byte_tokenizer().save_pretrained(tmp_path / "tok")
    base = tiny_model("llama")
    base.resize_token_embeddings(263)  # the byte tokenizer's ids
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="Answer:", tokenizer_name_or_path=str(tmp_path / "tok"))
    for n in (3, 11):  # cut, repeated
        theirs, mine = configs(n, **text)
        expected = checks.peft_model(base, theirs).prompt_encoder["default"].embedding.weight
        got = get_peft_model(copy.deepcopy(base), mine).model.prompt_encoder["default"].embedding.weight
        assert torch.equal(got, expected)
    ids = build_byte_tokenizer()("Answer:")["input_ids"]
    tiny = get_peft_model(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=len(ids), **{
        **text, "tokenizer_name_or_path": "tiny"})).model
    assert torch.equal(tiny.prompt_encoder["default"].embedding.weight, base.get_input_embeddings().weight[ids])
    theirs, mine = configs(5, prompt_tuning_init="SAMPLE_VOCAB")
    expected = checks.peft_model(base, theirs).prompt_encoder["default"].embedding.weight
    torch.manual_seed(11)
    got = get_peft_model(copy.deepcopy(base), mine).model.prompt_encoder["default"].embedding.weight
    assert torch.equal(got, expected)
    rows = base.get_input_embeddings().weight
    assert all(any(torch.equal(r, w) for w in rows) for r in got)


def test_with_lora_both_active_equals_the_hand_composed_model(tmp_path):
    base = tiny_model("llama")
    ids, mask = checks.padded_batch()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False), adapter_name="lora")
    model.add_adapter("soft", PromptTuningConfig(num_virtual_tokens=3))
    model.set_adapter(["lora", "soft"])
    checks.perturb(model.model.prompt_encoder["soft"])
    prompt = model.model.prompt_encoder["soft"].embedding.weight
    both = model(input_ids=ids, attention_mask=mask).logits
    model.set_adapter("lora")
    embeds = torch.cat([prompt.unsqueeze(0).expand(3, -1, -1), base.get_input_embeddings()(ids)], 1)
    by_hand = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], 1)).logits
    assert (both - by_hand).abs().max().item() < checks.ATOL
    model.set_adapter(["lora", "soft"])
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and any("prompt_encoder.soft" in n for n in grads)
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    model.eval()
    model.save_pretrained(tmp_path)
    again = load_adapter(copy.deepcopy(base), tmp_path / "lora", adapter_name="lora")
    load_adapter(again, tmp_path / "soft", adapter_name="soft")
    again.set_adapter(["lora", "soft"])
    assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="soft prompt"):
        again.merge_and_unload()
