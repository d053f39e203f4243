"""The text each token adds to the output, for constraints that reason about text.

``tokenizer.decode([id])`` alone loses a SentencePiece token's leading space and shows a lone byte of
a multi-byte character as U+FFFD, so each token is decoded after an anchor token and the anchor's text
is cut off. Special tokens, and tokens whose text is not whole characters, get ``None``: constraints
never allow them (the end-of-sequence token is handled apart)."""
from __future__ import annotations

_CACHE: dict = {}


def token_texts(tokenizer, vocab_size: int | None = None) -> list[str | None]:
    """Text of every id in ``range(vocab_size)`` (default ``len(tokenizer)``); None where unusable."""
    size = vocab_size if vocab_size is not None else len(tokenizer)
    key = (id(tokenizer), size)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    anchor_ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = anchor_ids[-1:] if anchor_ids else []
    prefix = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids or [])
    known = len(tokenizer)
    ids = [i for i in range(min(size, known)) if i not in special]
    decoded = tokenizer.batch_decode([anchor + [i] for i in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    out: list[str | None] = [None] * size
    for i, text in zip(ids, decoded):
        if not text.startswith(prefix):
            text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        else:
            text = text[len(prefix):]
        if text and "\ufffd" not in text:
            out[i] = text
    _CACHE[key] = (tokenizer, out)
    return out
