"""PrefixTuningConfig: PEFT's fields for prefix tuning (Li & Liang, 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.config import check_bool, check_int
from peftkern.tuners.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """A trainable key/value prefix of ``num_virtual_tokens`` positions for every attention layer.

    prefix_projection: produce the prefix from a table [n, token_dim] through a two-layer MLP
    (token_dim -> encoder_hidden_size -> num_layers * 2 * token_dim, tanh between) while training;
    the file holds its output (folded), as PEFT saves it. init_weights: None (random) or "zero"
    (the last layer, or the table, starts at zero). With grouped-query attention ``token_dim`` and
    ``num_attention_heads`` are the key/value sizes (head_dim x KV heads, KV heads), as PEFT sets them."""

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    peft_type: str = "PREFIX_TUNING"

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    def validate_method(self) -> None:
        super().validate_method()
        check_bool(self, "prefix_projection")
        check_int(self, "encoder_hidden_size", minimum=1, allow_none=True)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"{self.field_name('init_weights')} must be None or 'zero', got {self.init_weights!r}")
