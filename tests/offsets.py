"""The largest offset a Triton kernel addresses at a given (huge) shape, without the memory: a static
check of int32 overflow in address arithmetic (issue 25, item 4), for any op's kernels.

``kernel_offsets(kernel, args, programs)`` runs only the listed program ids of one launch in Triton's
interpreter (``TRITON_INTERPRET=1``, as the tests run) with every pointer argument replaced by a
:class:`Buffer` (a dtype and a shape, no storage) at its own far-apart fake address. Loads return
zeros, stores and atomics go nowhere, and every address the programs form is recorded; the
hand-off blocks of ``peftkern.ops._lowrank`` (publish, wait, last arrival) are replaced so every
path runs. The result maps each pointer argument to the (smallest, largest) element offset used:
an offset formed in int32 that wrapped shows as a negative one, or as one past the buffer's end
(:func:`check_offsets`).

Use: pick the documented maximum shapes (docs/kernels.md), build the launch's arguments with
Buffers of those shapes, run the first and last programs (the last row and column tiles reach the
largest offsets) and assert :func:`check_offsets` is empty.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

_REGION = 1 << 44  # bytes between two buffers' fake base addresses: far beyond any shape checked


class Buffer:
    """Stands for a tensor argument: dtype, shape (row-major strides), a fake address; no storage."""

    def __init__(self, dtype: torch.dtype, *shape: int):
        self.dtype, self.shape = dtype, tuple(shape)
        self.base = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def stride(self, dim: int | None = None):
        strides, acc = [], 1
        for size in reversed(self.shape):
            strides.append(acc)
            acc *= size
        strides = tuple(reversed(strides))
        return strides if dim is None else strides[dim]

    def data_ptr(self) -> int:
        return self.base


@contextlib.contextmanager
def _offline_interpreter(record):
    from triton.runtime import interpreter as interp

    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def zeros_like(ptrs):
        dtype_tt = ptrs.get_element_ty()
        return interp.TensorHandle(np.zeros(ptrs.data.shape, dtype=interp._get_np_dtype(dtype_tt)), dtype_tt)

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        record(ptrs, mask)
        return zeros_like(ptrs)

    def masked_store(self, ptrs, value, mask, cache_policy):
        record(ptrs, mask)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        record(ptr, mask)
        return interp.TensorHandle(np.zeros(ptr.data.shape, dtype=interp._get_np_dtype(val.dtype.scalar)),
                                   val.dtype.scalar)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        record(ptr, None)
        return interp.TensorHandle(np.zeros(ptr.data.shape, dtype=interp._get_np_dtype(cmp.dtype.scalar)),
                                   cmp.dtype.scalar)

    def dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        return interp.TensorHandle(acc.data.copy(), acc.dtype.scalar)  # addresses only: no math

    patch(builder, "create_dot", dot)
    patch(builder, "create_masked_load", masked_load)
    patch(builder, "create_masked_store", masked_store)
    patch(builder, "create_atomic_rmw", atomic_rmw)
    patch(builder, "create_atomic_cas", atomic_cas)
    patch(executor, "_init_args_hst", lambda self, args, kwargs: (list(args), dict(kwargs)))
    patch(executor, "_restore_args_dev", lambda self, *a: None)
    try:
        from peftkern.ops import _lowrank
    except ImportError:  # a checkout from before the shared core
        _lowrank = None
    if _lowrank is not None:
        patch(_lowrank, "publish", lambda *a: None)
        patch(_lowrank, "wait_published", lambda *a: None)
        patch(_lowrank, "last_arrival", lambda *a: True)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def kernel_offsets(kernel, args: dict, programs, grid_size: int) -> dict[str, tuple[int, int]]:
    """{pointer argument: (smallest, largest) element offset addressed} by ``programs`` (ids along
    axis 0) of the launch ``kernel[(grid_size,)](**args)``. ``args`` holds every argument by name
    (Buffers for tensors; constexprs and launch options such as num_warps are dropped)."""
    from triton.runtime import interpreter as interp

    buffers = {name: a for name, a in args.items() if isinstance(a, Buffer)}
    for i, buf in enumerate(buffers.values()):
        buf.base = (i + 1) * _REGION
    seen: dict[str, list] = {name: [None, None] for name in buffers}
    by_base = sorted((b.base, name) for name, b in buffers.items())

    def record(ptrs, mask):
        addrs = ptrs.data.astype(np.uint64).reshape(-1)
        if mask is not None:
            addrs = addrs[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape).reshape(-1)]
        if addrs.size == 0:
            return
        region = (addrs // np.uint64(_REGION)).astype(np.int64)
        for index in np.unique(region):
            picked = addrs[region == index]
            if index < 1 or index > len(by_base):
                raise AssertionError(f"address outside every buffer: {hex(int(picked[0]))}")
            base, name = by_base[index - 1]
            size = buffers[name].element_size
            offsets = (picked.astype(np.int64) - base) // size
            lo, hi = int(offsets.min()), int(offsets.max())
            cur = seen[name]
            cur[0] = lo if cur[0] is None else min(cur[0], lo)
            cur[1] = hi if cur[1] is None else max(cur[1], hi)

    params = [p for p in kernel.arg_names]
    call_args = {k: v for k, v in args.items() if k in params}
    with _offline_interpreter(record):
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        runner = interp.GridExecutor(fn, kernel.arg_names, (grid_size,))
        set_idx, set_dim = interp.InterpreterBuilder.set_grid_idx, interp.InterpreterBuilder.set_grid_dim
        interp.InterpreterBuilder.set_grid_dim = lambda self, x, y, z: set_dim(self, grid_size, y, z)
        try:
            for pid in programs:
                interp.InterpreterBuilder.set_grid_idx = lambda self, x, y, z, pid=pid: set_idx(self, pid, y, z)
                _run_once(runner, call_args)
        finally:
            interp.InterpreterBuilder.set_grid_idx, interp.InterpreterBuilder.set_grid_dim = set_idx, set_dim
    return {name: tuple(v) for name, v in seen.items() if v[0] is not None}


def _run_once(runner, call_args):
    """One pass of the executor over a grid of one program (whose id the patched set_grid_idx sets)."""
    saved_grid = runner.grid
    runner.grid = (1,)
    try:
        runner(**call_args)
    finally:
        runner.grid = saved_grid


def check_offsets(offsets: dict[str, tuple[int, int]], args: dict) -> list[str]:
    """The buffers addressed below element 0 or past their last element, as messages."""
    bad = []
    for name, (lo, hi) in offsets.items():
        extent = args[name].numel
        if lo < 0 or hi >= extent:
            bad.append(f"{name}: offsets {lo}..{hi} outside 0..{extent - 1} (shape {args[name].shape})")
    return bad
