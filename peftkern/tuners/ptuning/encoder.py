"""PromptEncoder: P-tuning's virtual tokens, a table [n, token_dim] passed through an MLP or a
bidirectional LSTM + MLP while training; folded to the plain table of its output when loaded
from a file (the layout of PEFT's module: ``embedding``, ``mlp_head``, ``lstm_head``)."""
from __future__ import annotations

import torch
from torch import nn

from peftkern.tuners.prompt_learning import FoldableEncoder


class PromptEncoder(FoldableEncoder):
    def __init__(self, num_tokens: int, token_dim: int, hidden: int, kind: str, num_layers: int, dropout: float,
                 reparameterize: bool):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(num_tokens, token_dim)
        self.lstm_head = self.mlp_head = None
        if not reparameterize:
            return
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden, num_layers=num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def output(self) -> torch.Tensor:
        """[n, token_dim]: the table through the encoder (the table itself once folded)."""
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x) if self.mlp_head is not None else x

    def output_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)

    def load_folded(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(value)
        self.lstm_head = self.mlp_head = None
