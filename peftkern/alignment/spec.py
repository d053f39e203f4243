"""The pipeline file: what runs, in which order, for how many rounds; checked as a whole before
anything loads, each error naming the file and the key (``pipe.yaml: stages[1]: unknown stage 'dpoo'``).

    model: tiny                  # 'tiny', 'tiny-micro' or a local transformers causal-LM directory
    adapter: runs/sft/adapter    # optional: starting adapter(s) (a folder or a list), merged into the first policy
    constitution: tasks          # a bundled name (default, tasks) or a YAML/JSON file
    rounds: 2
    adapters: merge              # merge: each stage's adapter folded into the next policy;
                                 # stack: the policy is the base with every stage's adapter active
    prompts: bundled             # the bundled tasks' training questions, or a JSONL file (records with 'prompt'
                                 # or 'messages')
    prompts_per_round: 96
    eval: {suites: [instruct-tasks, tasks], limit: 60}
    eval_stages: false           # also evaluate after every stage that changes the policy
    plot: [instruct-tasks/prompt_accuracy, tasks/exact_match]
    seed: 0
    setup: [{stage: sft, settings: {max_steps: 10}}]     # run once, before round 1 (round 0 is evaluated after it)
    stages:                                               # run in order, every round
      - {stage: cai-sl, chain: {critic: rules, context: fresh, candidates: 8}, settings: {max_steps: 20}}
      - {stage: rlaif, labeller: rules, label_threshold: 0.6}
      - {stage: dpo, settings: {max_steps: 20}}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from peftkern.alignment.cai import ChainSettings
from peftkern.alignment.constitution import ConstitutionError, load_constitution
from peftkern.train.config import TRAINERS, settings_from_mapping

DATA_STAGES = ("cai-sl", "rlaif", "generate-pairs", "self-critique")
POLICY_TRAINERS = tuple(t for t in TRAINERS if t != "rm")
STAGES = (*TRAINERS, *DATA_STAGES)
# options each stage takes besides 'stage' (and 'name')
STAGE_KEYS = {
    "cai-sl": ("chain", "settings", "keep"), "self-critique": ("chain", "rounds", "keep"),
    "generate-pairs": ("max_new_tokens", "temperature"),
    "rlaif": ("labeller", "label_threshold", "max_new_tokens", "temperature", "reward_temperature"),
    **{t: ("settings",) for t in TRAINERS},
}
PIPELINE_SET = ("model", "out", "resume", "overwrite", "init_adapter", "adapter")  # per stage, by the pipeline
TOP_KEYS = ("model", "adapter", "constitution", "rounds", "adapters", "prompts", "prompts_per_round", "eval", "plot",
            "seed", "setup", "stages", "batch_size", "eval_stages", "description")


class PipelineError(ValueError):
    """A pipeline file or option that cannot run; the message names the file and key."""


@dataclass
class Stage:
    kind: str
    name: str
    options: dict = field(default_factory=dict)


@dataclass
class PipelineSpec:
    model: str = "tiny"
    adapter: list | None = None    # adapter folders merged, in order, into the first policy
    constitution: str = "default"
    rounds: int = 1
    adapters: str = "merge"
    prompts: str = "bundled"
    prompts_per_round: int = 64
    eval: dict = field(default_factory=dict)
    plot: list = field(default_factory=list)
    seed: int = 0
    batch_size: int = 16
    eval_stages: bool = False    # also evaluate after every stage that changes the policy
    setup: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    path: str = "pipeline"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


def _train_settings(values, where: str, kind: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: expected a mapping of trainer settings, got {type(values).__name__}")
    taken = sorted(k for k in values if str(k).replace("-", "_") in PIPELINE_SET)
    if taken:
        raise PipelineError(f"{where}: {taken[0]!r} is set by the pipeline ({', '.join(PIPELINE_SET)})")
    try:
        return settings_from_mapping(values, where, kind)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


def _chain(values, where: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PipelineError(f"{where}: expected a mapping of chain settings, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(ChainSettings)}
    bad = sorted(set(values) - known)
    if bad:
        raise PipelineError(f"{where}: unknown chain setting(s) {bad} (known: {', '.join(sorted(known))})")
    try:
        ChainSettings(**values).check()
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{where}: {exc}") from None
    return dict(values)


def parse_stage(item, where: str) -> Stage:
    if isinstance(item, str):
        item = {"stage": item}
    if not isinstance(item, dict) or "stage" not in item:
        raise PipelineError(f"{where}: expected a mapping with 'stage' (one of {', '.join(STAGES)}), got {item!r}")
    kind = item["stage"]
    if kind not in STAGES:
        raise PipelineError(f"{where}: unknown stage {kind!r} (stages: {', '.join(STAGES)})")
    allowed = STAGE_KEYS[kind]
    bad = sorted(set(item) - {"stage", "name", *allowed})
    if bad:
        raise PipelineError(f"{where}: unknown key(s) {bad} for stage {kind} (known: stage, name, {', '.join(allowed)})")
    options = {k: v for k, v in item.items() if k not in ("stage", "name")}
    if "settings" in options:
        options["settings"] = _train_settings(options["settings"], f"{where}.settings",
                                              "sft" if kind == "cai-sl" else kind)
    if "chain" in options:
        options["chain"] = _chain(options["chain"], f"{where}.chain")
    if "label_threshold" in options:
        t = options["label_threshold"]
        if not isinstance(t, (int, float)) or not 0.5 <= t <= 1.0:
            raise PipelineError(f"{where}.label_threshold: expected a number in [0.5, 1], got {t!r}")
    if "rounds" in options and (not isinstance(options["rounds"], int) or options["rounds"] < 1):
        raise PipelineError(f"{where}.rounds: expected an integer >= 1, got {options['rounds']!r}")
    if "keep" in options and options["keep"] not in ("auto", "all", "following"):
        raise PipelineError(f"{where}.keep: expected auto, all or following, got {options['keep']!r}")
    return Stage(kind, str(item.get("name") or kind), options)


def parse_spec(data, path: str) -> PipelineSpec:
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected a mapping with 'stages', got "
                            f"{'an empty file' if data is None else type(data).__name__}")
    bad = sorted(set(data) - set(TOP_KEYS))
    if bad:
        raise PipelineError(f"{path}: unknown key(s) {bad} (known: {', '.join(TOP_KEYS)})")
    values = {k: v for k, v in data.items() if k != "description"}
    spec = PipelineSpec(**{k: v for k, v in values.items() if k not in ("setup", "stages")}, path=path)
    for key, kind in (("rounds", int), ("prompts_per_round", int), ("seed", int), ("batch_size", int)):
        value = getattr(spec, key)
        if not isinstance(value, kind) or isinstance(value, bool) or (key != "seed" and value < 1):
            raise PipelineError(f"{path}: {key}: expected {'an integer' if key == 'seed' else 'a positive integer'}, "
                                f"got {value!r}")
    if spec.adapters not in ("merge", "stack"):
        raise PipelineError(f"{path}: adapters: expected merge or stack, got {spec.adapters!r}")
    for key in ("model", "constitution", "prompts"):
        if not isinstance(getattr(spec, key), str) or not getattr(spec, key):
            raise PipelineError(f"{path}: {key}: expected a non-empty string, got {getattr(spec, key)!r}")
    if not isinstance(spec.eval, dict) or set(spec.eval) - {"suites", "limit", "batch_size", "max_new_tokens"}:
        raise PipelineError(f"{path}: eval: expected a mapping with suites, limit, batch_size, max_new_tokens; "
                            f"got {spec.eval!r}")
    if not isinstance(spec.plot, list):
        raise PipelineError(f"{path}: plot: expected a list of 'suite/metric' names, got {spec.plot!r}")
    raw = data.get("stages")
    if not isinstance(raw, list) or not raw:
        raise PipelineError(f"{path}: stages: expected a non-empty list of stages, got {raw!r}")
    spec.stages = [parse_stage(s, f"{path}: stages[{i}]") for i, s in enumerate(raw)]
    setup = data.get("setup") or []
    if not isinstance(setup, list):
        raise PipelineError(f"{path}: setup: expected a list of stages, got {type(setup).__name__}")
    spec.setup = [parse_stage(s, f"{path}: setup[{i}]") for i, s in enumerate(setup)]
    try:
        load_constitution(spec.constitution)
    except ConstitutionError as exc:
        raise PipelineError(f"{path}: constitution: {exc}") from None
    if not spec.model.startswith("tiny"):
        if not os.path.isdir(spec.model):
            raise PipelineError(f"{path}: model: {spec.model}: not 'tiny' / 'tiny-micro' and no such model directory")
        if not os.path.isfile(os.path.join(spec.model, "config.json")):
            raise PipelineError(f"{path}: model: {spec.model}: no config.json in it (not a transformers model)")
    if isinstance(spec.adapter, str):
        spec.adapter = [spec.adapter]
    for folder in spec.adapter or []:
        if not isinstance(folder, str) or not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise PipelineError(f"{path}: adapter: {folder}: no adapter_config.json in it (not an adapter folder)")
    if spec.prompts != "bundled" and not os.path.isfile(spec.prompts):
        raise PipelineError(f"{path}: prompts: {spec.prompts}: no such file (or 'bundled')")
    names = [s.name for s in spec.setup + spec.stages]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PipelineError(f"{path}: stage name(s) {twice} used twice; give each a 'name'")
    return spec


def load_spec(path: str) -> PipelineSpec:
    import yaml

    if not os.path.isfile(path):
        raise PipelineError(f"{path}: no such pipeline file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(data, path)
