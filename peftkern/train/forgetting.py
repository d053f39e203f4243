"""The forgetting report on the embedded default: SFT on task A, then on task B, and what B costs A.

Task A is the bundled ``add`` skill, task B ``upper`` (``peftkern.models.tasks``; ``reverse`` is out
of the tiny model's reach in a few hundred steps, so it could show no gain); the base is the
pretrained tiny Llama, whose corpus states all three skills in plain sentences. For full
fine-tuning and for LoRA, stage 1 trains A once; stage 2 trains B from that model with each tool
against forgetting:

* ``none``: plain SFT on B;
* ``rehearsal``: a share of every batch replays task A's training data (``--rehearsal-data``);
* ``rehearsal (corpus)``: the share replays the base corpus as plain text (the LM loss);
* ``EWC``: ``--ewc`` with the Fisher of the stage-2 parameters on A's data, at their start, for
  three strengths lambda;
* ``L2-SP``: ``--l2sp`` (F = 1), three lambdas.

LoRA's stage 1 adapter is merged into the base, and stage 2 adds a fresh adapter to that model: its
anchor is the adapter's initial factors (delta = 0, the stage-1 model), so EWC there penalises the
factors the old task's Fisher says matter (at B = 0 only B's; A's gradient is zero) and L2-SP pulls
the delta back to zero.

Measured with ``peftkern.evaluation``: held-out exact match of A and of B (suite ``tasks``: 30
held-out questions per skill, greedy) and the perplexity of held-out base-corpus text (suite
``perplexity-tasks``). The multi-epoch curve trains B over several epochs (full fine-tuning, no
tool) and evaluates both tasks after each.

``run_report(out_dir)`` does it all and writes ``report.json``, ``report.md``, ``forgetting.png`` and
``curve.png``; ``peftkern forgetting --out DIR`` is the command (``--quick`` for a smoke run).
"""
from __future__ import annotations

import json
import os
import random
import time

import torch

from peftkern.models import tasks
from peftkern.train.atomic import atomic_write_text
from peftkern.train.config import TrainConfig

TASK_A, TASK_B = "add", "upper"
METHODS = ("none", "rehearsal", "rehearsal (corpus)", "EWC", "L2-SP")
# Stage settings (full / quick).
PLANS = {
    "full": dict(train=480, steps_a=150, steps_b=150, batch=16, eval_limit=90, corpus=480, curve_epochs=4,
                 fisher_samples=128, ewc_lambdas=(100.0, 1e3, 1e4, 1e5), l2sp_lambdas=(0.01, 0.1, 1.0)),
    "quick": dict(train=48, steps_a=4, steps_b=4, batch=8, eval_limit=6, corpus=32, curve_epochs=2, fisher_samples=8,
                  ewc_lambdas=(100.0,), l2sp_lambdas=(0.01,)),
}
SCHEDULE = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
MODES = {"full": dict(lora_r=0, lr=1e-3), "LoRA": dict(lora_r=16, lora_alpha=32.0, lr=2e-3)}
REHEARSAL_RATIO = 0.25


def variants(plan: dict) -> list[tuple[str, dict]]:
    """(method, its settings) for every stage-2 run: one per method, one per lambda for EWC and L2-SP."""
    out = [("none", {}), ("rehearsal", {"rehearsal_ratio": REHEARSAL_RATIO}),
           ("rehearsal (corpus)", {"rehearsal_ratio": REHEARSAL_RATIO})]
    out += [("EWC", {"ewc_lambda": lam}) for lam in plan["ewc_lambdas"]]
    out += [("L2-SP", {"ewc_lambda": lam}) for lam in plan["l2sp_lambdas"]]
    return out


def skill_records(skill: str, n: int, seed: int, exclude: set[str]) -> list[dict]:
    """``n`` SFT records of one skill, none of whose questions is in ``exclude``."""
    rng = random.Random(seed)
    items, tries = [], 0
    while len(items) < n:
        tries += 1
        if tries > 100 * n:
            raise ValueError(f"cannot draw {n} {skill} questions outside the held-out ones")
        q = tasks.make_question(rng, skill)
        if q[0] not in exclude:
            items.append(q)
    return tasks.sft_records(items)


