"""The shared base of every method: :class:`Tuner`, one subclass per method in ``tuners/<method>/``.

A tuner is stateless: it knows how its method finds its targets, builds or extends its layers,
names its tensors in PEFT's files, and what (if anything) it does around the model's forward. The
model wrapper (``tuners/model.py``), the injection journal and the file code call these hooks and
stay the same for every method; a new method is a new folder with a config, a layer and a Tuner
subclass, registered with one line in ``tuners/methods.py``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from peftkern.nn.lora import is_conv1d
from peftkern.tuners.config import ALL_LINEAR, PeftConfig
from peftkern.tuners.layers import adapter_stack, is_adapter_layer, is_linear_like, layer_adapters, plain_base
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper
from peftkern.tuners.targeting import Target, find_modules_to_save, find_targets, resolve_target_modules

PEFT_PREFIX = "base_model.model."
CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_HEADS = ("classifier", "score")


@dataclass
class Slot:
    """One tensor of an adapter file: the live tensor it corresponds to (its shape is what a file
    must have), and how to read it for saving / write a loaded value (default: the tensor itself)."""
    target: torch.Tensor
    get: Callable[[], torch.Tensor] | None = None
    put: Callable[[torch.Tensor], None] | None = None

    def read(self) -> torch.Tensor:
        return self.get() if self.get is not None else self.target

    def write(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            if self.put is not None:
                self.put(value)
            else:
                self.target.copy_(value)


@dataclass
class Injection:
    """What an injection changed, so that :meth:`undo` can restore the model exactly."""
    model: nn.Module
    adapter_name: str
    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)  # (parent, attr, original)
    extended: list[nn.Module] = field(default_factory=list)  # layers / wrappers that gained the adapter
    requires_grad: dict[int, bool] = field(default_factory=dict)
    undo_steps: list[Callable[[], None]] = field(default_factory=list)  # model-level additions (soft prompts)

    def undo(self) -> None:
        for step in reversed(self.undo_steps):
            step()
        for layer in self.extended:
            if isinstance(layer, ModulesToSaveWrapper):
                layer.delete(self.adapter_name)
            elif self.adapter_name in layer_adapters(layer):
                layer.delete_adapter(self.adapter_name)
        for parent, attr, original in reversed(self.replaced):
            setattr(parent, attr, original)
        for p in self.model.parameters():
            if id(p) in self.requires_grad:
                p.requires_grad_(self.requires_grad[id(p)])


def parent_and_attr(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def adapter_stacks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(path, stack outermost first) of every adapted module; the path is the adapted module's own
    name in the plain model."""
    found, inner = [], set()
    for path, module in model.named_modules():
        if is_adapter_layer(module) and id(module) not in inner:
            stack = adapter_stack(module)
            inner.update(id(m) for m in stack)
            found.append((path, stack))
    return found


def wrappers(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def check_adapter_name(adapter_name) -> None:
    """A name safe as a folder name and a state-dict key part (issue: names with path separators
    made ``save_pretrained`` write outside its folder)."""
    bad = ("/", "\\", ".")
    if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in bad) \
            or adapter_name.strip() != adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty string without '/', '\\\\', '.', surrounding spaces, "
                         f"and not the reserved '__base__'; got {adapter_name!r}")


