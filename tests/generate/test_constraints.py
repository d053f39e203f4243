"""Rule constraints: the regex engine against Python's re, and every sampled output honouring its
constraint (regex, JSON schema, banned words, required words), in our loop and in transformers'."""
import json
import random
import re

import pytest
import torch

from peftkern.generate import DecodingSettings, generate
from peftkern.generate.constraints import (BannedWords, JsonConstraint, RegexConstraint, RegexError, RequiredWords,
                                           compile_regex, matches_schema, schema_to_regex)
from peftkern.models import build_byte_tokenizer, build_tiny_model
from tests.generate.models import bpe_tokenizer, llama_for

PATTERNS = [r"[A-Z]{3,5}", r"(yes|no)", r"\d+(\.\d+)?", r"a*b+c?", r"(ab|a)*b", r"[^abc]x.", r"\w+ \w+",
            r"x{2}|y{0,2}z", r"[a\-z]+", r"[]a]+", r"(?P<n>q)(?:r|s)*?", r"^\s*[0-9a-f]{2}\S$", r"\.\*\[", r"[\d.]{2}"]
ALPHABET = "abcenoqrsxyzABC0129 .-]*[\t"


def _matching(dfa, rng, max_len=8):
    """A random string the DFA accepts (a random walk over characters that keep a match reachable)."""
    state, out = 0, []
    for _ in range(max_len):
        if dfa.accepting[state] and rng.random() < 0.3:
            break
        options = [c for c in ALPHABET if dfa.step(state, c) >= 0]
        if not options:
            break
        c = rng.choice(options)
        out.append(c)
        state = dfa.step(state, c)
    return "".join(out) if dfa.accepting[state] else None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_engine_agrees_with_re(pattern):
    dfa = compile_regex(pattern)
    rng = random.Random(pattern)
    strings = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(1500)]
    matching = [s for s in (_matching(dfa, rng) for _ in range(300)) if s is not None]
    assert matching, "the walk found no match"
    mutated = [s[:i] + rng.choice(ALPHABET) + s[i + 1:] for s in matching for i in [rng.randrange(len(s) or 1)]]
    for s in strings + matching + mutated:
        assert dfa.fullmatch(s) == bool(re.fullmatch(pattern, s, re.ASCII)), s
    # the distance to a match is the shortest completion: from the start, the shortest match's length
    shortest = min((s for s in matching), key=len)
    assert dfa.distance[0] <= len(shortest)


def test_bad_patterns_name_the_problem():
    with pytest.raises(RegexError, match=r"invalid regular expression '\(ab': missing \), unterminated"):
        compile_regex("(ab")
    with pytest.raises(RegexError, match="position 0 is not supported"):
        compile_regex("(?=a)b")
    with pytest.raises(RegexError, match=r"the escape \\b"):
        compile_regex(r"a\b")
    with pytest.raises(RegexError, match="matches no string"):
        compile_regex(r"[^\x00-\U0010ffff]")
    tok = build_byte_tokenizer()
    with pytest.raises(ValueError, match=r"invalid regular expression '\[a-'"):
        RegexConstraint(tok, "[a-")


def test_schema_keywords_checked():
    with pytest.raises(ValueError, match=r"keyword\(s\) \['maximum'\] are not supported"):
        schema_to_regex({"type": "integer", "maximum": 3})
    with pytest.raises(ValueError, match=r"schema.properties.a: unknown type 'float'"):
        schema_to_regex({"type": "object", "properties": {"a": {"type": "float"}}})


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 6},
    "age": {"type": "integer", "minimum": 0},
    "score": {"type": "number"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 3}}, "required": ["name"]}


