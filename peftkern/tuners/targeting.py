"""Which modules an adapter config targets, by PEFT's matching rules, for any method (read-only:
nothing here changes the model). A config is read through the PEFT field names it has
(``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform``,
``layers_pattern``); a method without one of them simply lacks that rule.

* list target: a module matches when its full name equals an entry or ends with ``"." + entry``;
  ``layers_to_transform`` then keeps only modules whose layer index (the first ``<name>.<int>.`` in
  the path, or after ``layers_pattern``) is listed.
* string target: ``re.fullmatch`` against the full name; ``"all-linear"`` expands to every linear
  module but the output head.
* modules named by ``modules_to_save`` are never targets; ``exclude_modules`` removes others.
* rank_pattern / alpha_pattern keys match as ``(.*\\.)?(key)$`` against the full name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from peftkern.nn.mixed_batch import is_adapter_layer
from peftkern.tuners.config import ALL_LINEAR
from peftkern.tuners.layers import adapter_stack, is_linear_like, plain_base
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper


@dataclass
class Target:
    """One module an adapter goes onto: its dotted path, the module there now (a plain module or a
    stack of adapter layers), and the method's settings for it (LoRA: r, lora_alpha; IA3: is_feedforward)."""
    name: str
    module: nn.Module
    options: dict = field(default_factory=dict)


def adapter_owned(model: nn.Module) -> set[str]:
    """Names of modules that live inside an adapter layer or a modules_to_save wrapper (never targets)."""
    owned = set()
    for name, module in model.named_modules():
        if is_adapter_layer(module) or isinstance(module, ModulesToSaveWrapper):
            owned.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return owned


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that is not part of an adapter, in model order; a stack of
    adapter layers counts as the module it adapts, under that module's name."""
    owned = adapter_owned(model)
    return [(n, m) for n, m in model.named_modules() if n and n not in owned]


def output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or (is_adapter_layer(module) and plain_base(module) is head) \
                or getattr(module, "original_module", None) is head:
            return name
    return None


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_target_modules(model: nn.Module, config, defaults: dict | None = None) -> list[str] | str:
    """config.target_modules with None (PEFT's per-model default from ``defaults``) and "all-linear"
    expanded."""
    targets = config.target_modules
    if targets is None:
        defaults = defaults if defaults is not None else getattr(config, "DEFAULT_TARGETS", {})
        kind = model_type(model)
        if kind not in defaults:
            raise ValueError(f"{config.field_name('target_modules')} is None and peftkern knows no default for "
                             f"model type {kind!r}; pass target_modules (e.g. {linear_leaf_names(model)})")
        return list(defaults[kind])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = output_head_name(model)
        return sorted(n for n, m in candidate_modules(model) if is_linear_like(m) and n != head)
    return targets


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The distinct last path components of the model's linear modules (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in candidate_modules(model) if is_linear_like(m)})


def _layer_index(key: str, layers_pattern) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _in_modules_to_save(config, key: str) -> bool:
    saved = getattr(config, "modules_to_save", None)
    return bool(saved) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved)


def _excluded(config, key: str) -> bool:
    ex = getattr(config, "exclude_modules", None)
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return key in ex or any(key.endswith(f".{e}") for e in ex)


def name_matches(names: list[str] | str, key: str) -> str | None:
    """The entry of ``names`` (a list of names, or a regex) that selects module ``key``, else None."""
    if isinstance(names, str):
        return names if re.fullmatch(names, key) else None
    if key in names:
        return key
    return next((t for t in names if key.endswith(f".{t}")), None)


def matched_entry(config, targets: list[str] | str, key: str) -> str | None:
    """The target entry (or the regex) that selects module ``key``, else None."""
    if _excluded(config, key) or _in_modules_to_save(config, key):
        return None
    entry = name_matches(targets, key)
    if entry is None or isinstance(targets, str):
        return entry
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(key, getattr(config, "layers_pattern", None))
        if index is None or (index != layers if isinstance(layers, int) else index not in layers):
            return None
    return entry


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def find_targets(model: nn.Module, config, accepts: Callable[[nn.Module], bool] = is_linear_like,
                 kind: str = "nn.Linear and transformers Conv1D", defaults: dict | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module ``config`` puts an adapter on. Raises ValueError, before
    anything changes, when a target entry matches nothing (naming the linear modules that exist) or
    matches a module the method cannot adapt (``accepts`` is False for it)."""
    targets = resolve_target_modules(model, config, defaults)
    found: list[tuple[str, nn.Module]] = []
    used: set[str] = set()
    for key, module in candidate_modules(model):
        entry = matched_entry(config, targets, key)
        if entry is None:
            continue
        if not accepts(module):
            raise ValueError(f"target module {key!r} is a {type(plain_base(module)).__name__}; peftkern "
                             f"{config.PEFT_TYPE} adapts {kind} only (linear modules here: {linear_leaf_names(model)})")
        used.add(entry)
        found.append((key, module))
    missing = [targets] if isinstance(targets, str) and not found else \
        ([] if isinstance(targets, str) else [t for t in targets if t not in used])
    if missing:
        raise ValueError(f"{config.field_name('target_modules')}: {missing} matched no module of "
                         f"{type(model).__name__} (after layers_to_transform / exclude_modules / modules_to_save); "
                         f"linear modules here: {linear_leaf_names(model)}")
    return found


def find_modules_to_save(model: nn.Module, config) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names (PEFT: the path ends with the name).
    As in PEFT, names that match nothing are skipped (a classification config lists both
    "classifier" and "score"), but a list of which none matches is an error naming the modules."""
    saved = getattr(config, "modules_to_save", None)
    if not saved:
        return []
    owned = adapter_owned(model)
    paths, used = [], set()
    for key, module in model.named_modules():
        if not key or key in owned:
            continue
        hit = next((m for m in saved if key.endswith(m)), None)
        if hit is not None:
            if is_adapter_layer(module):
                raise ValueError(f"{config.field_name('modules_to_save')}: {key!r} already carries adapter layers "
                                 f"({', '.join(type(m).__name__ for m in adapter_stack(module))}); a module is "
                                 "either adapted or saved in full, not both")
            paths.append(key)
            used.add(hit)
    missing = [m for m in saved if m not in used]
    if not used:
        names = sorted({k.rsplit(".", 1)[-1] for k, _ in model.named_modules() if k and k not in owned})
        raise ValueError(f"{config.field_name('modules_to_save')}: {missing} matched no module; modules here: {names}")
    # a wrapped module's own children would match too (e.g. "lm_head" then nothing below it); keep outermost
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]
