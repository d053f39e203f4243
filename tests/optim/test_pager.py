"""optim.pager: ordinary memory without CUDA (said once); managed memory on a GPU (gpu-marked)."""
import warnings

import pytest
import torch

from peftkern.optim import PagedAdamW, pager


def test_cpu_fallback_says_so_once_and_allocates_ordinary_zeros():
    p = pager.Pager(enabled=True, owner="Test")
    with pytest.warns(RuntimeWarning, match="Test: paged=True but the parameters are on 'cpu'") as record:
        a = p.zeros(10, torch.float32, torch.device("cpu"))
        b = p.zeros(1 << 20, torch.uint8, torch.device("cpu"))
    assert len(record) == 1
    assert a.device.type == "cpu" and torch.equal(a, torch.zeros(10)) and b.dtype == torch.uint8
    assert not p.is_paged(b) and p.paged_tensors() == []
    p.prefetch()  # nothing paged: a no-op without CUDA


def test_disabled_pager_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = pager.Pager(enabled=False).zeros(5, torch.float32, "cpu")
    assert torch.equal(t, torch.zeros(5))


def test_no_managed_bytes_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only state")
    assert pager.managed_bytes(0) == 0


@pytest.mark.gpu
def test_managed_state_is_paged_prefetched_and_freed():
    device = torch.device("cuda", torch.cuda.current_device())
    if pager.managed_memory_supported(device.index) is not None:
        pytest.skip(pager.managed_memory_supported(device.index))
    p = pager.Pager(enabled=True)
    before = pager.managed_bytes(device.index)
    t = p.zeros(1 << 20, torch.float32, device)
    assert t.device == device and t.is_cuda and p.is_paged(t) and torch.count_nonzero(t) == 0
    assert pager.managed_bytes(device.index) == before + (4 << 20)
    p.prefetch()
    t.add_(1.0)
    torch.cuda.synchronize()
    assert t.sum().item() == float(1 << 20)
    small = p.zeros(16, torch.float32, device)
    assert not p.is_paged(small)  # below MIN_PAGED_BYTES
    del t
    import gc

    gc.collect()
    assert pager.managed_bytes(device.index) == before


