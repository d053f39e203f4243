"""benchmarks/traffic.py on cases counted by hand: eager aten ops on meta tensors, Triton kernels under
the interpreter (masked loads/stores/atomics, distinct vs raw, tl.dot FLOPs), roofline, extrapolation."""
import itertools

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import traffic
from benchmarks.traffic import Count, Launch

F32 = 4


def test_eager_mm_counts_inputs_outputs_and_flops():
    x = torch.empty(8, 4, device="meta")
    w = torch.empty(6, 4, device="meta")
    count = traffic.count_eager(lambda: x @ w.t())
    assert [launch.name for launch in count.launches] == ["mm"]  # the transpose is a view: free
    mm = count.launches[0]
    assert (mm.read, mm.written, mm.flops) == ((8 * 4 + 6 * 4) * F32, 8 * 6 * F32, 2 * 8 * 6 * 4)
    assert (mm.raw_read, mm.raw_written) == (mm.read, mm.written)


def test_eager_views_and_noop_casts_are_free_inplace_reads_and_writes():
    x = torch.empty(5, 7, device="meta")
    y = torch.empty(5, 7, device="meta")
    count = traffic.count_eager(lambda: (x.t(), x.view(-1), x.to(torch.float32), x.contiguous(), x.add_(y)))
    assert [launch.name for launch in count.launches] == ["add_"]
    assert (count.launches[0].read, count.launches[0].written) == (2 * 35 * F32, 35 * F32)


def test_eager_broadcast_input_counts_its_footprint_once():
    x = torch.empty(16, 32, device="meta")
    b = torch.empty(32, device="meta")
    count = traffic.count_eager(lambda: x + b)
    assert count.launches[0].read == (16 * 32 + 32) * F32
    assert count.launches[0].written == 16 * 32 * F32


def test_eager_dropout_counts_the_gpu_fused_kernel():
    x = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    count = traffic.count_eager(lambda: torch.nn.functional.dropout(x, 0.1, True))
    assert [launch.name for launch in count.launches] == ["native_dropout"]
    # reads x (bf16), writes the output (bf16) and the keep mask (bool)
    assert (count.launches[0].read, count.launches[0].written) == (64 * 32 * 2, 64 * 32 * 2 + 64 * 32)


def test_eager_backward_is_counted():
    x = torch.empty(8, 4, device="meta", requires_grad=True)
    w = torch.empty(6, 4, device="meta")
    dy = torch.empty(8, 6, device="meta")
    count = traffic.count_eager(lambda: (x @ w.t()).backward(dy))
    assert [launch.name for launch in count.launches] == ["mm", "mm"]
    assert count.launches[1].read == (8 * 6 + 6 * 4) * F32  # dx = dy W
    assert count.launches[1].written == 8 * 4 * F32


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _reread_kernel(src, dst, n, BLOCK: tl.constexpr):
    """Every program reads the same n elements; program i writes dst[i]."""
    offs = tl.arange(0, BLOCK)
    total = tl.sum(tl.load(src + offs, mask=offs < n, other=0.0), axis=0)
    tl.store(dst + tl.program_id(0), total)


@triton.jit
def _dot_atomic_kernel(a, b, acc, BLOCK: tl.constexpr):
    """acc[BLOCK, BLOCK] += a @ b, every program adding into the same tile."""
    r = tl.arange(0, BLOCK)
    tile_a = tl.load(a + r[:, None] * BLOCK + r[None, :])
    tile_b = tl.load(b + r[:, None] * BLOCK + r[None, :])
    tl.atomic_add(acc + r[:, None] * BLOCK + r[None, :], tl.dot(tile_a, tile_b))


def _meter(fn, skip_math=True):
    count = Count()
    with traffic.TritonMeter(count, skip_math=skip_math):
        fn()
    return count


def test_triton_masked_elements_only():
    src, dst = torch.randn(13), torch.empty(13)
    count = _meter(lambda: _copy_kernel[(2,)](src, dst, 13, BLOCK=8), skip_math=False)
    (launch,) = count.launches
    assert launch.name == "_copy_kernel" and launch.source == "triton"
    assert (launch.read, launch.written, launch.raw_read, launch.raw_written) == (13 * F32,) * 4
    assert torch.equal(dst, src)  # metering does not change what the kernel does


