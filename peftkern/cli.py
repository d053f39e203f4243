"""The ``peftkern`` command: info, kernels, demo and the trainers' subcommands.

Each subcommand is a function ``_cmd_<name>(args)`` with its parser built in ``_parser()``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import warnings


def _cmd_info(args) -> int:
    import torch

    import peftkern
    from peftkern import _cuda, backend

    lines = [
        f"peftkern      {peftkern.__version__}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__}",
    ]
    for name in ("triton", "transformers", "safetensors", "cuda.core", "peft", "bitsandbytes", "trl", "liger_kernel"):
        lines.append(f"{name:<13} {_version_of(name)}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"gpu           {gpu}")
    lines.append(f"fatbin        {'present: ' + _cuda.FATBIN_PATH if _cuda.fatbin_present() else 'absent'}")
    try:
        from peftkern import _host  # noqa: F401

        host = "built"
    except ImportError as exc:
        host = f"absent ({exc})"
    lines.append(f"host twin     {host}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines.append(f"backend       {backend.current()} (PEFTKERN_BACKEND / peftkern.backend.use)")
    for face in backend.FACES:
        reason = backend.why_unavailable(face, device)
        lines.append(f"  face {face:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    print("\n".join(lines))
    return 0


def _version_of(module_name: str) -> str:
    import importlib
    import importlib.metadata

    dist = {"cuda.core": "cuda-core", "liger_kernel": "liger-kernel"}.get(module_name, module_name)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        try:
            return getattr(importlib.import_module(module_name), "__version__", "installed")
        except Exception:
            return "not installed"


def _arch_list(text: str) -> tuple[str, ...]:
    """``--arch``: comma-separated names from peftkern.kernels.ARCHS (argparse reports a bad one)."""
    from peftkern.kernels import ARCHS

    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    if not archs:
        raise argparse.ArgumentTypeError(f"no architecture given; choose from {', '.join(ARCHS)}")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown architecture {', '.join(map(repr, unknown))}; choose from "
                                         f"{', '.join(ARCHS)}")
    return archs


def _cmd_kernels(args) -> int:
    from peftkern import kernels

    try:
        rows = kernels.report(args.arch, jobs=args.jobs, ops=args.op)
    except ValueError as exc:  # an unknown --op
        print(f"peftkern kernels: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        print(kernels.format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_bench(args) -> int:
    """Runs the repository's benchmarks/ (not installed with the package: found next to peftkern/)."""
    from pathlib import Path

    import peftkern

    repo = Path(peftkern.__file__).resolve().parent.parent
    if not (repo / "benchmarks" / "runner.py").is_file():
        print(f"peftkern bench: no benchmarks/ folder next to {repo / 'peftkern'}; the suite lives in the "
              "source checkout (install it editable: pip install -e .)", file=sys.stderr)
        return 2
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from benchmarks import runner

    ops = [op.strip() for spec in (args.op or []) for op in spec.split(",") if op.strip()]
    return runner.main(ops or None, quick=args.quick, out=args.out, progress=not args.no_progress, threads=args.threads)


def _cmd_demo(args) -> int:
    import torch

    from peftkern.train.demo import run_demo
    from peftkern.train.demo_report import format_report

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = "quick" if args.quick else args.plan
    report = run_demo(args.out, plan=plan, quiet=args.quiet, seed=args.seed, fresh_base=args.fresh_base)
    print(format_report(report))
    print(f"wrote {args.out}/index.html (open it in a browser), report.json, plots, adapters")
    return 0


def _cmd_pretrain(args) -> int:
    import torch

    from peftkern.train.pretrain import tiny_base_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    print(tiny_base_dir(quiet=args.quiet, fresh=args.fresh))
    return 0


