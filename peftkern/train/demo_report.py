"""The demo's report: the terminal table, the PNG plots of metrics and GRPO rewards, and ``index.html``
(one self-contained page: the table, the plots embedded as base64 PNG, the sample answers).

Every function reads the report dict :func:`peftkern.train.demo.run_demo` builds; nothing here trains."""
from __future__ import annotations

import base64
import html
import os

from peftkern.train.atomic import atomic_write_text
from peftkern.train.logs import read_log

PLOTS = (("metrics.png", "Held-out metrics after each stage"), ("sft_loss.png", "QLoRA SFT loss"),
         ("grpo_reward.png", "GRPO reward of the sampled answers"))
STAGE_NAMES = {"base": "base", "sft": "SFT (QLoRA)", "grpo": "GRPO"}


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table_rows(report: dict) -> list[list[str]]:
    """[stage, exact match, sampled accuracy, GRPO reward, eval loss, steps, seconds, peak RSS MB, what]
    per stage."""
    rows = []
    for s in report["stages"]:
        exact = _pct(s.get("exact_match"))
        if "exact_match_before" in s:
            exact = f"{_pct(s['exact_match_before'])} -> {exact}"
        sampled = _pct(s.get("sampled_accuracy"))
        if "sampled_accuracy_before" in s:
            sampled = f"{_pct(s['sampled_accuracy_before'])} -> {sampled}"
        loss = f"{s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}" if "eval_loss_after" in s else "-"
        reward = f"{s['reward_before']:.3f} -> {s['reward']:.3f}" if "reward" in s else "-"
        rows.append([STAGE_NAMES.get(s["name"], s["name"]), exact, sampled, reward, loss, str(s.get("steps", "-")),
                     f"{s['seconds']:.0f}", f"{s['peak_rss_mb']:.0f}", s.get("what", "")])
    return rows


HEADER = ["stage", "exact match", "sampled acc.", "reward", "eval loss", "steps", "s", "peak MB", "what"]


def format_report(report: dict) -> str:
    """The summary table, the memory figures of peftkern's parts and the sample answers, for the terminal."""
    rows = [HEADER] + table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 4)
    sft = next((s for s in report["stages"] if s["name"] == "sft"), None)
    if sft:
        lines.append(f"NF4 base {sft['model_mb_nf4']:.1f} MB (fp32 {sft['model_mb_fp32']:.1f} MB); 8-bit AdamW state "
                     f"{sft['optimizer_state_mb'] * 1024:.0f} KB (fp32 AdamW {sft['optimizer_state_mb_fp32'] * 1024:.0f} "
                     f"KB) for {sft['trainable_parameters']} LoRA parameters")
    lines.append(f"held-out prompts: {sft['held_out_prompts'] if sft else '?'}, never trained on; exact match: greedy "
                 "answer == the rule's answer; reward: GRPO's held-out metric, the bundled rewards (exact answer 1, "
                 "format 0.2) of the greedy answers; sampled acc.: share right among samples at temperature 1")
    for smp in report["samples"]:
        lines.append(f"  {smp['prompt']!r} (answer {smp['answer']!r}): base {smp['base']!r} | sft "
                     f"{smp['after_sft']!r} | grpo {smp['after_grpo']!r}")
    lines.append(f"total {report['seconds']:.0f} s on {report['cpu_count']} CPUs ({report['threads']} torch threads)")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, png_path: str) -> str:
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


def plot_metrics(report: dict, png_path: str) -> str | None:
    """Bars of greedy exact match and sampled accuracy on the held-out prompts after each stage."""
    plt = _pyplot()
    if plt is None:
        return None
    stages = report["stages"]
    names = [STAGE_NAMES.get(s["name"], s["name"]) for s in stages]
    exact = [s.get("exact_match") or 0.0 for s in stages]
    sampled = [s.get("sampled_accuracy") or 0.0 for s in stages]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    x = range(len(stages))
    bars1 = ax.bar([i - 0.2 for i in x], exact, 0.4, label="exact match (greedy)", color="tab:blue")
    bars2 = ax.bar([i + 0.2 for i in x], sampled, 0.4, label="sampled accuracy (T=1)", color="tab:green")
    for bar in list(bars1) + list(bars2):
        ax.annotate(f"{bar.get_height():.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of held-out prompts")
    ax.set_title("Held-out metrics after each stage")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, png_path)


