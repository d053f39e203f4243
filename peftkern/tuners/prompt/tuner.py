"""Prompt tuning as a tuner: a PromptEmbedding per adapter, its rows before the input embeddings."""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.prompt.config import PromptTuningConfig
from peftkern.tuners.prompt.encoder import PromptEmbedding, load_init_tokenizer
from peftkern.tuners.prompt_learning import SoftPromptTuner


class PromptTuningTuner(SoftPromptTuner):
    peft_type = "PROMPT_TUNING"
    config_class = PromptTuningConfig

    def prepare_config(self, model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
        config = super().prepare_config(model, config)
        check_token_dim(model, config)
        return config

    def build_encoder(self, model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
        total = config.num_virtual_tokens * config.num_transformer_submodules
        encoder = PromptEmbedding(total, config.token_dim)
        if config.inference_mode:  # the weights come from a file, as PEFT
            return encoder
        words = model.get_input_embeddings()
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = torch.randint(0, words.num_embeddings, (total,), dtype=torch.long)
            encoder.init_from_rows(words, ids.tolist())
        elif config.prompt_tuning_init == "TEXT":
            tokenizer = load_init_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
            ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
            if any(i >= words.num_embeddings for i in ids):
                raise ValueError(f"PromptTuningConfig.tokenizer_name_or_path = {config.tokenizer_name_or_path!r} gives "
                                 f"token ids beyond the model's {words.num_embeddings} embeddings: another model's "
                                 "tokenizer?")
            encoder.init_from_rows(words, list(ids))
        return encoder


def check_token_dim(model: nn.Module, config) -> None:
    """The virtual tokens go into the input embeddings: their width must be the model's."""
    width = model.get_input_embeddings().weight.shape[-1]
    if config.token_dim != width:
        raise ValueError(f"{config.field_name('token_dim')} = {config.token_dim} but {type(model).__name__}'s input "
                         f"embeddings are {width} wide")
