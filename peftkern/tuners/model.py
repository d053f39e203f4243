"""PeftKernModel: a transformers model with adapters of any method swapped in, and PEFT's adapter
methods (add/set/delete/disable, mixed-adapter batches, weighted combination, merge_and_unload,
saving). Everything method-specific goes through the adapter's tuner (``tuners/methods.py``)."""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from peftkern.nn.mixed_batch import BASE_ONLY, row_adapters
from peftkern.tuners.config import PeftConfig
from peftkern.tuners.files import adapter_directory, write_adapter_files
from peftkern.tuners.layers import activate_layer, delete_from_layer, is_adapter_layer, layer_adapters
from peftkern.tuners.lora.tuner import lora_layers
from peftkern.tuners.lora.weighted import adapter_rank, combine_layer, combined_rank
from peftkern.tuners.methods import TUNERS, tuner_for
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.state_dict import adapter_slots
from peftkern.tuners.tuner import Injection, adapter_stacks, check_adapter_name, parent_and_attr, wrappers


class PeftKernModel(nn.Module):
    """Wraps the adapted model (``self.model``, the very object passed in, changed in place).
    Calls and unknown attributes go through to it, so ``model(**batch)``, ``model.generate(...)``
    and ``model.config`` work as before. Adapters of different methods may sit on one model at
    once (``set_adapter([...])`` runs several)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = []
        self.adapters_disabled = False
        self.method_state: dict[str, object] = {}  # per-adapter state a method keeps (AdaLoRA's allocator)

    # -- plumbing ---------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward. ``adapter_names`` (one name per row of the batch, ``"__base__"`` for
        the base model alone): each row runs through its own adapter, as PEFT's mixed-batch inference;
        unlike PEFT also in training mode (each adapter's gradient comes from its own rows)."""
        active = self._running()
        if adapter_names is not None:
            self._refuse_rows_with_input_changes()
        for name in active:
            args, kwargs = tuner_for(self.peft_config[name]).before_forward(self, name, args, kwargs)
        with self._rows(adapter_names):
            outputs = self.model(*args, **kwargs)
        for name in active:
            outputs = tuner_for(self.peft_config[name]).after_forward(self, name, outputs)
        return outputs

    def _running(self) -> list[str]:
        return [] if self.adapters_disabled else list(self.active_adapters)

    def _input_changers(self) -> list[str]:
        return [n for n in self._running() if tuner_for(self.peft_config[n]).changes_inputs]

    def _refuse_rows_with_input_changes(self) -> None:
        changers = self._input_changers()
        if changers:
            raise ValueError(f"adapter_names= (one adapter per row) cannot run with adapters that change the inputs "
                             f"(soft prompts: {changers}), as in PEFT; run them in separate batches")

    def changes_inputs(self) -> bool:
        """Whether an active adapter rewrites the forward's inputs (a soft prompt)."""
        return bool(self._input_changers())

    def model_inputs(self, kwargs: dict) -> dict:
        """``kwargs`` of a forward of the model (or of its decoder stack) as the active adapters
        rewrite them (soft prompts: virtual tokens before the input embeddings or in the cache, the
        attention mask, positions and labels extended); unchanged when no active adapter changes
        inputs or adapters are disabled."""
        args = ()
        for name in self._input_changers():
            args, kwargs = tuner_for(self.peft_config[name]).before_forward(self, name, args, kwargs)
        return kwargs

    def prepended_positions(self) -> int:
        """How many positions the active adapters put before the input (the hidden states and logits
        of a forward start with them): prompt tuning's and P-tuning's virtual tokens; 0 otherwise."""
        return sum(tuner_for(self.peft_config[n]).virtual_positions(self.peft_config[n]) for n in self._running())

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """``model.generate`` of the wrapped model; ``adapter_names`` as in :meth:`forward` (one per
        prompt; repeated for each beam / returned sequence)."""
        if adapter_names is not None:
            repeat = max(int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1))
            if isinstance(adapter_names, (list, tuple)):
                adapter_names = [n for n in adapter_names for _ in range(repeat)]
        if adapter_names is not None:
            self._refuse_rows_with_input_changes()
        with self._rows(adapter_names), self._inputs_rewritten_in_generate():
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _inputs_rewritten_in_generate(self):
        """While generating, the inputs ``generate`` prepares for each step go through the active
        adapters' ``before_forward`` (soft prompts), as they do in :meth:`forward`."""
        if not self._input_changers():
            yield
            return
        model = self.model
        had_own = "prepare_inputs_for_generation" in vars(model)
        original = model.prepare_inputs_for_generation

        def prepare(*args, **kwargs):
            return self.model_inputs(original(*args, **kwargs))

        model.prepare_inputs_for_generation = prepare
        try:
            yield
        finally:
            if had_own:
                model.prepare_inputs_for_generation = original
            else:
                del model.prepare_inputs_for_generation

    def _rows(self, adapter_names):
        if adapter_names is None:
            return contextlib.nullcontext()
        if isinstance(adapter_names, (list, tuple)):
            unknown = sorted({n for n in adapter_names if n != BASE_ONLY and n not in self.peft_config})
            if unknown:
                raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; adapters: {list(self.peft_config)} "
                                 f"(and {BASE_ONLY!r} for the base model)")
        return row_adapters(adapter_names)

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

    def adapter_layers(self) -> list[tuple[str, nn.Module]]:
        """(path of the adapted module, layer) of every adapter layer, any method."""
        return [(path, layer) for path, stack in adapter_stacks(self.model) for layer in stack]

    def lora_layers(self) -> list[tuple[str, nn.Module]]:
        return lora_layers(self.model)

    def _wrappers(self) -> list[tuple[str, ModulesToSaveWrapper]]:
        return wrappers(self.model)

    # -- adapters ---------------------------------------------------------------------------
    def _inject(self, config: PeftConfig, adapter_name: str) -> Injection:
        """Insert a new adapter (inactive), recording its resolved config."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(self.peft_config)})")
        tuner = tuner_for(config)
        config = tuner.prepare_config(self.model, config)
        tuner.check_new_adapter(self, config, adapter_name)
        journal = tuner.inject(self.model, config, adapter_name)
        self.peft_config[adapter_name] = config
        return journal

    def _forget(self, adapter_name: str, journal: Injection) -> None:
        """Undo a failed addition: the layers, the config, any method state."""
        journal.undo()
        self.peft_config.pop(adapter_name, None)
        self.method_state.pop(adapter_name, None)

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add adapter ``adapter_name`` (left inactive and frozen, as in PEFT; ``set_adapter`` runs it)."""
        self._inject(config, adapter_name)
        self._refresh()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Run ``adapter_names`` (one name or several, of any methods, combined) and let them train
        unless their config is in inference mode."""
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
        """Apply the active adapter set to every layer: which run, which train, which extras train."""
        names = self.active_adapters
        trainable = {n for n in names if not self.peft_config[n].inference_mode}
        for _, layer in self.adapter_layers():
            activate_layer(layer, names, trainable)
        for _, wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            wrapper.set_adapter(held, trainable=bool(held) and held[0] in trainable)
        extras = {name: tuner_for(config).extra_trainable(self.model, config, name)
                  for name, config in self.peft_config.items()}
        for params in extras.values():
            for p in params:
                p.requires_grad_(False)
        for name in trainable:
            for p in extras[name]:
                p.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` everywhere; if it was active, the first remaining adapter becomes active."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        for _, layer in self.adapter_layers():
            delete_from_layer(layer, adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete(adapter_name)
        self._drop_empty_layers()
        tuner_for(self.peft_config[adapter_name]).remove_adapter(self.model, adapter_name)
        del self.peft_config[adapter_name]
        self.method_state.pop(adapter_name, None)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and adapter_name in self.active_adapters and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        self._refresh()

    def _drop_empty_layers(self) -> None:
        """Take out adapter layers that hold no adapter any more (so their module is plain again)."""
        for path, stack in adapter_stacks(self.model):
            kept = [m for m in stack if layer_adapters(m)]
            if len(kept) == len(stack):
                continue
            below = stack[-1].base_layer
            for layer in reversed(kept):
                layer.base_layer = below
                below = layer
            parent, attr = parent_and_attr(self.model, path)
            setattr(parent, attr, below)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model runs as the base model (adapters and modules_to_save copies off)."""
        modules = [m for _, m in self.adapter_layers()] + [m for _, m in self._wrappers()]
        previous = [m.disable_adapters for m in modules]
        was = self.adapters_disabled
        try:
            self.adapters_disabled = True
            for m in modules:
                m.disable_adapters = True
            yield
        finally:
            self.adapters_disabled = was
            for m, state in zip(modules, previous):
                m.disable_adapters = state

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None) -> None:
        """A new LoRA adapter ``adapter_name`` combining LoRA ``adapters`` with ``weights`` ("linear",
        "cat" or "svd"; see peftkern.tuners.lora.weighted). It targets the union of their modules, has
        r = alpha = the new rank and rsLoRA off (so its scaling is 1), and is left inactive."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"need one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}")
        kinds = {a: self.peft_config[a].peft_type for a in adapters}
        if set(kinds.values()) != {"LORA"}:
            raise TypeError(f"add_weighted_adapter combines LoRA adapters only, got {kinds}")
        for path, wrapper in self._wrappers():
            if sum(a in wrapper.modules_to_save for a in adapters) > 1:
                raise ValueError(f"adapters {adapters} hold several modules_to_save copies of {path!r}, which "
                                 "cannot be combined")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        configs = [self.peft_config[a] for a in adapters]
        new_rank = combined_rank(combination_type, [adapter_rank(c) for c in configs], svd_rank)
        regex = {isinstance(c.target_modules, str) for c in configs}
        if len(regex) > 1:
            raise ValueError("cannot combine adapters whose target_modules mix regex strings and lists")
        if regex == {True}:
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
            self._forget(adapter_name, journal)
            raise
        self._refresh()

    # -- a method's own steps -------------------------------------------------------------------
    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's rank allocation, between the optimizer step and ``zero_grad`` (as PEFT's)."""
        done = False
        for name, config in self.peft_config.items():
            tuner = tuner_for(config)
            if hasattr(tuner, "update_and_allocate") and not config.inference_mode:
                tuner.update_and_allocate(self, name, global_step)
                done = True
        if not done:
            raise ValueError("update_and_allocate is AdaLoRA's step, and this model has no trainable AdaLoRA adapter "
                             f"(adapters: { {n: c.peft_type for n, c in self.peft_config.items()} })")

    # -- merging ----------------------------------------------------------------------------
    def _unload(self, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for path, stack in adapter_stacks(self.model):
            if merge:
                for layer in reversed(stack):  # innermost first: each layer merges into what is below it
                    TUNERS[layer.peft_type].merge_layer(layer, list(names), safe_merge)
            parent, attr = parent_and_attr(self.model, path)
            setattr(parent, attr, stack[-1].base_layer)
        for path, wrapper in self._wrappers():
            parent, attr = parent_and_attr(self.model, path)
            setattr(parent, attr, wrapper.running_module() if merge else wrapper.original_module)
        for name, config in self.peft_config.items():
            tuner_for(config).remove_adapter(self.model, name)
        self.peft_config.clear()
        self.method_state.clear()
        self.active_adapters = []
        return self.model

    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Fold the active (or the given) adapters into the base weights, put every original module
        back (modules_to_save: the active adapter's copy) and return the plain transformers model.
        ``safe_merge`` checks for non-finite weights before writing them."""
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.peft_config]
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown}; adapters: {list(self.peft_config)}")
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            tuner_for(self.peft_config[name]).check_mergeable(self, name)
        return self._unload(True, adapter_names, safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain transformers model."""
        return self._unload(False, None, False)

    # -- reporting and files ----------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
        for name, config in self.peft_config.items():  # methods with a parameter analysis of their own
            describe = getattr(tuner_for(config), "describe_parameters", None)
            line = describe(self, name) if describe is not None else ""
            if line:
                print(line)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_name``'s file under PEFT's keys (live tensors, not copies)."""
        config = self.peft_config[adapter_name]
        return {k: s.read() for k, s in adapter_slots(self.model, tuner_for(config), config, adapter_name).items()}

    def config_to_save(self, adapter_name: str) -> PeftConfig:
        config = self.peft_config[adapter_name]
        return tuner_for(config).config_to_save(self, config, adapter_name)

    def save_pretrained(self, directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter, "default"
        in ``directory``, others in ``directory/<name>``."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.peft_config)}")
        for name in names:
            tensors = self.adapter_state_dict(name)
            write_adapter_files(adapter_directory(directory, name), self.config_to_save(name).to_json(), tensors)


def carries_adapters(model: nn.Module) -> bool:
    """Whether ``model`` already holds peftkern adapter layers or modules_to_save wrappers."""
    return any(is_adapter_layer(m) or isinstance(m, ModulesToSaveWrapper) for m in model.modules())


def refuse_adapted(model: nn.Module, what: str) -> None:
    """An already adapted model passed where a plain one is expected: refuse (issue: a second wrapper
    over the same layers ran one adapter while reporting another, and saved files that did not load)."""
    if isinstance(model, PeftKernModel):
        raise ValueError(f"{what}: the model is already a PeftKernModel (adapters {list(model.peft_config)}); "
                         "add another adapter with model.add_adapter(name, config) or peftkern.load_adapter(model, dir, "
                         "adapter_name=...)")
    if carries_adapters(model):
        layers = sorted({type(m).__name__ for m in model.modules()
                         if is_adapter_layer(m) or isinstance(m, ModulesToSaveWrapper)})
        raise ValueError(f"{what}: the model already carries peftkern adapter layers ({', '.join(layers)}); use the "
                         "PeftKernModel that holds them (add_adapter / load_adapter on it), or unload() it first")


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftKernModel:
    """Put adapter ``adapter_name`` of ``config``'s method on ``model`` (in place), freeze everything
    else, and return the model wrapped with PEFT's adapter methods. The adapter is active and
    trainable (unless ``config.inference_mode``). Nothing changes if a target matches nothing."""
    tuner_for(config)
    refuse_adapted(model, "get_peft_model")
    wrapped = PeftKernModel(model)
    wrapped._inject(config, adapter_name)
    freeze_base(wrapped)
    wrapped.set_adapter(adapter_name)
    return wrapped


def freeze_base(wrapped: PeftKernModel) -> None:
    for p in wrapped.model.parameters():
        p.requires_grad_(False)


__all__ = ["PeftKernModel", "get_peft_model", "freeze_base", "refuse_adapted", "carries_adapters"]
