"""The embedded default model: a tiny transformers ``LlamaForCausalLM`` over the byte tokenizer.

Sizes: ``"demo"`` (2.76M parameters: 6 layers, hidden 192; what ``--model tiny`` and ``peftkern demo``
use) and ``"micro"`` (~60k parameters, for tests). Weights start random from a seed;
:mod:`peftkern.train.pretrain` trains the demo size on the bundled corpus, and the package ships the
result (:mod:`peftkern.models.base`).
"""
from __future__ import annotations

import torch

from peftkern.models.tokenizer import SPECIAL_TOKENS

VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
PAD_ID, BOS_ID, END_ID = 256, 257, 262

SIZES = {
    "demo": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=6),
    "micro": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2),
}


def tiny_config(size: str = "demo"):
    """A ``LlamaConfig`` of the given size (``"demo"`` or ``"micro"``) for the byte tokenizer."""
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"tiny model size must be one of {sorted(SIZES)}, got {size!r}")
    return LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=END_ID, attn_implementation="sdpa", **SIZES[size])


def build_tiny_model(size: str = "demo", seed: int = 0):
    """A randomly initialised tiny ``LlamaForCausalLM`` (fp32), the same for the same seed."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(size))
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = END_ID
    model.generation_config.bos_token_id = BOS_ID
    return model
