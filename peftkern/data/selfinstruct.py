"""Self-Instruct (Wang et al., 2023): new instructions bootstrapped from seed tasks with a local model.

Each round builds ``batch_size`` prompts, each listing instructions drawn from the pool (``seed_in_prompt``
seed tasks and up to ``generated_in_prompt`` accepted ones) as "Task i: ..." and ending with the next
"Task k:", and samples all of them in one batched ``generate`` call (KV cache on). Every line the model
writes is a candidate, kept only if it passes, in this order:

* ``empty``; ``truncated`` (the model hit ``max_new_tokens`` inside it);
* ``punctuation_start`` / ``non_ascii_start``: it must start with an ASCII letter or digit;
* ``length``: ``min_words`` <= words <= ``max_words`` (the paper's 3 and 150);
* ``keyword``: none of ``blocked_keywords`` (things a text model cannot do: image, file, draw, ...)
  and no ``blocked_prefixes`` ("write a program");
* ``duplicate``: not the same text as a pool entry; ``rouge_l``: ROUGE-L F with every pool entry
  (seeds and accepted) < ``rouge_threshold`` (0.7 as in the paper).

An accepted instruction joins the pool at once. Rounds go on until ``n`` are accepted (or
``max_rounds``). Then, unless ``outputs`` is off, the model answers each accepted instruction (greedy,
batched) and the answers are validated: ``empty``, ``truncated`` (no end of turn within
``output_tokens``), ``echo`` (the instruction repeated), ``format`` (not a valid SFT record).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from peftkern.data.converters import normalize_all
from peftkern.data.dedup import normalize_text
from peftkern.data.io import read_records
from peftkern.data.risks import risk_report
from peftkern.data.rouge import RougePool
from peftkern.train.data import DataError, Record, check_record, encode_prompt, left_pad
from peftkern.train.model import base_causal_lm

BLOCKED_KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
BLOCKED_PREFIXES = ("write a program",)
PROMPT_HEADER = "Come up with a series of tasks:\n"
_TASK_MARK = re.compile(r"\s*Task\s*\d+\s*:")


@dataclass
class SelfInstructSettings:
    n: int = 20
    batch_size: int = 8
    seed_in_prompt: int = 6
    generated_in_prompt: int = 2
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.5
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    blocked_keywords: tuple[str, ...] = BLOCKED_KEYWORDS
    blocked_prefixes: tuple[str, ...] = BLOCKED_PREFIXES
    max_rounds: int = 50
    outputs: bool = True
    output_tokens: int = 64
    seed: int = 0

    def check(self) -> "SelfInstructSettings":
        for name in ("n", "batch_size", "seed_in_prompt", "max_new_tokens", "max_rounds", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"self-instruct: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.rouge_threshold <= 1:
            raise ValueError(f"self-instruct: rouge_threshold must be in (0, 1], got {self.rouge_threshold}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("self-instruct: temperature must be > 0 and top_p in (0, 1]")
        if self.min_words > self.max_words:
            raise ValueError(f"self-instruct: min_words {self.min_words} > max_words {self.max_words}")
        return self


@dataclass
class SeedTask:
    instruction: str
    output: str = ""
    where: str = ""


@dataclass
class SelfInstructResult:
    instructions: list[dict] = field(default_factory=list)  # {"instruction", "rouge_l_to_pool", "nearest"}
    records: list[dict] = field(default_factory=list)  # valid TRL records (messages)
    rejected: list[dict] = field(default_factory=list)  # {"stage", "reason", "text", ...}
    report: dict = field(default_factory=dict)


# -- seeds ---------------------------------------------------------------------------------------
def load_seed_tasks(source) -> list[SeedTask]:
    """Seed tasks from Self-Instruct's ``seed_tasks.jsonl`` (``instruction`` + ``instances``) or any
    format peftkern.data.converters reads (first user turn as the instruction)."""
    records = read_records(source)
    seeds, others = [], []
    for rec in records:
        if "instruction" in rec.data and "instances" in rec.data:
            inst = rec.data["instruction"]
            if not isinstance(inst, str) or not inst.strip():
                raise DataError(f"{rec.where}: field 'instruction' must be a non-empty string")
            first = rec.data["instances"][0] if isinstance(rec.data["instances"], list) and rec.data["instances"] else {}
            seeds.append(SeedTask(inst.strip(), str(first.get("output", "")) if isinstance(first, dict) else "",
                                  rec.where))
        else:
            others.append(rec)
    for item in normalize_all(others):
        user = next((m["content"] for m in item["messages"] if m["role"] == "user"), "")
        answer = next((m["content"] for m in reversed(item["messages"]) if m["role"] == "assistant"), "")
        seeds.append(SeedTask(user.strip(), answer, item["where"]))
    if not seeds:
        raise DataError(f"{source}: no seed tasks")
    return seeds


def bundled_seed_tasks(n: int = 24, seed: int = 0) -> list[SeedTask]:
    """Seed tasks for the embedded default: bundled task questions, skills in turn."""
    from peftkern.models import tasks

    return [SeedTask(q, a, f"bundled task {i}") for i, (q, a, _) in enumerate(tasks.questions(n, seed + 11))]


# -- generation ----------------------------------------------------------------------------------
@torch.no_grad()
def generate_batch(lm, tokenizer, prompts: list, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                   top_p: float = 1.0) -> list[tuple[str, bool]]:
    """(text, finished) per prompt from one batched, KV-cached ``generate`` call; ``finished``: the
    model emitted its end token within ``max_new_tokens``. Prompts: strings or message lists."""
    lm = base_causal_lm(lm)
    device = next(lm.parameters()).device
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = lm.training
    lm.eval()
    out = lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                      use_cache=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      **sampling)
    lm.train(was_training)
    new = out[:, ids.shape[1]:]
    finished = (new == tokenizer.eos_token_id).any(dim=1).tolist()
    return list(zip(tokenizer.batch_decode(new, skip_special_tokens=True), finished))


def _max_positions(lm) -> int | None:
    return getattr(base_causal_lm(lm).config, "max_position_embeddings", None)


def build_prompt(instructions: list[str]) -> str:
    body = "".join(f"Task {i}: {t}\n" for i, t in enumerate(instructions, 1))
    return f"{PROMPT_HEADER}{body}Task {len(instructions) + 1}:"


def _fitted_prompt(tokenizer, shown: list[str], budget: int | None) -> str:
    """The prompt, dropping the first listed tasks while it is longer than ``budget`` tokens."""
    while True:
        prompt = build_prompt(shown)
        if budget is None or len(shown) <= 1 or len(encode_prompt(tokenizer, prompt)) <= budget:
            return prompt
        shown = shown[1:]


def parse_candidates(text: str, finished: bool) -> list[tuple[str, bool]]:
    """(instruction, cut) pieces of a generated continuation of "Task k:": the rest of that line, then
    any further "Task j: ..." lines. ``cut``: the last piece when generation stopped on the token limit
    before its line ended."""
    lines = text.split("\n")
    last = len(lines) - 1
    pieces = [(lines[0].strip(), last == 0 and not finished)]
    for i, line in enumerate(lines[1:], 1):
        if not line.strip():
            continue
        mark = _TASK_MARK.match(line)
        if mark is None:
            break  # a line that is not a new task ends the list
        pieces.append((line[mark.end():].strip(), i == last and not finished))
    return pieces


def instruction_filter(text: str, cut: bool, s: SelfInstructSettings) -> str | None:
    """The name of the first filter ``text`` fails (None: it passes the text filters)."""
    if not text:
        return "empty"
    if cut:
        return "truncated"
    if not text[0].isascii():
        return "non_ascii_start"
    if not text[0].isalnum():
        return "punctuation_start"
    n_words = len(text.split())
    if n_words < s.min_words or n_words > s.max_words:
        return "length"
    low = text.lower()
    if any(re.search(rf"\b{re.escape(k.lower())}\b", low) for k in s.blocked_keywords) or \
            any(low.startswith(p.lower()) for p in s.blocked_prefixes):
        return "keyword"
    return None


# -- the loop ------------------------------------------------------------------------------------
def self_instruct(lm, tokenizer, seeds: list[SeedTask], settings: SelfInstructSettings, progress=None) -> SelfInstructResult:
    """Generate ``settings.n`` new instructions from ``seeds`` (and answers to them); see the module doc."""
    s = settings.check()
    if not seeds:
        raise DataError("self-instruct needs at least one seed task")
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    seed_texts = [t.instruction for t in seeds]
    pool = RougePool(seed_texts)
    known = {normalize_text(t) for t in seed_texts}
    accepted: list[dict] = []
    result = SelfInstructResult()
    rejected: Counter = Counter()
    candidates = duplicates = 0
    limit = _max_positions(lm)
    budget = None if limit is None else limit - s.max_new_tokens
    for _ in range(s.max_rounds):
        if len(accepted) >= s.n:
            break
        prompts = []
        for _ in range(s.batch_size):
            shown = rng.sample(seed_texts, min(s.seed_in_prompt, len(seed_texts)))
            generated = [a["instruction"] for a in accepted]
            shown += rng.sample(generated, min(s.generated_in_prompt, len(generated)))
            rng.shuffle(shown)
            prompts.append(_fitted_prompt(tokenizer, shown, budget))
        for text, finished in generate_batch(lm, tokenizer, prompts, s.max_new_tokens, True, s.temperature, s.top_p):
            for cand, cut in parse_candidates(text, finished):
                if len(accepted) >= s.n:
                    break
                candidates += 1
                reason = instruction_filter(cand, cut, s)
                near = None
                if reason is None:
                    if normalize_text(cand) in known:
                        reason = "duplicate"
                    else:
                        near = pool.nearest(cand)
                        if near.score >= s.rouge_threshold:
                            reason = "rouge_l"
                if reason in ("duplicate", "rouge_l"):
                    duplicates += 1
                if reason is not None:
                    rejected[reason] += 1
                    entry = {"stage": "instruction", "reason": reason, "text": cand}
                    if near is not None:
                        entry.update(rouge_l=round(near.score, 4), nearest=pool.texts[near.index])
                    result.rejected.append(entry)
                    continue
                accepted.append({"instruction": cand, "rouge_l_to_pool": round(near.score, 4),
                                 "nearest": pool.texts[near.index] if near.index >= 0 else None})
                pool.add(cand)
                known.add(normalize_text(cand))
                if progress is not None:
                    progress(len(accepted))
    result.instructions = accepted
    failures: Counter = Counter()
    if s.outputs and accepted:
        result.records, failed = answer_and_validate(lm, tokenizer, [a["instruction"] for a in accepted], s)
        failures.update(f["reason"] for f in failed)
        result.rejected += failed
    result.report = risk_report([a["instruction"] for a in accepted], seed_texts, candidates, rejected, duplicates,
                                failures, len(accepted) if s.outputs else 0)
    result.report.update(requested=s.n, accepted=len(accepted), complete=len(accepted) >= s.n,
                         settings={k: v if not isinstance(v, tuple) else list(v) for k, v in vars(s).items()})
    return result


def _answer_prompt(tokenizer, instruction: str):
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": instruction}]
    return f"{instruction}\n"


def output_problem(instruction: str, output: str, finished: bool) -> str | None:
    """Why an answer fails validation (None: it passes)."""
    if not output.strip():
        return "empty"
    if not finished:
        return "truncated"
    if normalize_text(output) == normalize_text(instruction):
        return "echo"
    try:
        check_record(Record(sft_record(instruction, output), "generated"), "sft")
    except DataError:
        return "format"
    return None


def sft_record(instruction: str, output: str) -> dict:
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": output.strip()}],
            "source": "self-instruct"}


def answer_and_validate(lm, tokenizer, instructions: list[str], s: SelfInstructSettings) -> tuple[list[dict], list[dict]]:
    """(valid SFT records, failures ``{"stage": "output", "reason", "text", "output"}``)."""
    records, failed = [], []
    for i in range(0, len(instructions), s.batch_size):
        chunk = instructions[i:i + s.batch_size]
        answers = generate_batch(lm, tokenizer, [_answer_prompt(tokenizer, t) for t in chunk], s.output_tokens, False)
        for inst, (out, finished) in zip(chunk, answers):
            reason = output_problem(inst, out, finished)
            if reason is None:
                records.append(sft_record(inst, out))
            else:
                failed.append({"stage": "output", "reason": reason, "text": inst, "output": out})
    return records, failed
