"""Reading typed fields out of a source record, with errors that name the record and the field."""
from __future__ import annotations

from peftkern.train.data import DataError

# What a record keeps besides its messages, when the source has it.
META_KEYS = ("id", "category", "task", "negative", "source")
NEGATIVE_KINDS = ("refusal", "counterexample")


def text_field(d: dict, name: str, where: str, required: bool = True) -> str:
    """``d[name]`` as a string ('' when optional and absent or null); DataError naming the field."""
    if name not in d or d[name] is None:
        if required:
            raise DataError(f"{where}: missing field '{name}' (has {sorted(d)})")
        return ""
    value = d[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def meta_of(d: dict, where: str) -> dict:
    """The :data:`META_KEYS` present in ``d`` (empty values left out); ``negative`` is checked."""
    meta = {k: d[k] for k in META_KEYS if d.get(k) not in (None, "")}
    neg = meta.get("negative")
    if neg is not None and neg not in NEGATIVE_KINDS:
        raise DataError(f"{where}: field 'negative' must be one of {NEGATIVE_KINDS} (or absent), got {neg!r}")
    return meta
