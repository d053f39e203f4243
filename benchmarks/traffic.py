"""Counted bytes and FLOPs per kernel launch, and the roofline that turns them into modeled GPU time.

Two counters fill one :class:`Count` (a list of :class:`Launch`, in launch order):

* eager torch (:class:`EagerCounter`, a ``TorchDispatchMode``): every aten op that launches a kernel
  counts the bytes of its tensor inputs and outputs (each tensor's footprint: broadcast dimensions
  count once) and its FLOPs from ``torch.utils.flop_counter``'s formulas. Views and bare
  allocations launch nothing and count nothing. Run it on ``meta`` tensors to count GPU-scale shapes
  without computing them. peftkern's own registered ops are opened up, so the aten ops and Triton
  launches inside them are counted one by one.
* Triton (:class:`TritonMeter`): kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` set
  before peftkern is imported) with ``create_masked_load``, ``create_masked_store``,
  ``create_atomic_rmw`` and ``create_dot`` metered: only elements whose mask is true count. Per
  launch it keeps the **distinct** bytes read and written (each element once, however many programs
  touch it: the compulsory DRAM traffic when re-reads hit L2, as the eager count assumes for every
  aten op) and the **raw** masked requests (no cache at all, an upper bound). ``tl.dot`` counts
  2*m*n*k FLOPs for the whole tile, masked lanes included, as the tensor cores compute them.

The roofline: time of a launch = max(bytes / bandwidth, FLOPs / peak) + a fixed launch cost; the
modeled time of a sequence is the sum over its launches. Every figure from here is *modeled*.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# counts and the roofline
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Roofline:
    """A GPU as three numbers: DRAM bandwidth (bytes/s), dense peak (FLOP/s), cost of a launch (s)."""

    name: str
    bandwidth: float
    peak_flops: float
    launch_s: float

    def describe(self) -> str:
        return (f"modeled {self.name}: per launch max(bytes / {self.bandwidth / 1e12:.2f} TB/s, "
                f"FLOPs / {self.peak_flops / 1e12:.0f} TFLOP/s) + {self.launch_s * 1e6:.0f} us")


H100_SXM = Roofline("H100 SXM (bf16 dense)", bandwidth=3.35e12, peak_flops=989e12, launch_s=4e-6)

_FIELDS = ("read", "written", "raw_read", "raw_written", "flops")


@dataclasses.dataclass
class Launch:
    """One kernel launch: an aten op (``source="aten"``) or a Triton grid (``source="triton"``).

    ``read`` / ``written`` are distinct bytes; ``raw_read`` / ``raw_written`` every masked request
    (equal to the distinct figures for aten ops).
    """

    name: str
    source: str
    read: float = 0.0
    written: float = 0.0
    raw_read: float = 0.0
    raw_written: float = 0.0
    flops: float = 0.0

    @property
    def bytes(self) -> float:
        return self.read + self.written

    @property
    def raw_bytes(self) -> float:
        return self.raw_read + self.raw_written

    def time(self, roofline: Roofline = H100_SXM, raw: bool = False) -> float:
        moved = self.raw_bytes if raw else self.bytes
        return max(moved / roofline.bandwidth, self.flops / roofline.peak_flops) + roofline.launch_s


@dataclasses.dataclass
class Count:
    """Launches in order, with totals and modeled time."""

    launches: list = dataclasses.field(default_factory=list)

    @property
    def bytes(self) -> float:
        return sum(launch.bytes for launch in self.launches)

    @property
    def raw_bytes(self) -> float:
        return sum(launch.raw_bytes for launch in self.launches)

    @property
    def flops(self) -> float:
        return sum(launch.flops for launch in self.launches)

    def time(self, roofline: Roofline = H100_SXM, raw: bool = False) -> float:
        """Modeled seconds: the sum over launches of each launch's roofline time."""
        return sum(launch.time(roofline, raw) for launch in self.launches)

    def summary(self) -> list[dict]:
        return [{"name": launch.name, "source": launch.source, **{f: getattr(launch, f) for f in _FIELDS}}
                for launch in self.launches]


def modeled_time(count: Count, roofline: Roofline = H100_SXM, raw: bool = False) -> float:
    return count.time(roofline, raw)


