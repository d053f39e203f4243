"""AdaLoraConfig: PEFT's AdaLoRA configuration, field for field (``peft.AdaLoraConfig``, which
extends PEFT's LoraConfig; the LoRA fields AdaLoRA ignores are accepted at their defaults only)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkern.tuners.config import PeftConfig, check_int, check_number
from peftkern.tuners.lora.config import LORA_METADATA, LORA_UNSUPPORTED, validate_lora_common

# PEFT's defaults per model type (target_modules None), for the families peftkern supports.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
}

# LoRA fields PEFT's AdaLoRA does not use (r is only warned about, as PEFT does): defaults only.
ADALORA_UNSUPPORTED: dict[str, Any] = {**LORA_UNSUPPORTED, "use_rslora": False, "use_dora": False,
                                       "alpha_pattern": {}}


@dataclass
class AdaLoraConfig(PeftConfig):
    """PEFT's AdaLoRA settings: an SVD-form update P diag(E) Q per target whose rank budget shrinks
    from ``init_r`` to an average of ``target_r`` by importance (sensitivity x uncertainty, two EMAs).

    Schedule: ``tinit`` warm-up steps at full budget, a cubic decrease until ``total_step - tfinal``
    (a new mask every ``deltaT`` steps), then ``tfinal`` steps at the final ranks. beta1 / beta2: the
    EMAs of sensitivity and uncertainty. orth_reg_weight: weight of ||P^T P - I|| + ||Q Q^T - I||.
    rank_pattern: after allocation, each layer's kept triplets (saved in the config, as PEFT).
    The LoRA fields (lora_alpha: scaling numerator, s = alpha / init_r; lora_dropout,
    target_modules, exclude_modules, bias, modules_to_save, fan_in_fan_out, layers_to_transform,
    layers_pattern, init_lora_weights) mean what they mean for LoRA.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_lora_weights: bool = True
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    peft_type: str = "ADALORA"

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    UNSUPPORTED_AT_DEFAULT: ClassVar[dict[str, Any]] = ADALORA_UNSUPPORTED
    METADATA_ONLY: ClassVar[dict[str, Any]] = LORA_METADATA
    NAME_LISTS: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules")
    DEFAULT_TARGETS: ClassVar[dict] = DEFAULT_TARGETS

    def validate_method(self) -> None:
        validate_lora_common(self)
        if self.r != 8:
            warnings.warn("AdaLoraConfig.r is not used by AdaLoRA (as in PEFT); the initial rank is init_r",
                          stacklevel=4)
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"AdaLoraConfig.init_lora_weights must be True or False, got {self.init_lora_weights!r}")
        check_int(self, "init_r", minimum=1)
        check_int(self, "target_r", minimum=1)
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        check_int(self, "tinit", minimum=0)
        check_int(self, "tfinal", minimum=0)
        check_int(self, "deltaT", minimum=1)
        check_number(self, "beta1", low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(self, "beta2", low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(self, "orth_reg_weight", low=0.0)
        if self.total_step is None:
            raise ValueError("AdaLoraConfig.total_step is required (the number of training steps, > 0), as in PEFT")
        check_int(self, "total_step", minimum=1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoraConfig: tinit ({self.tinit}) must be < total_step - tfinal "
                             f"({self.total_step} - {self.tfinal}) so that a budgeting phase exists")
        self._validate_rank_pattern()

    def _validate_rank_pattern(self) -> None:
        pattern = self.rank_pattern
        if pattern is None:
            return
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise TypeError(f"AdaLoraConfig.rank_pattern must be None or a dict of lora_E name -> list of bools, "
                            f"got {type(pattern).__name__}")
        for key, mask in pattern.items():
            if not isinstance(mask, (list, tuple)) or not all(isinstance(v, bool) for v in mask):
                raise ValueError(f"AdaLoraConfig.rank_pattern[{key!r}] must be a list of bools (kept triplets), "
                                 f"got {mask!r}")
            if len(mask) != self.init_r:
                raise ValueError(f"AdaLoraConfig.rank_pattern[{key!r}] has {len(mask)} entries, expected init_r = "
                                 f"{self.init_r}")
            if not key.endswith("lora_E") and ".lora_E." not in key:
                raise ValueError(f"AdaLoraConfig.rank_pattern key {key!r} does not name a lora_E parameter")
