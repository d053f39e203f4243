"""JSON-schema-like formats: a subset of JSON Schema turned into a regular expression of its compact
JSON text, and a validator for the same subset.

Keywords: ``type`` (object, array, string, integer, number, boolean, null, or a list of them),
``properties`` (every property is written, in the order given; ``required`` is accepted),
``additionalProperties`` (false only: nothing extra is ever written), ``items``, ``minItems``,
``maxItems``, ``enum``, ``const``, ``minLength``, ``maxLength``, ``pattern`` (string contents),
``minimum`` (only 0 or more, which rules out a minus sign), ``anyOf`` / ``oneOf``, and the
annotations ``title``, ``description``, ``$schema``. Any other keyword raises ValueError naming it:
none is ignored silently. Text is compact JSON as ``json.dumps`` writes it: ``", "`` and ``": "``
separators, no other whitespace.
"""
from __future__ import annotations

import json
import re

ANNOTATIONS = {"title", "description", "$schema", "examples", "default"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const", "minLength", "maxLength", "pattern", "minimum", "anyOf", "oneOf"} | ANNOTATIONS
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NATURAL = r"(?:0|[1-9][0-9]*)"
FRACTION_EXPONENT = r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"


def _check(schema, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"schema{where}: expected an object, got {schema!r}")
    unknown = sorted(set(schema) - KEYWORDS)
    if unknown:
        raise ValueError(f"schema{where}: keyword(s) {unknown} are not supported (supported: {sorted(KEYWORDS)})")
    kinds = schema.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind is not None and kind not in TYPES:
            raise ValueError(f"schema{where}: unknown type {kind!r} (types: {list(TYPES)})")
    if schema.get("additionalProperties", False) is not False:
        raise ValueError(f"schema{where}: additionalProperties must be false (extra properties are never written)")
    if "minimum" in schema and (not isinstance(schema["minimum"], (int, float)) or schema["minimum"] != 0):
        raise ValueError(f"schema{where}: only minimum 0 is supported (it rules out negative numbers), "
                         f"got {schema['minimum']!r}")


def schema_to_regex(schema: dict, where: str = "") -> str:
    """A regular expression whose matches are exactly the compact JSON texts this compiler writes for
    ``schema``."""
    _check(schema, where)
    if "const" in schema:
        return re.escape(json.dumps(schema["const"]))
    if "enum" in schema:
        if not schema["enum"]:
            raise ValueError(f"schema{where}: enum is empty")
        return "(?:" + "|".join(re.escape(json.dumps(v)) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise ValueError(f"schema{where}: {key} must be a non-empty list")
            return "(?:" + "|".join(schema_to_regex(s, f"{where}.{key}[{i}]") for i, s in enumerate(options)) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(?:" + "|".join(schema_to_regex({**schema, "type": k}, where) for k in kind) + ")"
    if kind is None:
        raise ValueError(f"schema{where}: needs a type (or enum, const, anyOf, oneOf)")
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"schema{where}: properties must be an object")
        missing = [r for r in schema.get("required", []) if r not in props]
        if missing:
            raise ValueError(f"schema{where}: required {missing} not among the properties")
        parts = [re.escape(json.dumps(name)) + ": " + schema_to_regex(sub, f"{where}.properties.{name}")
                 for name, sub in props.items()]
        return r"\{" + ", ".join(parts) + r"\}"
    if kind == "array":
        item = schema_to_regex(schema.get("items", {"type": "string"}), f"{where}.items")
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        if high is not None and int(high) < low:
            raise ValueError(f"schema{where}: maxItems {high} < minItems {low}")
        if high == 0:
            return r"\[\]"
        more = f"{{{max(low - 1, 0)},{'' if high is None else int(high) - 1}}}"
        body = f"{item}(?:, {item}){more}"
        return r"\[" + (body if low > 0 else f"(?:{body})?") + r"\]"
    if kind == "string":
        if "pattern" in schema:
            return '"' + f"(?:{schema['pattern']})" + '"'
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        return f'"{STRING_CHAR}{{{low},{"" if high is None else int(high)}}}"'
    if kind == "integer":
        return NATURAL if "minimum" in schema else INTEGER
    if kind == "number":
        return (NATURAL if "minimum" in schema else INTEGER) + FRACTION_EXPONENT
    if kind == "boolean":
        return "(?:true|false)"
    return "null"


def matches_schema(value, schema: dict) -> bool:
    """Whether the parsed JSON ``value`` satisfies ``schema`` (the same subset)."""
    _check(schema, "")
    if "const" in schema:
        return value == schema["const"]
    if "enum" in schema:
        return value in schema["enum"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            hits = sum(matches_schema(value, s) for s in schema[key])
            return hits >= 1 if key == "anyOf" else hits == 1
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(matches_schema(value, {**schema, "type": k}) for k in kind)
    if kind == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or any(r not in value for r in schema.get("required", [])):
            return False
        if schema.get("additionalProperties", True) is False and set(value) - set(props):
            return False
        return all(matches_schema(value[k], s) for k, s in props.items() if k in value)
    if kind == "array":
        if not isinstance(value, list) or len(value) < schema.get("minItems", 0):
            return False
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return False
        return all(matches_schema(v, schema.get("items", {"type": "string"})) for v in value)
    if kind == "string":
        if not isinstance(value, str) or len(value) < schema.get("minLength", 0):
            return False
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return False
        return "pattern" not in schema or re.fullmatch(schema["pattern"], value) is not None
    if kind in ("integer", "number"):
        ok = isinstance(value, int) if kind == "integer" else isinstance(value, (int, float))
        return ok and not isinstance(value, bool) and ("minimum" not in schema or value >= schema["minimum"])
    if kind == "boolean":
        return isinstance(value, bool)
    return value is None
