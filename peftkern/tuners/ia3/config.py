"""IA3Config: PEFT's (IA)^3 configuration, field for field (``peft.IA3Config``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.config import PeftConfig, check_bool, check_modules_to_save, names_or_regex

# PEFT's defaults per model type (target_modules / feedforward_modules None), for the families peftkern supports.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"], "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"], "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
    "gemma": ["down_proj"], "gemma2": ["down_proj"], "gpt2": ["mlp.c_proj"], "opt": ["fc2"], "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"], "bloom": ["mlp.dense_4h_to_h"], "phi": ["fc2"],
}


@dataclass
class IA3Config(PeftConfig):
    """PEFT's (IA)^3 settings: learned vectors that scale the outputs of ``target_modules`` (keys,
    values), or the inputs of those among them named by ``feedforward_modules`` (the feed-forward
    down projection).

    target_modules / exclude_modules: PEFT's target rules (list, regex, "all-linear").
    feedforward_modules: which targets scale their input (a list: a module whose name ends with an
    entry; a regex: ``fullmatch``); a list must be a subset of a list of targets. fan_in_fan_out:
    the targets store W as [in, out] (GPT-2 Conv1D; set to match the targets, as PEFT does).
    modules_to_save: modules trained in full and saved with the adapter. init_ia3_weights: vectors
    start at 1 (the model unchanged); False: standard normal (PEFT discourages it).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    peft_type: str = "IA3"

    PEFT_TYPE: ClassVar[str] = "IA3"
    NAME_LISTS: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules", "feedforward_modules")
    DEFAULT_TARGETS: ClassVar[dict] = DEFAULT_TARGETS

    def validate_method(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            names_or_regex(self, name)
        check_bool(self, "fan_in_fan_out", "init_ia3_weights")
        check_modules_to_save(self)
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise ValueError(f"IA3Config.feedforward_modules must be a subset of target_modules; "
                             f"{sorted(set(ff) - set(targets))} are not targets")
