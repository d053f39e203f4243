"""The embedded default's tokenizer: byte-level (256 byte tokens) plus chat special tokens.

Built in memory with ``tokenizers`` (a byte-level BPE with no merges, so every byte is one token) and
wrapped as a ``transformers.PreTrainedTokenizerFast``: ``save_pretrained``, ``AutoTokenizer`` and
``apply_chat_template`` work on it as on any hub tokenizer, and nothing is downloaded.

Ids: 0..255 are the bytes (in ``bytes_to_unicode`` order of the byte-level alphabet), then the
special tokens of :data:`SPECIAL_TOKENS` in order.
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# One turn: <|role|>content<|end|>; the assistant's <|end|> is what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer():
    """A fresh ``PreTrainedTokenizerFast``: vocab 256 bytes + 7 special tokens (263 ids).

    ``eos_token`` is ``<|end|>`` (the end of a turn), so generation stops at the end of an answer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _byte_order(alphabet)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _byte_order(alphabet: list[str]) -> list[str]:
    """The 256 byte-level characters ordered by the byte each stands for (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    char_of = {}
    extra = 0
    for b in range(256):
        if b in printable:
            char_of[b] = chr(b)
        else:
            char_of[b] = chr(256 + extra)
            extra += 1
    chars = [char_of[b] for b in range(256)]
    if set(chars) != set(alphabet):
        raise RuntimeError("tokenizers' byte-level alphabet is not GPT-2's bytes_to_unicode map")
    return chars
