"""Optimizer states in CUDA unified (managed) memory, allocated and steered through cuda-python.

A paged state lives in ``cudaMallocManaged`` memory wrapped as an ordinary CUDA torch tensor, so
the step kernels read it like any other. Before each step :meth:`Pager.prefetch` looks at the free
device memory: with room, it prefetches every paged state to the GPU on torch's current stream
(``cudaMemPrefetchAsync``), so the step runs at device bandwidth; under pressure it advises the
driver to keep the states in host memory (``cudaMemAdviseSetPreferredLocation`` = host, plus
``SetAccessedBy`` = the GPU so kernels read them over the bus instead of faulting pages back and
forth), leaving the device memory to activations. Managed memory is never requested beyond the
card's total memory.

Without CUDA (or on CPU parameters) ``paged=True`` keeps the states in ordinary memory and says
so once per pager. Nothing here touches CUDA at import.
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref

import torch

# States smaller than this stay in ordinary memory: managed allocations move in pages of
# 64 KiB..2 MiB, so paging a small tensor saves nothing and costs a driver call.
MIN_PAGED_BYTES = 1 << 20
# Device memory kept free when deciding to prefetch, for the step's own temporaries.
PREFETCH_HEADROOM_BYTES = 256 << 20

_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.float16: "<f2", torch.int32: "<i4"}

_managed_lock = threading.Lock()
_managed_bytes: dict[int, int] = {}  # device index -> managed bytes alive, over every pager


class ManagedMemoryError(MemoryError):
    """Managed memory was refused: the request would pass the card's memory, or CUDA failed."""


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
    """None if ``device_index`` can allocate managed memory, else why not."""
    try:
        rt = _runtime()
    except ImportError as exc:
        return f"cuda-python is not importable ({exc})"
    supported = _call(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrManagedMemory, device_index),
                      "cudaDeviceGetAttribute(ManagedMemory)")
    return None if supported else f"cuda:{device_index} cannot allocate managed memory"


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
        self._paged: list[weakref.ref] = []
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
        tensor = self._managed_zeros(numel, dtype, device)
        self._paged.append(weakref.ref(tensor))
        return tensor

    def is_paged(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` (or a view of it) lives in this pager's managed memory."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(t.untyped_storage().data_ptr() == ptr for t in self.paged_tensors())

    def _why_not_paged(self, device: torch.device) -> str | None:
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

    def _managed_zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        rt = _runtime()
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        with torch.cuda.device(index):
            _free, total = _call(rt.cudaMemGetInfo(), "cudaMemGetInfo")
            with _managed_lock:
                alive = _managed_bytes.get(index, 0)
                if alive + nbytes > total:
                    raise ManagedMemoryError(
                        f"{self.owner}: paging {nbytes / 2**30:.2f} GiB of optimizer state on cuda:{index} would "
                        f"bring managed memory to {(alive + nbytes) / 2**30:.2f} GiB, more than the card's "
                        f"{total / 2**30:.2f} GiB; use optim_bits=8 or fewer trainable parameters")
                _managed_bytes[index] = alive + nbytes
            try:
                buffer = _ManagedBuffer(numel, dtype, index)
            except BaseException:
                with _managed_lock:
                    _managed_bytes[index] -= nbytes
                raise
            tensor = torch.as_tensor(buffer, device=torch.device("cuda", index))
            tensor.zero_()
        return tensor

    # -- steering -------------------------------------------------------------------------------

    def paged_tensors(self) -> list[torch.Tensor]:
        alive = [t for t in (ref() for ref in self._paged) if t is not None]
        self._paged = [weakref.ref(t) for t in alive]
        return alive

    def prefetch(self) -> None:
        """Before a step: bring every paged state to its GPU if it fits beside what is in use,
        else advise the driver to keep them in host memory (read over the bus, never thrashed)."""
        tensors = self.paged_tensors()
        if not tensors:
            return
        rt = _runtime()
        by_device: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device.index, []).append(t)
        for index, group in by_device.items():
            with torch.cuda.device(index):
                free, _total = _call(rt.cudaMemGetInfo(), "cudaMemGetInfo")
                state_bytes = sum(t.numel() * t.element_size() for t in group)
                # States already prefetched count as free space they can keep using.
                available = free + (state_bytes if self._resident else 0)
                if available >= state_bytes + PREFETCH_HEADROOM_BYTES:
                    self._to_device(rt, index, group)
                else:
                    self._prefer_host_memory(rt, index, group)

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
