"""P-tuning as a tuner: a PromptEncoder per adapter, its output before the input embeddings."""
from __future__ import annotations

import warnings

from torch import nn

from peftkern.tuners.prompt.tuner import check_token_dim
from peftkern.tuners.prompt_learning import SoftPromptTuner
from peftkern.tuners.ptuning.config import PromptEncoderConfig
from peftkern.tuners.ptuning.encoder import PromptEncoder


class PTuningTuner(SoftPromptTuner):
    peft_type = "P_TUNING"
    config_class = PromptEncoderConfig

    def prepare_config(self, model: nn.Module, config: PromptEncoderConfig) -> PromptEncoderConfig:
        config = super().prepare_config(model, config)
        check_token_dim(model, config)
        if config.encoder_hidden_size is None:
            config = config.replace(encoder_hidden_size=config.token_dim)
        return config

    def build_encoder(self, model: nn.Module, config: PromptEncoderConfig) -> PromptEncoder:
        if config.encoder_reparameterization_type == "MLP" and config.encoder_num_layers != 2:
            warnings.warn(f"PromptEncoderConfig.encoder_num_layers = {config.encoder_num_layers} is ignored for the MLP "
                          "encoder, which has exactly 2 hidden layers (as PEFT)", stacklevel=4)
        return PromptEncoder(config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim,
                             config.encoder_hidden_size, config.encoder_reparameterization_type,
                             config.encoder_num_layers, config.encoder_dropout, reparameterize=not config.inference_mode)
