"""Loading the model to train and the one module the loops call.

:class:`LMWithHeads` wraps a causal LM so one ``forward`` gives what the losses need: per-token
log-probs of the labels computed from the last hidden states through the fused head (no [tokens, V]
logits), and optionally a per-token value (PPO) or a per-sequence score (reward model) from a small
linear head on the same hidden states. DDP / FSDP2 wrap this module, so every parameter that trains
is used inside its forward.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from peftkern.losses import head_parameters
from peftkern.nn import NF4Linear
from peftkern.train.adapters import add_adapters, attach_adalora_steps, uses_adapters
from peftkern.train.config import TrainConfig
from peftkern.train.errors import ConfigError
from peftkern.train.logprobs import token_logprobs
from peftkern.train.shared_prefix import can_share_prefix, shared_prefix_hidden
from peftkern.tuners import load_adapter


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside PEFT-style wrappers."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def decoder_of(lm: nn.Module) -> nn.Module:
    """The stack under the LM head (LlamaModel for LlamaForCausalLM)."""
    lm = base_causal_lm(lm)
    if hasattr(lm, "model") and isinstance(lm.model, nn.Module):
        return lm.model
    prefix = getattr(lm, "base_model_prefix", "")
    if prefix and isinstance(getattr(lm, prefix, None), nn.Module):
        return getattr(lm, prefix)
    raise TypeError(f"cannot find the decoder of {type(lm).__name__}: expected a transformers *ForCausalLM")


def head_of(lm: nn.Module) -> dict:
    """The output head as the fused losses take it: {weight [V, H], bias [V] or None, lora_A, lora_B,
    lora_scaling} (``peftkern.losses.head_parameters``): a LoRA on the head trains with the rest,
    and one that the fused path cannot express (DoRA, several adapters) raises."""
    return head_parameters(base_causal_lm(lm).get_output_embeddings())


def adapted_inputs(lm: nn.Module, inputs: dict) -> tuple[dict, int]:
    """The decoder call's keyword arguments as ``lm``'s active adapters rewrite them (soft prompts:
    virtual tokens before the input embeddings or a prefix in the cache, the attention mask
    extended), and how many virtual positions then lead the hidden states (cut off before the
    head, so position t still predicts label t + 1). Unchanged for a plain model, other methods and
    inside ``disable_adapter()`` (DPO's reference)."""
    if hasattr(lm, "model_inputs") and hasattr(lm, "prepended_positions"):
        return lm.model_inputs(inputs), lm.prepended_positions()
    return inputs, 0


class LMWithHeads(nn.Module):
    """A causal LM plus optional heads.

    ``forward(input_ids [B, T], attention_mask [B, T], labels [B, T] or None)`` returns a dict with
    ``logps`` [B, T-1] fp32 (log p(labels[:, t+1] | ids[:, :t+1]); 0 where the label is -100) when
    labels are given, ``values`` [B, T] fp32 with ``value_head``, ``scores`` [B] fp32 (at each row's last
    real token; right padding assumed; [B, N] with ``score_head=N`` > 1, a reward ensemble) with ``score_head``, ``entropy`` [B, T-1] fp32 (of each labelled
    position's next-token distribution) and ``hidden`` [B, T, H] when asked.
    """

    def __init__(self, lm: nn.Module, value_head: bool = False, score_head: bool | int = False,
                 autocast_bf16: bool = False):
        super().__init__()
        self.lm = lm
        hidden = base_causal_lm(lm).config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        self.score_head = nn.Linear(hidden, int(score_head)) if score_head else None  # an int: that many heads
        for head in (self.value_head, self.score_head):
            if head is not None:
                nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
                nn.init.zeros_(head.bias)
        self.autocast_bf16 = autocast_bf16

    def shares_prompts(self) -> bool:
        """Whether a forward can run a prompt once for the rows that share it: the decoder continues from a
        KV cache at given positions, no soft prompt rewrites the inputs, and gradient checkpointing (which
        turns the cache off in training) is off."""
        decoder = decoder_of(self.lm)
        changes_inputs = getattr(self.lm, "changes_inputs", None)
        return (can_share_prefix(decoder) and not (changes_inputs is not None and changes_inputs())
                and not getattr(decoder, "gradient_checkpointing", False))

    def _autocast(self, device: torch.device):
        if self.autocast_bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, input_ids, attention_mask, labels=None, want_hidden: bool = False, want_entropy: bool = False,
                head_loss=None, position_ids=None, shared_prompts=None):
        """With ``head_loss`` (a callable (hidden [B, T-1, H], targets [B, T-1], head dict) -> anything,
        from ``peftkern.train.objectives``), its result is ``out["head_loss"]`` instead of ``logps``: a
        fused loss from hidden states, computed here so that DDP / FSDP2 see the head used in forward.
        ``position_ids`` [B, T] (packed rows, ``attention_mask`` None): positions restart at 0 for each
        packed example and attention stays inside it (transformers' padding-free convention).
        ``shared_prompts`` (prompt lengths [B] int, G): the rows come in groups of G copies of one prompt,
        each with its own completion; where :meth:`shares_prompts` the prompt runs once per group
        (``peftkern.train.shared_prefix``), otherwise every row runs whole (the same states)."""
        out = {}
        with self._autocast(input_ids.device):
            if shared_prompts is not None and position_ids is None and self.shares_prompts():
                lengths, group = shared_prompts
                hidden = shared_prefix_hidden(decoder_of(self.lm), input_ids, attention_mask, lengths, group)
            else:
                if position_ids is not None:
                    inputs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                else:
                    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                inputs, virtual = adapted_inputs(self.lm, inputs)
                hidden = decoder_of(self.lm)(**inputs).last_hidden_state[:, virtual:]
            if labels is not None and head_loss is not None:
                out["head_loss"] = head_loss(hidden[:, :-1], labels[:, 1:], head_of(self.lm))
            elif labels is not None:
                head = head_of(self.lm)
                got = token_logprobs(hidden[:, :-1], head["weight"], labels[:, 1:], head["bias"],
                                     return_entropy=want_entropy, lora_A=head["lora_A"], lora_B=head["lora_B"],
                                     lora_scaling=head["lora_scaling"])
                if want_entropy:
                    out["logps"], out["entropy"] = got
                else:
                    out["logps"] = got
            if self.value_head is not None:
                out["values"] = self.value_head(hidden).squeeze(-1).float()
            if self.score_head is not None:
                last = (attention_mask.sum(1) - 1).clamp_min(0)
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                out["scores"] = self.score_head(hidden[rows, last]).squeeze(-1).float()
        if want_hidden:
            out["hidden"] = hidden
        return out


