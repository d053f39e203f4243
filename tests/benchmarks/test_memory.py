"""benchmarks/memory.py: the live-tensor tracker on hand-worked sequences and the fresh-process RSS peak."""
import torch

from benchmarks import memory

MIB = 2 ** 20


def test_live_peak_counts_new_storages_until_freed():
    def fn():
        a = torch.ones(MIB // 4)  # 1 MiB of fp32
        b = a * 2  # 2 MiB live
        del a  # 1 MiB live
        c = b + 1  # 2 MiB again
        return c.view(-1)  # a view: no new storage

    assert memory.live_peak(fn) == 2 * MIB


def test_live_peak_ignores_preexisting_tensors_and_inplace_writes():
    x = torch.ones(MIB // 4)

    def fn():
        x.mul_(2)  # writes memory that already existed
        return x.t(), x[:10]

    assert memory.live_peak(fn) == 0


def test_live_peak_sees_inside_peftkern_ops():
    import peftkern

    x = torch.randn(64, 32, requires_grad=True)
    w, a, b = torch.randn(48, 32), torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)

    def fn():
        peftkern.ops.lora_linear(x, w, None, a, b, 2.0, 0.5, training=True).sum().backward()

    # at least y [64, 48] and u [64, 4], and the dropout keep-mask drawn inside the op
    assert memory.live_peak(fn) >= (64 * 48 + 64 * 4) * 4 + 64 * 32


def build_alloc_step(mib: int):
    """Builder for the subprocess test: a step that holds ``mib`` MiB at its peak."""
    def step():
        t = torch.ones(mib * MIB // 4)
        return float(t[0])

    return step


def test_peak_rss_in_a_fresh_process():
    result = memory.peak_rss("tests.benchmarks.test_memory:build_alloc_step", {"mib": 64})
    assert 60 * MIB <= result["extra_bytes"] <= 72 * MIB, result
    assert result["method"]
