"""Rule constraints for decoding: regular expressions, JSON-schema-like formats, banned and required
words, as logits processors (usable in transformers' generate too)."""
from peftkern.generate.constraints.processors import (BannedWords, JsonConstraint, RegexConstraint,
                                                      RequiredWords, TextConstraint)
from peftkern.generate.constraints.regex import RegexError, compile_regex
from peftkern.generate.constraints.schema import matches_schema, schema_to_regex

__all__ = ["RegexConstraint", "JsonConstraint", "BannedWords", "RequiredWords", "TextConstraint", "compile_regex",
           "RegexError", "schema_to_regex", "matches_schema"]
