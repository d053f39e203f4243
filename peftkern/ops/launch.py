"""Launch-time helpers every op's Triton launcher shares: the fp32 matmul precision the user asked
torch for, and entering the tensors' own CUDA device around a launch.

Public names on purpose: ops import these, never each other's private helpers.
"""
from __future__ import annotations

import contextlib

import torch


def matmul_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands: "tf32" or "ieee".

    16-bit operands always use tensor cores ("tf32" is ignored for them by Triton). For fp32 this
    follows torch's own setting, reading the API of torch >= 2.9 first
    (``torch.backends.cuda.matmul.fp32_precision``: "tf32" | "ieee" | "none", where "none" defers to
    ``torch.backends.fp32_precision``). Reading the legacy ``allow_tf32`` after the new API was set
    raises in torch >= 2.9, so it is only read when the new API is absent.
    """
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new is not None:
        if new == "none":
            new = getattr(torch.backends, "fp32_precision", "none")
        if new == "none":  # nothing set anywhere: torch's default for fp32 matmuls is full precision
            return "ieee"
        return "tf32" if new == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


def device_guard(where):
    """A context that makes the CUDA device of ``where`` (a tensor, a ``torch.device`` or a device
    string) current for a launch and restores the caller's device after, so a model spread over
    several GPUs launches each kernel on its own device and stream. A no-op context for any other
    device (the CPU interpreter, meta). Building it touches no CUDA state."""
    device = where if isinstance(where, torch.device) else getattr(where, "device", None)
    if not isinstance(device, torch.device):  # a string or index, not a tensor-like object
        device = torch.device(where)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def register_loop_vmap(op, out_dims) -> None:
    """Give a registered op a vmap rule that runs it once per batch entry and stacks the outputs
    (``out_dims``: one batch dim per output, 0), so ``torch.func.vmap`` / ``jacrev`` / ``jacfwd``
    reach ops whose kernels know no batch dimension. Correct first: one launch per entry."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        outs = []
        for i in range(size):
            picked = [a.select(d, i) if d is not None and isinstance(a, torch.Tensor) else a
                      for a, d in zip(args, in_dims)]
            outs.append(op(*picked))
        stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return stacked, tuple(out_dims)

    torch.library.register_vmap(op, rule)


def register_once_differentiable(op, name: str) -> None:
    """Give a backward op an autograd rule that refuses to be differentiated again, so torch.func's
    reverse transforms (which run backwards under their own grad level) can call it; a second
    derivative raises an error naming ``name``."""

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{name}: the backward is not differentiable (no double backward / Hessians)")

    op.register_autograd(backward, setup_context=setup)


def eager_function(op, setup_context, backward, jvp, name: str) -> type:
    """A ``torch.autograd.Function`` around the registered forward ``op`` for eager calls: forward-mode
    AD (``jvp``) and torch.func support, which the op's own autograd lacks (under torch.compile the
    op's registered autograd runs: Dynamo traces no custom jvp).

    ``setup_context(ctx, inputs, output)`` saves what the backward needs and returns the tensors the
    jvp needs; every output but the first is non-differentiable; ``backward(ctx, dy)`` runs once
    (no double backward); ``jvp(ctx, *tangents)`` gives the tangent of the first output."""

    def setup(ctx, inputs, output):
        ctx.save_for_forward(*setup_context(ctx, inputs, output))
        ctx.mark_non_differentiable(*output[1:])

    @torch.autograd.function.once_differentiable
    def run_backward(ctx, dy, *_):
        return backward(ctx, dy)

    def run_jvp(ctx, *tangents):
        return jvp(ctx, *tangents)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: the registered op with forward-mode AD and torch.func support (eager calls).",
        "generate_vmap_rule": True, "forward": staticmethod(lambda *inputs: op(*inputs)),
        "setup_context": staticmethod(setup), "backward": staticmethod(run_backward), "jvp": staticmethod(run_jvp)})
