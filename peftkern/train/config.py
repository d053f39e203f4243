"""One dataclass of run settings shared by every trainer; the CLI flags and ``--config run.yaml`` keys
are its field names (``lora_r`` <-> ``--lora-r``). Flags given on the command line override the file."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

TRAINERS = ("sft", "rm", "dpo", "kto", "ppo")


def _f(default, help: str, kinds: tuple[str, ...] = TRAINERS, choices=None):
    return field(default=default, metadata={"help": help, "kinds": kinds, "choices": choices})


@dataclass
class TrainConfig:
    # model and adapters
    model: str = _f("tiny", "'tiny' (the embedded default) or a local transformers causal-LM directory")
    tokenizer: str | None = _f(None, "tokenizer directory (default: the model's)")
    lora_r: int = _f(16, "LoRA rank; 0 trains every weight instead")
    lora_alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: str = _f("all-linear", "comma-separated module names to adapt, or 'all-linear'")
    quant: str = _f("none", "base weight format: 'none' or 'nf4' (QLoRA)", choices=("none", "nf4"))
    dora: bool = _f(False, "DoRA adapters instead of LoRA")
    # -- PEFT method (peftkern.tuners; built in train/adapters.py): the method and its main options --
    peft: str = _f("lora", "adapter method: 'lora' (DoRA with --dora), 'ia3', 'adalora' or 'bitfit'",
                   choices=("lora", "ia3", "adalora", "bitfit"))
    ia3_target_modules: str = _f("default", "(IA)^3 targets: comma-separated names, or 'default' (PEFT's per "
                                 "model type: keys, values and the down projection)")
    ia3_feedforward_modules: str = _f("default", "(IA)^3 targets whose input is scaled: comma-separated names, or "
                                      "'default' (PEFT's per model type)")
    adalora_init_r: int = _f(12, "AdaLoRA initial rank per module")
    adalora_target_r: int = _f(8, "AdaLoRA average final rank per module")
    adalora_tinit: int = _f(0, "AdaLoRA warm-up steps at the full budget")
    adalora_tfinal: int = _f(0, "AdaLoRA final steps at the final ranks")
    adalora_delta_t: int = _f(1, "AdaLoRA steps between two allocations")
    adalora_beta1: float = _f(0.85, "AdaLoRA EMA of sensitivity")
    adalora_beta2: float = _f(0.85, "AdaLoRA EMA of uncertainty")
    adalora_orth_reg_weight: float = _f(0.5, "AdaLoRA weight of the orthogonality regularizer")
    adalora_total_step: int = _f(0, "AdaLoRA schedule length in optimizer steps (0: --max-steps)")
    bitfit_target_modules: str = _f("all", "BitFit: 'all' (every bias; a model without biases gets trainable "
                                    "ones on --target-modules) or comma-separated module names")
    # -- end of the PEFT method block --
    # data
    data: str | None = _f(None, "training data, JSONL in TRL's format (default with --model tiny: the bundled set)")
    eval_data: str | None = _f(None, "held-out data, same format (default with --model tiny: the bundled held-out set)")
    max_length: int = _f(256, "tokens per sequence (longer ones are truncated)")
    packing: bool = _f(False, "pack SFT examples into rows of max_length tokens", ("sft",))
    completion_only: bool = _f(True, "SFT loss on completion / assistant tokens only", ("sft",))
    # optimisation
    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    optim: str = _f("adamw", "optimizer: 'adamw' (fp32 state), 'adamw8bit' or 'paged_adamw8bit' (8-bit state)",
                    choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    batch_size: int = _f(8, "examples (pairs for DPO/RM; prompts for PPO, whose rollout per step is batch_size x "
                         "grad_accum prompts per process) per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the training data (when max_steps is 0)")
    max_steps: int = _f(0, "optimizer steps (0: epochs x steps per epoch)")
    schedule: str = _f("cosine", "learning-rate decay after warm-up", choices=("cosine", "linear", "constant"))
    warmup_steps: int = _f(0, "linear warm-up steps")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    grad_checkpointing: bool = _f(False, "recompute decoder layers in the backward to save memory")
    bf16: bool = _f(True, "bf16 autocast on a GPU (ignored on the CPU)")
    seed: int = _f(0, "seed of initialisation, data order, dropout and sampling")
    # DPO / KTO / RM
    beta: float = _f(0.1, "KL strength of DPO / KTO", ("dpo", "kto"))
    loss_type: str = _f("sigmoid", "DPO loss: any loss_type peftkern.losses.dpo_loss accepts", ("dpo",))
    label_smoothing: float = _f(0.0, "DPO label smoothing (conservative / robust DPO)", ("dpo",))
    desirable_weight: float = _f(1.0, "KTO weight of desirable examples", ("kto",))
    undesirable_weight: float = _f(1.0, "KTO weight of undesirable examples", ("kto",))
    # PPO
    reward_model: str | None = _f(None, "reward model: a directory written by 'peftkern rm'", ("ppo",))
    reward_fn: str | None = _f(None, "reward function 'module:function' called as f(prompt, completion) -> "
                               "float (default with --model tiny: the bundled task reward)", ("ppo",))
    ppo_epochs: int = _f(2, "optimisation passes over each rollout", ("ppo",))
    max_new_tokens: int = _f(8, "tokens generated per rollout", ("ppo",))
    temperature: float = _f(1.0, "sampling temperature of rollouts", ("ppo",))
    gamma: float = _f(1.0, "discount", ("ppo",))
    lam: float = _f(0.95, "GAE lambda", ("ppo",))
    cliprange: float = _f(0.2, "policy ratio clip", ("ppo",))
    cliprange_value: float = _f(0.2, "value clip", ("ppo",))
    vf_coef: float = _f(0.1, "value loss weight", ("ppo",))
    ent_coef: float = _f(0.0, "entropy bonus weight", ("ppo",))
    kl_coef: float = _f(0.05, "initial KL penalty coefficient", ("ppo",))
    adaptive_kl: bool = _f(True, "adapt the KL coefficient towards target_kl", ("ppo",))
    target_kl: float = _f(1.0, "KL per sequence the adaptive controller aims at", ("ppo",))
    kl_horizon: int = _f(10000, "adaptive KL controller horizon", ("ppo",))
    # loop, output
    out: str = _f("runs/run", "output directory (checkpoints, log.jsonl, adapter, metrics)")
    log_every: int = _f(10, "log every N optimizer steps")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only before and after)")
    save_every: int = _f(0, "checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")
    strategy: str = _f("auto", "many processes (launch with torchrun): 'ddp' or 'fsdp2'; 'auto': ddp when "
                       "WORLD_SIZE > 1", choices=("auto", "none", "ddp", "fsdp2"))
    quiet: bool = _f(False, "no progress bar")

    def check(self) -> "TrainConfig":
        positive = ("batch_size", "grad_accum", "max_length", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lora_r", "max_steps", "epochs", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.dora and self.lora_r == 0:
            raise ValueError("--dora needs LoRA adapters (lora_r > 0)")
        self.check_peft()
        return self

    def check_peft(self) -> None:
        """The PEFT method block: options of another method than --peft are refused, not ignored."""
        if self.dora and self.peft != "lora":
            raise ValueError(f"--dora is a LoRA option; --peft is {self.peft!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for prefix in ("ia3_", "adalora_", "bitfit_"):
            changed = [n for n in defaults if n.startswith(prefix) and getattr(self, n) != defaults[n]]
            if changed and self.peft != prefix[:-1]:
                raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in changed)}: options of --peft "
                                 f"{prefix[:-1]}, but --peft is {self.peft!r}")
        if self.peft == "adalora" and self.adalora_total_step <= 0 and self.max_steps <= 0:
            raise ValueError("--peft adalora needs --max-steps (or --adalora-total-step): AdaLoRA's rank budget "
                             "falls on a schedule of that many steps")


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, kind: str, defaults: dict | None = None) -> None:
    """Add ``--config`` and one flag per TrainConfig field that applies to trainer ``kind``."""
    defaults = defaults or {}
    parser.add_argument("--config", default=None, help="YAML file of settings (keys: the flags' names with "
                        "underscores); flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        if kind not in f.metadata["kinds"]:
            continue
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, nargs="?", const=True, default=None, type=_parse_bool, metavar="BOOL",
                                help=help_text)
            continue
        conv = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, default=None, type=conv, choices=f.metadata["choices"], help=help_text)


def config_from_args(args: argparse.Namespace, kind: str, defaults: dict | None = None) -> TrainConfig:
    """TrainConfig from: field defaults, then ``defaults``, then the YAML file, then explicit flags."""
    values = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config, kind))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return TrainConfig(**values).check()


def load_yaml(path: str, kind: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of setting: value, got {type(loaded).__name__}")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ValueError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        out[name] = value
    return out
