"""What the fused-loss tests share: float64 leaves, gradients of a value, the head's keywords, the
float64 token log-probs through the reference head, and the check of a fused loss (value and every
gradient) against its float64 definition differentiated by autograd."""
import torch

from peftkern import backend
from peftkern.reference import logprobs as ref
from tests.helpers import assert_close

FACES = [f for f in ("torch", "triton") if backend.available("cpu")[f]]
NAMES = ("hidden", "weight", "bias", "lora_A", "lora_B")
LORA_SCALING = 0.7


def leaves(tensors, dtype):
    """Fresh leaves of ``dtype`` that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def grads(value, tensors):
    """d value / d each tensor (None for None or for a tensor the value does not use)."""
    live = [t for t in tensors if t is not None]
    got = iter(torch.autograd.grad(value, live, allow_unused=True))
    return [None if t is None else next(got) for t in tensors]


def head_kw(params, temperature):
    """The fused losses' head keywords from (hidden, weight, bias, lora_A, lora_B)."""
    h, w, b, a, lb = params
    return dict(bias=b, temperature=temperature, lora_A=a, lora_B=lb, lora_scaling=LORA_SCALING)


def token_logps(params, targets, temperature):
    """Token log-probs through the reference head (full logits, log-softmax), in the params' dtype."""
    h, w, b, a, lb = params
    return ref.linear_logprobs(h, w, targets, bias=b, temperature=temperature, lora_A=a, lora_B=lb,
                               lora_scaling=LORA_SCALING)


def check_against_float64(fused, reference, params, targets, temperature, face, *, dtype=torch.float32,
                          factor=4.0, loss_factor=None, scale=1.0, loss_of=lambda out: out):
    """``fused(leaves)`` (run on ``face``) against ``reference(float64 token log-probs, mask)``: the
    loss (``loss_of(output)``, an fp32 scalar) and the gradients of ``scale * loss`` with respect to
    every parameter (in ``dtype``). Returns the fused output."""
    p64 = leaves(params, torch.float64)
    expected = reference(token_logps(p64, targets, temperature), targets != -100)
    g_expected = grads(expected * scale, p64)
    mine = leaves(params, dtype)
    with backend.use(face):
        out = fused(mine)
    loss = loss_of(out)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, expected.detach(), dtype, "loss", loss_factor or factor)
    for name, got, want in zip(NAMES, grads(loss * scale, mine), g_expected):
        if want is not None:
            assert got is not None and got.dtype == dtype, f"d{name}"
            assert_close(got, want, dtype, f"d{name}", factor)
    return out
