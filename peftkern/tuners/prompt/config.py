"""PromptTuningConfig: PEFT's fields for prompt tuning (Lester et al., 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.prompt_learning import PromptLearningConfig

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """``num_virtual_tokens`` trainable input embeddings before every input.

    prompt_tuning_init: "RANDOM" (standard normal, nn.Embedding's own init), "TEXT" (the embeddings
    of ``prompt_tuning_init_text``'s tokens, repeated or cut to length; needs
    ``tokenizer_name_or_path``: a tokenizer folder, or "tiny" for the embedded default's), or
    "SAMPLE_VOCAB" (rows of the model's embedding table at random token ids). As in PEFT, the
    initialization runs only for a trainable adapter (``inference_mode=False``)."""

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    peft_type: str = "PROMPT_TUNING"

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    def validate_method(self) -> None:
        super().validate_method()
        init = self.prompt_tuning_init
        if hasattr(init, "value"):  # PEFT's PromptTuningInit enum
            init = self.prompt_tuning_init = init.value
        if init not in INITS:
            raise ValueError(f"{self.field_name('prompt_tuning_init')} must be one of {INITS}, got {init!r}")
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{self.field_name(name)} must be a string or None, got {value!r}")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise TypeError(f"{self.field_name('tokenizer_kwargs')} must be a dict or None, got {self.tokenizer_kwargs!r}")
        if init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ValueError(f"{self.field_name('prompt_tuning_init')} = 'TEXT' needs "
                                 f"{self.field_name('tokenizer_name_or_path')} (a tokenizer folder, or 'tiny')")
            if not self.prompt_tuning_init_text:
                raise ValueError(f"{self.field_name('prompt_tuning_init')} = 'TEXT' needs "
                                 f"{self.field_name('prompt_tuning_init_text')} (a non-empty text)")
        elif self.tokenizer_kwargs:
            raise ValueError(f"{self.field_name('tokenizer_kwargs')} is only used with prompt_tuning_init='TEXT'")