def extrapolate(small: Count, large: Count, m_small: float, m_large: float, m_target: float) -> Count:
    """Each launch's counts as an affine function of M (tokens), fitted through two counts of the
    same launch sequence at ``m_small`` and ``m_large`` and evaluated at ``m_target``.

    Exact when every count is affine in M, as it is for kernels tiled along M when both M are
    multiples of every BLOCK_M (whole tiles only) and for aten ops on [M, ...] tensors.
    """
    if len(small.launches) != len(large.launches):
        raise ValueError(f"cannot extrapolate: {len(small.launches)} launches at M={m_small} but "
                         f"{len(large.launches)} at M={m_large}")
    if m_large == m_small:
        raise ValueError("extrapolate needs two different M")
    t = (m_target - m_small) / (m_large - m_small)
    out = Count()
    for a, b in zip(small.launches, large.launches):
        if a.name != b.name:
            raise ValueError(f"launch sequences differ: {a.name} at M={m_small} vs {b.name} at M={m_large}")
        fields = {f: max(0.0, getattr(a, f) + t * (getattr(b, f) - getattr(a, f))) for f in _FIELDS}
        out.launches.append(Launch(a.name, a.source, **fields))
    return out


def extrapolate_grid(counts: dict, target: tuple) -> Count:
    """Multilinear extrapolation of launch counts over several sizes at once (e.g. (M, K, N)).

    ``counts`` maps each corner of a box, a tuple with one of two values per dimension, to the
    :class:`Count` of the same launch sequence there. Every count of a tiled kernel is affine in each
    size separately (bytes like M*K + N*K, raw re-reads like (M / BLOCK_M) * N * K, FLOPs M*N*K) when
    every size is a multiple of its tiles, so the multilinear fit through the corners is exact.
    """
    dims = len(target)
    values = [sorted({corner[d] for corner in counts}) for d in range(dims)]
    if any(len(v) != 2 for v in values) or len(counts) != 2 ** dims:
        raise ValueError(f"extrapolate_grid needs the {2 ** dims} corners of a box, got {sorted(counts)}")
    corners = list(counts.items())
    lengths = {len(c.launches) for _, c in corners}
    if len(lengths) != 1:
        raise ValueError(f"launch sequences differ in length across the corners: {sorted(lengths)}")
    weights = []
    for corner, _ in corners:
        w = 1.0
        for d in range(dims):
            lo, hi = values[d]
            other = hi if corner[d] == lo else lo
            w *= (target[d] - other) / (corner[d] - other)
        weights.append(w)
    out = Count()
    for i, first in enumerate(corners[0][1].launches):
        names = {c.launches[i].name for _, c in corners}
        if len(names) != 1:
            raise ValueError(f"launch {i} differs across the corners: {sorted(names)}")
        fields = {f: max(0.0, sum(w * getattr(c.launches[i], f) for w, (_, c) in zip(weights, corners)))
                  for f in _FIELDS}
        out.launches.append(Launch(first.name, first.source, **fields))
    return out


# ---------------------------------------------------------------------------------------------
# eager torch: a TorchDispatchMode over aten ops
# ---------------------------------------------------------------------------------------------

