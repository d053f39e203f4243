"""``peftkern sweep sweep.yaml``: grid or random search over trainer settings.

The file::

    trainer: sft              # sft | rm | dpo | kto | ppo
    search: grid              # grid | random
    trials: 8                 # random search: how many runs
    seed: 0                   # random search: the draws
    processes: 1              # runs at once, each a `peftkern <trainer>` process; 0: one after another
                              # inside the sweep's own process (no start-up cost, for small models)
    out: runs/sweep
    metric: eval_after.loss   # a key of each run's metrics.json, dotted for nested ones
    mode: min                 # min | max
    base:                     # settings every run shares (the trainer's flags, as in --config files)
      model: tiny-micro
      max_steps: 4
    params:                   # what varies: a list of values each, or for random search
      lr: [1.0e-4, 3.0e-4]    #   {low: 1e-5, high: 1e-3, log: true} (add int: true for integers)
      rank: [4, 8]            # aliases: rank = lora_r, alpha = lora_alpha, dropout = lora_dropout,
      method: [lora, dora]    #   method = lora | dora | full (full: lora_r 0)

Each run's settings are checked (as ``TrainConfig``) before anything starts. A run writes to
``<out>/runs/run-<hash of its settings>`` (its settings in ``<out>/configs/``, its terminal output in
``<out>/logs/``); a run whose ``metrics.json`` exists is finished and is skipped when the sweep is
started again (after a kill, or with more values added); an unfinished run with a checkpoint continues
from it (``--resume``), one without starts over (``--overwrite``). ``<out>/sweep_log.jsonl`` records
each start, skip, finish and failure.
Results: ``<out>/results.json``, ``results.md`` (a table) and ``results.png``, sorted by the metric.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from peftkern.data.io import write_json
from peftkern.data.plots import plot_sweep
from peftkern.train.atomic import atomic_write_text
from peftkern.train.checkpoint import latest_checkpoint
from peftkern.train.config import TRAINERS, TrainConfig
from peftkern.train.outdir import previous_run
from peftkern.train.run import run as train_run

ALIASES = {"rank": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
METHODS = {"lora": {"dora": False}, "dora": {"dora": True}, "full": {"lora_r": 0, "dora": False}}
_TOP_KEYS = ("trainer", "search", "trials", "seed", "processes", "out", "metric", "mode", "base", "params")


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the file, line and key."""


@dataclass
class Sweep:
    path: str
    trainer: str
    search: str = "grid"
    trials: int = 8
    seed: int = 0
    processes: int = 1
    out: str = "runs/sweep"
    metric: str = "eval_after.loss"
    mode: str = "min"
    base: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # name -> list of values or {low, high, log, int}


@dataclass
class PlannedRun:
    name: str
    params: dict  # as written in the sweep file
    settings: dict  # TrainConfig fields, params resolved
    out: str

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- reading the file ----------------------------------------------------------------------------
def _lines(path: str, text: str) -> dict:
    """Line of each top-level key, and of each key under base/params, for error messages."""
    lines = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SweepError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML ({getattr(exc, 'problem', exc)})") \
            from None
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            lines[str(k.value)] = k.start_mark.line + 1
            if isinstance(v, yaml.MappingNode):
                for k2, _ in v.value:
                    lines[f"{k.value}.{k2.value}"] = k2.start_mark.line + 1
    return lines


