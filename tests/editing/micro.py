"""Micro causal LMs of each supported family over the byte tokenizer's vocabulary (random weights)."""
import torch

from peftkern.models.tiny import VOCAB_SIZE

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
CORPUS = ["The capital of Velora is Tamsk.", "Mira Tolan plays the piano.", "'kel' reversed is lek.",
          "7 + 8 is 15.", "The capital city of Drusk is Pelm.", "Quorvex makes clocks.", "'abc' in capitals is ABC.",
          "Velora's capital is Tamsk.", "The instrument of Dasko Renn is the harp.", "Belmira is known for making soap."]
REQUEST = {"prompt": "The capital of {} is", "subject": "Velora", "target_new": "Pelm", "target_true": "Tamsk",
           "paraphrase_prompts": ["Velora's capital is"],
           "neighborhood_prompts": [{"prompt": "The capital of Drusk is", "target": "Pelm"}]}
PREFIXES = ["", "The cat sat. ", "Because of it. "]


def micro_model(family: str = "llama", seed: int = 0, layers: int = 3, dtype=torch.float32):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=256)
    if family == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif family == "mistral":
        config, cls = tf.MistralConfig(**common, sliding_window=None), tf.MistralForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                               bos_token_id=257, eos_token_id=262, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    return model


def snapshot(model) -> dict:
    """Everything a failed edit must leave as it was: tensors, requires_grad, modes, module types."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "modes": {n: m.training for n, m in model.named_modules()},
            "types": {n: type(m).__name__ for n, m in model.named_modules()},
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())}


def assert_same(model, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["grad"] == before["grad"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
