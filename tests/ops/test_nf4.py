"""peftkern.ops.nf4: every face of dequantize and of the fused dequant-GEMM / QLoRA op (forward and
every gradient, GEMM and GEMV paths) against the reference; the CUDA math through the host twin."""
import numpy as np
import pytest
import torch

from peftkern import backend
from peftkern.ops import lora as lora_ops
from peftkern.ops.nf4 import DEQUANT_FACES, LINEAR_FACES, _flat, nf4_dequantize, nf4_linear
from peftkern.quant import quantize_nf4
from peftkern.reference import nf4 as ref
from tests.helpers import RTOL, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEQUANT_RUNNABLE = [f for f in DEQUANT_FACES if backend.why_unavailable(f, DEVICE) is None]
LINEAR_RUNNABLE = [f for f in LINEAR_FACES if backend.why_unavailable(f, DEVICE) is None]


def _weight(n, k, blocksize=64, double_quant=True, dtype=torch.float32):
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    return quantize_nf4(w.to(DEVICE), blocksize, double_quant)


@pytest.mark.parametrize("face", DEQUANT_RUNNABLE)
@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((64, 64), 64, True), ((37, 45), 32, True), ((5, 7), 128, False), ((130, 33), 4096, True), ((9,), 64, False),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_faces_equal_reference(seed, face, shape, blocksize, double_quant, dtype):
    w4 = quantize_nf4(torch.randn(shape, device=DEVICE), blocksize, double_quant)
    expected = ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, blocksize, dtype)
    with backend.use(face):
        got = nf4_dequantize(w4, dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    interpreted_bf16 = face == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16
    if face == "torch" or (DEVICE == "cpu" and not interpreted_bf16):
        assert torch.equal(got, expected)
    else:  # the GPU may fuse code2 * absmax2 + offset into one FMA (within an fp32 ulp); Triton's
        # interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
        assert rel_error(got, expected) <= RTOL[dtype]


host = None
try:
    from peftkern import _host as host  # noqa: F811
except ImportError:
    pass


@pytest.mark.skipif(host is None or not hasattr(host, "nf4_dequantize"), reason="host twin not built")
@pytest.mark.parametrize("double_quant", [True, False])
def test_host_twin_dequantize_equals_reference(seed, double_quant):
    w4 = quantize_nf4(torch.randn(77, 131), 64, double_quant)
    n = w4.numel
    expected = ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, 64, torch.float32).reshape(-1)
    if double_quant:
        got = host.nf4_dequantize_nested(w4.packed.numpy().reshape(-1), w4.absmax.numpy(), w4.nested_absmax.numpy(),
                                         w4.nested_code.numpy(), w4.offset, n, 64, 256)
    else:
        got = host.nf4_dequantize(w4.packed.numpy().reshape(-1), w4.absmax.numpy(), n, 64)
    assert np.array_equal(got, expected.numpy())


@pytest.mark.skipif(host is None or not hasattr(host, "nf4_nearest_code"), reason="host twin not built")
def test_host_twin_codes_and_nearest():
    code = ref.nf4_code()
    assert [host.nf4_code_value(i) for i in range(16)] == code.tolist()
    mids = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.rand(5000) * 2 - 1, code, mids, torch.nextafter(mids, torch.ones(15))])
    expected = torch.bucketize(x, mids)
    assert np.array_equal(host.nf4_nearest_code(x.numpy()), expected.to(torch.uint8).numpy())


# -- fused dequant-GEMM / QLoRA ------------------------------------------------------------------

def _reference(x, w4, b, a, bb, scaling, dy, keep=None, dropout_p=0.0):
    """float64 autograd on the reference with W = dequant(W4) rounded to x's dtype first (the
    kernels feed tl.dot W in x's dtype)."""
    w = ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, w4.blocksize, x.dtype).double()
    leaves = {"x": x.detach().double().requires_grad_()}
    if b is not None:
        leaves["bias"] = b.detach().double().requires_grad_()
    if a is not None:
        leaves["lora_A"] = a.detach().double().requires_grad_()
        leaves["lora_B"] = bb.detach().double().requires_grad_()
    y = ref.nf4_linear(leaves["x"], w, leaves.get("bias"), leaves.get("lora_A"), leaves.get("lora_B"), scaling,
                       keep, dropout_p)
    y.backward(dy.double())
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _run(face, x, w4, b, a, bb, scaling, dy, dropout_p=0.0, training=False):
    leaves = {"x": x.detach().requires_grad_()}
    if b is not None:
        leaves["bias"] = b.detach().requires_grad_()
    if a is not None:
        leaves["lora_A"] = a.detach().requires_grad_()
        leaves["lora_B"] = bb.detach().requires_grad_()
    with backend.use(face):
        y = nf4_linear(leaves["x"], w4, leaves.get("bias"), leaves.get("lora_A"), leaves.get("lora_B"), scaling,
                       dropout_p, training)
    y.backward(dy)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _tol(dtype, k):
    # the dtype's tolerance, loosened for 16-bit outputs of long dot products (fp32 accumulate, one rounding)
    return RTOL[dtype] * (1.0 if dtype == torch.float32 else 1.5)