class Tuner:
    """Base of every method's tuner. Subclasses set ``peft_type``, ``config_class``,
    ``layer_kind`` (for messages) and implement :meth:`make_layer`; the other hooks have the
    defaults most layer-based methods want."""

    peft_type: str = ""
    config_class: type[PeftConfig] = PeftConfig
    layer_kind = "nn.Linear and transformers Conv1D"
    default_targets: dict = {}
    file_prefix = PEFT_PREFIX  # before every file key (PEFT's soft prompts: none)
    changes_inputs = False  # whether before_forward rewrites the inputs (then generate() runs it on each step)

    # -- config -------------------------------------------------------------------------------
    def prepare_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """A copy of ``config`` as it will be stored: classification heads added to modules_to_save
        (as PEFT does), target_modules None / "all-linear" resolved to the list they mean."""
        config = config.replace()
        if config.task_type in CLASSIFIER_TASKS and hasattr(config, "modules_to_save"):
            saved = list(config.modules_to_save or [])
            config.modules_to_save = saved + [n for n in CLASSIFIER_HEADS if n not in saved]
        targets = getattr(config, "target_modules", "")
        if targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
            config.target_modules = sorted(resolve_target_modules(model, config, self.default_targets))
        return config

    def check_new_adapter(self, wrapped, config: PeftConfig, adapter_name: str) -> None:
        """Refuse a combination the method cannot hold (e.g. two trainable AdaLoRA adapters)."""

    # -- targets and layers -------------------------------------------------------------------
    def accepts(self, module: nn.Module) -> bool:
        return is_linear_like(module)

    def find_targets(self, model: nn.Module, config: PeftConfig) -> list[Target]:
        found = find_targets(model, config, self.accepts, self.layer_kind, self.default_targets)
        return [Target(name, module, self.target_options(config, name)) for name, module in found]

    def target_options(self, config: PeftConfig, name: str) -> dict:
        return {}

    def own_layer(self, module: nn.Module) -> nn.Module | None:
        """This method's layer in the stack at ``module`` (to add a further adapter to), if any."""
        if not is_adapter_layer(module):
            return None
        return next((m for m in adapter_stack(module) if getattr(m, "peft_type", None) == self.peft_type), None)

    def layer_for(self, target: Target, adapter_name: str, new_layer: Callable[[nn.Module], nn.Module]):
        """(layer, module to place at the target): this method's layer already in the stack at the
        target (refusing a name it holds), or ``new_layer(target.module)`` wrapping what is there."""
        existing = self.own_layer(target.module)
        if existing is None:
            layer = new_layer(target.module)
            return layer, layer
        if adapter_name in layer_adapters(existing):
            raise ValueError(f"adapter {adapter_name!r} already exists on {target.name!r}")
        return existing, target.module

    def make_layer(self, target: Target, adapter_name: str, config: PeftConfig) -> nn.Module:
        """The module that should sit at ``target.name`` carrying ``adapter_name`` (inactive, frozen):
        the existing stack with the adapter added to this method's layer in it, or a new layer of
        this method wrapping whatever is there now."""
        raise NotImplementedError

    def align_fan_in_fan_out(self, config: PeftConfig, targets: list[Target]) -> None:
        """Mirror PEFT: set ``config.fan_in_fan_out`` to the targets' weight layout (Conv1D: True), with a warning."""
        if not hasattr(config, "fan_in_fan_out"):
            return
        bases = [plain_base(t.module) for t in targets]
        if any(is_conv1d(b) for b in bases) and not config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is False but the targets are transformers Conv1D (weight stored [in, out]); "
                          "setting fan_in_fan_out=True as PEFT does", stacklevel=5)
            config.fan_in_fan_out = True
        elif bases and not any(is_conv1d(b) for b in bases) and config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is True but the targets store their weight [out, in]; setting "
                          "fan_in_fan_out=False as PEFT does", stacklevel=5)
            config.fan_in_fan_out = False

    def inject(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> Injection:
        """Put adapter ``adapter_name`` on every target (inactive) and wrap ``modules_to_save``.
        Targets are all found and checked before the first change; on any error the model is put back."""
        targets = self.find_targets(model, config)
        save_paths = find_modules_to_save(model, config)
        self.align_fan_in_fan_out(config, targets)
        journal = Injection(model, adapter_name, requires_grad={id(p): p.requires_grad for p in model.parameters()})
        try:
            for target in targets:
                layer = self.make_layer(target, adapter_name, config)
                if layer is target.module:
                    journal.extended.append(self.own_layer(layer))
                else:
                    parent, attr = parent_and_attr(model, target.name)
                    setattr(parent, attr, layer)
                    journal.replaced.append((parent, attr, target.module))
            for path in save_paths:
                module = model.get_submodule(path)
                if isinstance(module, ModulesToSaveWrapper):
                    module.add(adapter_name)
                    journal.extended.append(module)
                else:
                    parent, attr = parent_and_attr(model, path)
                    setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
                    journal.replaced.append((parent, attr, module))
        except BaseException:
            journal.undo()
            raise
        return journal

    # -- training -------------------------------------------------------------------------------
    def extra_trainable(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> list[nn.Parameter]:
        """Parameters outside the adapter layers that train with this adapter (LoRA: biases)."""
        return []

    # -- files ------------------------------------------------------------------------------------
    def layer_slots(self, layer: nn.Module, path: str, adapter_name: str, config: PeftConfig) -> dict[str, Slot]:
        """The file tensors of one adapter on one of this method's layers, under PEFT's keys
        (``<path>.<table>[.<key in the entry>]``, adapter name dropped, no prefix)."""
        slots = {}
        for table in layer.adapter_layer_names:
            entries = getattr(layer, table, None)
            if not isinstance(entries, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in entries:
                continue
            entry = entries[adapter_name]
            if isinstance(entry, nn.Module):
                for key, tensor in entry.state_dict(keep_vars=True).items():
                    slots[self.checkpoint_key(f"{path}.{table}.{key}")] = Slot(tensor)
            else:
                slots[self.checkpoint_key(f"{path}.{table}")] = Slot(entry)
        return slots

    def checkpoint_key(self, key: str) -> str:
        return key

    def extra_slots(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> dict[str, Slot]:
        """File tensors outside this method's layers and modules_to_save (LoRA: saved biases)."""
        return {}

    def config_to_save(self, wrapped, config: PeftConfig, adapter_name: str) -> PeftConfig:
        return config.replace(inference_mode=True)

    def before_load(self, wrapped, config: PeftConfig, adapter_name: str, tensors: dict) -> None:
        """Shape the new adapter's layers for the file's tensors (AdaLoRA: ranks after allocation)."""

    # -- around the forward (model-level methods: soft prompts, regularizers) ---------------------
    def before_forward(self, wrapped, adapter_name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def after_forward(self, wrapped, adapter_name: str, outputs):
        return outputs

    def virtual_positions(self, config: PeftConfig) -> int:
        """Positions ``before_forward`` puts before the input (prompt tuning: its virtual tokens), which
        the model's hidden states and logits then start with."""
        return 0

    def remove_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Take out what this adapter added outside layers and wrappers (delete_adapter, unload)."""

    # -- merging ----------------------------------------------------------------------------------
    def check_mergeable(self, wrapped, adapter_name: str) -> None:
        """Raise when this adapter cannot be folded into weights (soft prompts), before anything changes."""

    def merge_layer(self, layer: nn.Module, names: list[str], safe_merge: bool) -> None:
        layer.merge([n for n in names if n in layer_adapters(layer)], safe_merge=safe_merge)