# Ops that only allocate or re-describe memory: no kernel, no bytes.
_FREE = {
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
    aten._unsafe_view, aten.alias, aten.detach, aten.lift_fresh, aten.set_, aten.resize_,
    aten._local_scalar_dense,
}


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing ``t``: broadcast (stride-0) dimensions count once."""
    if t.numel() == 0:
        return 0
    elems = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elems * t.element_size()


def _custom_op_impl(func):
    """The Python implementation behind a peftkern ``torch.library.custom_op``, or None."""
    if getattr(func, "namespace", None) != "peftkern":
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func.name().split(".")[0])
    return getattr(opdef, "_init_fn", None)


class OpenCustomOps(TorchDispatchMode):
    """Base for dispatch modes that must see inside peftkern's registered ops: such an op runs its
    Python implementation with this mode pushed again, so its inner aten ops come through here."""

    def handle(self, func, args, kwargs, out):  # pragma: no cover - overridden
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _custom_op_impl(func)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        self.handle(func, args, kwargs, out)
        return out


class EagerCounter(OpenCustomOps):
    """Appends one :class:`Launch` per kernel-launching aten op to ``count``."""

    def __init__(self, count: Count):
        super().__init__()
        self.count = count
        self.paused = 0

    def handle(self, func, args, kwargs, out):
        if self.paused or func.overloadpacket in _FREE:
            return
        ins = [t for t in tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
               if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not func._schema.is_mutable and _all_alias(outs, ins):
            return  # a view, or an op like `to` / `contiguous` that handed back its input
        read = sum(footprint(t) for t in {id(t): t for t in ins}.values())
        written = sum(footprint(t) for t in {id(t): t for t in outs}.values())
        flops = _flops(func, args, kwargs, out)
        self.count.launches.append(Launch(str(func.overloadpacket).replace("aten.", ""), "aten",
                                          read, written, read, written, flops))


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _all_alias(outs, ins) -> bool:
    inputs = {_storage_id(t) for t in ins}
    return all(_storage_id(t) in inputs for t in outs)


def _flops(func, args, kwargs, out) -> float:
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func.overloadpacket)
    return float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0


@contextlib.contextmanager
def gpu_dropout():
    """On a GPU, ``F.dropout`` in training is one fused ``native_dropout`` kernel (output and a bool
    mask); on meta and CPU tensors torch decomposes it into bernoulli_, div_ and mul. Route it to
    ``native_dropout`` so the count is the GPU's sequence."""
    import torch.nn.functional as F

    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return torch.native_dropout(input, p, True)[0]

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


def count_eager(fn: Callable[[], object]) -> Count:
    """Counts of every aten op ``fn()`` runs (forward and the backward it triggers), launch by launch."""
    count = Count()
    with gpu_dropout(), EagerCounter(count):
        fn()
    return count


# ---------------------------------------------------------------------------------------------
# Triton: the interpreter's memory ops and tl.dot, metered
# ---------------------------------------------------------------------------------------------

