"""``peftkern generate`` (prompts file in, JSONL out) and ``peftkern chat`` (an interactive terminal chat):
argument parsing and the two commands' runs. The decoding flags are shared with ``peftkern eval``."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile

from peftkern.generate.settings import DecodingSettings

DEFAULTS = DecodingSettings()


def add_model_arguments(p: argparse.ArgumentParser, many_adapters_help: str) -> None:
    p.add_argument("--model", required=True, help="'tiny' (the embedded default), 'tiny-micro' or a local "
                   "transformers causal-LM directory (an NF4 checkpoint loads as NF4)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR", help=many_adapters_help)
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--nf4", action="store_true", help="quantize the base's linears to NF4 on load")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")


def add_decoding_arguments(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULTS.max_new_tokens) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"(default {max_new_tokens})")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature)
    g.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="0: off")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="1: off")
    g.add_argument("--min-p", type=float, default=DEFAULTS.min_p, help="0: off")
    g.add_argument("--repetition-penalty", type=float, default=DEFAULTS.repetition_penalty, help="1: off")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed of sampling")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    c = p.add_argument_group("constraints and steering")
    c.add_argument("--regex", default=None, help="the whole output must match this regular expression")
    c.add_argument("--json-schema", default=None, metavar="FILE", help="the output must be JSON of this "
                   "(JSON-schema-like) schema")
    c.add_argument("--ban", action="append", default=[], metavar="WORD", help="never write WORD (repeatable)")
    c.add_argument("--require", action="append", default=[], metavar="WORD", help="always write WORD (repeatable)")
    c.add_argument("--contrastive", default=None, metavar="AMATEUR", help="contrastive decoding against "
                   "'__base__' (adapters off), an adapter NAME, or a model DIR")
    c.add_argument("--cd-alpha", type=float, default=0.1, help="contrastive plausibility cut (default 0.1)")
    c.add_argument("--cd-beta", type=float, default=0.5, help="contrastive strength (default 0.5)")
    c.add_argument("--guide", default=None, metavar="MODULE:FUNCTION", help="classifier guidance by a reward "
                   "function f(prompt, text) -> float")
    c.add_argument("--guide-weight", type=float, default=1.0)
    c.add_argument("--guide-top-k", type=int, default=10)


def settings_from_args(args) -> DecodingSettings:
    return DecodingSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), seed=args.seed).check()


def import_function(spec: str):
    """``module:function`` (or ``path/to/file.py:function``) -> the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ValueError(f"{spec!r}: expected MODULE:FUNCTION")
    if module_name.endswith(".py"):
        spec_obj = importlib.util.spec_from_file_location("peftkern_user_fn", module_name)
        if spec_obj is None or not os.path.isfile(module_name):
            raise ValueError(f"{spec!r}: no such file {module_name}")
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {module_name} has no function {attr!r}")
    return fn