def _cmd_train(args) -> int:
    from peftkern.train.config import config_from_args
    from peftkern.train.distributed import is_main_process
    from peftkern.train.errors import RunWarning, TrainError
    from peftkern.train.logs import dumps
    from peftkern.train.run import run

    command = f"peftkern {args.command}"
    show_default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RunWarning):
            print(f"{command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            show_default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        cfg = config_from_args(args, args.command)
        summary = run(args.command, cfg)
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; resume from the newest checkpoint with --resume", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show_default
    if summary is None or not is_main_process():
        return 0
    if summary.get("preempted"):
        again = " ".join(shlex.quote(a) for a in ["peftkern", *_without_resume(args.argv), "--resume"])
        where = summary.get("checkpoint") or "the newest checkpoint"
        print(f"{command}: stopped by {summary['signal']} after step {summary['steps']}; checkpoint {where}.\n"
              f"resume with: {again}", file=sys.stderr)
        return 0
    print(dumps(summary, indent=1))
    return 0


def _without_resume(argv: list[str]) -> list[str]:
    """``argv`` less any ``--resume`` / ``--resume PATH`` / ``--resume=PATH``."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not a.startswith("--resume="):
            out.append(a)
    return out


# Commands that need only torch and triton: `peftkern kernels` runs in the static-compile environment
# (Makefile's .venv-triton36), which has no transformers, so their parsers are built without the others.
_LIGHT_COMMANDS = ("info", "kernels")


def _parser(light_only: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkern", description="Fused PEFT kernels: info, static kernel report, "
                                     "demo and trainers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, faces available, GPU, fatbin")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("kernels", help="compile every Triton kernel for sm_80/sm_90 and report registers, "
                       "spills, shared memory, wgmma")
    p.add_argument("--arch", default="sm_80,sm_90", type=_arch_list,
                   help="comma-separated archs (default: sm_80,sm_90)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects "
                   "(kernel, config, arch, registers, spill_bytes, shared_bytes, wgmma, ok)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--op", action="append", help="only this op's kernels (lora, dora, nf4, logprobs, adamw, ia3, bottleneck, "
                   "...); repeat for several")
    p.set_defaults(func=_cmd_kernels)
    if light_only:
        return parser

    from peftkern.editing.cli import add_parser as add_editing_parsers
    from peftkern.quant.cli import add_parser as add_quantize_parser

    add_quantize_parser(sub)  # peftkern quantize MODEL_DIR OUT_DIR (peftkern.quant.cli.run)
    from peftkern.generate.cli import add_parser as add_generate_parser

    add_generate_parser(sub)  # peftkern generate, peftkern chat (peftkern.generate.cli)
    from peftkern.evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub)  # peftkern eval (peftkern.evaluation.cli)

    from peftkern.train.forgetting_cli import add_parser as add_forgetting_parsers

    add_forgetting_parsers(sub)  # peftkern fisher ..., peftkern forgetting --out DIR (peftkern.train.forgetting_cli)
    from peftkern.train.merge_cli import add_parser as add_merge_parsers

    add_merge_parsers(sub)  # peftkern merge --model DIR --adapter DIR --out DIR, peftkern export (peftkern.train.merge_cli)

    from peftkern.data.cli import add_parser as add_data_parser

    add_data_parser(sub)  # peftkern data convert|inspect|self-instruct|augment|pairs, peftkern sweep

    add_editing_parsers(sub)  # peftkern edit / eval-edits (peftkern.editing.cli)
    from peftkern.alignment.cli import add_parser as add_alignment_parsers

    add_alignment_parsers(sub)  # peftkern cai-sl, rlaif, pipeline, self-critique (peftkern.alignment.cli)

    from peftkern.labeling.cli import add_parser as add_labeling_parsers

    add_labeling_parsers(sub)  # peftkern sample-pairs, peftkern label serve|export|stats|prioritize (peftkern.labeling.cli)

    from peftkern.train.rm_cli import add_parser as add_rm_parsers

    add_rm_parsers(sub)  # peftkern rm-calibrate (peftkern.train.rm_cli)

    p = sub.add_parser("bench", help="run the benchmark suite (the repository's benchmarks/, found next to the "
                       "peftkern package: needs a source checkout or editable install)",
                       description="Runs benchmarks/bench_<op>.py with pytest and writes <date>-<device>.json, .md "
                       "and .png. benchmarks/ is not installed with the package: it is found next to the peftkern "
                       "package, so this needs a source checkout or an editable install (pip install -e .).")
    p.add_argument("--op", action="append", help="only the cases of this op (benchmarks/bench_<op>.py); "
                   "repeat or comma-separate; default: every op")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few rounds: checks the harness, not speed "
                   "(CI); written as <date>-<device>-quick.*")
    p.add_argument("--out", default=None, help="folder for <date>-<device>.json/.md/.png (default: benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the measured cases "
                   "(default 1; 0 = torch's default)")
    p.set_defaults(func=_cmd_bench)

    _add_training_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    from peftkern.train.config import add_arguments

    p = sub.add_parser("demo", help="the embedded tiny Llama end to end on the CPU: pretrained base, QLoRA SFT, "
                       "GRPO; writes index.html, report.json, plots, adapters and samples")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--plan", default="full", choices=("full", "quick", "smoke"), help="full (default, a few minutes), "
                   "quick (the same stages, fewer steps) or smoke (seconds, a random micro model: checks the pipeline, "
                   "shows no learning)")
    p.add_argument("--quick", action="store_true", help="same as --plan quick")
    p.add_argument("--fresh-base", action="store_true", help="train the base again on the bundled corpus (39 minutes "
                   "of wall time measured on a busy 2-core machine) instead of loading the shipped (or cached) one; it replaces the cached copy")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the tiny model's ops are too "
                   "small to gain from more, and lose badly when other programs share the cores; 0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="build the embedded tiny base ('--model tiny') into the cache once; prints "
                       "its directory (model and tokenizer)",
                       description="The package ships the tiny base trained with the default settings; this prints "
                       "where it is. With --fresh (or settings the package holds no weights for) it trains the tiny "
                       "Llama on the bundled corpus (500 steps: 39 minutes of wall time measured on a busy 2-core machine) and keeps it under "
                       "$PEFTKERN_CACHE (default ~/.cache/peftkern), which is then read before the shipped copy.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    p.add_argument("--fresh", action="store_true", help="train it again even when the cache or the package holds it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    described = {
        "sft": "supervised fine-tuning (loss on completions; data: 'messages' or 'prompt'/'completion')",
        "rm": "reward model: scalar head(s), Bradley-Terry loss with optional 'margin' (data: 'prompt'/'chosen'/"
              "'rejected'), or all-pairs Bradley-Terry / Plackett-Luce over K-way rankings (data: 'prompt'/"
              "'completions'/'ranking'); --ensemble N bootstrap heads",
        "dpo": "DPO family, reference log-probs precomputed and cached (data: 'prompt'/'chosen'/'rejected')",
        "kto": "KTO on unpaired labelled completions (data: 'prompt'/'completion'/'label')",
        "ppo": "PPO with a value head against a reward model or a Python reward function (data: 'prompt')",
        "grpo": "GRPO: G sampled completions per prompt, group-normalized rewards from reward functions or a reward "
                "model, TRL's loss types (data: 'prompt' and any columns the rewards read)",
        "rloo": "RLOO: G sampled completions per prompt, leave-one-out baseline, KL in the reward (data: 'prompt')",
        "orpo": "ORPO, reference-free: NLL of the chosen plus the odds-ratio term (data: 'prompt'/'chosen'/'rejected')",
        "simpo": "SimPO, reference-free: length-normalized margin with gamma (data: 'prompt'/'chosen'/'rejected')",
        "cpo": "CPO, reference-free: pair loss plus the chosen completions' NLL (data: 'prompt'/'chosen'/'rejected')",
    }
    for kind, text in described.items():
        p = sub.add_parser(kind, help=text, description=f"peftkern {kind}: {text}. Many processes: torchrun "
                           f"--nproc_per_node N -m peftkern {kind} ... --strategy ddp|fsdp2.")
        add_arguments(p, kind)
        p.set_defaults(func=_cmd_train)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    light = bool(argv) and argv[0] in _LIGHT_COMMANDS
    args = _parser(light_only=light).parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
