"""Optimizer states in CUDA unified (managed) memory, allocated and steered through cuda-python.

A paged state lives in ``cudaMallocManaged`` memory wrapped as an ordinary CUDA torch tensor, so
the step kernels read it like any other. Before each step :meth:`Pager.prefetch` looks at the free
device memory: with room, it prefetches every paged state to the GPU on torch's current stream
(``cudaMemPrefetchAsync``), so the step runs at device bandwidth; under pressure it advises the
driver to keep the states in host memory (``cudaMemAdviseSetPreferredLocation`` = host, plus
``SetAccessedBy`` = the GPU so kernels read them over the bus instead of faulting pages back and
forth), leaving the device memory to activations. Managed memory is never requested beyond the
card's total memory.

"Room" counts what torch's caching allocator holds but does not use as free: ``cudaMemGetInfo``
sees those cached blocks as taken, and judging by it alone would advise the states to host memory
on every step of a run that merely warmed up the allocator.

Paging is an optimisation, never a reason to fail: without CUDA (or on CPU parameters), when the
capability query fails (cuda-python for a newer CUDA than the driver runs answers every call with
``cudaErrorInsufficientDriver``), when the GPU lacks concurrent managed access, or when a managed
allocation is refused, the states stay in ordinary memory and the pager says why, once. A failed
prefetch or advice later on turns steering off (the states stay managed and migrate on demand),
also said once. Nothing here touches CUDA at import.
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref

import torch

from peftkern import _cuda

# States smaller than this stay in ordinary memory: managed allocations move in pages of
# 64 KiB..2 MiB, so paging a small tensor saves nothing and costs a driver call.
MIN_PAGED_BYTES = 1 << 20
# Device memory kept free when deciding to prefetch, for the step's own temporaries.
PREFETCH_HEADROOM_BYTES = 256 << 20

_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.float16: "<f2", torch.int32: "<i4", torch.int16: "<i2"}
# dtypes the array interface cannot name: allocated as an integer of the same size, then viewed
_STORAGE_DTYPE = {torch.bfloat16: torch.int16}

_managed_lock = threading.Lock()
_managed_bytes: dict[int, int] = {}  # device index -> managed bytes alive, over every pager


class ManagedMemoryError(MemoryError):
    """A CUDA call about managed memory failed (the message holds CUDA's error name and text)."""


class ManagedMemoryLimitError(ManagedMemoryError):
    """Paging the request would bring managed memory past the card's total memory."""


def _runtime():
    from cuda.bindings import runtime

    return runtime


def _call(result, what: str):
    """Unpack a cuda-python ``(error, *values)`` result, raising with CUDA's message on failure."""
    rt = _runtime()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        _, message = rt.cudaGetErrorString(err)
        text = message.decode() if isinstance(message, bytes) else str(message)
        raise ManagedMemoryError(f"{what} failed: {err.name}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _bindings_major() -> int:
    import cuda.bindings

    return int(str(cuda.bindings.__version__).split(".")[0])


def _location(device_index: int | None):
    """A ``cudaMemLocation`` for the device, or for the host when ``device_index`` is None (cuda-python 13)."""
    rt = _runtime()
    loc = rt.cudaMemLocation()
    if device_index is None:
        loc.type = rt.cudaMemLocationType.cudaMemLocationTypeHost
        loc.id = 0
    else:
        loc.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = device_index
    return loc


def _where(device_index: int | None):
    """Destination argument of prefetch/advise: a location (cuda-python >= 13) or a device id (12)."""
    if _bindings_major() >= 13:
        return _location(device_index)
    return _runtime().cudaCpuDeviceId if device_index is None else device_index


class _ManagedBuffer:
    """One ``cudaMallocManaged`` allocation, exposed through ``__cuda_array_interface__``; freed (and
    its bytes returned to the per-device count) when the last tensor viewing it dies."""

    def __init__(self, numel: int, dtype: torch.dtype, device_index: int):
        rt = _runtime()
        self.nbytes = max(1, numel) * torch.empty(0, dtype=dtype).element_size()
        self.numel = numel
        self.dtype = dtype
        self.device_index = device_index
        self.ptr = int(_call(rt.cudaMallocManaged(self.nbytes, rt.cudaMemAttachGlobal), "cudaMallocManaged"))
        weakref.finalize(self, _free_managed, self.ptr, self.nbytes, device_index)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.numel,), "typestr": _TYPESTR[self.dtype], "data": (self.ptr, False), "version": 3,
                "strides": None}


def _free_managed(ptr: int, nbytes: int, device_index: int) -> None:
    try:
        _runtime().cudaFree(ptr)
    finally:
        with _managed_lock:
            _managed_bytes[device_index] = _managed_bytes.get(device_index, 0) - nbytes


