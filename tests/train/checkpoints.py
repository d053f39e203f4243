"""Tiny transformers checkpoints written in the test's tmp folder: Llama (tied or not, sharded or
not, in any dtype) and GPT-2, with the byte tokenizer beside them so the trainers can run on them."""
import os

import torch
import transformers

from peftkern.models import build_byte_tokenizer

VOCAB = 263  # the byte tokenizer's size


def llama_config(tied: bool = False, **kw):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, pad_token_id=0)
    settings.update(kw)
    return transformers.LlamaConfig(**settings)


def save_model(model, path, dtype=torch.bfloat16, shard: str | None = None, tokenizer: bool = True) -> str:
    """``model`` saved in ``dtype`` under ``path`` (sharded when ``shard`` is a size), with a tokenizer."""
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard or "50GB")
    if tokenizer:
        build_byte_tokenizer().save_pretrained(path)
    return str(path)


def tiny_llama(path=None, tied: bool = False, dtype=torch.bfloat16, shard: str | None = None, seed: int = 0, **kw):
    """A random tiny Llama (weights scaled as a trained model's are: std 0.02); saved when ``path``."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(tied, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    if path is not None:
        save_model(model, path, dtype, shard)
    return model.to(dtype)


def tiny_gpt2(path=None, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                 n_positions=256, bos_token_id=1, eos_token_id=1))
    if path is not None:
        save_model(model, path, dtype)
    return model.to(dtype)


def write_sft_data(path, n: int = 8) -> str:
    import json

    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i}: what is {i} + {i}?", "completion": f" {2 * i}."}) + "\n")
    return str(path)


def files(path) -> list[str]:
    return sorted(os.listdir(path))
