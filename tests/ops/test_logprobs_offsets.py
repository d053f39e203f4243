"""The log-prob kernels' addresses at the documented maximum shapes (tokens <= 2^21 per call,
H <= 2^15, V <= 2^18, LoRA rank <= 2^10): no offset may wrap at 2^31.

Each kernel runs one program (the last tile of its grid, where offsets are largest) in Triton's
interpreter with pointers that are never dereferenced: loads return a fixed value per argument
(row indices at their maximum, valid targets, non-zero coefficients) and loads, stores and
atomics only record the element offsets they would touch. Nothing of the maximum shapes is
allocated. A kernel computing ``rows * stride`` in int32 shows up as a negative or out-of-range
offset (the probe's own check, with an int32 kernel, is the first test)."""
import os
from contextlib import contextmanager

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="the probe runs kernels in Triton's interpreter")

N_MAX, H_MAX, V_MAX, R_MAX = 1 << 21, 1 << 15, 1 << 18, 1 << 10
REGION = 1 << 44  # each fake pointer's base: far apart, so every address names its argument


class FakePtr:
    """What the interpreter needs of a tensor argument: a base address and a dtype. Loads through it
    return ``fill``; ``extent`` is the number of elements it points at."""

    def __init__(self, index, dtype, fill, extent):
        self.base, self.dtype, self.fill, self.extent = (index + 1) * REGION, dtype, fill, extent

    def data_ptr(self):
        return self.base


