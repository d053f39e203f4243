"""BitFitConfig: train only biases (Ben Zaken et al., 2022). PEFT has no BitFit; the file keeps
PEFT's layout (``adapter_config.json`` with ``peft_type: "BITFIT"``, ``adapter_model.safetensors``
holding ``base_model.model.<module>.bias`` for each trained bias, its full value)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.config import PeftConfig, check_modules_to_save, names_or_regex


@dataclass
class BitFitConfig(PeftConfig):
    """target_modules: None (every module that has a bias: linears, Conv1D, LayerNorm, ...), or
    PEFT's target rules (a list of names, a regex, "all-linear"); a chosen linear without a bias
    gets a trainable one starting at zero. exclude_modules: modules left out. modules_to_save:
    modules trained in full and saved with the adapter (e.g. a classification head)."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    peft_type: str = "BITFIT"

    PEFT_TYPE: ClassVar[str] = "BITFIT"
    NAME_LISTS: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules")

    def validate_method(self) -> None:
        names_or_regex(self, "target_modules")
        names_or_regex(self, "exclude_modules")
        check_modules_to_save(self)
