"""peftkern's decoding loop gives transformers' generate tokens, token for token, for the same settings
and seed: greedy and sampled, on tiny Llama / Qwen2 / Mistral / GPT-2, plain, with LoRA, DoRA, two
adapters at once and an NF4 base."""
import pytest
import torch

from peftkern.generate import DecodingSettings, ModelStepper, decode, generate
from peftkern.models import build_byte_tokenizer, build_tiny_model
from tests.generate.models import FAMILIES, prompts, variant

GREEDY = DecodingSettings(max_new_tokens=12)
SAMPLED = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=30, top_p=0.9, min_p=0.02,
                           repetition_penalty=1.2, seed=11)


def hf_generate(model, ids, mask, settings, eos=3, pad=1, **extra):
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, eos_token_id=eos,
                         **settings.transformers_kwargs(), **extra)
    return out[:, ids.shape[1]:]


def ours(model, ids, mask, settings, eos=3, pad=1, **extra):
    gen = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
    return decode(ModelStepper(model), ids, mask, settings, eos_token_ids=[eos], pad_token_id=pad, generator=gen,
                  **extra)


def padded_to(tokens, width, pad=1):
    return torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=pad)


@pytest.mark.parametrize("kind", ["plain", "lora", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_same_tokens_as_transformers(family, kind, settings):
    model = variant(family, kind)
    ids, mask = prompts()
    expected = hf_generate(model, ids, mask, settings)
    got = ours(model, ids, mask, settings)
    assert torch.equal(padded_to(got.tokens, expected.shape[1]), expected)


@pytest.mark.parametrize("kind", ["dora", "two"])
def test_same_tokens_other_adapters(kind):
    model = variant("llama", kind)
    ids, mask = prompts()
    for settings in (GREEDY, SAMPLED):
        assert torch.equal(ours(model, ids, mask, settings).tokens, hf_generate(model, ids, mask, settings))


def test_rows_end_at_eos_and_get_pad_after():
    model = variant("qwen2", "lora")
    ids, mask = prompts()
    free = ours(model, ids, mask, GREEDY, eos=-1).tokens
    eos = int(free[0, 4])  # row 0 reaches this token at step 4 (or earlier)
    expected = hf_generate(model, ids, mask, GREEDY, eos=eos)
    got = ours(model, ids, mask, GREEDY, eos=eos)
    assert torch.equal(padded_to(got.tokens, expected.shape[1]), expected)
    first = (free[0] == eos).nonzero()[0].item()
    assert got.finish_reasons[0] == "eos" and got.lengths[0] == first + 1
    assert (got.tokens[0, first + 1:] == 1).all()


def test_text_api_with_chat_template_and_stop_strings_matches_transformers():
    """The byte tokenizer's tokens are single bytes, so transformers' stop-string rule and ours end on
    the same token."""
    torch.manual_seed(0)
    model = build_tiny_model("micro", seed=1).eval()
    tok = build_byte_tokenizer()
    chats = [[{"role": "user", "content": "Reverse 'abc'."}], [{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hi"}]]
    settings = DecodingSettings(max_new_tokens=16, do_sample=True, temperature=1.5, seed=4, stop=("E", "2"))
    got = generate(model, tok, chats, settings)
    tok.padding_side = "left"
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                  return_dict=True)
    torch.manual_seed(4)
    hf = model.generate(**enc, tokenizer=tok, stop_strings=["E", "2"], pad_token_id=tok.pad_token_id,
                        **settings.transformers_kwargs())[:, enc["input_ids"].shape[1]:]
    for c, row in zip(got, hf.tolist()):
        assert row[:len(c.token_ids)] == c.token_ids
        assert all(t == tok.pad_token_id for t in row[len(c.token_ids):])
        if c.finish_reason == "stop":
            assert "E" not in c.text and "2" not in c.text
            assert tok.decode(c.token_ids)[-1] in "E2"


def test_batching_does_not_change_greedy_outputs():
    model = build_tiny_model("micro", seed=2).eval()
    tok = build_byte_tokenizer()
    texts = ["What is 2 + 3?", "Hi", "Write 'abc' in capitals.", "x"]
    one = [generate(model, tok, [t], max_new_tokens=10, chat=True)[0].text for t in texts]
    batched = [c.text for c in generate(model, tok, texts, max_new_tokens=10, chat=True, batch_size=3)]
    assert one == batched