def test_triton_distinct_vs_raw_rereads():
    src, dst = torch.randn(5), torch.empty(3)
    (launch,) = _meter(lambda: _reread_kernel[(3,)](src, dst, 5, BLOCK=8)).launches
    assert launch.read == 5 * F32  # each element once
    assert launch.raw_read == 3 * 5 * F32  # every program's request
    assert launch.written == launch.raw_written == 3 * F32


def test_triton_dot_flops_and_atomics():
    a, b, acc = torch.randn(16, 16), torch.randn(16, 16), torch.zeros(16, 16)
    (launch,) = _meter(lambda: _dot_atomic_kernel[(2,)](a, b, acc, BLOCK=16), skip_math=False).launches
    assert launch.flops == 2 * (2 * 16 ** 3)
    tile = 16 * 16 * F32
    # a and b read by both programs; acc read-modify-written by both
    assert launch.read == 3 * tile and launch.raw_read == 2 * 3 * tile
    assert launch.written == tile and launch.raw_written == 2 * tile
    torch.testing.assert_close(acc, 2 * (a @ b), rtol=1e-5, atol=1e-5)


def test_roofline_per_launch():
    roof = traffic.H100_SXM
    memory_bound = Launch("copy", "aten", read=1.675e12, written=1.675e12, raw_read=1.675e12, raw_written=1.675e12)
    compute_bound = Launch("mm", "aten", read=1.0, written=1.0, raw_read=1.0, raw_written=1.0, flops=989e12)
    assert memory_bound.time(roof) == pytest.approx(1.0 + 4e-6)
    assert compute_bound.time(roof) == pytest.approx(1.0 + 4e-6)
    assert Count([memory_bound, compute_bound]).time(roof) == pytest.approx(2.0 + 8e-6)
    raw_heavy = Launch("k", "triton", read=0.0, written=0.0, raw_read=3.35e12, raw_written=0.0)
    assert raw_heavy.time(roof) == pytest.approx(4e-6)
    assert raw_heavy.time(roof, raw=True) == pytest.approx(1.0 + 4e-6)


def test_extrapolate_affine_in_m():
    def count(m):
        return Count([Launch("k", "triton", read=100 + 8 * m, written=4 * m, raw_read=200 + 8 * m,
                             raw_written=4 * m, flops=10 * m)])

    out = traffic.extrapolate(count(128), count(256), 128, 256, 16384)
    assert out.launches[0].read == 100 + 8 * 16384 and out.launches[0].flops == 10 * 16384
    with pytest.raises(ValueError, match="launches"):
        traffic.extrapolate(count(128), Count(), 128, 256, 512)


@triton.jit
def _tiled_gemm_kernel(x, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """y = x w^T, one [BM, BN] tile per program: every count multilinear in (M, K, N)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    rows = (pid // tiles_n) * BM + tl.arange(0, BM)
    cols = (pid % tiles_n) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(w + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
    tl.store(y + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def _gemm_count(m, k, n):
    x, w, y = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
    grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
    return traffic.count_triton(lambda: _tiled_gemm_kernel[grid](x, w, y, m, n, k, BM=16, BN=16, BK=16))


def test_extrapolate_grid_matches_a_direct_count():
    corners = {c: _gemm_count(*c) for c in itertools.product((16, 32), repeat=3)}
    target = (48, 64, 80)
    direct = _gemm_count(*target)
    guessed = traffic.extrapolate_grid(corners, target)
    for a, b in zip(direct.launches, guessed.launches):
        for field in ("read", "written", "raw_read", "raw_written", "flops"):
            assert getattr(b, field) == pytest.approx(getattr(a, field)), field
    m, k, n = target
    launch = direct.launches[0]
    assert launch.read == (m * k + n * k) * F32 and launch.written == m * n * F32
    assert launch.raw_read == ((n // 16) * m * k + (m // 16) * n * k) * F32
    assert launch.flops == 2 * m * n * k


def test_count_triton_sees_aten_ops_around_launches_but_not_interpreter_copies():
    src = torch.randn(40)

    def fn():
        dst = torch.zeros(40)
        _copy_kernel[(5,)](src, dst, 40, BLOCK=8)
        return dst.sum()

    count = traffic.count_triton(fn)
    assert [launch.name for launch in count.launches] == ["zeros", "_copy_kernel", "sum"]
    assert count.launches[0].written == 40 * F32