def write_data(folder: str, plan: dict, seed: int = 0) -> dict:
    """Task A and task B training files (held-out questions excluded) and a base-corpus text file."""
    from peftkern.evaluation.suites import HELD_OUT_SEED

    os.makedirs(folder, exist_ok=True)
    held_out = {q for q, _, _ in tasks.questions(plan["eval_limit"], HELD_OUT_SEED)}
    paths = {}
    for name, skill, offset in (("a", TASK_A, 11), ("b", TASK_B, 23)):
        path = os.path.join(folder, f"task_{skill}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in
                                        skill_records(skill, plan["train"], seed + offset, held_out)))
        paths[name] = path
    corpus = tasks.pretraining_text(tasks.questions(plan["corpus"], seed + 7, distinct=False))
    paths["corpus"] = os.path.join(folder, "corpus.jsonl")
    atomic_write_text(paths["corpus"], "".join(json.dumps({"text": t}) + "\n" for t in corpus))
    return paths


def held_out_examples(tokenizer, limit: int) -> dict[str, list[dict]]:
    """The evaluation's held-out questions of A and of B as tokenized SFT examples (for their NLL)."""
    from peftkern.evaluation.suites import HELD_OUT_SEED
    from peftkern.train.data import Record, encode_sft

    out = {TASK_A: [], TASK_B: []}
    for i, item in enumerate(tasks.questions(limit, HELD_OUT_SEED)):
        skill = tasks.SKILLS[i % len(tasks.SKILLS)]
        if skill in out:
            rec = Record(tasks.sft_records([item])[0], f"held-out {i}")
            out[skill].append(encode_sft(tokenizer, rec, 96, True))
    return out


def evaluate_lm(lm, tokenizer, limit: int) -> dict:
    """{A and B held-out accuracy, A and B held-out answer NLL per token, base-corpus perplexity} of
    ``lm`` as it is (adapters as set). The NLL of A's right answers shows how much of A is left
    before the greedy answer flips."""
    from peftkern.evaluation import evaluate
    from peftkern.train.model import LMWithHeads
    from peftkern.train.sft import sft_eval_loss

    was = lm.training
    lm.eval()
    with torch.no_grad():
        out = evaluate(lm, tokenizer, ["tasks", "perplexity-tasks"], limit=limit, batch_size=16)["suites"]
        device = next(lm.parameters()).device
        nll = {skill: sft_eval_loss(LMWithHeads(lm), examples, tokenizer.pad_token_id, device)
               for skill, examples in held_out_examples(tokenizer, limit).items()}
    lm.train(was)
    m = out["tasks"]["metrics"]
    return {"acc_a": m.get(f"exact_match/{TASK_A}"), "acc_b": m.get(f"exact_match/{TASK_B}"),
            "nll_a": nll[TASK_A], "nll_b": nll[TASK_B], "ppl": out["perplexity-tasks"]["metrics"]["perplexity"]}


