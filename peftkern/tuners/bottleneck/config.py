"""BottleneckConfig: bottleneck adapters as in Houlsby et al. (2019), Pfeiffer et al. (2021) and He
et al. (2022, the parallel adapter). PEFT has no bottleneck adapters; the file keeps PEFT's layout
(``adapter_config.json`` with ``peft_type: "BOTTLENECK"``, ``adapter_model.safetensors``), and the
field names follow AdapterHub's ``BnConfig`` where they mean the same."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkern.tuners.config import PeftConfig, check_bool, check_modules_to_save, check_number

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
NON_LINEARITIES = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh"}
INIT_WEIGHTS = ("mam_adapter", "houlsby", "bert")


@dataclass
class BottleneckConfig(PeftConfig):
    """placement: "houlsby" (two serial adapters per block: on the attention output and on the
    feed-forward output), "pfeiffer" (one serial adapter after the feed-forward block) or "parallel"
    (beside the feed-forward block, reading its input, scaled by ``scaling``).

    reduction_factor: bottleneck = hidden // reduction_factor (AdapterHub's rule), unless
    bottleneck_size is given. non_linearity: relu, gelu, silu (swish), tanh. scaling: s in
    y = r + s * up(act(down(h))). original_ln_before: the serial adapter's input includes the
    block's residual (None: the placement's default, True for Pfeiffer, False for Houlsby);
    original_ln_after: the model's own residual add follows the adapter (always, in pre-norm
    decoders). init_weights: "mam_adapter" (down Kaiming-uniform, up zeros: the model unchanged),
    "houlsby" (both near zero, truncated normal 0.01), "bert" (normal 0.02). target_layers: block
    indices (None: every block).
    """

    placement: str = "houlsby"
    reduction_factor: float | None = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool | None = None
    original_ln_after: bool = True
    init_weights: str = "mam_adapter"
    target_layers: list[int] | None = None
    modules_to_save: list[str] | None = None
    peft_type: str = "BOTTLENECK"

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"

    def validate_method(self) -> None:
        name = self.field_name
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{name('placement')} must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in NON_LINEARITIES:
            raise ValueError(f"{name('non_linearity')} must be one of {', '.join(NON_LINEARITIES)}, "
                             f"got {self.non_linearity!r}")
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"{name('init_weights')} must be one of {', '.join(INIT_WEIGHTS)}, "
                             f"got {self.init_weights!r}")
        if self.bottleneck_size is None:
            if self.reduction_factor is None:
                raise ValueError(f"{name('reduction_factor')} or {name('bottleneck_size')} must be given")
            check_number(self, "reduction_factor", low=0.0, low_open=True)
        elif isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) \
                or self.bottleneck_size < 1:
            raise ValueError(f"{name('bottleneck_size')} must be a positive integer, got {self.bottleneck_size!r}")
        check_number(self, "scaling")
        if self.original_ln_before is not None:
            check_bool(self, "original_ln_before")
        check_bool(self, "original_ln_after")
        if not self.original_ln_after:
            raise ValueError(f"{name('original_ln_after')} = False is not supported: in a pre-norm decoder the "
                             "model's own residual add follows the adapter")
        if self.placement == "houlsby" and self.original_ln_before:
            raise ValueError(f"{name('original_ln_before')} = True with placement 'houlsby' would feed the attention "
                             "adapter the block's mid-stream residual, which peftkern cannot reach without editing "
                             "the model's code; use placement 'pfeiffer' or original_ln_before False")
        if self.placement == "parallel" and self.original_ln_before:
            raise ValueError(f"{name('original_ln_before')} does not apply to placement 'parallel'")
        layers = self.target_layers
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if not isinstance(layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise TypeError(f"{name('target_layers')} must be a list of block indices (ints >= 0), "
                                f"got {self.target_layers!r}")
            self.target_layers = sorted(set(layers))
        check_modules_to_save(self)

    @property
    def activation(self) -> str:
        """The op's name of the non-linearity (swish is silu)."""
        return NON_LINEARITIES[self.non_linearity.lower()]

    @property
    def serial_input_includes_residual(self) -> bool:
        """Pfeiffer's default: the adapter reads the block's output (sub-layer output + residual)."""
        if self.original_ln_before is not None:
            return self.original_ln_before
        return self.placement == "pfeiffer"

    def bottleneck_for(self, hidden: int) -> int:
        """The bottleneck width for a hidden size: bottleneck_size, else int(hidden // reduction_factor)."""
        return self.bottleneck_size if self.bottleneck_size is not None else int(hidden // self.reduction_factor)
