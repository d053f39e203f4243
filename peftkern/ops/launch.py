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


def device_guard(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device current for a launch (and restores the caller's
    device after), so a model spread over several GPUs launches each kernel on its own device and
    stream. A no-op context for CPU tensors (the interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