def managed_bytes(device_index: int) -> int:
    """Managed bytes alive on ``device_index`` across every pager of this process."""
    with _managed_lock:
        return _managed_bytes.get(device_index, 0)


def managed_memory_supported(device_index: int) -> str | None:
    """None if ``device_index`` can allocate, prefetch and advise managed memory, else why not.

    Never raises: a query that fails (no cuda-python, a driver older than cuda-python's CUDA) is
    itself the reason, with the cuda-python / torch CUDA mismatch named when there is one.
    """
    try:
        rt = _runtime()
    except Exception as exc:  # ImportError, or bindings that cannot load the driver library
        return f"cuda-python's runtime bindings are not usable ({type(exc).__name__}: {exc})"
    try:
        managed = _call(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrManagedMemory, device_index),
                        "cudaDeviceGetAttribute(ManagedMemory)")
        concurrent = _call(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrConcurrentManagedAccess,
                                                     device_index), "cudaDeviceGetAttribute(ConcurrentManagedAccess)")
    except Exception as exc:
        return _cuda.with_version_hint(f"the managed-memory capability query failed ({exc})")
    if not managed:
        return f"cuda:{device_index} cannot allocate managed memory"
    if not concurrent:
        return (f"cuda:{device_index} has no concurrent managed access (Windows, WSL or an old GPU), so managed "
                "states could be neither prefetched nor advised")
    return None


def torch_cached_free_bytes(device_index: int) -> int:
    """Bytes torch's caching allocator reserves on the device but holds no tensor in: free for us,
    although ``cudaMemGetInfo`` counts them as used."""
    return max(0, torch.cuda.memory_reserved(device_index) - torch.cuda.memory_allocated(device_index))


def has_room(free_bytes: int, cached_free_bytes: int, state_bytes: int, resident: bool,
             headroom: int | None = None) -> bool:
    """Whether ``state_bytes`` of paged states fit on the device beside what is in use.

    ``free_bytes`` is ``cudaMemGetInfo``'s free memory and ``cached_free_bytes`` torch's
    reserved-but-unused memory (free for the states too); states already ``resident`` on the
    device occupy space they can keep using."""
    headroom = PREFETCH_HEADROOM_BYTES if headroom is None else headroom
    available = free_bytes + cached_free_bytes + (state_bytes if resident else 0)
    return available >= state_bytes + headroom


@functools.lru_cache(maxsize=None)
def _managed_support(device_index: int) -> str | None:
    return managed_memory_supported(device_index)


