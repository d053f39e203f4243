"""Which modules an adapter config targets, by PEFT's matching rules (read-only: nothing here
changes the model).

* list target: a module matches when its full name equals an entry or ends with ``"." + entry``;
  ``layers_to_transform`` then keeps only modules whose layer index (the first ``<name>.<int>.`` in
  the path, or after ``layers_pattern``) is listed.
* string target: ``re.fullmatch`` against the full name; ``"all-linear"`` expands to every linear
  module but the output head.
* modules named by ``modules_to_save`` are never LoRA targets; ``exclude_modules`` removes others.
* rank_pattern / alpha_pattern keys match as ``(.*\\.)?(key)$`` against the full name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from peftkern.nn.lora import LoRALinear, is_conv1d
from peftkern.tuners.config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig
from peftkern.tuners.modules_to_save import ModulesToSaveWrapper


@dataclass
class Target:
    """One module an adapter goes onto: its dotted path, the module there now, and its r and alpha."""
    name: str
    module: nn.Module
    r: int
    lora_alpha: float


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, GPT-2 Conv1D, a peftkern LoRA layer (adding another adapter), or any module that
    declares in_features/out_features and holds a weight (e.g. a quantized linear)."""
    if isinstance(module, ModulesToSaveWrapper):
        return False
    if isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d(module):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")
            and not isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)))


def adapter_owned(model: nn.Module) -> set[str]:
    """Names of modules that live inside a LoRA layer or a modules_to_save wrapper (never targets)."""
    owned = set()
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)) or hasattr(module, "lora_A"):
            owned.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return owned


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that is not part of an adapter, in model order."""
    owned = adapter_owned(model)
    return [(n, m) for n, m in model.named_modules() if n and n not in owned]


def output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head or getattr(module, "base_layer", None) is head \
                or getattr(module, "original_module", None) is head:
            return name
    return None


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """config.target_modules with None (PEFT's per-model default) and "all-linear" expanded."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"LoraConfig.target_modules is None and peftkern knows no default for model type "
                             f"{model_type!r}; pass target_modules (e.g. {linear_leaf_names(model)})")
        return list(DEFAULT_TARGETS[model_type])
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


def _in_modules_to_save(config: LoraConfig, key: str) -> bool:
    return bool(config.modules_to_save) and any(
        re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save)


def _excluded(config: LoraConfig, key: str) -> bool:
    ex = config.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return key in ex or any(key.endswith(f".{e}") for e in ex)


def matched_entry(config: LoraConfig, targets: list[str] | str, key: str) -> str | None:
    """The target entry (or the regex) that selects module ``key``, else None."""
    if _excluded(config, key) or _in_modules_to_save(config, key):
        return None
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, key) else None
    if key in targets:
        return key
    entry = next((t for t in targets if key.endswith(f".{t}")), None)
    if entry is None:
        return None
    layers = config.layers_to_transform
    if layers is not None and (not isinstance(layers, list) or layers):
        index = _layer_index(key, config.layers_pattern)
        if index is None or (index != layers if isinstance(layers, int) else index not in layers):
            return None
    return entry


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def find_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """Every module ``config`` puts an adapter on. Raises ValueError, before anything changes, when a
    target entry matches nothing (naming the linear modules that exist) or matches a module type
    LoRA cannot wrap."""
    targets = resolve_target_modules(model, config)
    found: list[Target] = []
    used: set[str] = set()
    for key, module in candidate_modules(model):
        entry = matched_entry(config, targets, key)
        if entry is None:
            continue
        if not is_linear_like(module):
            raise ValueError(f"target module {key!r} is a {type(module).__name__}; peftkern LoRA wraps nn.Linear "
                             f"and transformers Conv1D only (linear modules here: {linear_leaf_names(model)})")
        used.add(entry)
        found.append(Target(key, module, pattern_value(config.rank_pattern, key, config.r),
                            pattern_value(config.alpha_pattern, key, config.lora_alpha)))
    missing = [targets] if isinstance(targets, str) and not found else \
        ([] if isinstance(targets, str) else [t for t in targets if t not in used])
    if missing:
        raise ValueError(f"LoraConfig.target_modules: {missing} matched no module of {type(model).__name__} "
                         f"(after layers_to_transform / exclude_modules / modules_to_save); linear modules "
                         f"here: {linear_leaf_names(model)}")
    return found


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names (PEFT: the path ends with the name).
    As in PEFT, names that match nothing are skipped (a classification config lists both
    "classifier" and "score"), but a list of which none matches is an error naming the modules."""
    if not config.modules_to_save:
        return []
    owned = adapter_owned(model)
    paths, used = [], set()
    for key, _ in model.named_modules():
        if not key or key in owned:
            continue
        hit = next((m for m in config.modules_to_save if key.endswith(m)), None)
        if hit is not None:
            paths.append(key)
            used.add(hit)
    missing = [m for m in config.modules_to_save if m not in used]
    if not used:
        names = sorted({k.rsplit(".", 1)[-1] for k, _ in model.named_modules() if k and k not in owned})
        raise ValueError(f"LoraConfig.modules_to_save: {missing} matched no module; modules here: {names}")
    # a wrapped module's own children would match too (e.g. "lm_head" then nothing below it); keep outermost
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]
