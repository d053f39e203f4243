"""ModulesToSaveWrapper: a module trained in full, one copy per adapter, laid out as PEFT lays it
out (``original_module`` plus ``modules_to_save.<adapter>``) so state-dict keys match PEFT's."""
from __future__ import annotations

import copy

from torch import nn

from peftkern.nn.mixed_batch import current_rows


class ModulesToSaveWrapper(nn.Module):
    """Runs the active adapter's copy of the module, or the frozen original when no adapter of this
    wrapper is active or adapters are disabled. Attribute reads fall through to the module that runs
    (so ``lm_head.weight`` still works for code that reads it)."""

    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        module.requires_grad_(False)
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        """A trainable copy of the original for ``adapter_name`` (not made active)."""
        if adapter_name not in self.modules_to_save:
            clone = copy.deepcopy(self.original_module)
            clone.requires_grad_(False)
            self.modules_to_save[adapter_name] = clone

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """Make the one of ``adapter_names`` this wrapper holds active (at most one may be), or none."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"modules_to_save can have one active adapter at a time, got {held}")
        for module in self.modules_to_save.values():
            module.requires_grad_(False)
        self.active_adapter = held[0] if held else None
        if self.active_adapter is not None and trainable:
            self.modules_to_save[self.active_adapter].requires_grad_(True)

    def delete(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def running_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        rows = current_rows()
        if rows is not None and not self.disable_adapters and args:
            return self._forward_by_rows(rows, *args, **kwargs)
        return self.running_module()(*args, **kwargs)

    def _forward_by_rows(self, rows, x, *args, **kwargs):
        """Row i through the copy of adapter ``rows.names[i]`` (the original for names this wrapper
        does not hold, and for "__base__"), as PEFT's mixed batches."""
        if x.shape[0] != len(rows.names):
            raise ValueError(f"adapter_names has {len(rows.names)} entries but the input has {x.shape[0]} rows")
        out = None
        for name in rows.groups:
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            idx = rows.index(name, x.device)
            y = module(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.running_module(), name)