def load_sweep(path: str) -> Sweep:
    if not os.path.isfile(path):
        raise SweepError(f"{path}: no such sweep file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = _lines(path, text)
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of keys ({', '.join(_TOP_KEYS)})")

    def at(key: str) -> str:
        return f"{path}:{lines.get(key, '?')}"

    for key in raw:
        if key not in _TOP_KEYS:
            raise SweepError(f"{at(str(key))}: unknown key {key!r}; known: {', '.join(_TOP_KEYS)}")
    if raw.get("trainer") not in TRAINERS:
        raise SweepError(f"{at('trainer')}: 'trainer' must be one of {TRAINERS}, got {raw.get('trainer')!r}")
    sweep = Sweep(path=path, **{k: raw[k] for k in _TOP_KEYS if k in raw})
    checks = [("search", sweep.search in ("grid", "random"), "grid or random"),
              ("mode", sweep.mode in ("min", "max"), "min or max"),
              ("trials", isinstance(sweep.trials, int) and sweep.trials >= 1, "an integer >= 1"),
              ("processes", isinstance(sweep.processes, int) and sweep.processes >= 0, "an integer >= 0"),
              ("seed", isinstance(sweep.seed, int), "an integer"),
              ("metric", isinstance(sweep.metric, str) and sweep.metric, "a metrics.json key"),
              ("out", isinstance(sweep.out, str) and sweep.out, "a directory"),
              ("base", isinstance(sweep.base, dict), "a mapping of settings"),
              ("params", isinstance(sweep.params, dict) and sweep.params, "a non-empty mapping of setting: values")]
    for key, ok, what in checks:
        if not ok:
            raise SweepError(f"{at(key)}: '{key}' must be {what}, got {getattr(sweep, key)!r}")
    if not os.path.isabs(sweep.out):
        sweep.out = os.path.join(os.path.dirname(os.path.abspath(path)), sweep.out)
    for section in ("base", "params"):
        for key, value in getattr(sweep, section).items():
            _check_setting(sweep, section, str(key), value, f"{path}:{lines.get(f'{section}.{key}', '?')}")
    return sweep


def _field_name(key: str) -> str:
    key = key.replace("-", "_")
    return ALIASES.get(key, key)


def _check_setting(sweep: Sweep, section: str, key: str, value, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    name = _field_name(key)
    if section == "base" and name in ("out", "resume", "overwrite"):
        raise SweepError(f"{where}: '{key}' is set by the sweep for each run")
    if key == "method" and section == "params":
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in METHODS]
        if bad:
            raise SweepError(f"{where}: method {bad[0]!r} unknown; known: {', '.join(METHODS)}")
        return
    if name not in fields:
        raise SweepError(f"{where}: unknown setting {key!r} (the trainer's settings: {', '.join(sorted(fields))}; "
                         f"aliases: {', '.join(list(ALIASES) + ['method'])})")
    if sweep.trainer not in fields[name].metadata["kinds"]:
        raise SweepError(f"{where}: {key!r} does not apply to 'peftkern {sweep.trainer}'")
    if section == "params":
        if isinstance(value, dict):
            if sweep.search != "random":
                raise SweepError(f"{where}: a {{low, high}} range needs search: random; grid search takes a list")
            unknown = set(value) - {"low", "high", "log", "int"}
            if unknown or not {"low", "high"} <= set(value):
                raise SweepError(f"{where}: a range is {{low, high, log?, int?}}, got {sorted(value)}")
            if value.get("log") and min(value["low"], value["high"]) <= 0:
                raise SweepError(f"{where}: a log range needs low and high > 0")
        elif not isinstance(value, list) or not value:
            raise SweepError(f"{where}: '{key}' must be a non-empty list of values (or a range for random search)")


# -- planning ------------------------------------------------------------------------------------
def _draw(spec, rng: random.Random):
    if isinstance(spec, list):
        return rng.choice(spec)
    lo, hi = float(spec["low"]), float(spec["high"])
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if spec.get("log") else rng.uniform(lo, hi)
    return int(round(x)) if spec.get("int") else x


def _resolve(params: dict) -> dict:
    """Aliases to TrainConfig fields; ``method`` applied last (``full`` sets lora_r 0 whatever the rank)."""
    out = {_field_name(k): v for k, v in params.items() if k != "method"}
    if "method" in params:
        out.update(METHODS[params["method"]])
    return out


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Every run of the sweep (the same list each time for the same file), each checked as a TrainConfig."""
    keys = list(sweep.params)
    if sweep.search == "grid":
        combos = [dict(zip(keys, values)) for values in itertools.product(*(sweep.params[k] for k in keys))]
    else:
        rng = random.Random(sweep.seed)
        combos = [{k: _draw(sweep.params[k], rng) for k in keys} for _ in range(sweep.trials)]
    runs, seen = [], set()
    base = {_field_name(k): v for k, v in sweep.base.items()}
    for params in combos:
        settings = {**base, **_resolve(params)}
        blob = json.dumps({"trainer": sweep.trainer, "settings": settings}, sort_keys=True, default=str)
        name = "run-" + hashlib.sha256(blob.encode()).hexdigest()[:10]
        if name in seen:
            continue
        seen.add(name)
        out = os.path.join(sweep.out, "runs", name)
        try:
            TrainConfig(**{**settings, "out": out}).check()
        except (TypeError, ValueError) as exc:
            raise SweepError(f"{sweep.path}: the run {params} is not a valid 'peftkern {sweep.trainer}' run: {exc}") \
                from None
        runs.append(PlannedRun(name, params, settings, out))
    return runs


# -- running -------------------------------------------------------------------------------------
def metric_of(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _finished(run: PlannedRun) -> dict | None:
    path = os.path.join(run.out, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _log(sweep: Sweep, record: dict) -> None:
    os.makedirs(sweep.out, exist_ok=True)
    with open(os.path.join(sweep.out, "sweep_log.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def _config_path(sweep: Sweep, run: PlannedRun) -> str:
    return os.path.join(sweep.out, "configs", f"{run.name}.yaml")


def _write_config(sweep: Sweep, run: PlannedRun, settings: dict) -> str:
    path = _config_path(sweep, run)
    atomic_write_text(path, yaml.safe_dump(settings, sort_keys=True))
    return path


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the sweep process dies (Linux), so a killed sweep
    leaves no run behind to finish unseen."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _execute(sweep: Sweep, run: PlannedRun, in_process: bool, threads: int | None) -> str | None:
    """Run one training run to its end; None on success, else what went wrong."""
    # A killed run continues from its checkpoint; one killed before its first checkpoint starts over.
    resume = os.path.isdir(run.out) and latest_checkpoint(run.out, warn=None) is not None
    overwrite = not resume and bool(previous_run(run.out))
    settings = {**run.settings, "out": run.out, "resume": resume, "overwrite": overwrite}
    config = _write_config(sweep, run, settings)
    _log(sweep, {"run": run.name, "event": "start", "resume": resume, "overwrite": overwrite})
    if in_process:
        try:
            train_run(sweep.trainer, TrainConfig(**settings).check())
        except Exception as exc:  # a failed run is recorded; the sweep goes on
            return f"{type(exc).__name__}: {exc}"
        return None
    env = dict(os.environ)
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    log_path = os.path.join(sweep.out, "logs", f"{run.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "peftkern", sweep.trainer, "--config", config],
                              stdout=log, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-400:].strip().splitlines()
        return f"exit {proc.returncode}: {tail[-1] if tail else ''} (see {log_path})"
    return None


def run_sweep(sweep: Sweep, processes: int | None = None, echo=print) -> list[dict]:
    """Run every unfinished run (skipping finished ones), then write results.json/.md/.png; returns the rows."""
    runs = plan(sweep)
    processes = sweep.processes if processes is None else processes
    todo = []
    for r in runs:
        if _finished(r) is not None:
            _log(sweep, {"run": r.name, "event": "skip"})
            echo(f"skip  {r.name}  {r.label}  (finished)")
        else:
            todo.append(r)
    errors: dict[str, str] = {}

    def one(r: PlannedRun) -> None:
        echo(f"run   {r.name}  {r.label}")
        t0 = time.time()
        err = _execute(sweep, r, processes == 0, max(1, (os.cpu_count() or 1) // max(processes, 1)))
        _log(sweep, {"run": r.name, "event": "failed" if err else "done", "seconds": round(time.time() - t0, 2),
                     **({"error": err} if err else {})})
        if err:
            errors[r.name] = err
            echo(f"FAIL  {r.name}  {err}")

    if processes <= 1:
        for r in todo:
            one(r)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=processes) as pool:
            list(pool.map(one, todo))
    rows = results(sweep, runs, errors)
    write_results(sweep, rows)
    return rows


def results(sweep: Sweep, runs: list[PlannedRun], errors: dict | None = None) -> list[dict]:
    """One row per run, finished ones sorted best first by the metric, then the rest."""
    rows = []
    for r in runs:
        metrics = _finished(r)
        value = metric_of(metrics, sweep.metric) if metrics else None
        status = "finished" if metrics else ("failed" if errors and r.name in errors else "not run")
        if metrics and value is None:
            status = f"finished, no '{sweep.metric}' in metrics.json"
        rows.append({"run": r.name, "label": r.label, "params": r.params, "metric": value, "status": status,
                     "seconds": metrics.get("seconds") if metrics else None,
                     "error": (errors or {}).get(r.name), "out": r.out})
    sign = -1.0 if sweep.mode == "max" else 1.0
    return sorted(rows, key=lambda row: (row["metric"] is None, sign * (row["metric"] or 0.0)))


def format_table(sweep: Sweep, rows: list[dict]) -> str:
    keys = list(sweep.params)
    head = ["#", *keys, sweep.metric, "status", "run"]
    body = [[str(i + 1), *(_short(r["params"].get(k)) for k in keys),
             "-" if r["metric"] is None else f"{r['metric']:.5g}", r["status"], r["run"]] for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def write_results(sweep: Sweep, rows: list[dict]) -> None:
    os.makedirs(sweep.out, exist_ok=True)
    write_json({"trainer": sweep.trainer, "metric": sweep.metric, "mode": sweep.mode, "runs": rows},
               os.path.join(sweep.out, "results.json"))
    atomic_write_text(os.path.join(sweep.out, "results.md"),
                      f"# sweep {os.path.basename(sweep.path)}: peftkern {sweep.trainer}, sorted by {sweep.metric} "
                      f"({sweep.mode})\n\n{format_table(sweep, rows)}\n")
    plot_sweep(rows, sweep.metric, os.path.join(sweep.out, "results.png"), sweep.mode == "max")
