"""PrefixEncoder: prefix tuning's key/value table [n, num_layers * 2 * token_dim], either trained
directly or produced by a two-layer MLP from a table [n, token_dim] (PEFT's module layout:
``embedding``, ``transform``); and the cache it fills for a batch."""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.prompt_learning import FoldableEncoder


class PrefixEncoder(FoldableEncoder):
    def __init__(self, num_tokens: int, token_dim: int, num_layers: int, hidden: int, projection: bool,
                 zero_init: bool):
        super().__init__()
        width = num_layers * 2 * token_dim
        self.transform = None
        if projection:
            self.embedding = nn.Embedding(num_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            if zero_init:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(num_tokens, width)
            if zero_init:
                nn.init.zeros_(self.embedding.weight)
        self._shape = (num_tokens, width)

    def output(self) -> torch.Tensor:
        """[n, num_layers * 2 * token_dim]: per virtual position, layer-major (key, value) halves."""
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    def output_shape(self) -> tuple[int, int]:
        return self._shape

    def load_folded(self, value: torch.Tensor) -> None:
        if self.transform is not None:  # the table now holds the MLP's output
            self.embedding = nn.Embedding(*self._shape, device=value.device)
            self.transform = None
        with torch.no_grad():
            self.embedding.weight.copy_(value)


def prefix_key_values(table: torch.Tensor, num_layers: int, heads: int, batch: int, dtype: torch.dtype):
    """table [n, L * 2 * heads * head_dim] -> per layer (key, value), each [batch, heads, n, head_dim]
    (PEFT's order: for virtual position t, layer l's key is the (2l)-th block of width heads*head_dim)."""
    n = table.shape[0]
    per_layer = table.to(dtype).view(n, num_layers * 2, heads, -1).permute(1, 2, 0, 3)  # [2L, heads, n, hd]
    return [(per_layer[2 * i].unsqueeze(0).expand(batch, -1, -1, -1),
             per_layer[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1)) for i in range(num_layers)]
