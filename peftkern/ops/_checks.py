"""Boundary checks shared by the ops: every bad input is caught here, with a message naming it,
before any kernel runs."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(str(d) for d in dtypes)}")


def check_same(op: str, named: dict[str, torch.Tensor | None], dtype: torch.dtype | None = None) -> None:
    """All given tensors share one device (and ``dtype`` when given)."""
    present = {k: v for k, v in named.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{op}: tensors are on different devices: {listing}")
    if dtype is not None:
        wrong = {k: v.dtype for k, v in present.items() if v.dtype != dtype}
        if wrong:
            listing = ", ".join(f"{k} is {d}" for k, d in wrong.items())
            raise TypeError(f"{op}: dtypes differ from the input's {dtype}: {listing}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, explain: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({explain})" if explain else ""
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(expected)}{extra}")


def check_finite_scalar(op: str, name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def check_probability(op: str, name: str, value: float) -> float:
    value = check_finite_scalar(op, name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {value}")
    return value
