"""What every method's configuration shares: PEFT's ``PeftConfig`` fields, the file format of
``adapter_config.json`` and the checks that name the field at fault.

Each method's own config (``tuners/<method>/config.py``) is a dataclass deriving from
:class:`PeftConfig`, adding its fields and a ``validate_method`` of its own. Field names and
meanings are PEFT's, so a file written by PEFT loads here and one written here loads in PEFT. Keys
PEFT knows but peftkern does not implement (``UNSUPPORTED_AT_DEFAULT``) are accepted at their
default value and refused otherwise; keys neither knows (a newer PEFT, another tool) give one
warning naming them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Keys every PEFT config file may carry that only describe the file: read and ignored.
FILE_METADATA: dict[str, Any] = {"auto_mapping": None, "peft_version": None}


@dataclass
class PeftConfig:
    """PEFT's fields common to every method. ``peft_type`` is fixed by each subclass (``PEFT_TYPE``)."""

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: str = ""

    PEFT_TYPE: ClassVar[str] = ""
    # PEFT fields of this method that peftkern does not implement: accepted only at these values.
    UNSUPPORTED_AT_DEFAULT: ClassVar[dict[str, Any]] = {}
    # PEFT fields of this method that only describe the file (besides FILE_METADATA).
    METADATA_ONLY: ClassVar[dict[str, Any]] = {}
    # Fields written as sorted lists (PEFT keeps them as sets).
    NAME_LISTS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.peft_type == "":
            self.peft_type = self.PEFT_TYPE
        self.validate()

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first field whose value is not accepted."""
        if self.peft_type != self.PEFT_TYPE:
            raise ValueError(f"{self.field_name('peft_type')} must be {self.PEFT_TYPE!r}, got {self.peft_type!r}")
        check_bool(self, "inference_mode")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"{self.field_name('task_type')} must be None or one of {TASK_TYPES}, "
                             f"got {self.task_type!r}")
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{self.field_name(name)} must be a string or None, got {value!r}")
        self.validate_method()

    def validate_method(self) -> None:
        """The method's own checks (subclasses)."""

    def field_name(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    # -- file format --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The dict PEFT writes: every PEFT field of the method, name lists sorted."""
        out = dict(self.UNSUPPORTED_AT_DEFAULT)
        out.update(self.METADATA_ONLY)
        out["auto_mapping"] = None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if f.name in self.NAME_LISTS and isinstance(value, (set, list)) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build from PEFT's dict: unsupported PEFT features at non-default values are an error naming
        the field, unknown keys one warning naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in own:
                kwargs[key] = value
            elif key in cls.UNSUPPORTED_AT_DEFAULT:
                if not _is_default(value, cls.UNSUPPORTED_AT_DEFAULT[key]):
                    raise ValueError(f"{source}: field {key!r} = {value!r} is a PEFT feature peftkern does not "
                                     f"implement for {cls.PEFT_TYPE} (only the default "
                                     f"{cls.UNSUPPORTED_AT_DEFAULT[key]!r} is accepted)")
            elif key not in cls.METADATA_ONLY and key not in FILE_METADATA:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring keys peftkern does not know for {cls.PEFT_TYPE}: {sorted(unknown)}",
                          stacklevel=3)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        """Read ``directory/adapter_config.json`` (its peft_type must be this class's)."""
        path, data = read_config_file(directory)
        kind = data.get("peft_type", cls.PEFT_TYPE)
        if kind != cls.PEFT_TYPE:
            raise ValueError(f"{path}: peft_type is {kind!r}, not {cls.PEFT_TYPE!r}; load it with "
                             f"peftkern.load_adapter (any method) or the {kind} config class")
        return cls.from_dict(data, source=path)

    def replace(self, **changes) -> "PeftConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def read_config_file(directory: str | os.PathLike) -> tuple[str, dict]:
    """(path, the parsed JSON object) of ``directory/adapter_config.json``; errors name the file."""
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return path, data


def _is_default(value, default) -> bool:
    return value == default or (default == {} and value is None)


# -- field checks shared by the methods' configs -------------------------------------------------

def check_bool(config: PeftConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise TypeError(f"{config.field_name(name)} must be a bool, got {value!r}")


def _finite_float(value: int | float) -> bool:
    """True when ``value`` is a finite float or an integer a float can hold (JSON integers are unbounded)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(config: PeftConfig, name: str, value=None, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number (not a bool, not a string) within [low, high] (open ends as asked)."""
    value = getattr(config, name) if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite_float(value):
        shown = value if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        raise ValueError(f"{config.field_name(name)} must be a finite number within the float range, got {shown!r}"
                         if isinstance(value, int) and not isinstance(value, bool)
                         else f"{config.field_name(name)} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{config.field_name(name)} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{config.field_name(name)} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_int(config: PeftConfig, name: str, minimum: int | None = None, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    kind = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, "an integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{config.field_name(name)} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{config.field_name(name)} must be {kind}"
                         f"{'' if minimum in (0, 1) else f' >= {minimum}'}, got {value!r}")


def names_or_regex(config: PeftConfig, name: str) -> None:
    """None, a regex string, or a list of names (PEFT stores a set; a sorted list here)."""
    value = getattr(config, name)
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        setattr(config, name, sorted(set(value)))
        return
    raise TypeError(f"{config.field_name(name)} must be a list of module names or a regex string, got {value!r}")


def check_modules_to_save(config: PeftConfig) -> None:
    value = config.modules_to_save
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise TypeError(f"{config.field_name('modules_to_save')} must be a list of module names, got {value!r}")
    config.modules_to_save = list(value)


def check_layers(config: PeftConfig) -> None:
    """layers_to_transform / layers_pattern (PEFT's rules: list targets only; pattern needs layers)."""
    layers = config.layers_to_transform
    if layers is not None:
        if isinstance(layers, bool) or not (isinstance(layers, int) or (
                isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in layers))):
            raise TypeError(f"{config.field_name('layers_to_transform')} must be an int or a list of ints, "
                            f"got {layers!r}")
        if isinstance(layers, tuple):
            config.layers_to_transform = list(layers)
        if isinstance(config.target_modules, str):
            raise ValueError(f"{config.field_name('layers_to_transform')} cannot be used when target_modules is a "
                             "regex string")
    if config.layers_pattern is not None:
        if layers is None:
            raise ValueError(f"{config.field_name('layers_pattern')} needs layers_to_transform as well")
        if isinstance(config.target_modules, str):
            raise ValueError(f"{config.field_name('layers_pattern')} cannot be used when target_modules is a "
                             "regex string")
        names_or_regex(config, "layers_pattern")