# (lead, in, out, rank or None, bias): GEMM path (M > 8), GEMV path (M <= 8), odd, empty, no LoRA
LINEAR_CASES = [
    ((40,), 64, 48, 8, True),
    ((3, 13), 45, 29, 5, False),
    ((5,), 70, 33, 16, True),
    ((1,), 32, 16, None, True),
    ((20,), 33, 40, None, False),
    ((0,), 16, 8, 4, True),
]


@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
@pytest.mark.parametrize("lead,k,n,rank,bias", LINEAR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_faces_match_reference(seed, face, lead, k, n, rank, bias, dtype):
    w4 = _weight(n, k, blocksize=32, double_quant=(n % 2 == 0))
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    a = (torch.randn(rank, k, device=DEVICE) / k**0.5).to(dtype) if rank else None
    bb = torch.randn(n, rank, device=DEVICE, dtype=dtype) if rank else None
    dy = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    y, grads = _run(face, x, w4, b, a, bb, 0.75, dy)
    y_ref, grads_ref = _reference(x, w4, b, a, bb, 0.75, dy)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_error(y, y_ref) <= _tol(dtype, k), f"y: {rel_error(y, y_ref):.2e}"
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        assert g is not None and g.shape == grads_ref[name].shape, name
        assert rel_error(g, grads_ref[name]) <= _tol(dtype, k) * 2, f"d{name}: {rel_error(g, grads_ref[name]):.2e}"


@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
def test_nf4_linear_fp16_and_blocksizes(seed, face):
    # K a multiple of the blocksize: the one-absmax-per-row tile path in the GEMM, GEMV and dx kernels
    for blocksize, double_quant, m in ((64, True, 17), (64, False, 5), (128, True, 3)):
        w4 = _weight(24, 128, blocksize, double_quant)
        x = torch.randn(m, 128, device=DEVICE, dtype=torch.float16)
        a = (torch.randn(4, 128, device=DEVICE) / 10).half()
        bb = torch.randn(24, 4, device=DEVICE, dtype=torch.float16)
        dy = torch.randn(m, 24, device=DEVICE, dtype=torch.float16)
        y, grads = _run(face, x, w4, None, a, bb, 2.0, dy)
        y_ref, grads_ref = _reference(x, w4, None, a, bb, 2.0, dy)
        assert rel_error(y, y_ref) <= _tol(torch.float16, 128)
        for name, g in grads.items():
            assert rel_error(g, grads_ref[name]) <= 2 * _tol(torch.float16, 128), name


@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
@pytest.mark.parametrize("m", [3, 20])
def test_nf4_linear_dropout_matches_reference_with_its_mask(seed, face, m):
    k, n, r, p = 40, 24, 4, 0.3
    w4 = _weight(n, k)
    x = torch.randn(m, k, device=DEVICE)
    a = torch.randn(r, k, device=DEVICE) / 5
    bb = torch.randn(n, r, device=DEVICE)
    dy = torch.randn(m, n, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, a, bb)]
    y, _, seed_t = torch.ops.peftkern.nf4_linear_fwd(leaves[0], *_flat(w4), None, leaves[1], leaves[2], 0.5, p, face)
    y.backward(dy)
    keep = lora_ops.dropout_keep_mask(seed_t, (m, k), p)
    y_ref, grads_ref = _reference(x, w4, None, a, bb, 0.5, dy, keep, p)
    assert rel_error(y, y_ref) <= RTOL[torch.float32]
    for leaf, name in zip(leaves, ("x", "lora_A", "lora_B")):
        assert rel_error(leaf.grad, grads_ref[name]) <= 2 * RTOL[torch.float32], name


def test_nf4_linear_without_grad_on_x(seed):
    w4 = _weight(16, 32)
    x = torch.randn(12, 32, device=DEVICE)
    a = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    bb = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    face = LINEAR_RUNNABLE[-1]
    with backend.use(face):
        nf4_linear(x, w4, None, a, bb, 1.0).sum().backward()
    _, grads_ref = _reference(x, w4, None, a, bb, 1.0, torch.ones(12, 16, device=DEVICE))
    assert rel_error(a.grad, grads_ref["lora_A"]) <= 2 * RTOL[torch.float32]
    assert rel_error(bb.grad, grads_ref["lora_B"]) <= 2 * RTOL[torch.float32]


