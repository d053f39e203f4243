"""Where the editable pieces of a decoder-only transformers model live.

ROME and MEMIT write into the MLP's output projection of a layer: ``mlp.down_proj`` in the Llama
family (Llama, Mistral, Qwen2 and others with a gated MLP; the key is ``act(gate(x)) * up(x)``) and
``mlp.c_proj`` in GPT-2 (a ``Conv1D`` storing its weight [in, out]; the key is ``gelu(c_fc(x))``).
Names are the module paths of the transformers model itself (not of a PeftKernModel around it), so
they are also the names an adapter's ``target_modules`` lists.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkern.editing.requests import EditError
from peftkern.tuners import PeftKernModel


@dataclass(frozen=True)
class Layout:
    """Module paths of one model, with ``{}`` for the layer index."""
    family: str          # "llama" (gated MLP, model.layers) or "gpt2" (transformer.h)
    n_layers: int
    layer: str           # decoder block, output = residual stream after the block
    mlp: str             # the MLP (output added to the residual stream)
    attn: str            # the attention module
    down: str            # the edited projection (input = key, output = value)
    embed: str           # token embedding
    head: tuple[str, ...]  # the final norm and the output head (downstream of every layer)

    def down_name(self, layer: int) -> str:
        return self.down.format(layer)

    def check_layer(self, layer, what: str = "layer") -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise EditError(f"{what} must be an integer layer index, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise EditError(f"{what} {layer} is out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        return layer


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftKernModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftKernModel) else model


def layout_of(model: nn.Module) -> Layout:
    """The layout of a Llama-family (model.layers[i].mlp.down_proj) or GPT-2 (transformer.h[i].mlp.c_proj)
    causal LM; anything else is an error naming what was found."""
    model = base_model(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(getattr(layers[0], "mlp", None), "down_proj"):
        attn = "self_attn" if hasattr(layers[0], "self_attn") else "attn"
        return Layout("llama", len(layers), "model.layers.{}", "model.layers.{}.mlp", "model.layers.{}." + attn,
                      "model.layers.{}.mlp.down_proj", "model.embed_tokens", ("model.norm", "lm_head"))
    inner = getattr(model, "transformer", None)
    blocks = getattr(inner, "h", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(getattr(blocks[0], "mlp", None), "c_proj"):
        return Layout("gpt2", len(blocks), "transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.attn",
                      "transformer.h.{}.mlp.c_proj", "transformer.wte", ("transformer.ln_f", "lm_head"))
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise EditError(f"cannot edit a {kind!r} model: ROME/MEMIT here support Llama-family models "
                    "(model.layers[i].mlp.down_proj: Llama, Mistral, Qwen2, ...) and GPT-2 (transformer.h[i].mlp.c_proj)")
