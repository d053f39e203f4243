"""No address of a LoRA, DoRA or NF4 kernel wraps at the documented maximum shapes (docs/kernels.md:
M <= 2^21 tokens, K, N <= 2^20, rank <= 1024; NF4 weights < 2^31 elements): each launch's first
and last programs (and the last row tile's producer) run in the interpreter on storage-free
buffers (tests/offsets.py), and every offset must land inside its buffer (issue 25, item 4).

Each case puts the dimension a kernel loops over at a modest size (the loop's own offsets are
column offsets, far from 2^31) and every other dimension at its maximum, so rows x stride goes
past 2^31 wherever the kernel multiplies one.
"""
import pytest
import torch

from peftkern.ops import _lowrank as lr
from peftkern.ops import dora, lora, nf4
from tests.offsets import Buffer, check_offsets, kernel_offsets

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:invalid value encountered")]

BIG_M, BIG_KN, R = 1 << 21, 1 << 20, 64
LOOP = 1024  # the looped-over dimension
T = torch.bfloat16


def _programs(tiles_r, tiles_c, group, producers=True):
    """(first program, the last row tile's producer, last program) of a producer_tile launch."""
    if not producers:
        return [0, tiles_r * tiles_c - 1], tiles_r * tiles_c
    span = group * (1 + tiles_c)
    last_group = (tiles_r - 1) // group
    size = tiles_r - last_group * group
    total = tiles_r * (1 + tiles_c)
    return [0, last_group * span + size - 1, total - 1], total


def _run(kernel, args, programs, total):
    offsets = kernel_offsets(kernel, args, programs, total)
    assert offsets, "no address recorded"
    bad = check_offsets(offsets, args)
    assert not bad, "\n".join(bad)
    return offsets


def _blocks(cfg):
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "GROUP_M"}


