"""Boundary checks shared by the ops: every bad input is caught here, with a message naming it,
before any kernel runs."""
from __future__ import annotations

import math
import numbers

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


def check_linear(op: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    """x [..., in] and weight [out, in] fit each other; returns (out, in)."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension [..., in], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects in={in_features}")
    return out_features, in_features


def check_finite_scalar(op: str, name: str, value):
    """``value`` as a Python float (a real number: int, float, a 0-dim float tensor; never a string or
    a bool), finite. Under ``torch.compile`` a number passes unchecked and unconverted: with
    ``dynamic=True`` it is a traced symbol whose value is unknown while tracing."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if torch.compiler.is_compiling() and not isinstance(value, torch.Tensor):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def check_probability(op: str, name: str, value):
    value = check_finite_scalar(op, name, value)
    if torch.compiler.is_compiling():
        return value
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1), got {value}")
    return value


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` for the first tensor's device, every floating tensor cast to the
    autocast dtype (as ``F.linear`` casts its inputs); otherwise the tensors as they are. ``None``
    entries pass through."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    device_type = first.device.type
    if device_type not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
