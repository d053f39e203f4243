"""Prefix tuning as a tuner: a PrefixEncoder per adapter; its keys and values fill the model's own
cache (transformers' ``DynamicCache``) before the input, so training, a plain forward and
``generate()`` all see the prefix at positions 0..n-1 and the input from position n on."""
from __future__ import annotations

from torch import nn
from transformers import DynamicCache

from peftkern.tuners.prefix.config import PrefixTuningConfig
from peftkern.tuners.prefix.encoder import PrefixEncoder, prefix_key_values
from peftkern.tuners.prompt_learning import (CACHE_KEYS, SoftPromptTuner, batch_size, cache_key, cache_length,
                                             model_sizes, shift_mask_and_positions, the_cache)


class PrefixTuningTuner(SoftPromptTuner):
    peft_type = "PREFIX_TUNING"
    config_class = PrefixTuningConfig
    prepends_positions = False  # the prefix lives in the cache, not in the hidden states

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if cache_key(model) is None:
            raise TypeError(f"PrefixTuningConfig: {type(model).__name__}.forward takes no KV cache (no 'cache' / "
                            "'past_key_values' argument); prefix tuning puts its prefix in the attention's cache, so "
                            "it needs a model with transformers' cache interface")

    def prepare_config(self, model: nn.Module, config: PrefixTuningConfig) -> PrefixTuningConfig:
        config = super().prepare_config(model, config)
        sizes = model_sizes(model)
        if sizes["kv_heads"] is not None:  # grouped-query attention: the prefix has the KV heads' shape (PEFT)
            head_dim = sizes["head_dim"] or config.token_dim // config.num_attention_heads
            config = config.replace(token_dim=head_dim * sizes["kv_heads"], num_attention_heads=sizes["kv_heads"])
        if config.token_dim % config.num_attention_heads:
            raise ValueError(f"{config.field_name('token_dim')} = {config.token_dim} is not a multiple of "
                             f"{config.field_name('num_attention_heads')} = {config.num_attention_heads}")
        kv_width = (sizes["kv_heads"] or sizes["heads"] or 0) * (sizes["head_dim"] or 0)
        if kv_width and config.token_dim != kv_width:
            raise ValueError(f"{config.field_name('token_dim')} = {config.token_dim} but {type(model).__name__}'s keys "
                             f"and values are {kv_width} wide per layer")
        if sizes["layers"] is not None and config.num_layers != sizes["layers"]:
            raise ValueError(f"{config.field_name('num_layers')} = {config.num_layers} but {type(model).__name__} has "
                             f"{sizes['layers']} layers")
        if config.encoder_hidden_size is None:
            config = config.replace(encoder_hidden_size=config.token_dim)
        return config

    def build_encoder(self, model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
        return PrefixEncoder(config.num_virtual_tokens, config.token_dim, config.num_layers, config.encoder_hidden_size,
                             projection=config.prefix_projection and not config.inference_mode,
                             zero_init=config.init_weights == "zero")

    def rewrite_inputs(self, model: nn.Module, config: PrefixTuningConfig, encoder: PrefixEncoder, kwargs: dict) -> dict:
        """A call that starts a sequence gets a fresh cache holding the prefix (replacing an empty
        one); every call gets the mask and positions shifted by the prefix length."""
        kwargs = dict(kwargs)
        batch = batch_size(kwargs)
        key, cache = the_cache(kwargs)
        starting = cache_length(cache) == 0
        kwargs = shift_mask_and_positions(kwargs, config.num_virtual_tokens, lead_positions=False)
        if starting:
            for k in CACHE_KEYS:
                kwargs.pop(k, None)
            kwargs[cache_key(model)] = self.prefix_cache(model, config, encoder, batch)
        return kwargs

    def prefix_cache(self, model: nn.Module, config: PrefixTuningConfig, encoder: PrefixEncoder, batch: int):
        dtype = model.get_input_embeddings().weight.dtype
        cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(prefix_key_values(encoder.output(), config.num_layers,
                                                          config.num_attention_heads, batch, dtype)):
            cache.update(k, v, layer)
        return cache