@pytest.mark.gpu
def test_managed_memory_never_exceeds_the_card():
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    with pytest.raises(pager.ManagedMemoryError, match="more than the card's"):
        pager.Pager(enabled=True).zeros(total // 4 + (1 << 20), torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_paged_optimizer_on_gpu_matches_unpaged(bits):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    paged = PagedAdamW(params, optim_bits=bits, paged=True)
    plain = PagedAdamW(copies, optim_bits=bits, paged=False)
    for _ in range(3):
        for a, b in zip(params, copies):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        paged.step()
        plain.step()
    assert any(paged._pager.is_paged(t) for s in paged.state.values() for t in s.values() if t.is_cuda)
    for a, b in zip(params, copies):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_under_pressure_states_are_advised_to_host_and_still_work(monkeypatch):
    device = torch.device("cuda", torch.cuda.current_device())
    if pager.managed_memory_supported(device.index) is not None:
        pytest.skip(pager.managed_memory_supported(device.index))
    p = pager.Pager(enabled=True)
    t = p.zeros(1 << 20, torch.float32, device)
    total = torch.cuda.get_device_properties(device).total_memory
    monkeypatch.setattr(pager, "PREFETCH_HEADROOM_BYTES", 2 * total)  # no room: pressure
    p.prefetch()
    assert p._prefer_host
    t.add_(2.0)
    torch.cuda.synchronize()
    assert t.sum().item() == 2.0 * (1 << 20)
    monkeypatch.setattr(pager, "PREFETCH_HEADROOM_BYTES", 0)  # room again: back to the device
    p.prefetch()
    assert not p._prefer_host
    t.add_(1.0)
    assert t.sum().item() == 3.0 * (1 << 20)


# -- mocked CUDA driver answers (tests/fake_cuda.py): paging falls back, never fails ---------------

from tests.fake_cuda import FakeCudaRuntime, FakeTorchCuda  # noqa: E402


@pytest.fixture
def fake_driver(monkeypatch):
    """Patch the pager onto a fake runtime and a fake 2-GPU torch.cuda; ordinary 'cuda' states are
    allocated on the host here."""
    def install(**kwargs):
        rt = FakeCudaRuntime(**kwargs)
        torch_cuda = FakeTorchCuda(monkeypatch, count=2)
        monkeypatch.setattr(pager, "_runtime", lambda: rt)
        monkeypatch.setattr(pager, "_bindings_major", lambda: 12)
        real_zeros = torch.zeros
        monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
        pager._managed_support.cache_clear()
        return rt, torch_cuda

    yield install
    pager._managed_support.cache_clear()


def test_insufficient_driver_gives_ordinary_states_with_one_warning(fake_driver, monkeypatch):
    rt, _ = fake_driver(query_error="cudaErrorInsufficientDriver")
    monkeypatch.setattr(pager._cuda, "bindings_major", lambda: 13)
    monkeypatch.setattr(pager._cuda, "torch_cuda_major", lambda: 12)
    p = pager.Pager(enabled=True, owner="PagedAdamW")
    with pytest.warns(RuntimeWarning) as record:
        states = [p.zeros(1 << 20, torch.float32, torch.device("cuda", 0)) for _ in range(4)]
    assert len(record) == 1
    message = str(record[0].message)
    assert "cudaErrorInsufficientDriver" in message and "ordinary memory" in message
    assert "'cuda-python>=12.0,<13'" in message  # the fix, named
    assert p.paged_tensors() == [] and all(torch.count_nonzero(s) == 0 for s in states)
    p.prefetch()  # nothing paged: nothing to steer, nothing raised


def test_no_concurrent_managed_access_is_a_reason(fake_driver):
    fake_driver(concurrent=False)
    assert "concurrent managed access" in pager.managed_memory_supported(0)


def test_missing_bindings_are_a_reason(monkeypatch):
    def broken():
        raise ImportError("No module named 'cuda.bindings'")

    monkeypatch.setattr(pager, "_runtime", broken)
    assert "not usable" in pager.managed_memory_supported(0)


def test_a_refused_managed_allocation_falls_back_once(fake_driver, monkeypatch):
    fake_driver()

    def refuse(self, numel, dtype, index):
        raise pager.ManagedMemoryError("cudaMallocManaged failed: cudaErrorMemoryAllocation: out of memory")

    monkeypatch.setattr(pager.Pager, "_managed_zeros", refuse)
    p = pager.Pager(enabled=True)
    with pytest.warns(RuntimeWarning, match="cudaErrorMemoryAllocation") as record:
        p.zeros(1 << 20, torch.float32, torch.device("cuda", 0))
        p.zeros(1 << 20, torch.float32, torch.device("cuda", 1))
    assert len(record) == 1 and p.paged_tensors() == []


def _fake_paged(p: pager.Pager, nbytes: int, index: int) -> torch.Tensor:
    t = torch.zeros(nbytes // 4, dtype=torch.float32)
    p._paged.append((pager.weakref.ref(t), index))
    return t


@pytest.mark.parametrize("cached_free, expect", [(0, "host"), (3 << 30, "device")])
def test_torch_cached_free_memory_counts_as_room(fake_driver, monkeypatch, cached_free, expect):
    """1 GiB of states, 0.5 GiB free by cudaMemGetInfo: under pressure, unless torch's caching
    allocator holds reserved-but-unused blocks, which are free for the states too."""
    rt, torch_cuda = fake_driver(free=512 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: (4 << 30))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: (4 << 30) - cached_free)
    p = pager.Pager(enabled=True)
    t = _fake_paged(p, 1 << 30, index=1)
    p.prefetch()
    kinds = [c[0] for c in rt.calls]
    if expect == "device":
        assert ("prefetch", 1) in rt.calls and "advise" not in kinds and p._resident
    else:
        assert ("advise", "SetPreferredLocation", -1) in rt.calls and "prefetch" not in kinds and p._prefer_host
    assert torch_cuda.entered == [1] and torch_cuda.current == 0
    del t


def test_has_room_arithmetic():
    gib = 1 << 30
    assert not pager.has_room(free_bytes=gib // 2, cached_free_bytes=0, state_bytes=gib, resident=False, headroom=0)
    assert pager.has_room(gib // 2, gib // 2, gib, resident=False, headroom=0)
    assert pager.has_room(0, 0, gib, resident=True, headroom=0)  # already there: keeps its own space
    assert not pager.has_room(gib, 0, gib, resident=False, headroom=1)


def test_a_failed_prefetch_turns_steering_off_with_one_warning(fake_driver, monkeypatch):
    rt, _ = fake_driver(prefetch_error="cudaErrorInvalidDevice")
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index=None: 0)
    p = pager.Pager(enabled=True)
    t = _fake_paged(p, 1 << 20, index=0)
    with pytest.warns(RuntimeWarning, match="cudaErrorInvalidDevice") as record:
        p.prefetch()
        p.prefetch()
    assert len(record) == 1 and not p._steering
    del t
