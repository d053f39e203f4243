"""``peftkern pipeline``: stages over rounds. Each round draws new prompts, samples from the current
policy, labels (rule checks, AI feedback, a reward model or function), trains with the existing
trainers (peftkern.train's ``build_trainer``), and is evaluated (peftkern.evaluation); each trainer
stage's adapter is merged into the next policy, or stacked with the earlier ones.

``out`` layout::

    state.json                 what is done (written atomically after every stage and evaluation)
    report.json, report.png    each round's metrics (round 0: the starting policy, after ``setup``)
    setup/<stage>/, round-1/<stage>/, ...   each stage's work: chains/ or pairs/ (chunks), the data
                               it wrote (sft.jsonl, pairs.jsonl), a trainer's run (adapter/, log.jsonl,
                               checkpoints/), policy/ (the merged model, adapters: merge)

A killed pipeline started again with ``resume`` skips the stages and evaluations done, redoes the
chunks of a data step not yet written, and resumes a trainer from its newest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch

from peftkern.alignment import cai, rlaif
from peftkern.alignment.constitution import load_constitution
from peftkern.alignment.plots import plot_rounds
from peftkern.alignment.resume import ChunkStore, read_jsonl, write_jsonl
from peftkern.alignment.spec import POLICY_TRAINERS, PipelineError, PipelineSpec, Stage
from peftkern.evaluation import evaluate
from peftkern.evaluation.harness import default_suites
from peftkern.evaluation.scoring import reward_fn_scorer, reward_model_scorer
from peftkern.generate.loading import attach_adapters, load_base, load_tokenizer
from peftkern.models import tasks
from peftkern.train.atomic import atomic_write_text
from peftkern.train.config import TrainConfig
from peftkern.train.merging import merge_adapters, save_checkpoint_folder
from peftkern.train.ppo import load_reward_fn
from peftkern.train.run import bundled_records, build_trainer

BUNDLED_REWARDS = {"ppo": {"reward_fn": "peftkern.models.tasks:task_reward"},
                   **{k: {"reward_fn": "peftkern.train.rewards:exact_answer,peftkern.train.rewards:answer_format",
                          "reward_weights": "1,0.2"} for k in ("grpo", "rloo")}}
CHUNK = 32            # prompts per chunk of a data step (the unit a killed step redoes)
BUNDLED_EVAL = 60     # held-out questions of the bundled tasks (never drawn as training prompts)
# The bundled prompts and trainer data are drawn with data seed 0, whose held-out questions are the
# evaluation suites' (tasks.questions(60, 1)), whatever the pipeline's seed (which drives sampling and
# training): no seed lets a held-out question into training.
BUNDLED_DATA_SEED = 0


def _log(quiet: bool, text: str) -> None:
    """The pipeline's own lines (what runs, what it gave); ``quiet`` silences the trainers' progress bars only."""
    print(text, flush=True)


class Pipeline:
    def __init__(self, spec: PipelineSpec, out: str, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, stop_after: str | None = None):
        self.spec, self.out, self.quiet, self.stop_after = spec, out, quiet, stop_after
        self.constitution = load_constitution(spec.constitution)
        self.state_path = os.path.join(out, "state.json")
        fingerprint = spec.as_dict()
        if os.path.isfile(self.state_path) and not overwrite:
            if not resume:
                raise PipelineError(f"{out}: holds a pipeline run (state.json); pass --resume to continue it or "
                                    "--overwrite to start again")
            with open(self.state_path, encoding="utf-8") as f:
                self.state = json.load(f)
            if self.state.get("spec") != json.loads(json.dumps(fingerprint)):
                old = self.state.get("spec") or {}
                key = next(k for k in sorted(set(old) | set(fingerprint)) if old.get(k) != json.loads(json.dumps(fingerprint.get(k))))
                raise PipelineError(f"{out}: --resume with another pipeline ({key} differs); use another --out")
        else:
            if overwrite and os.path.isdir(out):
                shutil.rmtree(out)
            elif os.path.isdir(out) and os.listdir(out):
                raise PipelineError(f"{out}: not empty; pass --overwrite to replace it")
            os.makedirs(out, exist_ok=True)
            self.state = {"spec": json.loads(json.dumps(fingerprint)), "done": {}, "policy": None, "adapters": [],
                          "base": None, "reward_model": None, "rounds": []}
            self._save()
        self.tokenizer = None

    # -- state ---------------------------------------------------------------------------------------
    def _bar(self, what: str) -> str | None:
        """A progress bar's title, or None with ``quiet``."""
        return None if self.quiet else what

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1))

    def _policy_model(self) -> str:
        return self.state["policy"] or self.spec.model

    def load_policy(self):
        """(model with the current policy's weights and adapters, tokenizer)."""
        if self.spec.adapters == "stack" and self.state["adapters"]:
            specs = [f"stage{i}={path}" for i, path in enumerate(self.state["adapters"])]
            lm = attach_adapters(load_base(self.state["base"]), specs)
            tok = load_tokenizer(self.state["base"])
        else:
            lm, tok = load_base(self._policy_model()), load_tokenizer(self._policy_model())
        return lm.eval(), tok

    # -- prompts -------------------------------------------------------------------------------------
    def round_prompts(self, round_index: int) -> list:
        n = self.spec.prompts_per_round
        if self.spec.prompts == "bundled":
            train, _ = tasks.split(n * max(self.spec.rounds, 1), BUNDLED_EVAL, BUNDLED_DATA_SEED)
            pool = [r["prompt"] for r in tasks.prompt_records(train)]
        else:
            pool = cai.prompts_of(read_jsonl(self.spec.prompts), self.spec.prompts)
        if not pool:
            raise PipelineError(f"{self.spec.prompts}: no prompts")
        start = ((max(round_index, 1) - 1) * n) % len(pool)
        return [pool[(start + i) % len(pool)] for i in range(n)]

    # -- stages --------------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.time()
        if self.spec.adapter and "start" not in self.state["done"]:
            for i, folder in enumerate(self.spec.adapter):
                self._advance_policy(folder, os.path.join(self.out, "start", f"policy-{i}"))
            self.state["done"]["start"] = {"adapters": [os.path.abspath(a) for a in self.spec.adapter]}
            self._save()
        for stage in self.spec.setup:
            self._stage(0, stage, "setup")
        self._evaluate(0)
        for r in range(1, self.spec.rounds + 1):
            for stage in self.spec.stages:
                self._stage(r, stage, f"round-{r}")
            self._evaluate(r)
        report = self.write_report(time.time() - started)
        return report

    def _stage(self, round_index: int, stage: Stage, group: str) -> None:
        key = f"{group}/{stage.name}"
        if key in self.state["done"]:
            _log(self.quiet, f"{key}: done before (skipped)")
            return
        _log(self.quiet, f"{key}: {stage.kind}")
        directory = os.path.join(self.out, group, stage.name)
        t = time.time()
        seed = self.spec.seed + 1000 * round_index + len(self.state["done"])
        round_data = self.state.setdefault("data", {}).setdefault(group, {})
        if stage.kind in ("cai-sl", "self-critique"):
            result = self._chains(stage, directory, round_index, seed, round_data)
            if stage.kind == "cai-sl":
                result.update(self._train("sft", stage, directory, round_data["sft"]))
        elif stage.kind == "generate-pairs":
            result = self._pairs(stage, directory, round_index, seed, round_data)
        elif stage.kind == "rlaif":
            result = self._rlaif(stage, directory, round_index, seed, round_data)
        else:
            data = {"sft": round_data.get("sft"), "dpo": round_data.get("pairs"), "rm": round_data.get("pairs"),
                    "orpo": round_data.get("pairs"), "simpo": round_data.get("pairs"),
                    "cpo": round_data.get("pairs")}.get(stage.kind)
            if stage.kind in ("ppo", "grpo", "rloo"):
                data = self._prompt_file(directory, round_index)
            result = self._train(stage.kind, stage, directory, data)
        result["seconds"] = round(time.time() - t, 2)
        if self.spec.eval_stages and (stage.kind in POLICY_TRAINERS or stage.kind == "cai-sl"):
            result["eval"] = self._metrics()[0]
        self.state["done"][key] = result
        self._save()
        _log(self.quiet, f"{key}: {json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))})}")
        if self.stop_after == key:  # tests: stop between stages as a kill would
            raise SystemExit(3)

    def _chains(self, stage: Stage, directory: str, round_index: int, seed: int, round_data: dict) -> dict:
        settings = cai.ChainSettings(**{"batch_size": self.spec.batch_size, **stage.options.get("chain", {})})
        if stage.kind == "self-critique":
            settings.revisions = stage.options.get("rounds", 1)
        settings.check()
        prompts = self.round_prompts(round_index)
        store = ChunkStore(os.path.join(directory, "chains"), {"settings": settings.as_dict(), "seed": seed,
                                                               "prompts": len(prompts)})
        model, tok = self.load_policy()
        chains = store.run(prompts, CHUNK, lambda i, chunk: cai.run_chains(model, tok, chunk, self.constitution,
                                                                           settings, seed=seed + i), self._bar("chains"))
        records = cai.sft_records(chains, stage.options.get("keep", "auto"))
        path = os.path.join(directory, "sft.jsonl")
        write_jsonl(path, records)
        round_data["sft"] = path
        checked = [c for c in chains if c["follows"] is not None]
        out = {"chains": len(chains), "kept": len(records)}
        if checked:
            out["answers_following"] = sum(bool(self.constitution.follows(c["answer"], c["prompt"]))
                                           for c in checked) / len(checked)
            out["finals_following"] = sum(bool(c["follows"]) for c in checked) / len(checked)
        return out

    def _sampled_pairs(self, stage: Stage, directory: str, round_index: int, seed: int, model, tok) -> list:
        prompts = self.round_prompts(round_index)
        options = {"max_new_tokens": stage.options.get("max_new_tokens", 16),
                   "temperature": stage.options.get("temperature", 1.0)}
        store = ChunkStore(os.path.join(directory, "samples"), {**options, "seed": seed, "prompts": len(prompts)})
        rows = store.run(prompts, CHUNK, lambda i, chunk: [
            {"prompt": p, "a": a, "b": b} for p, a, b in rlaif.sample_pairs(
                model, tok, chunk, seed=seed + i, batch_size=self.spec.batch_size, **options)], self._bar("samples"))
        return [(r["prompt"], r["a"], r["b"]) for r in rows]

    def _pairs(self, stage, directory, round_index, seed, round_data) -> dict:
        model, tok = self.load_policy()
        pairs = self._sampled_pairs(stage, directory, round_index, seed, model, tok)
        path = os.path.join(directory, "samples.jsonl")
        write_jsonl(path, [{"prompt": p, "a": a, "b": b} for p, a, b in pairs])
        round_data["samples"] = path
        return {"pairs": len(pairs)}

    def labeller(self, spec: str, model, tok):
        """``policy`` | ``rules`` | ``rm`` (the reward model of an earlier ``rm`` stage) | ``rm:DIR`` |
        ``module:function`` (f(prompt, completion) -> float) | a local model directory."""
        if spec == "policy":
            return rlaif.ModelLabeller(model, tok, self.constitution, self.spec.batch_size)
        if spec == "rules":
            return rlaif.RewardLabeller(rlaif.rules_scorer(self.constitution))
        if spec == "rm" or spec.startswith("rm:"):
            path = self.state["reward_model"] if spec == "rm" else spec[3:]
            if not path:
                raise PipelineError("labeller rm: no 'rm' stage has run before this one")
            return rlaif.RewardLabeller(reward_model_scorer(path, tok))
        if os.path.isdir(spec):
            return rlaif.ModelLabeller(load_base(spec), load_tokenizer(spec), self.constitution, self.spec.batch_size)
        if ":" in spec:
            return rlaif.RewardLabeller(reward_fn_scorer(load_reward_fn(spec)))
        raise PipelineError(f"labeller {spec!r}: expected policy, rules, rm, rm:DIR, module:function or a model "
                            "directory (no such directory)")

    def _rlaif(self, stage, directory, round_index, seed, round_data) -> dict:
        model, tok = self.load_policy()
        if round_data.get("samples"):
            pairs = [(r["prompt"], r["a"], r["b"]) for r in read_jsonl(round_data["samples"])]
        else:
            pairs = self._sampled_pairs(stage, directory, round_index, seed, model, tok)
        spec = stage.options.get("labeller", "policy")
        labeller = self.labeller(spec, model, tok)
        if isinstance(labeller, rlaif.RewardLabeller) and "reward_temperature" in stage.options:
            labeller.temperature = float(stage.options["reward_temperature"])
        store = ChunkStore(os.path.join(directory, "labels"), {"labeller": spec, "seed": seed, "pairs": len(pairs)})
        labelled = store.run(pairs, CHUNK, lambda i, chunk: rlaif.label_pairs(labeller, chunk, self.constitution,
                                                                              seed=seed + i), self._bar("labels"))
        records = rlaif.preference_records(labelled, stage.options.get("label_threshold", 0.5))
        path = os.path.join(directory, "pairs.jsonl")
        write_jsonl(path, records)  # none kept (every pair tied or unsure): the round's pair trainers skip
        round_data["pairs"] = path
        out = {"pairs": len(pairs), "kept": len(records)}
        if records:
            out["mean_confidence"] = sum(r["confidence"] for r in records) / len(records)
        return out

    def _prompt_file(self, directory: str, round_index: int) -> str:
        path = os.path.join(directory, "prompts.jsonl")
        write_jsonl(path, [{"prompt": p} for p in self.round_prompts(round_index)])
        return path

    def _train(self, kind: str, stage: Stage, directory: str, data: str | None) -> dict:
        examples = len(read_jsonl(data)) if data is not None else None
        if examples == 0:
            _log(self.quiet, f"{stage.name}: {kind} skipped: the round's data step kept no example ({data})")
            return {"trainer": kind, "skipped": "no data kept this round"}
        settings = dict(stage.options.get("settings", {}))
        lowered = self._fit_batch(settings, examples)
        run_dir = os.path.join(directory, "train") if stage.kind in ("cai-sl",) else directory
        if data is None and "data" not in settings:
            if not self.spec.model.startswith("tiny"):
                raise PipelineError(f"{stage.name}: stage {kind} has no data: no earlier step of this round made "
                                    "any; add settings: {data: FILE}")
            train, held_out = bundled_records(kind, BUNDLED_DATA_SEED)
            data = os.path.join(directory, "bundled.jsonl")
            write_jsonl(data, train)
            if "eval_data" not in settings:
                settings["eval_data"] = os.path.join(directory, "bundled_eval.jsonl")
                write_jsonl(settings["eval_data"], held_out)
        if data is not None:
            settings["data"] = data
        if kind in ("ppo", "grpo", "rloo") and self.spec.model.startswith("tiny") \
                and not (settings.get("reward_fn") or settings.get("reward_model")):
            settings.update(BUNDLED_REWARDS[kind])  # the policy is a merged directory now: name the bundled rewards
        checkpoints = os.path.join(run_dir, "checkpoints")
        resume = os.path.isdir(checkpoints) and any(n.startswith("step-") for n in os.listdir(checkpoints))
        cfg = TrainConfig(**{"seed": self.spec.seed, "quiet": self.quiet, "strategy": "none", **settings},
                          model=self._policy_model(), out=run_dir, resume=resume,
                          overwrite=not resume and os.path.isdir(run_dir)).check()
        summary = build_trainer(kind, cfg).train()
        result = {"trainer": kind, "steps": summary.get("steps"), **lowered}
        for when in ("eval_before", "eval_after"):
            if isinstance(summary.get(when), dict):
                result[when] = {k: v for k, v in summary[when].items() if isinstance(v, (int, float))}
        if kind == "rm":
            self.state["reward_model"] = os.path.join(run_dir, "reward_model")
            return result
        if kind in POLICY_TRAINERS:
            self._advance_policy(os.path.join(run_dir, "adapter"), os.path.join(directory, "policy"))
        return result

    def _fit_batch(self, settings: dict, examples: int | None) -> dict:
        """A round that kept fewer examples than one optimizer step takes trains on all of them at once:
        batch_size (and grad_accum) lowered in ``settings``; returns what changed, for the report."""
        defaults = TrainConfig()
        batch, accum = settings.get("batch_size", defaults.batch_size), settings.get("grad_accum", defaults.grad_accum)
        if examples is None or examples >= batch * accum:
            return {}
        settings["grad_accum"] = accum if examples >= accum else 1
        settings["batch_size"] = max(1, examples // settings["grad_accum"])
        _log(self.quiet, f"  {examples} examples this round: batch_size {batch} -> {settings['batch_size']}, "
                         f"grad_accum {accum} -> {settings['grad_accum']}")
        return {"batch_size": settings["batch_size"], "grad_accum": settings["grad_accum"], "examples": examples}

    def _advance_policy(self, adapter: str, policy_dir: str) -> None:
        """The next policy: ``adapter`` merged into the current one (written to ``policy_dir``); with
        ``adapters: stack`` the adapter is also kept in the list the policy loads."""
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f)["base_model_name_or_path"]
        if not os.path.isfile(os.path.join(policy_dir, "config.json")):
            model, _ = merge_adapters(base, [adapter])
            save_checkpoint_folder(model, policy_dir, base)
        if self.state["base"] is None:
            self.state["base"] = base
        self.state["adapters"].append(os.path.abspath(adapter))
        self.state["policy"] = os.path.abspath(policy_dir)

    # -- evaluation and report -----------------------------------------------------------------------
    def _evaluate(self, round_index: int) -> None:
        if any(r["round"] == round_index for r in self.state["rounds"]):
            return
        ev = self.spec.eval
        if "suites" in ev and not ev["suites"]:  # suites: [] (no evaluation)
            self.state["rounds"].append({"round": round_index, "metrics": {}, "samples": {},
                                         "policy": self.state["policy"], "adapters": list(self.state["adapters"])})
            self._save()
            return
        t = time.time()
        metrics, samples = self._metrics()
        self.state["rounds"].append({"round": round_index, "metrics": metrics, "samples": samples,
                                     "policy": self.state["policy"], "adapters": list(self.state["adapters"]),
                                     "seconds": round(time.time() - t, 2)})
        self._save()
        shown = {k: round(v, 3) for k, v in metrics.items() if k.count("/") == 1}
        _log(self.quiet, f"round {round_index} eval: {json.dumps(shown)}")

    def _metrics(self) -> tuple[dict, dict]:
        """({suite/metric: value}, {suite: a few samples}) of the current policy."""
        ev = self.spec.eval
        model, tok = self.load_policy()
        suites = ev.get("suites") or list(default_suites(self.spec.model))
        result = evaluate(model, tok, suites, limit=ev.get("limit"), batch_size=ev.get("batch_size", self.spec.batch_size),
                          max_new_tokens=ev.get("max_new_tokens"))
        metrics = {f"{name}/{m}": v for name, s in result["suites"].items() for m, v in s["metrics"].items()}
        return metrics, {name: s.get("samples", [])[:3] for name, s in result["suites"].items()}

    def write_report(self, seconds: float) -> dict:
        report = {"spec": self.state["spec"], "rounds": self.state["rounds"], "stages": self.state["done"],
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": round(seconds, 2)}
        atomic_write_text(os.path.join(self.out, "report.json"), json.dumps(report, indent=1))
        metrics = self.spec.plot or [k for k in self.state["rounds"][0]["metrics"] if k.count("/") == 1][:4]
        if not metrics:
            return report
        plot_rounds(self.state["rounds"], metrics, os.path.join(self.out, "report.png"))
        return report


def run_pipeline(spec: PipelineSpec, out: str, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 stop_after: str | None = None) -> dict:
    return Pipeline(spec, out, resume, overwrite, quiet, stop_after).run()
