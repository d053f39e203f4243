"""PeftKernModel: a transformers model with peftkern LoRA layers swapped in, and PEFT's adapter
methods (add/set/delete/disable, weighted combination, merge_and_unload)."""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from peftkern.tuners.config import ALL_LINEAR, LoraConfig
from peftkern.tuners.inject import _parent_and_attr, inject_adapter
from peftkern.tuners.layers import activate_layer, adapter_parameters, delete_from_layer, is_lora_layer
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.targeting import resolve_target_modules
from peftkern.tuners.weighted import adapter_rank, combine_layer, combined_rank

CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_HEADS = ("classifier", "score")


class PeftKernModel(nn.Module):
    """Wraps the adapted model (``self.model``, the very object passed in, changed in place).
    Calls and unknown attributes go through to it, so ``model(**batch)``, ``model.generate(...)``
    and ``model.config`` work as before."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []

    # -- plumbing ---------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if is_lora_layer(m)]

    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]

    # -- adapters ---------------------------------------------------------------------------
    def _inject(self, config: LoraConfig, adapter_name: str):
        """Insert a new adapter (inactive), recording the resolved target list in its config."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(self.peft_config)})")
        config = config.replace()
        if config.task_type in CLASSIFIER_TASKS:  # PEFT trains and saves the classification head in full
            saved = list(config.modules_to_save or [])
            config.modules_to_save = saved + [n for n in CLASSIFIER_HEADS if n not in saved]
        if config.target_modules is None or (isinstance(config.target_modules, str)
                                             and config.target_modules.lower() == ALL_LINEAR):
            config.target_modules = sorted(resolve_target_modules(self.model, config))
        journal = inject_adapter(self.model, config, adapter_name)
        self.peft_config[adapter_name] = config
        return journal

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter ``adapter_name`` (left inactive and frozen, as in PEFT; ``set_adapter`` runs it)."""
        self._inject(config, adapter_name)
        self._refresh()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Run ``adapter_names`` (one name or several, summed) and let them train unless their config
        is in inference mode."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}")
        for _, wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"adapters {held} both hold modules_to_save copies of one module; only one of "
                                 "them can be active at a time")
        self.active_adapters = names
        self._refresh()

    def _refresh(self) -> None:
        """Apply the active adapter set to every layer: which run, which train, which biases train."""
        names = self.active_adapters
        trainable = {n: not self.peft_config[n].inference_mode for n in self.peft_config}
        for _, layer in self.lora_layers():
            activate_layer(layer, names, trainable=True)
            for n in layer.lora_A.keys():
                if not trainable.get(n, False):
                    for p in adapter_parameters(layer, n):
                        p.requires_grad_(False)
        for _, wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            wrapper.set_adapter(held, trainable=bool(held) and trainable[held[0]])
        for name in names:
            bias = self.peft_config[name].bias
            if not trainable[name] or bias == "none":
                continue
            if bias == "all":
                for key, p in self.model.named_parameters():
                    if key == "bias" or key.endswith(".bias"):
                        p.requires_grad_(True)
            else:
                for _, layer in self.lora_layers():
                    if getattr(layer.base_layer, "bias", None) is not None:
                        layer.base_layer.bias.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere; if it was active, the first remaining adapter becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for _, layer in self.lora_layers():
            delete_from_layer(layer, adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and adapter_name in self.active_adapters and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        self._refresh()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model runs as the base model (adapters and modules_to_save copies off)."""
        modules = [m for _, m in self.lora_layers()] + [m for _, m in self._wrappers()]
        previous = [m.disable_adapters for m in modules]
        try:
            for m in modules:
                m.disable_adapters = True
            yield
        finally:
            for m, state in zip(modules, previous):
                m.disable_adapters = state

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None) -> None:
        """A new adapter ``adapter_name`` combining ``adapters`` with ``weights`` ("linear", "cat" or
        "svd"; see peftkern.tuners.weighted). It targets the union of their modules, has r = alpha =
        the new rank and rsLoRA off (so its scaling is 1), and is left inactive."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}")
        for path, wrapper in self._wrappers():
            if sum(a in wrapper.modules_to_save for a in adapters) > 1:
                raise ValueError(f"adapters {adapters} hold several modules_to_save copies of {path!r}, which "
                                 "cannot be combined")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        configs = [self.peft_config[a] for a in adapters]
        new_rank = combined_rank(combination_type, [adapter_rank(c) for c in configs], svd_rank)
        kinds = {isinstance(c.target_modules, str) for c in configs}
        if len(kinds) > 1:
            raise ValueError("cannot combine adapters whose target_modules mix regex strings and lists")
        if kinds == {True}:
            targets = "|".join(f"({c.target_modules})" for c in configs)
        else:
            targets = sorted(set().union(*[set(c.target_modules) for c in configs]))
        config = configs[0].replace(r=new_rank, lora_alpha=new_rank, target_modules=targets, rank_pattern={},
                                    alpha_pattern={}, use_rslora=False, init_lora_weights=True)
        journal = self._inject(config, adapter_name)
        try:
            for _, layer in self.lora_layers():
                if adapter_name not in layer.lora_A:
                    continue
                a, b = combine_layer(layer, adapters, weights, combination_type, new_rank, svd_clamp,
                                     svd_full_matrices, svd_driver)
                with torch.no_grad():
                    layer.lora_A[adapter_name].weight.copy_(a)
                    layer.lora_B[adapter_name].weight.copy_(b)
        except BaseException:
            journal.undo()
            del self.peft_config[adapter_name]
            raise
        self._refresh()

    # -- merging ----------------------------------------------------------------------------
    def _unload(self, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
        for path, layer in self.lora_layers():
            if merge:
                names = adapter_names if adapter_names is not None else self.active_adapters
                layer.merge([n for n in names if n in layer.lora_A], safe_merge=safe_merge)
            parent, attr = _parent_and_attr(self.model, path)
            setattr(parent, attr, layer.base_layer)
        for path, wrapper in self._wrappers():
            parent, attr = _parent_and_attr(self.model, path)
            setattr(parent, attr, wrapper.running_module() if merge else wrapper.original_module)
        self.peft_config.clear()
        self.active_adapters = []
        return self.model

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Add the active (or the given) adapters into the base weights, put every original module
        back (modules_to_save: the active adapter's copy) and return the plain transformers model.
        ``safe_merge`` checks for non-finite weights before writing them."""
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.peft_config]
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}")
        return self._unload(True, adapter_names, safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain transformers model."""
        return self._unload(False, None, False)

    # -- reporting and files ----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.model.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def save_pretrained(self, directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Same as ``peftkern.save_adapter`` (PEFT's layout: "default" at the top, others in subfolders)."""
        from peftkern.tuners.io import save_adapter

        for name in selected_adapters if selected_adapters is not None else list(self.peft_config):
            save_adapter(self, directory, name)


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftKernModel:
    """Swap the modules ``config`` targets for peftkern LoRA layers (in place), freeze everything
    else, and return the model wrapped with PEFT's adapter methods. The adapter is active and
    trainable (unless ``config.inference_mode``). Nothing changes if a target matches nothing."""
    if isinstance(model, PeftKernModel):
        raise TypeError("model already carries peftkern adapters; use model.add_adapter(name, config)")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peftkern.LoraConfig, got {type(config).__name__}")
    wrapped = PeftKernModel(model)
    wrapped._inject(config, adapter_name)
    freeze_base(wrapped)
    wrapped.set_adapter(adapter_name)
    return wrapped


def freeze_base(wrapped: PeftKernModel) -> None:
    for p in wrapped.model.parameters():
        p.requires_grad_(False)
