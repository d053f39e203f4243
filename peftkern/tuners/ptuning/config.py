"""PromptEncoderConfig: PEFT's fields for P-tuning (Liu et al., 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.config import check_int, check_number
from peftkern.tuners.prompt_learning import PromptLearningConfig

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Virtual-token embeddings produced by a prompt encoder from a trainable table.

    encoder_reparameterization_type: "MLP" (three linears with ReLUs: token_dim -> hidden -> hidden
    -> token_dim; ``encoder_num_layers`` is ignored, as PEFT) or "LSTM" (a bidirectional LSTM of
    ``encoder_num_layers`` layers, ``encoder_dropout`` between them, then a two-layer MLP).
    encoder_hidden_size: None means token_dim (PEFT's default)."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    peft_type: str = "P_TUNING"

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    def validate_method(self) -> None:
        super().validate_method()
        kind = self.encoder_reparameterization_type
        if hasattr(kind, "value"):  # PEFT's enum
            kind = self.encoder_reparameterization_type = kind.value
        if kind not in ENCODER_TYPES:
            raise ValueError(f"{self.field_name('encoder_reparameterization_type')} must be one of {ENCODER_TYPES}, "
                             f"got {kind!r}")
        check_int(self, "encoder_hidden_size", minimum=1, allow_none=True)
        check_int(self, "encoder_num_layers", minimum=1)
        check_number(self, "encoder_dropout", low=0.0, high=1.0, high_open=True)
