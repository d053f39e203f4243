"""Tiny models for the generation tests: the tuner tests' random causal LMs, with LoRA, DoRA, several
adapters or an NF4 base, and the embedded micro model with its byte tokenizer."""
import torch
from torch import nn

import peftkern
from tests.tuners.tiny_models import FAMILIES, VOCAB, tiny_model  # noqa: F401


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """GPT-2's Conv1D layers as nn.Linear (same function), so quantize_model turns them into NF4."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            lin = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(module.weight.t())
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)
    return model


def randomize_adapters(model, seed: int = 7, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def variant(family: str, kind: str, seed: int = 0):
    """``kind``: "plain", "lora", "dora", "two" (two LoRA adapters active at once), "nf4" (NF4 base + LoRA)."""
    model = tiny_model(family, seed)
    if kind == "plain":
        return model
    if kind == "nf4":
        if family == "gpt2":
            conv1d_to_linear(model)
        peftkern.quantize_model(model)
    config = peftkern.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=kind == "dora")
    model = peftkern.get_peft_model(model, config)
    if kind == "two":
        model.add_adapter("second", peftkern.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]
                                                         if family != "gpt2" else ["c_attn"]))
        model.set_adapter(["default", "second"])
    randomize_adapters(model)
    return model.eval()


def prompts(batch: int = 3, width: int = 9, seed: int = 3):
    """Left-padded random prompts (ids avoid 0..3: 1 is pad, 3 may serve as eos)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :(row * 3) % (width - 2)] = 0
    return ids.masked_fill(mask == 0, 1), mask


def bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here on a few sentences (multi-character tokens, as real
    vocabularies have), with an end-of-sequence and a pad token and the byte tokenizer's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from peftkern.models.tokenizer import CHAT_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "a dog and a cat", "yes no maybe", "hello world, hello there",
              '{"name": "ok", "age": 12}', "Write the answer in capitals.", "1 2 3 4 5 6 7 8 9 10"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama_for(tokenizer, seed: int = 0):
    """A tiny random Llama over ``tokenizer``'s vocabulary."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).eval()