def steering_from_args(args, lm, tok) -> tuple[list, object]:
    """(logits processors, scorer or None) the flags ask for."""
    from peftkern.generate.constraints import BannedWords, JsonConstraint, RegexConstraint, RequiredWords
    from peftkern.generate.contrastive import BASE, Contrastive
    from peftkern.generate.guidance import ClassifierGuidance, text_scorer

    processors = []
    if args.regex is not None:
        processors.append(RegexConstraint(tok, args.regex))
    if args.json_schema:
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                schema = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--json-schema {args.json_schema}: {exc}") from None
        processors.append(JsonConstraint(tok, schema))
    if args.ban:
        processors.append(BannedWords(tok, args.ban))
    if args.require:
        processors.append(RequiredWords(tok, args.require))
    if args.guide:
        processors.append(ClassifierGuidance(text_scorer(import_function(args.guide), tok), args.guide_weight,
                                             args.guide_top_k, pad_token_id=tok.pad_token_id))
    scorer = None
    if args.contrastive:
        amateur = args.contrastive
        if amateur != BASE and os.path.isdir(amateur):
            from peftkern.generate.loading import load_base

            amateur = load_base(amateur, device=args.device)
        scorer = Contrastive(amateur, alpha=args.cd_alpha, beta=args.cd_beta)
    return processors, scorer


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete the prompts of a JSONL file with a model and adapters; "
                       "writes JSONL", description="Each input line is a JSON object with 'prompt' (a string, "
                       "or a list of chat messages) or 'messages', and optionally 'adapter' (a --adapter NAME, or __base__: "
                       "prompts for different adapters share each batch); each output line is that object plus "
                       "'completion', 'finish_reason' (eos, stop, length), 'prompt_tokens', 'completion_tokens'.")
    add_model_arguments(p, "a PEFT adapter folder (repeatable: all are loaded and run together)")
    p.add_argument("--prompts", required=True, help="JSONL file of prompts")
    p.add_argument("--out", default=None, help="output JSONL (default: standard output)")
    p.add_argument("--chat", action="store_true", help="send string prompts as a user turn through the chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    add_decoding_arguments(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("chat", help="interactive terminal chat with a model and adapters (streams tokens; "
                       "/reset, /system TEXT, /adapter on|off, /quit)")
    add_model_arguments(p, "a PEFT adapter folder (repeatable); '/adapter off' turns them off")
    p.add_argument("--system", default=None, help="system message")
    add_decoding_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run_chat)


def _fail(command: str, exc: Exception) -> int:
    print(f"peftkern {command}: error: {exc}", file=sys.stderr)
    return 2


def run_generate(args) -> int:
    from peftkern.generate.loading import load_for_generation
    from peftkern.generate.prompts import read_prompt_file
    from peftkern.generate.text import generate

    try:
        settings = settings_from_args(args)
        records = read_prompt_file(args.prompts)
        lm, tok = load_for_generation(args.model, args.adapter, args.tokenizer, args.nf4, args.device)
        processors, scorer = steering_from_args(args, lm, tok)
        outs = generate(lm, tok, [r["prompt"] for r in records], settings, processors=processors, scorer=scorer,
                        batch_size=args.batch_size, chat=args.chat, system=args.system,
                        where=[r["_where"] for r in records], adapter_names=record_adapters(records, lm))
    except (ValueError, FileNotFoundError) as exc:
        return _fail("generate", exc)
    lines = []
    for rec, c in zip(records, outs):
        row = {k: v for k, v in rec.items() if k != "_where"}
        row.update(completion=c.text, finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens,
                   completion_tokens=len(c.token_ids))
        lines.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {len(lines)} completions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def record_adapters(records, lm) -> list[str] | None:
    """One adapter name per record when the records say which (an ``adapter`` field, ``"__base__"`` for
    none): then each prompt runs through its own adapter, all in the same batches."""
    if not any("adapter" in r for r in records):
        return None
    known = list(getattr(lm, "peft_config", {}))
    names = []
    for r in records:
        name = r.get("adapter")
        if not isinstance(name, str):
            raise ValueError(f"{r['_where']}: some records name an 'adapter', so every record must "
                             f"(a loaded adapter: {known}, or '__base__')")
        if name != "__base__" and name not in known:
            raise ValueError(f"{r['_where']}: adapter {name!r} is not loaded (--adapter NAME=DIR); loaded: {known}")
        names.append(name)
    return names


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync, rename over it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_chat(args) -> int:
    from peftkern.generate.chat import ChatSession
    from peftkern.generate.loading import load_for_generation

    try:
        settings = settings_from_args(args)
        lm, tok = load_for_generation(args.model, args.adapter, args.tokenizer, args.nf4, args.device)
        processors, scorer = steering_from_args(args, lm, tok)
        session = ChatSession(lm, tok, settings, system=args.system, processors=processors, scorer=scorer)
    except (ValueError, FileNotFoundError) as exc:
        return _fail("chat", exc)
    return session.run(sys.stdin, sys.stdout)
