"""A prompt run once for the G completions that share it (GRPO / RLOO training forward) gives the
full forward's hidden states and gradients, on every decoder family the trainers take."""
import pytest
import torch
import transformers as tf

from peftkern.train.model import LMWithHeads, decoder_of
from peftkern.train.shared_prefix import shared_prefix_hidden

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _model(family):
    torch.manual_seed(0)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL))
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _rows(group, prompt_lengths, seed):
    """Right-padded [P * group, T] rows: each prompt repeated ``group`` times, each copy with its own
    completion of 0 to 6 tokens -> (ids, mask, prompt lengths [N])."""
    gen = torch.Generator().manual_seed(seed)
    rows, lens = [], []
    for n in prompt_lengths:
        prompt = torch.randint(1, 97, (n,), generator=gen).tolist()
        for g in range(group):
            size = 0 if g == 1 else int(torch.randint(1, 7, (), generator=gen))  # one empty completion per group
            rows.append(prompt + torch.randint(1, 97, (size,), generator=gen).tolist())
            lens.append(n)
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask, torch.tensor(lens)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_hidden_states_and_gradients_equal_the_full_forward(family, seed):
    lm = _model(family).double().eval()  # eval: GPT-2's dropout. (RMSNorm runs in fp32 even in a float64 model)
    decoder = decoder_of(lm)
    ids, mask, lens = _rows(3, [5, 2, 9, 4], seed)
    weight = torch.randn(*ids.shape, 32, dtype=torch.float64) * mask[..., None]

    def run(shared):
        lm.zero_grad()
        if shared:
            hidden = shared_prefix_hidden(decoder, ids, mask, lens, 3)
        else:
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        (hidden * weight).sum().backward()
        return hidden.detach() * mask[..., None], {n: p.grad.clone() for n, p in lm.named_parameters()
                                                    if p.grad is not None}

    full, full_grads = run(False)
    shared, shared_grads = run(True)
    torch.testing.assert_close(shared, full, rtol=1e-6, atol=1e-6 * float(full.abs().max()))
    assert full_grads.keys() == shared_grads.keys() and len(full_grads) > 5
    for name, g in full_grads.items():  # fp32 rounding, relative to the gradient's scale
        err = float((shared_grads[name] - g).abs().max()) / max(float(g.abs().max()), 1e-30)
        assert err < 1e-5, f"{name}: max difference {err:.2e} of its largest entry"


def test_lm_with_heads_takes_the_shared_path_and_falls_back_under_checkpointing(monkeypatch):
    lm = _model("llama")
    module = LMWithHeads(lm)
    ids, mask, lens = _rows(2, [4, 6], 3)
    calls = []
    import peftkern.train.model as model_module

    real = model_module.shared_prefix_hidden
    monkeypatch.setattr(model_module, "shared_prefix_hidden", lambda *a: calls.append(1) or real(*a))
    labels = ids.masked_fill(mask == 0, -100)
    shared = module(ids, mask, labels, shared_prompts=(lens, 2))["logps"]
    plain = module(ids, mask, labels)["logps"]
    assert calls == [1]
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    assert not module.shares_prompts()
    module(ids, mask, labels, shared_prompts=(lens, 2))
    assert calls == [1]


def test_groups_must_share_their_prompt_length():
    lm = _model("llama")
    ids, mask, lens = _rows(2, [4, 6], 0)
    lens[1] = 3
    with pytest.raises(ValueError, match="rows of a group have prompts of different lengths"):
        shared_prefix_hidden(decoder_of(lm), ids, mask, lens, 2)
    with pytest.raises(ValueError, match="3 rows are not whole groups of 2"):
        shared_prefix_hidden(decoder_of(lm), ids[:3], mask[:3], torch.full((3,), 4), 2)