class Pager:
    """Allocates an optimizer's state tensors and steers the paged ones before each step.

    ``enabled=False`` allocates everything with ``torch.zeros``. Tensors are always 1-D of the
    requested element count; the caller reshapes them.
    """

    def __init__(self, enabled: bool, owner: str = "PagedAdamW"):
        self.enabled = bool(enabled)
        self.owner = owner
        self._said_fallback = False
        self._refused: str | None = None  # why managed allocations stopped (one was refused)
        self._steering = True  # False once a prefetch or an advice failed
        self._paged: list[tuple[weakref.ref, int]] = []  # (tensor, device index)
        self._prefer_host = False
        self._resident = False

    # -- allocation -----------------------------------------------------------------------------

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed 1-D state tensor on ``device``: managed memory when paging applies, else ordinary."""
        device = torch.device(device)
        if not self.enabled:
            return torch.zeros(numel, dtype=dtype, device=device)
        reason = self._why_not_paged(device)
        if reason is not None:
            self._fallback_once(reason)
            return torch.zeros(numel, dtype=dtype, device=device)
        if numel * torch.empty(0, dtype=dtype).element_size() < MIN_PAGED_BYTES:
            return torch.zeros(numel, dtype=dtype, device=device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            tensor = self._managed_zeros(numel, dtype, index)
        except ManagedMemoryLimitError:
            raise
        except Exception as exc:  # the driver refused: ordinary memory from now on, said once
            self._refused = f"a managed allocation failed ({type(exc).__name__}: {exc})"
            self._fallback_once(self._refused)
            return torch.zeros(numel, dtype=dtype, device=device)
        self._paged.append((weakref.ref(tensor), index))
        return tensor

    def is_paged(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (or a view of it) lives in this pager's managed memory."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(t.untyped_storage().data_ptr() == ptr for t in self.paged_tensors())

    def _why_not_paged(self, device: torch.device) -> str | None:
        if self._refused is not None:
            return self._refused
        if device.type != "cuda":
            return f"the parameters are on {device.type!r}, not on a CUDA device"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return _managed_support(device.index if device.index is not None else torch.cuda.current_device())

    def _fallback_once(self, reason: str) -> None:
        if not self._said_fallback:
            warnings.warn(f"{self.owner}: paged=True but {reason}; optimizer states stay in ordinary memory",
                          RuntimeWarning, stacklevel=4)
            self._said_fallback = True

    def _managed_zeros(self, numel: int, dtype: torch.dtype, index: int) -> torch.Tensor:
        rt = _runtime()
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        with torch.cuda.device(index):
            _free, total = _call(rt.cudaMemGetInfo(), "cudaMemGetInfo")
            with _managed_lock:
                alive = _managed_bytes.get(index, 0)
                if alive + nbytes > total:
                    raise ManagedMemoryLimitError(
                        f"{self.owner}: paging {nbytes / 2**30:.2f} GiB of optimizer state on cuda:{index} would "
                        f"bring managed memory to {(alive + nbytes) / 2**30:.2f} GiB, more than the card's "
                        f"{total / 2**30:.2f} GiB; use optim_bits=8 or fewer trainable parameters")
                _managed_bytes[index] = alive + nbytes
            try:
                buffer = _ManagedBuffer(numel, _STORAGE_DTYPE.get(dtype, dtype), index)
            except BaseException:
                with _managed_lock:
                    _managed_bytes[index] -= nbytes
                raise
            tensor = torch.as_tensor(buffer, device=torch.device("cuda", index)).view(dtype)
            tensor.zero_()
        return tensor

    # -- steering -------------------------------------------------------------------------------

    def paged_tensors(self) -> list[torch.Tensor]:
        return [t for t, _ in self._paged_by_device()]

    def _paged_by_device(self) -> list[tuple[torch.Tensor, int]]:
        alive = [(t, index) for t, index in ((ref(), index) for ref, index in self._paged) if t is not None]
        self._paged = [(weakref.ref(t), index) for t, index in alive]
        return alive

    def prefetch(self) -> None:
        """Before a step: bring every paged state to its GPU if it fits beside what is in use
        (torch's cached free blocks count as free), else advise the driver to keep them in host
        memory (read over the bus, never thrashed). A CUDA failure here turns steering off with
        one warning; the states stay usable where they are."""
        paged = self._paged_by_device()
        if not paged or not self._steering:
            return
        by_device: dict[int, list[torch.Tensor]] = {}
        for t, index in paged:
            by_device.setdefault(index, []).append(t)
        try:
            rt = _runtime()
            for index, group in by_device.items():
                with torch.cuda.device(index):
                    free, _total = _call(rt.cudaMemGetInfo(), "cudaMemGetInfo")
                    state_bytes = sum(t.numel() * t.element_size() for t in group)
                    if has_room(free, torch_cached_free_bytes(index), state_bytes, self._resident):
                        self._to_device(rt, index, group)
                    else:
                        self._prefer_host_memory(rt, index, group)
        except Exception as exc:
            self._steering = False
            warnings.warn(f"{self.owner}: steering the paged optimizer states failed ({type(exc).__name__}: {exc}); "
                          "they stay in managed memory and migrate on demand", RuntimeWarning, stacklevel=3)

    def _to_device(self, rt, index: int, group: list[torch.Tensor]) -> None:
        stream = rt.cudaStream_t(torch.cuda.current_stream(index).cuda_stream)
        for t in group:
            nbytes = t.numel() * t.element_size()
            if self._prefer_host:
                _call(rt.cudaMemAdvise(t.data_ptr(), nbytes,
                                       rt.cudaMemoryAdvise.cudaMemAdviseUnsetPreferredLocation, _where(None)),
                      "cudaMemAdvise(UnsetPreferredLocation)")
            if _bindings_major() >= 13:
                _call(rt.cudaMemPrefetchAsync(t.data_ptr(), nbytes, _where(index), 0, stream), "cudaMemPrefetchAsync")
            else:
                _call(rt.cudaMemPrefetchAsync(t.data_ptr(), nbytes, _where(index), stream), "cudaMemPrefetchAsync")
        self._prefer_host = False
        self._resident = True

    def _prefer_host_memory(self, rt, index: int, group: list[torch.Tensor]) -> None:
        if self._prefer_host:
            return
        for t in group:
            nbytes = t.numel() * t.element_size()
            _call(rt.cudaMemAdvise(t.data_ptr(), nbytes, rt.cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation,
                                   _where(None)), "cudaMemAdvise(SetPreferredLocation=host)")
            _call(rt.cudaMemAdvise(t.data_ptr(), nbytes, rt.cudaMemoryAdvise.cudaMemAdviseSetAccessedBy,
                                   _where(index)), "cudaMemAdvise(SetAccessedBy=device)")
        self._prefer_host = True
        self._resident = False
