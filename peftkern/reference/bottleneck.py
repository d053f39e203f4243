"""Bottleneck adapter, defined plainly (Houlsby et al. 2019; He et al. 2022 for the scaling and the
parallel form): a down-projection, a non-linearity and an up-projection added to a residual.

    y = r + s * (act(h W_d^T + b_d) W_u^T + b_u)        r = h (serial) or the sub-layer's output (parallel)

h [..., hidden], W_d [bottleneck, hidden], b_d [bottleneck], W_u [hidden, bottleneck], b_u [hidden].
As AdapterHub's ``Adapter.forward``: s multiplies the whole up-projection, its bias included.
"""
from __future__ import annotations

import torch

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """relu, gelu (exact, erf), silu (swish) or tanh of ``z``."""
    if name == "relu":
        return torch.relu(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "silu":
        return torch.nn.functional.silu(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown non-linearity {name!r}; choose from {', '.join(ACTIVATIONS)}")


def bottleneck_adapter(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                       b_up: torch.Tensor, scaling: float = 1.0, non_linearity: str = "relu",
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = (h if residual is None else residual) + scaling * up(act(down(h)))."""
    up = activation(h @ w_down.t() + b_down, non_linearity) @ w_up.t() + b_up
    return (h if residual is None else residual) + scaling * up
