"""Comparison helpers shared by the op tests."""
import torch

# Relative error (norm of difference over norm of reference) allowed per dtype against a float64
# reference, as docs/ARCHITECTURE.md sets them.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.double()
    expected = expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(actual, expected, dtype, name="", factor=1.0):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_error(actual, expected)
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"
