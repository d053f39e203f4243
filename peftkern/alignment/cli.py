"""``peftkern cai-sl``, ``peftkern rlaif``, ``peftkern pipeline``, ``peftkern self-critique``.

``cai-sl`` and ``rlaif`` are one-round pipelines (peftkern.alignment.pipeline) built from their flags,
so they write, resume and report as a pipeline does; ``self-critique`` is the decoding mode."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from peftkern.alignment.cai import CONTEXTS, CRITICS, ChainSettings, prompts_of
from peftkern.alignment.constitution import ConstitutionError, load_constitution
from peftkern.alignment.critique import self_critique
from peftkern.alignment.pipeline import run_pipeline
from peftkern.alignment.resume import ResumeError, read_jsonl, write_jsonl
from peftkern.alignment.spec import PipelineError, load_spec, parse_spec
from peftkern.generate.loading import LoadError, load_for_generation
from peftkern.generate.prompts import PromptError, as_messages
from peftkern.models.tasks import SYSTEM_PROMPT
from peftkern.train.config import load_yaml
from peftkern.train.errors import TrainError

# trainer settings for the tiny models (those of peftkern/alignment/examples/tiny.yaml)
TINY_SFT = {"lr": 5e-3, "batch_size": 16, "max_length": 128, "max_steps": 20}
TINY_DPO = {"lr": 5e-4, "batch_size": 8, "max_length": 128, "max_steps": 20}
_ERRORS = (PipelineError, ConstitutionError, ResumeError, TrainError, LoadError, PromptError)


def _common(p, what: str) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (the embedded default), 'tiny-micro' or a local "
                   "transformers causal-LM directory (default: tiny)")
    p.add_argument("--adapter", action="append", default=None, help="start from this adapter folder (merged into the "
                   "policy first; repeat for a chain of adapters, each trained on the merge of the ones before)")
    p.add_argument("--constitution", default=None, help="a bundled constitution (default, tasks) or a YAML/JSON file "
                   "(default: 'tasks' with the tiny models, else 'default')")
    p.add_argument("--prompts", default="bundled", help="JSONL of records with 'prompt' or 'messages' (default: the "
                   "bundled tasks' training questions, tiny models only)")
    p.add_argument("--n", type=int, default=96, help=f"prompts to {what} (default 96)")
    p.add_argument("--out", required=True, help="output directory (resumable: see --resume)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds first")
    p.add_argument("--eval-suite", action="append", default=None, help="evaluation suite before and after "
                   "(repeatable; default for tiny models: instruct-tasks and tasks); 'none' to skip")
    p.add_argument("--eval-limit", type=int, default=60, help="items per suite (default 60)")
    p.add_argument("--train-config", default=None, help="YAML of trainer settings (TrainConfig keys) for the "
                   "training step")
    p.add_argument("--max-steps", type=int, default=None, help="trainer optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="trainer learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    p.add_argument("--quiet", action="store_true")


def add_parser(sub) -> None:
    p = sub.add_parser("cai-sl", help="Constitutional AI, supervised stage: answer -> critique -> revision chains, "
                       "then SFT on the final revisions",
                       description="For each prompt the model answers, critiques its answer against a sampled "
                       "principle and revises (batched, KV cache); writes chains/ (every step kept), sft.jsonl "
                       "(TRL 'messages') and trains SFT on it; evaluates before and after. See docs/alignment.md.")
    _common(p, "answer")
    p.add_argument("--revisions", type=int, default=1, help="critique -> revision steps per prompt (default 1)")
    p.add_argument("--critic", choices=CRITICS, default="auto", help="model: the model critiques; rules: the "
                   "principle's rule checks; auto: rules where a principle has checks (default)")
    p.add_argument("--context", choices=CONTEXTS, default=None, help="chain: revise in the whole conversation; fresh: "
                   "ask again with the revision request in the system turn; resample: ask again as asked, the rule "
                   "critic chooses among the candidates (default: resample for tiny models, else chain)")
    p.add_argument("--candidates", type=int, default=None, help="revisions sampled per step; the first passing the "
                   "checks is kept (default: 8 for tiny models, else 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer / revision (default: 16 for "
                   "tiny models, else 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of answers and revisions")
    p.add_argument("--keep", choices=("auto", "all", "following"), default="auto", help="which chains become SFT "
                   "data (auto: those whose final revision passes the checks, when there are checks)")
    p.add_argument("--no-train", action="store_true", help="write the chains and sft.jsonl only")
    p.set_defaults(func=run_cai_sl)

    p = sub.add_parser("rlaif", help="AI feedback: two sampled answers per prompt compared under a principle; soft "
                       "labels -> preference pairs -> DPO (or a reward model)",
                       description="Labels by the log-prob of '(A)' vs '(B)' from the policy or another local model "
                       "(both orders averaged), or by a reward function / reward model / the constitution's rules. "
                       "Writes samples/, labels/, pairs.jsonl (with 'confidence') and trains --train on them.")
    _common(p, "sample pairs for")
    p.add_argument("--labeller", default="policy", help="policy | rules | rm:DIR | module:function | a model "
                   "directory (default: policy)")
    p.add_argument("--label-threshold", type=float, default=0.5, help="drop pairs whose label confidence "
                   "max(p, 1-p) is below this (default 0.5: keep every pair with a preference)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the two answers")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default: 16 for tiny "
                   "models, else 128)")
    p.add_argument("--train", choices=("dpo", "rm", "none"), default="dpo", help="what trains on the pairs "
                   "(default dpo)")
    p.set_defaults(func=run_rlaif)

    p = sub.add_parser("pipeline", help="iterated alignment: YAML stages (sft, rm, ppo, dpo, grpo, cai-sl, rlaif, "
                       "generate-pairs, self-critique) repeated for N rounds; report JSON + plot",
                       description="See docs/alignment.md for the file's keys. A killed run continues with --resume.")
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="delete what --out holds first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--stop-after", default=None, help=argparse.SUPPRESS)  # tests: stop once this stage is done
    p.set_defaults(func=run_pipeline_cmd)

    p = sub.add_parser("self-critique", help="decoding with self-critique: answer, then K rounds of critique -> "
                       "revision under sampled principles; prints the final answers",
                       description="The policy critiques and revises its own answers --rounds times (greedy unless "
                       "--temperature). --out writes every chain as JSONL.")
    p.add_argument("--model", default="tiny")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder(s), all active")
    p.add_argument("--constitution", default=None, help="bundled name or file (default: tasks for tiny models)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="JSONL of records with 'prompt' or 'messages'")
    p.add_argument("--rounds", type=int, default=1, help="critique -> revision rounds K (default 1)")
    p.add_argument("--critic", choices=CRITICS, default="auto")
    p.add_argument("--system", default=None, help="system turn before each --prompt (default for tiny models: the "
                   "bundled tasks' system prompt)")
    p.add_argument("--context", choices=CONTEXTS, default=None, help="revision context (default: resample for tiny "
                   "models, whose revisions are new samples the rule critic chooses from; else chain)")
    p.add_argument("--candidates", type=int, default=None, help="revisions sampled per round (default: 8 for tiny "
                   "models, else 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 for tiny models, else 64")
    p.add_argument("--temperature", type=float, default=None, help="default: 0.7 for tiny models (resampling), else "
                   "0 (greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the chains here (JSONL)")
    p.set_defaults(func=run_self_critique)


def _tiny(model: str) -> bool:
    """The embedded models, or a policy a pipeline made from them (its tokenizer is the byte tokenizer)."""
    if model.startswith("tiny"):
        return True
    try:
        with open(os.path.join(model, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return config.get("bos_token") == "<|bos|>" and "<|assistant|>" in (config.get("extra_special_tokens") or [])


def _spec(args, stages: list[dict]) -> dict:
    settings = {}
    if args.train_config:
        settings.update(load_yaml(args.train_config))
    for key in ("max_steps", "lr"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for s in stages:
        if "settings" in s:
            s["settings"] = {**s["settings"], **settings}  # the user's settings over the tiny defaults
    suites = args.eval_suite if args.eval_suite is not None else (["instruct-tasks", "tasks"] if _tiny(args.model) else [])
    if suites == ["none"]:
        suites = []
    data = {"model": args.model, "constitution": args.constitution or ("tasks" if _tiny(args.model) else "default"),
            "rounds": 1, "prompts": args.prompts, "prompts_per_round": args.n, "seed": args.seed,
            "batch_size": args.batch_size, "eval": {"suites": suites, "limit": args.eval_limit}, "stages": stages}
    if args.adapter:
        data["adapter"] = args.adapter
    return data


def _run(command: str, args, data: dict, path: str) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = parse_spec(data, path) if data is not None else load_spec(path)
        report = run_pipeline(spec, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                              stop_after=getattr(args, "stop_after", None))
    except (*_ERRORS, ValueError) as exc:
        print(f"peftkern {command}: error: {exc}", file=sys.stderr)
        return 2
    for r in report["rounds"]:
        shown = {k: round(v, 3) for k, v in r["metrics"].items() if k.count("/") == 1}
        print(f"round {r['round']}: {json.dumps(shown)}")
    print(f"wrote {args.out}/report.json and report.png")
    return 0


def run_cai_sl(args) -> int:
    tiny = _tiny(args.model)
    chain = {"revisions": args.revisions, "critic": args.critic, "context": args.context or ("resample" if tiny else "chain"),
             "candidates": args.candidates or (8 if tiny else 1), "temperature": args.temperature,
             "max_new_tokens": args.max_new_tokens or (16 if tiny else 128)}
    stage = {"stage": "self-critique" if args.no_train else "cai-sl", "name": "cai-sl", "chain": chain, "keep": args.keep}
    if args.no_train:
        stage["rounds"] = max(args.revisions, 1)
        chain.pop("revisions")
    else:
        stage["settings"] = dict(TINY_SFT) if tiny else {}
    return _run("cai-sl", args, _spec(args, [stage]), "peftkern cai-sl")


def run_rlaif(args) -> int:
    stages = [{"stage": "rlaif", "labeller": args.labeller, "label_threshold": args.label_threshold,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens or (16 if _tiny(args.model) else 128)}]
    if args.train != "none":
        stages.append({"stage": args.train, "settings": dict(TINY_DPO) if _tiny(args.model) else {}})
    return _run("rlaif", args, _spec(args, stages), "peftkern rlaif")


def run_pipeline_cmd(args) -> int:
    return _run("pipeline", args, None, args.pipeline)


def run_self_critique(args) -> int:
    try:
        constitution = load_constitution(args.constitution or ("tasks" if _tiny(args.model) else "default"))
        tiny = _tiny(args.model)
        system = args.system if args.system is not None else (SYSTEM_PROMPT if tiny else None)
        prompts = [as_messages(p, system) for p in args.prompt]
        if args.prompts:
            prompts += prompts_of(read_jsonl(args.prompts), args.prompts)
        if not prompts:
            raise PipelineError("give --prompt TEXT (repeatable) or --prompts FILE")
        model, tok = load_for_generation(args.model, args.adapter)
        pick = (lambda value, small, large: value if value is not None else (small if tiny else large))
        settings = ChainSettings(critic=args.critic, context=pick(args.context, "resample", "chain"),
                                 candidates=pick(args.candidates, 8, 1), max_new_tokens=pick(args.max_new_tokens, 16, 64),
                                 temperature=pick(args.temperature, 0.7, 0.0), seed=args.seed)
        chains = self_critique(model, tok, prompts, constitution, args.rounds, settings)
    except (*_ERRORS, ValueError) as exc:
        print(f"peftkern self-critique: error: {exc}", file=sys.stderr)
        return 2
    for c in chains:
        print(c["final"])
    if args.out:
        write_jsonl(args.out, chains)
    return 0
