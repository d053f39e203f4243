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