def _sample(model, tok, processors, n=12, max_new_tokens=40, seed=0, temperature=3.0):
    prompts = [f"Question {i}: say something." for i in range(n)]
    return generate(model, tok, prompts, DecodingSettings(max_new_tokens=max_new_tokens, do_sample=True,
                                                          temperature=temperature, seed=seed),
                    processors=processors, batch_size=6)


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def lm(request):
    if request.param == "bytes":
        return build_tiny_model("micro", seed=3).eval(), build_byte_tokenizer()
    tok = bpe_tokenizer()
    return llama_for(tok, seed=3), tok


@pytest.mark.parametrize("pattern", [r"[A-Z]{2,4}-\d{2}", r"(yes|no|maybe)", r"\w+ \w+\.", r"(the|a) [a-z]+"])
def test_every_sample_matches_the_regex(lm, pattern):
    model, tok = lm
    for c in _sample(model, tok, [RegexConstraint(tok, pattern)], max_new_tokens=16):
        assert re.fullmatch(pattern, c.text, re.ASCII), c.text


def test_every_sample_is_json_of_the_schema(lm):
    model, tok = lm
    outs = _sample(model, tok, [JsonConstraint(tok, SCHEMA)], max_new_tokens=110)
    for c in outs:
        value = json.loads(c.text)
        assert matches_schema(value, SCHEMA), c.text
        assert list(value) == list(SCHEMA["properties"])


def test_json_closed_in_time_with_a_tight_budget():
    """Unbounded strings and numbers still end as valid JSON when max_new_tokens is close to the minimum."""
    model, tok = build_tiny_model("micro", seed=5).eval(), build_byte_tokenizer()
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}}
    for c in _sample(model, tok, [JsonConstraint(tok, schema)], max_new_tokens=22, n=8):
        assert matches_schema(json.loads(c.text), schema), c.text
        assert len(c.token_ids) <= 22


def test_no_sample_contains_a_banned_word(lm):
    model, tok = lm
    banned = ["e", "The", "cat"]
    outs = _sample(model, tok, [BannedWords(tok, banned)], temperature=1.0)
    unconstrained = _sample(model, tok, [], temperature=1.0)
    assert any("e" in c.text.lower() for c in unconstrained)  # the ban has something to do
    for c in outs:
        assert not any(w.lower() in c.text.lower() for w in banned), c.text


def test_every_sample_contains_the_required_words(lm):
    model, tok = lm
    words = ["cat", "dog"]
    for c in _sample(model, tok, [RequiredWords(tok, words)], max_new_tokens=14, temperature=1.0):
        assert all(w in c.text for w in words), c.text


def test_constraints_work_inside_transformers_generate_with_the_same_tokens():
    model, tok = build_tiny_model("micro", seed=3).eval(), build_byte_tokenizer()
    pattern = r"[a-z]+ [0-9]{2}"
    settings = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=2.0, top_k=50, seed=9)
    ours = generate(model, tok, ["hi", "hello you"], settings, processors=[RegexConstraint(tok, pattern)])
    tok.padding_side = "left"
    enc = tok(["hi", "hello you"], return_tensors="pt", padding=True)
    torch.manual_seed(9)
    hf = model.generate(**enc, logits_processor=[RegexConstraint(tok, pattern, max_new_tokens=12)],
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        **settings.transformers_kwargs())[:, enc["input_ids"].shape[1]:]
    for c, row in zip(ours, hf.tolist()):
        assert row[:len(c.token_ids)] == c.token_ids
        assert re.fullmatch(pattern, tok.decode(row, skip_special_tokens=True))


def test_budget_too_small_is_an_error():
    model, tok = build_tiny_model("micro").eval(), build_byte_tokenizer()
    with pytest.raises(ValueError, match=r"needs at least 10 characters, more than max_new_tokens=4"):
        generate(model, tok, ["x"], max_new_tokens=4, processors=[RegexConstraint(tok, r"[0-9]{10}")])
    with pytest.raises(ValueError, match=r"take 8 tokens, more than max_new_tokens=5"):
        generate(model, tok, ["x"], max_new_tokens=5, processors=[RequiredWords(tok, ["abc", "def"])])