@contextmanager
def _probe(pointers: dict, program_id: tuple):
    from triton.runtime import interpreter as interp

    by_region = {p.base // REGION: (name, p) for name, p in pointers.items()}
    seen = {name: [] for name in pointers}

    def record(ptrs, mask):
        addresses = ptrs.data[mask.data] if mask is not None else ptrs.data.reshape(-1)
        elsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        for addr in np.unique(addresses.astype(np.uint64)):
            region = int(addr) // REGION
            if region not in by_region:
                raise AssertionError(f"address {int(addr):#x} is in no argument's range: an offset wrapped")
            name, p = by_region[region]
            seen[name].append((int(addr) - p.base) // elsize)
        return by_region

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        record(ptrs, mask)
        dtype_tt = ptrs.get_element_ty()
        np_dtype = interp._get_np_dtype(dtype_tt)
        fills = {by_region[int(a) // REGION][1].fill for a in np.unique(ptrs.data.astype(np.uint64))
                 if int(a) // REGION in by_region}
        value = np.full(ptrs.data.shape, fills.pop() if len(fills) == 1 else 0, dtype=np_dtype)
        if mask is not None and other is not None:
            value = np.where(mask.data, value, other.data)
        return interp.TensorHandle(value, dtype_tt)

    def store(self, ptrs, value, mask, cache_policy):
        record(ptrs, mask)

    def atomic(self, rmw_op, ptr, val, mask, sem, scope):
        record(ptr, mask)
        return interp.TensorHandle(np.zeros_like(val.data), val.dtype.scalar)

    saved = {name: getattr(interp.InterpreterBuilder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_get_program_id")}
    saved_args = (interp.GridExecutor._init_args_hst, interp.GridExecutor._restore_args_dev)
    interp.InterpreterBuilder.create_masked_load = load
    interp.InterpreterBuilder.create_masked_store = store
    interp.InterpreterBuilder.create_atomic_rmw = atomic
    interp.InterpreterBuilder.create_get_program_id = lambda self, axis: interp.TensorHandle(
        np.array([program_id[axis] if axis < len(program_id) else 0], dtype=np.int32), interp.tl.int32)
    interp.GridExecutor._init_args_hst = lambda self, args, kwargs: (list(args), dict(kwargs))
    interp.GridExecutor._restore_args_dev = lambda self, *a: None
    try:
        yield seen
    finally:
        for name, fn in saved.items():
            setattr(interp.InterpreterBuilder, name, fn)
        interp.GridExecutor._init_args_hst, interp.GridExecutor._restore_args_dev = saved_args


def _run(kernel, pointers: dict, program_id: tuple, scalars: dict, constexprs: dict):
    """Run one program; -> {argument: (smallest, largest) element offset touched}."""
    args = {name: pointers.get(name, scalars.get(name)) for name in kernel.arg_names if name not in constexprs}
    with _probe(pointers, program_id) as seen:
        kernel[(1,)](**args, **constexprs)
    return {name: (min(v), max(v)) for name, v in seen.items() if v}


def _assert_within(touched, pointers, must_pass_2_31=()):
    for name, (low, high) in touched.items():
        extent = pointers[name].extent
        assert 0 <= low <= high < extent, f"{name}: offsets [{low}, {high}] outside [0, {extent})"
    for name in must_pass_2_31:
        assert touched[name][1] >= 1 << 31, f"{name}: the probe did not reach 2^31 ({touched[name][1]})"


def _ptrs(spec: dict) -> dict:
    return {name: FakePtr(i, dtype, fill, extent) for i, (name, (dtype, fill, extent)) in enumerate(spec.items())}


def test_probe_catches_an_int32_offset():
    import triton
    import triton.language as tl

    @triton.jit
    def int32_rows(x_ptr, stride, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + rows * stride, 1.0)

    ptrs = _ptrs({"x_ptr": (torch.float32, 0, N_MAX * H_MAX)})
    with pytest.raises(Exception, match="wrapped|outside"):
        touched = _run(int32_rows, ptrs, (N_MAX // 16 - 1,), {"stride": H_MAX}, {"BLOCK": 16})
        _assert_within(touched, ptrs)


def _head_pointers(C, V, H_stride, extra):
    """The head's arguments: hidden rows N_MAX with row stride H_stride, W with V rows, LoRA u / B."""
    return _ptrs({
        "rows_ptr": (torch.int64, N_MAX - 1, C), "h_ptr": (torch.float32, 0, N_MAX * H_stride),
        "w_ptr": (torch.float32, 0, V * H_stride), "bias_ptr": (torch.float32, 0, V),
        "u_ptr": (torch.float32, 0, N_MAX * R_MAX), "b_ptr": (torch.float32, 0, V * R_MAX),
        "tgt_ptr": (torch.int64, 3, N_MAX), **extra})


def _head_scalars(C, V):
    # H is small (the loop over it is short) and the row strides are the maximum: offsets as large
    # as H_MAX-wide rows give, in a fraction of the interpreter's time
    return {"C": C, "V": V, "H": 32, "R": 16, "ignore_index": -100, "stride_hn": H_MAX, "stride_hk": 1,
            "stride_wv": H_MAX, "stride_wk": 1, "stride_un": R_MAX, "stride_ur": 1, "stride_bv": R_MAX,
            "stride_br": 1, "inv_temp": 1.0}


FLAGS = {"HAS_BIAS": True, "HAS_LORA": True, "PRECISION": "ieee", "BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_V": 128,
         "BLOCK_H": 16}


def test_stats_kernel_offsets():
    from peftkern.ops.logprobs import _logprobs_fwd_kernel

    C, V = N_MAX, 1 << 12  # the loop runs over V: its row stride still gives V * H_MAX > 2^31
    ptrs = _head_pointers(C, V, H_MAX, {name: (torch.float32, 0, C) for name in
                                         ("logp_ptr", "ent_ptr", "mean_ptr", "lse_ptr")})
    touched = _run(_logprobs_fwd_kernel, ptrs, (C // 32 - 1,), _head_scalars(C, V),
                   {**FLAGS, "ENTROPY": True, "MEAN": True})
    _assert_within(touched, ptrs, ("h_ptr",))


def test_logits_kernel_offsets():
    from peftkern.ops.logprobs import _logits_kernel

    C, V = N_MAX, V_MAX
    nv = V // 128
    ptrs = _head_pointers(C, V, H_MAX, {"z_ptr": (torch.float32, 0, C * V), "part_ptr": (torch.float32, 0, C * nv * 4)})
    touched = _run(_logits_kernel, ptrs, (C // 32 - 1, nv - 1), {**_head_scalars(C, V), "NV": nv},
                   {**FLAGS, "STATS": True})
    _assert_within(touched, ptrs, ("h_ptr", "w_ptr", "z_ptr", "part_ptr"))


def test_softmax_grad_kernel_offsets():
    from peftkern.ops.logprobs import _softmax_grad_kernel

    C, V = N_MAX, V_MAX
    ptrs = _ptrs({"z_ptr": (torch.float32, 0, C * V), "g_ptr": (torch.float32, 0, C * V),
                  "tgt_ptr": (torch.int64, 3, C), "lse_ptr": (torch.float32, 0, C), "ent_ptr": (torch.float32, 0, C),
                  "dlogp_ptr": (torch.float32, 1, C), "dent_ptr": (torch.float32, 1, C),
                  "dmean_ptr": (torch.float32, 1, C), "db_ptr": (torch.float32, 0, V)})
    touched = _run(_softmax_grad_kernel, ptrs, (C // 32 - 1, V // 128 - 1), {"C": C, "V": V, "inv_temp": 1.0},
                   {"ENTROPY": True, "MEAN": True, "NEED_DB": True, "BLOCK_N": 32, "BLOCK_V": 128})
    _assert_within(touched, ptrs, ("z_ptr", "g_ptr"))


@pytest.mark.parametrize("side", ["dx", "dy"])
def test_products_kernel_offsets(side):
    from peftkern.ops.logprobs import _grad_products_kernel

    K = H_MAX
    # dx programs loop over V, dy programs over the chunk's rows: keep the looped size small
    C, V = (N_MAX, 1 << 11) if side == "dx" else (64, V_MAX)
    ptrs = _ptrs({"g_ptr": (torch.float32, 0, C * V), "y_ptr": (torch.float32, 0, V * (1 << 21)),
                  "x_ptr": (torch.float32, 0, N_MAX * K), "rows_ptr": (torch.int64, N_MAX - 1, C),
                  "dx_ptr": (torch.float32, 0, N_MAX * K), "dy_ptr": (torch.float32, 0, V * K)})
    blocks = {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_K": 64}
    n_k = K // 64
    n_dx = (C // 32) * n_k
    pid = n_dx - 1 if side == "dx" else n_dx + (V // 32) * n_k - 1
    scalars = {"C": C, "V": V, "K": K, "n_dx": n_dx, "stride_yv": 1 << 21, "stride_yk": 1, "stride_xn": K,
               "stride_xk": 1}
    touched = _run(_grad_products_kernel, ptrs, (pid,), scalars,
                   {"NEED_DX": True, "NEED_DY": True, "PRECISION": "ieee", **blocks})
    large = ("g_ptr", "y_ptr", "dx_ptr") if side == "dx" else ("x_ptr", "dy_ptr")
    _assert_within(touched, ptrs, large)
