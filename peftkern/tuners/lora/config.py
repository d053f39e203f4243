"""LoraConfig: PEFT's LoRA configuration, field for field (``peft.LoraConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkern.tuners.config import (PeftConfig, check_bool, check_int, check_layers, check_modules_to_save,
                                    check_number, names_or_regex)

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian")

# PEFT's default target_modules per model type (used when target_modules is None), for the
# decoder families peftkern supports.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}

# Fields PEFT's LoraConfig writes that peftkern does not implement: accepted only at these values.
LORA_UNSUPPORTED: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "eva_config": None,
    "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "monteclora_config": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False, "velora_config": None,
    "ensure_weight_tying": False,
}
LORA_METADATA: dict[str, Any] = {"megatron_core": "megatron.core", "qalora_group_size": 16}


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's LoRA settings (see ``peft.LoraConfig`` for the full prose).

    r: rank of each adapter. lora_alpha: scaling numerator (s = alpha / r, alpha / sqrt(r) with
    ``use_rslora``). lora_dropout: dropout on the adapter's input. target_modules: a list of module
    names (a module matches when its full name equals one or ends with ``"." + name``), a regex
    matched against the full name, or ``"all-linear"`` (every nn.Linear / Conv1D but the output
    head). bias: which biases train and are saved ("none", "all", "lora_only"). modules_to_save:
    modules trained in full and saved with the adapter. layers_to_transform / layers_pattern:
    restrict list targets to these layer indices. rank_pattern / alpha_pattern: per-module r / alpha,
    keys matched as regexes against the end of the module name. init_lora_weights: True (A
    Kaiming-uniform, B zero), "gaussian", or False (both random). use_dora: DoRA layers.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    use_dora: bool = False
    peft_type: str = "LORA"

    PEFT_TYPE: ClassVar[str] = "LORA"
    UNSUPPORTED_AT_DEFAULT: ClassVar[dict[str, Any]] = LORA_UNSUPPORTED
    METADATA_ONLY: ClassVar[dict[str, Any]] = LORA_METADATA
    NAME_LISTS: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules")
    DEFAULT_TARGETS: ClassVar[dict] = DEFAULT_TARGETS

    def validate_method(self) -> None:
        validate_lora_common(self)
        check_bool(self, "use_rslora", "use_dora")
        self._validate_patterns()
        if self.init_lora_weights not in INIT_CHOICES or isinstance(self.init_lora_weights, (int, float)) \
                and not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian' in peftkern "
                             f"(PiSSA/OLoRA/LoftQ/EVA/CorDA initialisations are not implemented), "
                             f"got {self.init_lora_weights!r}")

    def _validate_patterns(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise TypeError(f"LoraConfig.{name} must be a dict of module-name pattern -> value, got {pattern!r}")
            for key, value in pattern.items():
                if name == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                    raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
                if name == "alpha_pattern":
                    check_number(self, f"alpha_pattern[{key!r}]", value)


def validate_lora_common(config: PeftConfig) -> None:
    """The fields LoRA and AdaLoRA share: r, lora_alpha, lora_dropout, targets, bias, modules_to_save,
    fan_in_fan_out, layers."""
    check_int(config, "r", minimum=1)
    check_number(config, "lora_alpha")
    check_number(config, "lora_dropout", low=0.0, high=1.0, high_open=True)
    names_or_regex(config, "target_modules")
    names_or_regex(config, "exclude_modules")
    if config.bias not in BIAS_CHOICES:
        raise ValueError(f"{config.field_name('bias')} must be one of {BIAS_CHOICES}, got {config.bias!r}")
    check_bool(config, "fan_in_fan_out")
    check_modules_to_save(config)
    check_layers(config)
