"""The forgetting tools' commands.

``peftkern fisher --model DIR --data FILE --out F``: the diagonal Fisher of the parameters a run
would train, as a safetensors file for ``peftkern sft --ewc F``.

The model is built exactly as the trainer builds it from the same flags (``--model``,
``--lora-r``, ``--lora-alpha``, ``--target-modules``, ``--dora``, ``--quant``, ``--seed``), so the
Fisher's tensors are the run's trainable parameters at the values the run starts from: the full
weights with ``--lora-r 0``, the adapter's initial factors otherwise.
"""
from __future__ import annotations

import argparse
import sys

from peftkern.train.config import TrainConfig

_MODEL_FIELDS = ("model", "tokenizer", "lora_r", "lora_alpha", "target_modules", "dora", "quant", "seed",
                 "max_length", "completion_only")


def add_parser(sub) -> None:
    defaults = TrainConfig()
    p = sub.add_parser("fisher", help="estimate the diagonal Fisher of the trainable parameters on old-task data "
                       "(for --ewc)", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=defaults.model, help="'tiny' or a local transformers model directory, as for "
                   f"the trainers (default: {defaults.model})")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--data", default=None, help="the old task's SFT data, JSONL (default with --model tiny: the "
                   "bundled training set)")
    p.add_argument("--out", required=True, help="the Fisher file to write (.safetensors)")
    p.add_argument("--kind", choices=("empirical", "true"), default="empirical",
                   help="empirical: gradients of the data's labels; true: of labels drawn from the model "
                   "(default: empirical)")
    p.add_argument("--samples", type=int, default=None, help="examples to average over (default: all)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the adapter's initialisation (as the "
                   "trainer's --seed), the subset and the true Fisher's draws (default: 0)")
    p.add_argument("--lora-r", type=int, default=defaults.lora_r, help="LoRA rank as the run will use; 0: every "
                   f"weight (default: {defaults.lora_r})")
    p.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    p.add_argument("--target-modules", default=defaults.target_modules)
    p.add_argument("--dora", action="store_true", help="DoRA adapters, as the run")
    p.add_argument("--quant", choices=("none", "nf4"), default=defaults.quant)
    p.add_argument("--max-length", type=int, default=defaults.max_length)
    p.add_argument("--completion-only", type=lambda s: s.lower() in ("1", "true", "yes", "on"),
                   default=defaults.completion_only, metavar="BOOL",
                   help=f"score completion tokens only (default: {defaults.completion_only})")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)

    p = sub.add_parser("forgetting", help="the forgetting report on the embedded default: SFT on task A, then B, "
                       "with none / rehearsal / EWC / L2-SP, full and LoRA",
                       description="Writes report.json, report.md, forgetting.png and curve.png in --out "
                       "(peftkern.train.forgetting; about 25 minutes on 2 CPU cores, --quick: a smoke run).")
    p.add_argument("--out", required=True, help="folder for the report, the runs and their data")
    p.add_argument("--quick", action="store_true", help="a few steps and questions: checks the pipeline, not forgetting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the tiny model's small ops "
                   "only lose to thread contention)")
    p.set_defaults(func=run_forgetting)


def config_for(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a trainer would build its model from, given the same flags."""
    values = {name: getattr(args, name) for name in _MODEL_FIELDS}
    return TrainConfig(**values, data=args.data, strategy="none", quiet=args.quiet).check()


def fisher_for_config(cfg: TrainConfig, kind: str = "empirical", samples: int | None = None):
    """(Fisher dict, fingerprint of the parameter values, examples used) for the model and data of ``cfg``."""
    import torch

    from peftkern.train.errors import ConfigError
    from peftkern.train.fisher import estimate_fisher, parameter_fingerprint, trainable_parameters
    from peftkern.train.loading import check_paths, is_embedded, load_lm, load_tokenizer
    from peftkern.train.model import LMWithHeads, prepare_lm
    from peftkern.train.run import bundled_records
    from peftkern.train.sft import sft_examples

    check_paths(cfg, "sft")
    if cfg.data is None and not is_embedded(cfg.model):
        raise ConfigError(f"--data is required with --model {cfg.model} (the bundled data fits the tiny models only)")
    tok = load_tokenizer(cfg)
    data = cfg.data if cfg.data is not None else bundled_records("sft", cfg.seed)[0]
    torch.manual_seed(cfg.seed)  # as build_trainer: the same adapter initialisation
    lm = prepare_lm(cfg, load_lm(cfg, quiet=cfg.quiet))
    examples = sft_examples(tok, data, cfg)
    model = LMWithHeads(lm)
    fisher = estimate_fisher(model, examples, kind=kind, samples=samples, seed=cfg.seed)
    used = min(samples or len(examples), len(examples))
    return fisher, parameter_fingerprint(trainable_parameters(lm)), used


def run(args: argparse.Namespace) -> int:
    from peftkern.train.errors import TrainError
    from peftkern.train.fisher import save_fisher

    try:
        if args.samples is not None and args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        cfg = config_for(args)
        fisher, fingerprint, used = fisher_for_config(cfg, args.kind, args.samples)
        save_fisher(args.out, fisher, args.kind, used, fingerprint,
                    extra={"model": cfg.model, "lora_r": cfg.lora_r, "data": cfg.data or "bundled"})
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"peftkern fisher: error: {exc}", file=sys.stderr)
        return 2
    total = sum(t.numel() for t in fisher.values())
    print(f"wrote {args.out}: {args.kind} Fisher of {len(fisher)} tensors ({total} parameters) over {used} examples")
    return 0


def run_forgetting(args: argparse.Namespace) -> int:
    import torch

    from peftkern.train.errors import TrainError
    from peftkern.train.forgetting import format_markdown, run_report

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_report(args.out, "quick" if args.quick else "full", args.seed)
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"peftkern forgetting: error: {exc}", file=sys.stderr)
        return 2
    print(format_markdown(report))
    print(f"wrote {args.out}/report.json, report.md, forgetting.png, curve.png ({report['seconds']:.0f} s)")
    return 0