def test_nf4_linear_bad_input():
    w4 = _weight(16, 32)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        nf4_linear(torch.randn(4, 31, device=DEVICE), w4)
    with pytest.raises(TypeError, match="dtype"):
        nf4_linear(torch.randint(0, 3, (4, 32), device=DEVICE), w4)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        nf4_linear(torch.randn(4, 32, device=DEVICE), w4, None, torch.randn(2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="lora_B"):
        nf4_linear(torch.randn(4, 32, device=DEVICE), w4, None, torch.randn(2, 32, device=DEVICE),
                   torch.randn(15, 2, device=DEVICE))
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_linear(torch.randn(4, 32, device=DEVICE), torch.randn(16, 32))
    with pytest.raises(TypeError, match="dtypes differ"):
        nf4_linear(torch.randn(4, 32, device=DEVICE), w4, torch.randn(16, device=DEVICE, dtype=torch.float16))


def test_opcheck_dequantize():
    w4 = _weight(8, 32)
    torch.library.opcheck(torch.ops.peftkern.nf4_dequantize.default, (*_flat(w4), torch.float32, "torch"))


@pytest.mark.gpu
def test_cuda_face_matches_triton_on_gpu(seed):
    w4 = _weight(257, 129, 64, True)
    with backend.use("cuda"):
        a = nf4_dequantize(w4, torch.bfloat16)
    with backend.use("triton"):
        b = nf4_dequantize(w4, torch.bfloat16)
    assert rel_error(a, b) <= RTOL[torch.bfloat16]


# ---- no host copy per call (issue 25, item 6) ---------------------------------------------------

def test_code_table_is_copied_to_a_device_once():
    """Each call used to copy the 16-entry table from the host (a blocking copy on a GPU)."""
    meta = torch.device("meta")
    assert ref.nf4_code(meta) is ref.nf4_code(meta)
    assert ref.dynamic_code(meta) is ref.dynamic_code(meta)
    assert ref.nf4_code(meta).shape == (16,) and ref.dynamic_code(meta).shape == (256,)


@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
def test_no_host_copy_of_a_table_in_a_training_step(seed, face, monkeypatch):
    w4 = _weight(24, 64)
    x = torch.randn(20, 64, device=DEVICE, requires_grad=True)
    a = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    bb = torch.randn(24, 4, device=DEVICE, requires_grad=True)

    def step():
        with backend.use(face):
            nf4_linear(x, w4, None, a, bb, 0.5, 0.1, training=True).sum().backward()
            nf4_dequantize(w4, torch.float32)

    step()  # the first call may place the tables on the device
    copies = []
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dtype == torch.float32 and self.numel() in (16, 256) and out is not self:
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    step()
    assert not copies, f"tables copied per call: {copies}"


# ---- forward-mode AD, autocast, argument types (issue 28, items 9, 14, 18) ----------------------

@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
def test_nf4_linear_forward_mode_ad(seed, face):
    w4 = _weight(24, 64)
    x, b = torch.randn(20, 64, device=DEVICE), torch.randn(24, device=DEVICE)
    a, bb = torch.randn(4, 64, device=DEVICE) / 8, torch.randn(24, 4, device=DEVICE)
    primals = (x, b, a, bb)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with backend.use(face):
        _, dy = torch.func.jvp(lambda x, b, a, bb: nf4_linear(x, w4, b, a, bb, 0.5), primals, tangents)
        grad = torch.func.grad(lambda a: nf4_linear(x, w4, b, a, bb, 0.5).square().sum())(a)
    w = ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, 64, torch.float64)
    f = lambda x, b, a, bb: ref.nf4_linear(x, w, b, a, bb, 0.5)  # noqa: E731
    _, dy_ref = torch.func.jvp(f, tuple(t.double() for t in primals), tuple(t.double() for t in tangents))
    assert dy.abs().sum() > 0 and rel_error(dy, dy_ref) < 1e-5
    grad_ref = torch.func.grad(lambda a: f(x.double(), b.double(), a, bb.double()).square().sum())(a.double())
    assert rel_error(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("face", LINEAR_RUNNABLE)
def test_nf4_linear_under_autocast(seed, face):
    w4 = _weight(24, 64)
    x = torch.randn(20, 64, device=DEVICE)
    a, bb = torch.randn(4, 64, device=DEVICE) / 8, torch.randn(24, 4, device=DEVICE)
    with backend.use(face), torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_linear(x, w4, None, a, bb, 0.5)
    assert y.dtype == torch.bfloat16
    w = ref.dequantize_nf4(w4.packed, w4.absmax_fp32(), w4.shape, 64, torch.bfloat16).double()
    expected = ref.nf4_linear(*[t.to(torch.bfloat16).double() for t in (x,)], w, None,
                              *[t.to(torch.bfloat16).double() for t in (a, bb)], 0.5)
    assert rel_error(y, expected) < 2 * RTOL[torch.bfloat16]


def test_nf4_linear_scaling_must_be_a_number():
    w4 = _weight(16, 32)
    with pytest.raises(TypeError, match="scaling must be a real number"):
        nf4_linear(torch.randn(4, 32, device=DEVICE), w4, None, torch.randn(2, 32), torch.randn(16, 2), "2")
