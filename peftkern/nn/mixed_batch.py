"""Mixed-adapter batches: every row of a batch runs its own adapter (PEFT's ``adapter_names=``).

``with row_adapters(["a", "__base__", "b", "a"]):`` around a model call makes every adapter layer
run row i of its input through adapter ``names[i]`` alone ("__base__": the base layer only), as
PEFT's mixed-batch inference does. The generic path (``forward_by_rows``, any method) groups the
rows by adapter and runs the layer's ordinary (fused) forward once per group, so the base weights
are read once per group. A LoRA layer over a dense linear runs the whole batch through
``ops.multi_lora_linear`` (one pass over the base weight, each row's rank-r term from its own
adapter, forward and backward: adapters train together this way); over a quantized base it runs
the base layer once over all rows and adds each adapter's term to its own rows (``LoRALinear``).

A layer that wraps other adapter layers (methods stacked on one module) groups once for the whole
stack: inside a group the stack runs with exactly that adapter active on every layer that holds it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

BASE_ONLY = "__base__"


@dataclass
class RowAdapters:
    """The adapter of each row, and the row positions of each adapter (first-seen order)."""
    names: list[str]
    groups: dict[str, list[int]] = field(default_factory=dict)
    _index: dict = field(default_factory=dict)

    def __post_init__(self):
        for i, name in enumerate(self.names):
            self.groups.setdefault(name, []).append(i)

    def adapter_index(self, adapters: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """int64 [rows]: each row's position in ``adapters``, -1 where its name is not there (the base
        alone: "__base__" or an adapter this layer does not hold), for ``ops.multi_lora_linear``.
        Made once per call, device and adapter tuple, so layers holding the same adapters share it."""
        key = (adapters, str(device))
        if key not in self._index:
            position = {name: e for e, name in enumerate(adapters)}
            self._index[key] = torch.tensor([position.get(n, -1) for n in self.names], dtype=torch.long, device=device)
        return self._index[key]

    def rows_of(self, name: str, device: torch.device) -> slice | torch.Tensor:
        """The rows of ``name``: a slice when they are contiguous (a view, no copy), else a long
        tensor of row positions on ``device``."""
        rows = self.groups[name]
        if rows[-1] - rows[0] + 1 == len(rows):
            return slice(rows[0], rows[-1] + 1)
        return self.index(name, device)

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """Row positions of ``name`` as a long tensor on ``device`` (made once per call and device)."""
        key = (name, str(device))
        if key not in self._index:
            self._index[key] = torch.tensor(self.groups[name], dtype=torch.long, device=device)
        return self._index[key]


# The rows of the call in progress. A plain module global rather than a ContextVar: torch.compile
# reads (and guards on) globals but cannot trace ContextVar.get, and every adapter layer's forward
# asks. So one mixed-batch call at a time per process.
_ROWS: list[RowAdapters | None] = [None]


def current_rows() -> RowAdapters | None:
    """The per-row adapters of the model call in progress, or None (an ordinary call)."""
    return _ROWS[0]


@contextlib.contextmanager
def _rows_set(rows: RowAdapters | None):
    previous = _ROWS[0]
    _ROWS[0] = rows
    try:
        yield
    finally:
        _ROWS[0] = previous


@contextlib.contextmanager
def row_adapters(names):
    """Run the adapter layers called inside the block with one adapter per row of their input."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {names!r}")
    with _rows_set(RowAdapters(list(names))):
        yield


def is_adapter_layer(module: nn.Module) -> bool:
    """An adapter layer of any method: it declares its per-adapter tables and wraps a base layer."""
    return hasattr(module, "adapter_layer_names") and hasattr(module, "base_layer")


def adapter_stack(layer: nn.Module) -> list[nn.Module]:
    """``layer`` and the adapter layers it wraps (outermost first)."""
    stack = [layer]
    while is_adapter_layer(stack[-1].base_layer):
        stack.append(stack[-1].base_layer)
    return stack


def runnable_adapters(layer: nn.Module, held) -> list[str]:
    """The active adapters ``layer`` holds (``held``), or [] when its base alone gives the output:
    adapters disabled (which unmerges any merged one), merged, or none active."""
    if layer.disable_adapters:
        if layer.merged:
            layer.unmerge()
        return []
    if layer.merged:
        return []
    return [n for n in layer.active_adapters if n in held]


def forward_by_rows(layer: nn.Module, x: torch.Tensor, rows: RowAdapters, *args, **kwargs) -> torch.Tensor:
    """``layer(x)`` with row i of x run through adapter ``rows.names[i]`` only, on every layer of
    ``layer``'s stack; layers skip names they do not hold (as PEFT does)."""
    stack = adapter_stack(layer)
    check_rows(x, rows, stack)
    saved = [list(m.active_adapters) for m in stack]
    _ROWS[0] = None
    try:
        if len(rows.groups) == 1:
            _activate(stack, rows.names[0])
            return layer(x, *args, **kwargs)
        out = None
        for name in rows.groups:
            idx = rows.index(name, x.device)
            _activate(stack, name)
            y = layer(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, idx, y)
        return out
    finally:
        _ROWS[0] = rows
        for m, names in zip(stack, saved):
            m.active_adapters = names


def check_rows(x: torch.Tensor, rows: RowAdapters, stack: list[nn.Module]) -> None:
    """One name per row of ``x``, and no adapter merged anywhere in ``stack``."""
    if x.dim() == 0 or x.shape[0] != len(rows.names):
        raise ValueError(f"adapter_names has {len(rows.names)} entries but the input of this layer has "
                         f"{x.shape[0] if x.dim() else 0} rows (shape {tuple(x.shape)}); pass one name per row")
    if any(getattr(m, "merged", False) for m in stack):
        raise ValueError("cannot pass adapter_names while adapters are merged into the base weights; unmerge first")


def _activate(stack: list[nn.Module], name: str) -> None:
    for m in stack:
        m.active_adapters = [] if name == BASE_ONLY else [name]
