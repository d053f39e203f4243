"""Triton, imported once for every op file, plus the description of a compiled kernel config.

When Triton is missing, ``triton.jit`` becomes a no-op decorator and ``tl.constexpr`` a plain
marker, so the op files still import and the Triton face reports itself unavailable.
"""
from __future__ import annotations

import dataclasses
from typing import Any

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without Triton
    HAVE_TRITON = False

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _MissingLanguage:
        constexpr = object

    triton = _MissingTriton()
    tl = _MissingLanguage()

TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def tl_dtype_name(dtype) -> str:
    """'fp32' | 'fp16' | 'bf16' for a torch dtype (the names Triton signatures use)."""
    return TORCH_TO_TRITON[str(dtype)]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One launchable config of a Triton kernel, for the static compile report (``peftkern kernels``).

    ``signature`` maps every non-constexpr argument to its Triton type ("*bf16", "i32", "fp32");
    ``constexprs`` holds the constexpr values the launcher uses for this config. The compile models
    the common launch the way Triton's JIT specializes it: pointers 16-byte aligned, integer
    arguments divisible by 16, except ``unit_args`` (1 in that launch, e.g. the inner stride of a
    contiguous tensor: compiled as the constant 1) and ``plain_args`` (flags and sizes with no
    alignment to assume). ``options`` are further compile options as the launcher passes them
    (e.g. ``{"enable_fp_fusion": False}``); fp fusion is on unless given, as Triton's JIT does.
    """

    kernel: Any
    config: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    unit_args: tuple = ()
    plain_args: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__
