"""PromptEmbedding: prompt tuning's table of virtual-token embeddings [n, hidden] and its three
initializations (random, a text's token embeddings, random vocabulary rows)."""
from __future__ import annotations

import math

import torch
from torch import nn

from peftkern.tuners.prompt_learning import FoldableEncoder


class PromptEmbedding(FoldableEncoder):
    """``embedding.weight`` [num_virtual_tokens, token_dim] is the prompt itself (fp32)."""

    def __init__(self, num_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, token_dim)

    def output(self) -> torch.Tensor:
        return self.embedding.weight

    def output_shape(self) -> tuple[int, int]:
        return tuple(self.embedding.weight.shape)

    def load_folded(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(value)

    @torch.no_grad()
    def init_from_rows(self, word_embeddings: nn.Module, token_ids: list[int]) -> None:
        """The rows of the model's embedding table at ``token_ids`` (cut or repeated to length)."""
        n = self.embedding.num_embeddings
        if not token_ids:
            raise ValueError("prompt tuning init: the text gave no tokens")
        ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        weight = word_embeddings.weight
        rows = word_embeddings(torch.tensor(ids, dtype=torch.long, device=weight.device))
        self.embedding.weight.copy_(rows.detach().float())


def load_init_tokenizer(name: str, kwargs: dict | None):
    """The tokenizer for a TEXT init: "tiny" / "tiny-micro" is the embedded default's byte tokenizer,
    anything else goes to ``AutoTokenizer.from_pretrained`` (``trust_remote_code`` dropped, as PEFT)."""
    if name in ("tiny", "tiny-micro"):
        from peftkern.models.tokenizer import build_byte_tokenizer

        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "trust_remote_code"}
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"PromptTuningConfig.tokenizer_name_or_path = {name!r}: cannot load a tokenizer there "
                         f"({exc})") from None
