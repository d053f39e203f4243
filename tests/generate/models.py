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