class _LaunchMeter:
    """Distinct-element bitmaps per (buffer, element size, direction) and raw byte sums of one launch."""

    def __init__(self, name: str):
        self.name = name
        self.buffers: list[tuple[int, int]] = []  # (base address, nbytes), sorted by base
        self.bitmaps: dict[tuple[int, int, str], np.ndarray] = {}
        self.stray: dict[str, set] = {"r": set(), "w": set()}
        self.raw = {"r": 0, "w": 0}
        self.flops = 0.0

    def set_buffers(self, tensors):
        spans = {}
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes():
                spans[storage.data_ptr()] = storage.nbytes()
        self.buffers = sorted(spans.items())
        self._bases = np.array([b for b, _ in self.buffers], dtype=np.uint64)

    def mark(self, addresses: np.ndarray, elsize: int, direction: str):
        addresses = addresses.reshape(-1).astype(np.uint64, copy=False)
        if addresses.size == 0:
            return
        self.raw[direction] += addresses.size * elsize
        which = np.searchsorted(self._bases, addresses, side="right").astype(np.int64) - 1 \
            if self.buffers else np.full(addresses.shape, -1)
        for index in np.unique(which):
            picked = addresses[which == index] if len(self.buffers) > 1 else addresses
            if index < 0 or picked.max() >= self.buffers[index][0] + self.buffers[index][1]:
                self.stray[direction].update(picked.tolist())
                continue
            base, nbytes = self.buffers[index]
            key = (index, elsize, direction)
            if key not in self.bitmaps:
                self.bitmaps[key] = np.zeros(nbytes // elsize + 1, dtype=bool)
            self.bitmaps[key][(picked - np.uint64(base)) // np.uint64(elsize)] = True

    def launch(self) -> Launch:
        distinct = {"r": 0, "w": 0}
        for (_, elsize, direction), bitmap in self.bitmaps.items():
            distinct[direction] += int(np.count_nonzero(bitmap)) * elsize
        for direction, addresses in self.stray.items():
            distinct[direction] += len(addresses)  # unknown element size: counted per byte address
        return Launch(self.name, "triton", distinct["r"], distinct["w"], self.raw["r"], self.raw["w"], self.flops)


class TritonMeter:
    """While active, every Triton launch run by the interpreter appends a :class:`Launch` to ``count``.

    ``skip_math=True`` replaces ``tl.dot`` by its accumulator (FLOPs still counted): the counts only
    depend on indices and masks, never on values, and the interpreter then runs GEMM-sized kernels
    in seconds. Outputs are garbage in that mode; the kernels here have no data-dependent control flow.
    """

    def __init__(self, count: Count, skip_math: bool = True, eager: EagerCounter | None = None):
        self.count = count
        self.skip_math = skip_math
        self.eager = eager
        self.current: _LaunchMeter | None = None
        self._saved = []

    def __enter__(self):
        from triton.runtime import interpreter as interp

        if not interpreting():
            raise RuntimeError("TritonMeter needs Triton's interpreter: set TRITON_INTERPRET=1 before importing "
                               "peftkern (or triton)")
        builder, executor = interp.InterpreterBuilder, interp.GridExecutor
        meter = self

        def elsize(ptrs):
            return ptrs.get_element_ty().primitive_bitwidth // 8

        def masked_load(b, ptrs, mask, other, cache_policy, is_volatile):
            meter._mark(ptrs.data[mask.data.astype(bool)], elsize(ptrs), "r")
            return orig["create_masked_load"](b, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(b, ptrs, value, mask, cache_policy):
            meter._mark(ptrs.data[mask.data.astype(bool)], elsize(ptrs), "w")
            return orig["create_masked_store"](b, ptrs, value, mask, cache_policy)

        def atomic_rmw(b, rmw_op, ptr, val, mask, sem, scope):
            picked = ptr.data[np.broadcast_to(mask.data.astype(bool), ptr.data.shape)]
            meter._mark(picked, elsize(ptr), "r")
            meter._mark(picked, elsize(ptr), "w")
            return orig["create_atomic_rmw"](b, rmw_op, ptr, val, mask, sem, scope)

        def dot(b, a, bb, d, input_precision, max_num_imprecise_acc):
            m, k = a.data.shape[-2:]
            n = bb.data.shape[-1]
            batch = math.prod(a.data.shape[:-2])
            if meter.current is not None:
                meter.current.flops += 2.0 * batch * m * n * k
            if meter.skip_math:
                return interp.TensorHandle(d.data.copy(), d.dtype.scalar)
            return orig["create_dot"](b, a, bb, d, input_precision, max_num_imprecise_acc)

        def init_args(ex, args_dev, kwargs):
            args_hst, kwargs_hst = orig["_init_args_hst"](ex, args_dev, kwargs)
            if meter.current is not None:
                flat = tree_flatten((args_hst, kwargs_hst))[0]
                meter.current.set_buffers([t for t in flat if isinstance(t, torch.Tensor)])
            return args_hst, kwargs_hst

        def call(ex, *args, **kwargs):
            meter.current = _LaunchMeter(ex.fn.__name__)
            if meter.eager is not None:
                meter.eager.paused += 1  # the interpreter's own host copies are not the kernel's traffic
            try:
                return orig["__call__"](ex, *args, **kwargs)
            finally:
                if meter.eager is not None:
                    meter.eager.paused -= 1
                meter.count.launches.append(meter.current.launch())
                meter.current = None

        orig = {}
        for cls, name, new in ((builder, "create_masked_load", masked_load), (builder, "create_masked_store", masked_store),
                               (builder, "create_atomic_rmw", atomic_rmw), (builder, "create_dot", dot),
                               (executor, "_init_args_hst", init_args), (executor, "__call__", call)):
            orig[name] = getattr(cls, name)
            self._saved.append((cls, name, orig[name]))
            setattr(cls, name, new)
        return self

    def __exit__(self, *exc):
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()
        return False

    def _mark(self, addresses, elsize, direction):
        if self.current is not None:
            self.current.mark(addresses, elsize, direction)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (the only place they can be counted)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def count_triton(fn: Callable[[], object], skip_math: bool = True) -> Count:
    """Counts of ``fn()``: each Triton launch (interpreter, metered) and each aten op around them
    (allocations that write, casts, reductions in the launchers), in launch order."""
    count = Count()
    eager = EagerCounter(count)
    with TritonMeter(count, skip_math=skip_math, eager=eager), eager:
        fn()
    return count
