"""Forward hooks that read or change one module's input or output, always removed on exit.

Module outputs may be a tensor or a tuple whose first element is the hidden states (decoder blocks
and attention modules of some transformers versions); both are handled.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value,) + tuple(output[1:])
    if isinstance(output, list):
        return [value] + list(output[1:])
    return value


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str], what: str = "output"):
    """Within the block, ``store[name]`` is the latest input[0] (``what="input"``) or output (first
    element of a tuple) of each named module."""
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, output):
            store[name] = args[0] if what == "input" else _first(output)
        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook_for(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, module ``name``'s output (its first element) is replaced by ``fn(output)``."""
    def hook(module, args, output):
        return _replace_first(output, fn(_first(output)))

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def edit_input(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, module ``name``'s first input is replaced by ``fn(input)``."""
    def hook(module, args):
        return (fn(args[0]),) + tuple(args[1:])

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def low_rank_updates(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within the block, each named linear behaves as if its weight had ``B @ A`` added ([out, r] @ [r, in]):
    the output gains ``(x A^T) B^T``. The weights themselves are not touched."""
    stack = contextlib.ExitStack()
    with stack:
        for name, (a, b) in factors.items():
            def hook(module, args, output, a=a, b=b):
                x = args[0]
                extra = (x.to(a.dtype) @ a.t()) @ b.t()
                return _replace_first(output, _first(output) + extra.to(_first(output).dtype))
            handle = model.get_submodule(name).register_forward_hook(hook)
            stack.callback(handle.remove)
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Within the block the model is in eval mode (dropout off); its modes are put back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