def _config(out: str, model: str, mode: str, plan: dict, steps: int, data: str, seed: int, **extra) -> TrainConfig:
    values = dict(model=model, out=out, data=data, max_steps=steps, batch_size=plan["batch"], seed=seed,
                  strategy="none", quiet=True, log_every=max(steps // 4, 1), overwrite=True, max_length=96,
                  **SCHEDULE, **MODES[mode])
    if steps <= SCHEDULE["warmup_steps"]:
        values["warmup_steps"] = 0
    values.update(extra)
    return TrainConfig(**values).check()


def _train(cfg: TrainConfig, eval_records=None, callbacks=()):
    from peftkern.train.run import build_trainer

    trainer = build_trainer("sft", cfg, callbacks=callbacks)
    trainer.eval_examples = trainer.eval_examples[:16]
    summary = trainer.train()
    return trainer, summary


def _merged_model_dir(trainer, out: str, tokenizer) -> str:
    """The trained LM (LoRA merged in) saved as a transformers directory with the tokenizer."""
    from peftkern.train.adapters import has_lora, merge
    from peftkern.train.model import base_causal_lm

    lm = trainer.module.lm
    lm = merge(lm) if has_lora(lm) else lm
    lm = base_causal_lm(lm)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_report(out_dir: str, plan_name: str = "full", seed: int = 0, progress=print, model: str = "tiny") -> dict:
    """Every stage, variant and evaluation; writes the report files in ``out_dir``; returns the report.
    ``model``: the embedded default ("tiny"), or "tiny-micro" (random weights: for tests of the pipeline)."""
    from peftkern.train.fisher import save_fisher
    from peftkern.train.forgetting_cli import fisher_for_config
    from peftkern.train.loading import load_tokenizer

    plan = PLANS[plan_name]
    started = time.time()
    data = write_data(os.path.join(out_dir, "data"), plan, seed)
    tok = load_tokenizer(TrainConfig(model=model))
    base_cfg = _config(os.path.join(out_dir, "base"), model, "full", plan, 1, data["a"], seed)
    from peftkern.train.loading import load_lm

    rows, stages = [], {}
    stages["base"] = evaluate_lm(load_lm(base_cfg, quiet=True), tok, plan["eval_limit"])
    progress(f"forgetting: base {stages['base']}")
    for mode in MODES:
        stage1_out = os.path.join(out_dir, mode, "stage1")
        trainer, _ = _train(_config(stage1_out, model, mode, plan, plan["steps_a"], data["a"], seed))
        after_a = evaluate_lm(trainer.module.lm, tok, plan["eval_limit"])
        model_a = _merged_model_dir(trainer, os.path.join(out_dir, mode, "model_a"), tok)
        stages[f"{mode}: after A"] = after_a
        progress(f"forgetting: {mode} after A {after_a}")
        fisher_path = None
        for method, knobs in variants(plan):
            tag = method.replace(" ", "_").replace("(", "").replace(")", "")
            lam = knobs.get("ewc_lambda")
            run_out = os.path.join(out_dir, mode, tag + (f"_{lam:g}" if lam is not None else ""))
            extra = dict(knobs)
            if method == "rehearsal":
                extra["rehearsal_data"] = data["a"]
            elif method == "rehearsal (corpus)":
                extra["rehearsal_data"] = data["corpus"]
            elif method == "EWC":
                if fisher_path is None:  # one Fisher per mode: A's data at the stage-2 start
                    fcfg = _config(run_out, model_a, mode, plan, plan["steps_b"], data["a"], seed)
                    fisher, fingerprint, used = fisher_for_config(fcfg, "empirical", plan["fisher_samples"])
                    fisher_path = os.path.join(out_dir, mode, "fisher_a.safetensors")
                    save_fisher(fisher_path, fisher, "empirical", used, fingerprint)
                extra["ewc"] = fisher_path
            elif method == "L2-SP":
                extra["l2sp"] = True
            t0 = time.time()
            trainer, _ = _train(_config(run_out, model_a, mode, plan, plan["steps_b"], data["b"], seed, **extra))
            after_b = evaluate_lm(trainer.module.lm, tok, plan["eval_limit"])
            row = {"mode": mode, "variant": method, **after_b, "train_seconds": round(time.time() - t0, 1),
                   "acc_a_before_b": after_a["acc_a"], "acc_b_before_b": after_a["acc_b"],
                   "b_gain": after_b["acc_b"] - after_a["acc_b"], "a_kept": after_b["acc_a"] - after_a["acc_a"],
                   "ppl_before_b": after_a["ppl"], "nll_a_before_b": after_a["nll_a"], "lambda": lam,
                   "rehearsal_ratio": extra.get("rehearsal_ratio")}
            rows.append(row)
            progress(f"forgetting: {mode} / {method} {knobs}: {after_b}")
    curve = epoch_curve(out_dir, plan, data, tok, seed)
    report = {"plan": plan_name, "model": model, "settings": plan, "modes": MODES, "schedule": SCHEDULE, "task_a": TASK_A,
              "task_b": TASK_B, "rehearsal_ratio": REHEARSAL_RATIO, "stages": stages, "rows": rows, "curve": curve,
              "seconds": round(time.time() - started, 1), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    write_report(out_dir, report)
    return report


def epoch_curve(out_dir: str, plan: dict, data: dict, tok, seed: int) -> list[dict]:
    """Full fine-tuning on B from the stage-1 full model for several epochs: both tasks per epoch."""
    model_a = os.path.join(out_dir, "full", "model_a")
    steps_per_epoch = plan["train"] // plan["batch"]
    points = []
    cfg = _config(os.path.join(out_dir, "full", "curve"), model_a, "full", plan, steps_per_epoch * plan["curve_epochs"],
                  data["b"], seed)

    def at_epoch_end(trainer, done, record):
        if done % steps_per_epoch == 0:
            points.append({"epoch": done // steps_per_epoch, "step": done,
                           **evaluate_lm(trainer.module.lm, tok, plan["eval_limit"])})

    from peftkern.train.loading import load_lm

    points.append({"epoch": 0, "step": 0, **evaluate_lm(load_lm(cfg, quiet=True), tok, plan["eval_limit"])})
    _train(cfg, callbacks=[at_epoch_end])
    return points


# -- the report's files -----------------------------------------------------------------------------------

def label_of(row: dict) -> str:
    return row["variant"] + (f" {row['lambda']:g}" if row.get("lambda") is not None else "")


def format_markdown(report: dict) -> str:
    lines = ["| mode | variant | task A acc after B (before B) | task A answer NLL after B (before B) | "
             "task B gain (acc after B) | base-corpus ppl after B (before B) | lambda / ratio | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        knob = (f"lambda {r['lambda']:g}" if r.get("lambda") is not None else
                f"ratio {r['rehearsal_ratio']:g}" if r.get("rehearsal_ratio") else "")
        lines.append(f"| {r['mode']} | {r['variant']} | {r['acc_a']:.2f} ({r['acc_a_before_b']:.2f}) | "
                     f"{r['nll_a']:.2f} ({r['nll_a_before_b']:.2f}) | {r['b_gain']:+.2f} ({r['acc_b']:.2f}) | "
                     f"{r['ppl']:.2f} ({r['ppl_before_b']:.2f}) | {knob} | {r['train_seconds']:.0f} |")
    lines += ["", "| epoch on B | task A acc | task A answer NLL | task B acc | base-corpus ppl |", "|---|---|---|---|---|"]
    for p in report["curve"]:
        lines.append(f"| {p['epoch']} | {p['acc_a']:.2f} | {p['nll_a']:.2f} | {p['acc_b']:.2f} | {p['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path_bars: str, path_curve: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    width = 0.38
    labels = [label_of(r) for r in report["rows"] if r["mode"] == "full"]
    for k, mode in enumerate(MODES):
        rows = [r for r in report["rows"] if r["mode"] == mode]
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        color = f"C{k}"
        for ax, key in zip(axes, ("acc_a", "nll_a", "b_gain", "ppl")):
            ax.bar(xs, [r[key] for r in rows], width, label=mode, color=color)
            before = {"acc_a": "acc_a_before_b", "nll_a": "nll_a_before_b", "ppl": "ppl_before_b"}.get(key)
            if before and rows and rows[0].get(before) is not None:  # the level after A, before B
                ax.axhline(rows[0][before], color=color, linestyle="--", linewidth=1)
    titles = (f"task A ({report['task_a']}) held-out accuracy after B", "task A answer NLL/token after B (lower: kept)",
              f"task B ({report['task_b']}) gain in accuracy", "base-corpus perplexity after B (log)")
    axes[3].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    axes[0].legend(title="dashed: after A, before B", fontsize=8, title_fontsize=8)
    fig.suptitle(f"Forgetting on the embedded default: SFT on A ({report['task_a']}), then B ({report['task_b']}) - "
                 "measured (CPU)")
    fig.tight_layout()
    fig.savefig(path_bars, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [p["epoch"] for p in report["curve"]]
    ax.plot(epochs, [p["acc_a"] for p in report["curve"]], "o-", label="task A (old) accuracy")
    ax.plot(epochs, [p["acc_b"] for p in report["curve"]], "s-", label="task B (new) held-out accuracy")
    ax.set_xlabel("epochs of SFT on B (full fine-tuning)")
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("Multi-epoch curve - measured (CPU)")
    fig.tight_layout()
    fig.savefig(path_curve, dpi=110)
    plt.close(fig)


def write_report(out_dir: str, report: dict) -> None:
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    atomic_write_text(os.path.join(out_dir, "report.md"), format_markdown(report))
    plot(report, os.path.join(out_dir, "forgetting.png"), os.path.join(out_dir, "curve.png"))