def plot_rewards(log_path: str, png_path: str) -> str | None:
    """GRPO's mean exact-answer reward (and weighted reward) of each rollout's samples per step."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in read_log(log_path) if "reward" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if rows:
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r.get("rewards/exact_answer", float("nan")) for r in rows], label="exact answer",
                color="tab:green")
        ax.plot(steps, [r["reward"] for r in rows], label="weighted reward", color="tab:gray", alpha=0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean over the rollout")
    ax.set_title("GRPO: reward of the sampled answers")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, png_path)


def _img(out: str, name: str, title: str) -> str:
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return ""
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}code{background:#f6f6f6;padding:0 3px}.ok{color:#070}.bad{color:#a00}
figure{display:inline-block;margin:0 1em 1em 0}figure img{width:340px;border:1px solid #ddd}"""


def render_html(report: dict, out: str) -> str:
    """The page as a string (images read from ``out`` and embedded)."""
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table_rows(report))
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    samples = "".join(
        f"<tr><td><code>{e(s['prompt'])}</code></td><td><code>{e(s['answer'])}</code></td>"
        + "".join(f"<td class=\"{'ok' if s[k] == s['answer'] else 'bad'}\"><code>{e(repr(s[k]))}</code></td>"
                  for k in ("base", "after_sft", "after_grpo")) + "</tr>" for s in report["samples"])
    sft = next((s for s in report["stages"] if s["name"] == "sft"), {})
    parts = ""
    if sft:
        parts = (f"<p>peftkern's parts in this run: the SFT base quantized to <b>NF4</b> ({sft['model_mb_nf4']:.1f} MB "
                 f"instead of {sft['model_mb_fp32']:.1f} MB in fp32), <b>LoRA</b> adapters "
                 f"({sft['trainable_parameters']} trainable parameters), the <b>fused log-prob losses</b> (SFT and "
                 "GRPO from the last hidden states, never the [tokens, vocab] logits) and <b>8-bit AdamW</b> (state "
                 f"{sft['optimizer_state_mb'] * 1024:.0f} KB instead of {sft['optimizer_state_mb_fp32'] * 1024:.0f} KB)."
                 "</p>")
    plots = "".join(_img(out, name, title) for name, title in PLOTS)
    model = report.get("model", {})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>peftkern demo</title><style>{CSS}</style></head><body>
<h1>peftkern demo</h1>
<p>A tiny Llama ({model.get('parameters', '?')} parameters) pretrained on questions and answers as plain text, then taught the chat
format with QLoRA SFT, then GRPO on the exact-answer reward. Metrics on {sft.get('held_out_prompts', '?')}
held-out prompts never trained on. Plan <code>{e(report['plan'])}</code>, seed {report['seed']},
{report['cpu_count']} CPUs, {report['threads']} torch threads, torch {e(report['torch'])}; total
{report['seconds']:.0f} s.</p>
<table id="summary"><tr>{head}</tr>{rows}</table>
{parts}
<h2>Plots</h2>
<div id="plots">{plots}</div>
<h2>Sample answers (held out)</h2>
<table id="samples"><tr><th>prompt</th><th>answer</th><th>base</th><th>after SFT</th><th>after GRPO</th></tr>
{samples}</table>
</body></html>
"""


def write_html(report: dict, out: str) -> str:
    """``out/index.html`` (atomically); returns its path."""
    path = os.path.join(out, "index.html")
    atomic_write_text(path, render_html(report, out))
    return path