def test_lora_forward():
    M, K, N = BIG_M, LOOP, BIG_KN
    cfg = lr.lora_fwd_config(T)
    tiles_m, tiles_n = -(-M // cfg["BLOCK_M"]), -(-N // cfg["BLOCK_N"])
    args = dict(x_ptr=Buffer(T, M, K), w_ptr=Buffer(T, N, K), bias_ptr=Buffer(T, N), a_ptr=Buffer(T, R, K),
                b_ptr=Buffer(T, N, R), u_ptr=Buffer(T, M, R), y_ptr=Buffer(T, M, N),
                flag_ptr=Buffer(torch.int64, 1 + tiles_m), M=M, N=N, K=K, R=R, stride_xm=K, stride_xk=1,
                stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1, stride_um=R,
                stride_ur=1, stride_ym=N, stride_yn=1, scaling=2.0, p=0.1, inv_keep=1.0, HAS_DROPOUT=True,
                PRECISION="tf32", BLOCK_R=64, **_blocks(cfg))
    offsets = _run(lora._lora_fwd_kernel, args, *_programs(tiles_m, tiles_n, cfg["GROUP_M"]))
    assert offsets["y_ptr"][1] == M * N - 1 and offsets["x_ptr"][1] == M * K - 1  # the far corners reached


@pytest.mark.parametrize("compute_dx", [True, False])
def test_lora_backward(compute_dx):
    M, K, N = BIG_M, BIG_KN, LOOP
    cfg = lr.lora_bwd_config(T, 64, True, compute_dx)
    tiles_m, tiles_k = -(-M // cfg["BLOCK_M"]), -(-K // cfg["BLOCK_K"])
    work = R * K + N * R + tiles_k + -(-N // cfg["BLOCK_N"]) + tiles_m
    args = dict(dy_ptr=Buffer(T, M, N), w_ptr=Buffer(T, N, K), x_ptr=Buffer(T, M, K), a_ptr=Buffer(T, R, K),
                b_ptr=Buffer(T, N, R), u_ptr=Buffer(T, M, R), g_ptr=Buffer(T, M, R), seed_ptr=Buffer(torch.int64, 1),
                dx_ptr=Buffer(T, M, K), da_ptr=Buffer(T, R, K), db_ptr=Buffer(T, N, R),
                da_acc_ptr=Buffer(torch.float32, R, K), db_acc_ptr=Buffer(torch.float32, N, R),
                count_ptr=Buffer(torch.int32, work), flag_ptr=Buffer(torch.int32, tiles_m), M=M, N=N, K=K, R=R,
                stride_dym=N, stride_dyn=1, stride_wn=K, stride_wk=1, stride_xm=K, stride_xk=1, stride_ar=K,
                stride_ak=1, stride_bn=R, stride_br=1, stride_um=R, stride_ur=1, stride_gm=R, stride_gr=1,
                stride_dxm=K, stride_dxk=1, scaling=2.0, p=0.1, inv_keep=1.0, HAS_DROPOUT=True,
                COMPUTE_DX=compute_dx, PRECISION="tf32", BLOCK_R=64, **_blocks(cfg))
    offsets = _run(lora._lora_bwd_kernel, args, *_programs(tiles_m, tiles_k, cfg["GROUP_M"]))
    assert offsets["x_ptr"][1] == M * K - 1


def test_dora_norm_forward_and_backward():
    M, N = BIG_M, BIG_KN
    # the norm kernel loops over K: W's rows at the maximum N
    ncfg = dora._norm_config(T)
    K = LOOP
    args = dict(w_ptr=Buffer(T, N, K), a_ptr=Buffer(T, R, K), b_ptr=Buffer(T, N, R), mag_ptr=Buffer(T, N),
                scale_ptr=Buffer(torch.float32, N), N=N, K=K, R=R, stride_wn=K, stride_wk=1, stride_ar=K,
                stride_ak=1, stride_bn=R, stride_br=1, scaling=2.0, NORM_PRECISION="tf32", BLOCK_R=64,
                BLOCK_N=ncfg["BLOCK_N"], BLOCK_K=ncfg["BLOCK_K"])
    tiles = -(-N // ncfg["BLOCK_N"])
    _run(dora._dora_norm_kernel, args, [0, tiles - 1], tiles)

    cfg = lr.lora_fwd_config(T)  # DoRA forward tiles are LoRA's
    tiles_m, tiles_n = -(-M // cfg["BLOCK_M"]), -(-N // cfg["BLOCK_N"])
    args = dict(x_ptr=Buffer(T, M, K), w_ptr=Buffer(T, N, K), bias_ptr=Buffer(T, N), a_ptr=Buffer(T, R, K),
                b_ptr=Buffer(T, N, R), scale_ptr=Buffer(torch.float32, N), u_ptr=Buffer(T, M, R),
                y_ptr=Buffer(T, M, N), ynb_ptr=Buffer(T, M, N), flag_ptr=Buffer(torch.int64, 1 + tiles_m), M=M, N=N,
                K=K, R=R, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ar=K, stride_ak=1, stride_bn=R,
                stride_br=1, stride_um=R, stride_ur=1, stride_ym=N, stride_yn=1, scaling=2.0, p=0.1, inv_keep=1.0,
                HAS_BIAS=True, HAS_DROPOUT=True, PRECISION="tf32", BLOCK_R=64, **_blocks(cfg))
    _run(dora._dora_fwd_kernel, args, *_programs(tiles_m, tiles_n, cfg["GROUP_M"]))

    K, N = BIG_KN, LOOP
    cfg = dora._bwd_config(T, 64, True, True)
    tiles_m, tiles_k = -(-M // cfg["BLOCK_M"]), -(-K // cfg["BLOCK_K"])
    f32 = torch.float32
    args = dict(dy_ptr=Buffer(T, M, N), scale_ptr=Buffer(f32, N), ynb_ptr=Buffer(T, M, N), mag_ptr=Buffer(T, N),
                w_ptr=Buffer(T, N, K), x_ptr=Buffer(T, M, K), a_ptr=Buffer(T, R, K), b_ptr=Buffer(T, N, R),
                u_ptr=Buffer(T, M, R), g_ptr=Buffer(T, M, R), seed_ptr=Buffer(torch.int64, 1), dx_ptr=Buffer(T, M, K),
                da_ptr=Buffer(T, R, K), db_ptr=Buffer(T, N, R), dmag_ptr=Buffer(T, N), dbias_ptr=Buffer(T, N),
                da_acc_ptr=Buffer(f32, R, K), db_acc_ptr=Buffer(f32, N, R), dmag_acc_ptr=Buffer(f32, N),
                dbias_acc_ptr=Buffer(f32, N), count_ptr=Buffer(torch.int32, tiles_k + N), flag_ptr=Buffer(torch.int32,
                                                                                                     tiles_m),
                M=M, N=N, K=K, R=R, stride_dym=N, stride_dyn=1, stride_ym=N, stride_yn=1, stride_wn=K, stride_wk=1,
                stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_bn=R, stride_br=1, stride_um=R,
                stride_ur=1, stride_gm=R, stride_gr=1, stride_dxm=K, stride_dxk=1, scaling=2.0, p=0.1, inv_keep=1.0,
                HAS_DROPOUT=True, COMPUTE_DX=True, PRECISION="tf32", BLOCK_R=64, **_blocks(cfg))
    _run(dora._dora_bwd_kernel, args, *_programs(tiles_m, tiles_k, cfg["GROUP_M"]))


def _nf4_weight(n, k, blocksize=64):
    blocks = n * k // blocksize
    return dict(packed_ptr=Buffer(torch.uint8, n * k // 2), absmax_ptr=Buffer(torch.uint8, blocks),
                nested_ptr=Buffer(torch.float32, -(-blocks // 256)), ncode_ptr=Buffer(torch.float32, 256),
                code_ptr=Buffer(torch.float32, 16), offset=0.0, log2_bs=6, log2_nbs=8)


def test_nf4_kernels():
    M, K = BIG_M, LOOP
    N = (1 << 31) // K - 64  # NF4 weights hold < 2^31 elements (int32 code indices, checked at the boundary)
    common = dict(bias_ptr=Buffer(T, N), a_ptr=Buffer(T, R, K), b_ptr=Buffer(T, N, R), u_ptr=Buffer(T, M, R),
                  y_ptr=Buffer(T, M, N), M=M, N=N, K=K, R=R, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1,
                  stride_bn=R, stride_br=1, stride_um=R, stride_ur=1, stride_ym=N, stride_yn=1, scaling=2.0, p=0.1,
                  inv_keep=1.0, DOUBLE=True, HAS_LORA=True, HAS_DROPOUT=True, BLOCK_R=nf4.RANK_BLOCK)
    for row_blocks in (True, False):
        cfg = nf4._gemm_config(T, row_blocks)
        tiles_m, tiles_n = -(-M // cfg["BLOCK_M"]), -(-N // cfg["BLOCK_N"])
        args = dict(x_ptr=Buffer(T, M, K), **_nf4_weight(N, K), **common, flag_ptr=Buffer(torch.int64, 1 + tiles_m),
                    ROW_BLOCKS=row_blocks, PRECISION="tf32", **_blocks(cfg))
        _run(nf4._nf4_fwd_kernel, args, *_programs(tiles_m, tiles_n, cfg["GROUP_M"]))
    gemv = dict(x_ptr=Buffer(T, 8, K), **_nf4_weight(N, K), **{**common, "M": 8, "u_ptr": Buffer(T, 8, R),
                                                               "y_ptr": Buffer(T, 8, N)},
                flag_ptr=Buffer(torch.int64, 9), ROW_BLOCKS=True, **nf4._GEMV_CONFIG)
    gemv.pop("num_warps"), gemv.pop("num_stages")
    tiles_n = -(-N // gemv["BLOCK_N"])
    _run(nf4._nf4_gemv_kernel, gemv, [0, 7, 8, 8 + 8 * tiles_n - 1], 8 + 8 * tiles_n)

    M, N = BIG_M, LOOP
    K = (1 << 31) // N - 64
    cfg = nf4._dx_config(T, False, True)
    tiles_m, tiles_k = -(-M // cfg["BLOCK_M"]), -(-K // cfg["BLOCK_K"])
    args = dict(dy_ptr=Buffer(T, M, N), **_nf4_weight(N, K), x_ptr=Buffer(T, M, K), a_ptr=Buffer(T, R, K),
                b_ptr=Buffer(T, N, R), u_ptr=Buffer(T, M, R), g_ptr=Buffer(T, M, R), seed_ptr=Buffer(torch.int64, 1),
                dx_ptr=Buffer(T, M, K), da_ptr=Buffer(T, R, K), db_ptr=Buffer(T, N, R),
                da_acc_ptr=Buffer(torch.float32, R, K), db_acc_ptr=Buffer(torch.float32, N, R),
                count_ptr=Buffer(torch.int32, tiles_k + N), flag_ptr=Buffer(torch.int32, tiles_m), M=M, N=N, K=K, R=R,
                stride_dym=N, stride_dyn=1, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_bn=R,
                stride_br=1, stride_um=R, stride_ur=1, stride_gm=R, stride_gr=1, stride_dxm=K, stride_dxk=1,
                scaling=2.0, p=0.1, inv_keep=1.0, DOUBLE=True, ROW_BLOCKS=False, HAS_LORA=True, HAS_DROPOUT=True,
                COMPUTE_DX=True, PRECISION="tf32", BLOCK_R=nf4.RANK_BLOCK, **_blocks(cfg))
    _run(nf4._nf4_bwd_kernel, args, *_programs(tiles_m, tiles_k, cfg["GROUP_M"]))


def test_keep_mask_kernel():
    M, K = BIG_M, BIG_KN // 256
    args = dict(seed_ptr=Buffer(torch.int64, 1), out_ptr=Buffer(torch.uint8, M, K), M=M, K=K, p=0.1, BLOCK_M=32,
                BLOCK_K=32)
    # a 2D grid: the helper runs axis-0 programs, so check the last row block with every column block there
    offsets = kernel_offsets(lora._keep_mask_kernel, args, [0, M // 32 - 1], M // 32)
    assert not check_offsets(offsets, args)


def test_the_shared_blocks_are_the_ones_patched():
    """tests/offsets.py replaces the hand-off blocks by name: they must exist under these names."""
    assert all(callable(getattr(lr, name)) for name in ("publish", "wait_published", "last_arrival"))
