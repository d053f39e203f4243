"""LoraConfig: PEFT's LoRA configuration, field for field, read from and written to PEFT's
``adapter_config.json``.

Field names and meanings are PEFT's (``peft.LoraConfig``). A file written by PEFT loads here; a file
written here loads in PEFT. Keys PEFT knows but peftkern does not implement are accepted at their
default value and refused otherwise (the error names the field); keys neither knows (a newer PEFT,
another tool) give one warning naming them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT's default target_modules per model type (used when target_modules is None), for the
# decoder families peftkern supports.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"],
}

# Fields PEFT writes that peftkern does not implement: accepted only at these (PEFT's default) values.
UNSUPPORTED_AT_DEFAULT: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "eva_config": None,
    "kasa_config": None, "layer_replication": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "monteclora_config": None, "target_parameters": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_qalora": False, "velora_config": None,
    "ensure_weight_tying": False,
}
# Fields PEFT writes that only describe the file; read and ignored.
METADATA_ONLY: dict[str, Any] = {
    "auto_mapping": None, "megatron_core": "megatron.core", "qalora_group_size": 16, "peft_version": None,
}


@dataclass
class LoraConfig:
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
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = "LORA"

    def __post_init__(self):
        self.validate()

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first field whose value PEFT would not accept."""
        if self.peft_type != "LORA":
            raise ValueError(f"LoraConfig.peft_type must be 'LORA', got {self.peft_type!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        _check_number("lora_alpha", self.lora_alpha)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LoraConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        self._validate_layers()
        self._validate_patterns()
        if self.init_lora_weights not in INIT_CHOICES or isinstance(self.init_lora_weights, (int, float)) \
                and not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian' in peftkern "
                             f"(PiSSA/OLoRA/LoftQ/EVA/CorDA initialisations are not implemented), "
                             f"got {self.init_lora_weights!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be None or one of {TASK_TYPES}, got {self.task_type!r}")

    def _validate_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, bool) or not (isinstance(layers, int) or
                                                (isinstance(layers, (list, tuple)) and
                                                 all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
                raise TypeError(f"LoraConfig.layers_to_transform must be an int or a list of ints, got {layers!r}")
            if isinstance(layers, tuple):
                self.layers_to_transform = list(layers)
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern is not None:
            if layers is None:
                raise ValueError("LoraConfig.layers_pattern needs layers_to_transform as well")
            if isinstance(self.target_modules, str):
                raise ValueError("LoraConfig.layers_pattern cannot be used when target_modules is a regex string")
            self.layers_pattern = _names_or_regex("layers_pattern", self.layers_pattern)

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
                    _check_number(f"alpha_pattern[{key!r}]", value)

    # -- file format --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes: every PEFT field, target_modules as a sorted list."""
        out = dict(UNSUPPORTED_AT_DEFAULT)
        out.update({k: v for k, v in METADATA_ONLY.items() if k != "peft_version"})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, (set, list)) and f.name in (
                "target_modules", "exclude_modules") else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "LoraConfig":
        """Build from PEFT's dict: unsupported PEFT features at non-default values are an error,
        unknown keys a warning naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            elif key in UNSUPPORTED_AT_DEFAULT:
                if value != UNSUPPORTED_AT_DEFAULT[key] and not (key == "loftq_config" and value is None):
                    raise ValueError(f"{source}: field {key!r} = {value!r} is a PEFT feature peftkern does not "
                                     f"implement (only the default {UNSUPPORTED_AT_DEFAULT[key]!r} is accepted)")
            elif key not in METADATA_ONLY:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring keys peftkern does not know: {sorted(unknown)}", stacklevel=3)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """Read ``directory/adapter_config.json``."""
        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=path)

    def replace(self, **changes) -> "LoraConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"LoraConfig.{name} must be a finite number, got {value!r}")


def _names_or_regex(name: str, value):
    """None, a regex string, or a list of names (PEFT stores a set; sorted list here)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    raise TypeError(f"LoraConfig.{name} must be a list of module names or a regex string, got {value!r}")
