"""Tiny transformers causal LMs (random weights, no downloads) for the tuner tests."""
import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 96


def tiny_model(family: str, seed: int = 0):
    """A 2-layer fp32 causal LM of ``family`` with hidden size 32, in eval mode."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "mistral":
        config, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    with torch.no_grad():  # non-zero biases so that bias handling is visible
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model


def token_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def perturb_trainable(model, scale: float = 0.05, seed: int = 2) -> None:
    """Give every trainable parameter (adapter weights, saved modules, trained biases) new random
    values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_training_gradients_match(theirs, ours, ids, rtol=1e-4, atol=1e-6):
    """One training step of a PEFT model and of ours on the same batch: the same trainable
    parameters, each with a non-zero gradient equal to PEFT's."""
    for model in (theirs, ours):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    their_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n.removeprefix("model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert torch.allclose(grad, their_grads[name], rtol=rtol, atol=atol), name