@torch.no_grad()
def check_packed_attention(lm: nn.Module) -> None:
    """``--packing`` relies on the model starting a new sequence where ``position_ids`` restart
    (transformers' padding-free convention). Probe it once: two sequences packed in one row must
    give the second the hidden states it has alone; an attention implementation that ignores the
    boundary raises ConfigError instead of training across examples."""
    decoder = decoder_of(lm)
    device = next(p for p in lm.parameters() if p.device.type != "meta").device
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]], device=device) % base_causal_lm(lm).config.vocab_size
    packed = decoder(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device),
                     use_cache=False).last_hidden_state[0, 3:].float()
    alone = decoder(input_ids=ids[:, 3:], use_cache=False).last_hidden_state[0].float()
    if not torch.allclose(packed, alone, rtol=2e-2, atol=2e-2 * float(alone.abs().max())):
        impl = getattr(base_causal_lm(lm).config, "_attn_implementation", "?")
        raise ConfigError(f"--packing: this model's attention (attn_implementation={impl!r}) does not start a new "
                          "sequence where position_ids restart, so packed examples would attend to each other; "
                          "train without --packing (or with an attention implementation that honours it: eager, "
                          "sdpa, flash_attention_2)")


def prepare_lm(cfg, lm: nn.Module) -> nn.Module:
    """Apply ``--quant``, the adapters (fresh, or ``--adapter``'s) and gradient checkpointing as
    ``cfg`` asks. Adapter weights train in fp32 whatever the base's dtype (as PEFT's
    ``autocast_adapter_dtype``); the layers cast them to the compute dtype in forward."""
    if cfg.quant == "nf4" and not has_nf4(lm):  # a folder's model was quantized while it was read
        lm = quantize_nf4(lm)
    if getattr(cfg, "adapter", None):
        lm = load_adapter_to_train(lm, cfg)
    elif uses_adapters(cfg):
        lm = add_adapters(lm, cfg)
    elif has_nf4(lm):
        raise ValueError("the base weights are 4-bit (--quant nf4, or a 4-bit checkpoint) and stay frozen: "
                         "train adapters on them (lora_r > 0)")
    if uses_adapters(cfg) or getattr(cfg, "adapter", None):
        with torch.no_grad():
            for p in lm.parameters():
                if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
    if cfg.grad_checkpointing:
        base = base_causal_lm(lm)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_adapters(cfg) and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    return lm


def has_nf4(lm: nn.Module) -> bool:
    return any(isinstance(m, NF4Linear) for m in lm.modules())


ADAPTER_FLAGS = ("peft", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "dora", "num_virtual_tokens",
                 "encoder_hidden_size", "prefix_projection")


def load_adapter_to_train(lm: nn.Module, cfg) -> nn.Module:
    """``--adapter DIR``: the adapter folder (PEFT's files, any method) loaded trainable on ``lm``; its
    config decides the method, rank and targets, so a flag that sets them otherwise is refused. An
    adapter that does not fit the model (another architecture, other shapes) raises ConfigError
    naming the file and tensor."""
    defaults = TrainConfig()
    changed = [f"--{n.replace('_', '-')}" for n in ADAPTER_FLAGS if getattr(cfg, n) != getattr(defaults, n)]
    if changed:
        raise ConfigError(f"--adapter {cfg.adapter}: the adapter's own adapter_config.json sets the method, rank and "
                          f"targets; drop {', '.join(changed)}")
    try:
        wrapped = load_adapter(lm, cfg.adapter, is_trainable=True)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        text = str(exc)
        where = "" if cfg.adapter in text else f"{os.path.join(cfg.adapter, 'adapter_config.json')}: "
        raise ConfigError(f"--adapter {cfg.adapter}: does not fit --model {cfg.model}: {where}{text}") from None
    if any(c.peft_type == "ADALORA" for c in wrapped.peft_config.values()):
        attach_adalora_steps(wrapped)
    return wrapped


def quantize_nf4(lm: nn.Module) -> nn.Module:
    """Every decoder linear to NF4 (QLoRA's base), through peftkern.nn.NF4Linear."""
    head = base_causal_lm(lm).get_output_embeddings()
    for name, module in list(lm.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent_name, _, attr = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, attr, NF4Linear.from_linear(module))
    return lm


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every parameter that trains."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
