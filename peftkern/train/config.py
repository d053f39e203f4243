"""One dataclass of run settings shared by every trainer; the CLI flags and ``--config run.yaml`` keys
are its field names (``lora_r`` <-> ``--lora-r``). Flags given on the command line override the file."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from peftkern.train.errors import ConfigError, PathError

TRAINERS = ("sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo", "orpo", "simpo", "cpo")
SOFT_PROMPTS = ("prompt", "prefix", "ptuning")
ONLINE = ("grpo", "rloo")  # sample G completions per prompt and learn from their rewards
KIND_DEFAULTS = {  # settings whose default depends on the trainer (the field's default is None)
    "dpo": {"beta": 0.1, "loss_type": "sigmoid"}, "kto": {"beta": 0.1}, "grpo": {"beta": 0.0, "loss_type": "dapo"},
    "rloo": {"beta": 0.05}, "orpo": {"beta": 0.1}, "simpo": {"beta": 2.0}, "cpo": {"beta": 0.1, "loss_type": "sigmoid"},
}


def _f(default, help: str, kinds: tuple[str, ...] = TRAINERS, choices=None, repeat: bool = False):
    """A setting; ``repeat``: a flag that may be given several times (its values joined with commas)."""
    return field(default=default, metadata={"help": help, "kinds": kinds, "choices": choices, "repeat": repeat})


@dataclass
class TrainConfig:
    # model and adapters
    model: str = _f("tiny", "'tiny' (the embedded default) or a local transformers causal-LM directory")
    tokenizer: str | None = _f(None, "tokenizer directory (default: the model's)")
    lora_r: int = _f(16, "LoRA rank; 0 trains every weight instead")
    lora_alpha: float = _f(32.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: str = _f("all-linear", "comma-separated module names to adapt, or 'all-linear'")
    quant: str = _f("none", "base weight format: 'none' or 'nf4' (QLoRA; each linear is quantized as it is read, "
                    "so the 16-bit model is never whole in memory)", choices=("none", "nf4"))
    dtype: str = _f("auto", "dtype of the base weights: fp32, bf16, fp16, or auto (the checkpoint's own on the CPU, "
                    "bf16 on a GPU that has it); adapters train in fp32", choices=("auto", "fp32", "bf16", "fp16"))
    adapter: str | None = _f(None, "start from this adapter folder (adapter_config.json + adapter_model.safetensors, "
                             "PEFT's or peftkern's, any method) instead of a fresh adapter; its config sets the method")
    chat_template: str | None = _f(None, "Jinja chat-template file used instead of the tokenizer's (the assistant "
                                   "tokens are found from how it renders, so it needs no generation markers)")
    dora: bool = _f(False, "DoRA adapters instead of LoRA")
    # -- PEFT method (peftkern.tuners; built in train/adapters.py): the method and its main options --
    peft: str = _f("lora", "adapter method: 'lora' (DoRA with --dora), 'ia3', 'adalora', 'bitfit' or 'bottleneck'; soft "
                   "prompts: 'prompt' (prompt tuning), 'prefix' (prefix tuning), 'ptuning' (P-tuning)",
                   choices=("lora", "ia3", "adalora", "bitfit", "bottleneck", "prompt", "prefix", "ptuning"))
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
    placement: str = _f("houlsby", "bottleneck adapters: 'houlsby' (after attention and feed-forward), 'pfeiffer' "
                        "(after the block's feed-forward) or 'parallel' (beside the feed-forward)",
                        choices=("houlsby", "pfeiffer", "parallel"))
    reduction_factor: float = _f(16.0, "bottleneck adapters: bottleneck = hidden size // reduction factor")
    bottleneck_non_linearity: str = _f("relu", "bottleneck adapters' non-linearity: relu, gelu, silu, tanh",
                                       choices=("relu", "gelu", "silu", "swish", "tanh"))
    bottleneck_scaling: float = _f(1.0, "bottleneck adapters: s in h + s * up(act(down(x)))")
    num_virtual_tokens: int = _f(20, "soft prompts (--peft prompt|prefix|ptuning): virtual tokens")
    encoder_hidden_size: int = _f(0, "soft prompts: hidden size of prefix tuning's projection MLP or P-tuning's "
                                  "encoder (0: the model's width, PEFT's default)")
    prompt_tuning_init: str = _f("RANDOM", "prompt tuning init: RANDOM, SAMPLE_VOCAB (random vocabulary rows) or TEXT "
                                 "(--prompt-tuning-init-text's token embeddings, the run's tokenizer)",
                                 choices=("RANDOM", "SAMPLE_VOCAB", "TEXT"))
    prompt_tuning_init_text: str | None = _f(None, "prompt tuning: the text for --prompt-tuning-init TEXT")
    prefix_projection: bool = _f(False, "prefix tuning: produce the prefix through a two-layer MLP while training "
                                 "(folded into the saved file, as PEFT)")
    ptuning_encoder_type: str = _f("MLP", "P-tuning encoder: MLP or LSTM", choices=("MLP", "LSTM"))
    ptuning_encoder_num_layers: int = _f(2, "P-tuning: LSTM layers (the MLP always has 2 hidden layers)")
    # -- end of the PEFT method block --
    # data
    data: str | None = _f(None, "training data, JSONL in TRL's format (default with --model tiny: the bundled set); "
                          "SFT mixes several tasks: a.jsonl:0.5,b.jsonl:0.5 (weights) or a.jsonl,b.jsonl (by size "
                          "and --mix-temperature), logging each task's loss")
    eval_data: str | None = _f(None, "held-out data, same format (default with --model tiny: the bundled held-out "
                               "set); SFT: several files give one eval loss per task")
    max_length: int = _f(256, "tokens per sequence (longer ones are truncated)")
    packing: bool = _f(False, "pack SFT examples into rows of max_length tokens", ("sft",))
    multi_adapter: str | None = _f(None, "NAME=FILE: train one LoRA adapter per entry, each on its own SFT JSONL, in "
                                   "one job over one copy of the base (each row through its own adapter); saved "
                                   "in PEFT's files under <out>/adapter/NAME. Repeat the flag (YAML: a list); "
                                   "see docs/multi_adapter.md", ("sft",), repeat=True)
    completion_only: bool = _f(True, "SFT loss on completion / assistant tokens only", ("sft",))
    mix_temperature: float = _f(1.0, "multi-task --data: task i is drawn with probability proportional to "
                                "(weight or size)^(1/T)", ("sft",))
    rehearsal_data: str | None = _f(None, "JSONL replayed into every batch against forgetting: plain text "
                                    "({\"text\": ...}, the LM loss on every token) or earlier SFT records", ("sft",))
    rehearsal_ratio: float = _f(0.1, "share of each batch taken from --rehearsal-data, in [0, 1)", ("sft",))
    # forgetting: the anchored penalty, folded into the optimizer step
    ewc: str | None = _f(None, "Fisher file from 'peftkern fisher': add lambda/2 sum F (theta - theta0)^2 to the loss, "
                         "theta0 the trainable values at the start (EWC)")
    l2sp: bool = _f(False, "the same penalty with F = 1 (L2-SP): pull the trainable values towards their start")
    ewc_lambda: float = _f(1.0, "lambda of --ewc / --l2sp (>= 0)")
    ewc_fisher_bits: int = _f(32, "store --ewc's Fisher in 32 bits or as 8-bit blockwise codes", choices=(32, 8))
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
    # DPO / KTO / RM and the reference-free preference trainers
    beta: float | None = _f(None, "KL strength (DPO, KTO, GRPO, RLOO) or reward scale (ORPO's lambda, SimPO, CPO); "
                            "default: 0.1, 0.0 for grpo (no reference pass), 0.05 for rloo, 2.0 for simpo",
                            ("dpo", "kto", "grpo", "rloo", "orpo", "simpo", "cpo"))
    loss_type: str | None = _f(None, "DPO: any loss_type of peftkern.losses.dpo_loss, 'sft' or 'sigmoid_norm', or "
                               "several comma-separated (weighted by --loss-weights); GRPO: grpo, bnpo, dr_grpo, dapo "
                               "or cispo; CPO: sigmoid, hinge, ipo or simpo (default: sigmoid; dapo for grpo)",
                               ("dpo", "grpo", "cpo"))
    loss_weights: str | None = _f(None, "DPO: comma-separated weights of the --loss-type entries (default: 1 each)",
                                  ("dpo",))
    ld_alpha: float | None = _f(None, "DPO: LD-DPO's weight of the completion tokens past the shorter completion's "
                                "length (1: plain DPO)", ("dpo",))
    label_smoothing: float = _f(0.0, "label smoothing (conservative / robust DPO, SimPO, CPO)", ("dpo", "simpo", "cpo"))
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (SimPO; CPO with --loss-type simpo)",
                            ("simpo", "cpo"))
    cpo_alpha: float = _f(1.0, "CPO's weight of the chosen completions' NLL term", ("cpo",))
    desirable_weight: float = _f(1.0, "KTO weight of desirable examples", ("kto",))
    undesirable_weight: float = _f(1.0, "KTO weight of undesirable examples", ("kto",))
    init_adapter: str | None = _f(None, "an adapter folder (PEFT format, e.g. an SFT run's adapter/) merged into the "
                                  "model before training starts: train on top of it, with the merged model as the "
                                  "reference; the new adapter names <out>/base_model as its base",
                                  ("dpo", "grpo", "rloo", "orpo", "simpo", "cpo"))
    # reward models (docs/reward_models.md)
    rank_loss: str = _f("bradley_terry", "reward-model loss over each record's ranked completions: all-pairs "
                        "Bradley-Terry (InstructGPT) or Plackett-Luce (listwise); on pairs both are the "
                        "Bradley-Terry loss", ("rm",), choices=("bradley_terry", "plackett_luce"))
    ensemble: int = _f(1, "reward heads over one body, each trained on its own bootstrap sample of the data "
                       "(1: a plain reward model)", ("rm",))
    ensemble_adapters: bool = _f(False, "--ensemble N as N LoRA adapters over the frozen base, one per head (each "
                                 "member its own adapter and bootstrap sample), instead of N heads on one adapter",
                                 ("rm",))
    calibrate_on: str | None = _f(None, "held-out JSONL of pairs or rankings: after training, fit the reward model's "
                                  "temperature on it and save it with the model (as 'peftkern rm-calibrate')",
                                  ("rm",))
    # PPO, GRPO, RLOO
    reward_model: str | None = _f(None, "reward model: a directory written by 'peftkern rm'", ("ppo", "grpo", "rloo"))
    reward_aggregate: str = _f("mean", "reward of an ensemble --reward-model from its heads' scores: their mean, "
                               "min, or mean_minus_std (mean - reward_std_coef x std)", ("ppo", "grpo", "rloo"),
                               choices=("mean", "min", "mean_minus_std"))
    reward_std_coef: float = _f(1.0, "lambda of --reward-aggregate mean_minus_std", ("ppo", "grpo", "rloo"))
    reward_fn: str | None = _f(None, "reward function 'module:function' (default with --model tiny: the bundled task "
                               "rewards). PPO: f(prompt, completion) -> float. GRPO / RLOO (TRL's convention): "
                               "f(prompts, completions, completion_ids, **columns) -> one float (or None) per "
                               "completion; repeat the flag for several", ("ppo", "grpo", "rloo"),
                               repeat=True)
    reward_weights: str | None = _f(None, "comma-separated weights of the reward functions (default: 1 each)",
                                    ("grpo", "rloo"))
    num_generations: int = _f(8, "completions sampled per prompt (G, >= 2)", ("grpo", "rloo"))
    max_completion_length: int = _f(16, "tokens generated per completion at most", ("grpo", "rloo"))
    top_p: float = _f(1.0, "nucleus sampling of rollouts (1: off)", ("grpo", "rloo"))
    top_k: int = _f(0, "top-k sampling of rollouts (0: off)", ("grpo", "rloo"))
    num_iterations: int = _f(1, "optimisation passes over each rollout (mu), with the sampling policy's log-probs "
                             "as the old ones", ("grpo", "rloo"))
    steps_per_generation: int = _f(0, "micro-batches of batch_size prompts per rollout per process, a multiple of "
                                   "grad_accum (0: grad_accum, one rollout per optimizer step)", ("grpo", "rloo"))
    epsilon: float = _f(0.2, "ratio clip 1 - epsilon (and 1 + epsilon_high)", ("grpo", "rloo"))
    epsilon_high: float | None = _f(None, "upper ratio clip 1 + epsilon_high (default: epsilon; DAPO: 0.28; "
                                    "cispo: the ratio cap, e.g. 5)", ("grpo", "rloo"))
    delta: float | None = _f(None, "cap of the unclipped ratio (two-sided clipping, INTELLECT-2; > 1 + epsilon_high)",
                             ("grpo",))
    importance_sampling_level: str = _f("token", "one ratio per token, or per sequence (GSPO)", ("grpo",),
                                        choices=("token", "sequence"))
    scale_rewards: str = _f("group", "divide advantages by the group's reward std, the batch's, or not (Dr. GRPO)",
                            ("grpo",), choices=("group", "batch", "none"))
    normalize_advantages: bool = _f(False, "standardize RLOO's advantages over the batch", ("rloo",))
    mask_truncated_completions: bool = _f(False, "no loss on completions cut at max_completion_length", ONLINE)
    top_entropy_quantile: float = _f(1.0, "policy loss only on this top share of completion tokens by entropy "
                                     "(one more vocabulary pass; 1: all)", ("grpo",))
    ppo_epochs: int = _f(2, "optimisation passes over each step's samples (the rollout and any replayed ones)",
                         ("ppo",))
    ppo_mini_batch_size: int = _f(0, "samples per optimizer update: each pass shuffles the samples (the rollout, "
                                  "plus the replayed ones) into mini-batches of this many (0: one update per pass "
                                  "over them all)", ("ppo",))
    replay_rollouts: int = _f(1, "rollouts trained on at each step: this one and the N-1 before it, each sample "
                              "with the log-probs, values and advantages of when it was drawn (1: no replay)",
                              ("ppo",))
    max_new_tokens: int = _f(8, "tokens generated per rollout", ("ppo",))
    temperature: float = _f(1.0, "sampling temperature of rollouts (GRPO / RLOO also score at it, as TRL)",
                            ("ppo", "grpo", "rloo"))
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
    keep_last: int = _f(2, "checkpoints kept (the newest valid one is never deleted)")
    resume: bool | str = _f(False, "continue the run in --out from its newest valid checkpoint (--resume), or from "
                            "the checkpoint directory PATH (--resume PATH)")
    overwrite: bool = _f(False, "start a new run in a non-empty --out: the previous run's checkpoints, log and "
                         "outputs are deleted first")
    save_retries: int = _f(0, "retries of a checkpoint or output write that fails (full disk, I/O error) before "
                           "the run stops")
    max_bad_steps: int = _f(5, "optimizer steps in a row with a non-finite loss or gradient (each one skipped) "
                            "before the run stops")
    strategy: str = _f("auto", "many processes (launch with torchrun): 'ddp' or 'fsdp2'; 'none': one process only; "
                       "'auto': ddp when WORLD_SIZE > 1", choices=("auto", "none", "ddp", "fsdp2"))
    quiet: bool = _f(False, "no progress bar")

    def check(self) -> "TrainConfig":
        """Coerce each field to its type (``"1e-4"`` -> 1e-4, ``"false"`` -> False) and check ranges;
        raises ConfigError naming the setting."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f, getattr(self, f.name)))
        positive = ("batch_size", "grad_accum", "max_length", "keep_last", "log_every", "max_bad_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lora_r", "max_steps", "epochs", "warmup_steps", "eval_every", "save_every", "save_retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.dora and self.lora_r == 0:
            raise ConfigError("--dora needs LoRA adapters (lora_r > 0)")
        if self.reward_model and self.reward_fn:
            raise ConfigError("--reward-model and --reward-fn both given: the run scores with one of them; drop the "
                              "other")
        self._check_online()
        self._check_reward_models()
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite both given: continue the run in --out, or replace it")
        if not self.out:
            raise ConfigError("out: expected an output directory, got an empty string")
        self.check_peft()
        self._check_forgetting()
        return self

    def check_peft(self) -> None:
        """The PEFT method block: options of another method than --peft are refused, not ignored."""
        if self.dora and self.peft != "lora":
            raise ConfigError(f"--dora is a LoRA option; --peft is {self.peft!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for prefix in ("ia3_", "adalora_", "bitfit_", "bottleneck_"):
            changed = [n for n in defaults if (n.startswith(prefix) or (prefix == "bottleneck_" and n in (
                "placement", "reduction_factor"))) and getattr(self, n) != defaults[n]]
            if changed and self.peft != prefix[:-1]:
                raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in changed)}: options of --peft "
                                 f"{prefix[:-1]}, but --peft is {self.peft!r}")
        soft = {"prompt_tuning_": ("prompt",), "prefix_": ("prefix",), "ptuning_": ("ptuning",),
                "num_virtual_tokens": SOFT_PROMPTS, "encoder_hidden_size": ("prefix", "ptuning")}
        for prefix, methods in soft.items():
            changed = [n for n in defaults if n.startswith(prefix) and getattr(self, n) != defaults[n]]
            if changed and self.peft not in methods:
                raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in changed)}: options of --peft "
                                 f"{'|'.join(methods)}, but --peft is {self.peft!r}")
        if self.peft in SOFT_PROMPTS and self.packing:
            raise ConfigError(f"--packing with --peft {self.peft}: a soft prompt goes before each sequence, and a "
                              "packed row holds several; train without --packing")
        if self.peft == "adalora" and self.adalora_total_step <= 0 and self.max_steps <= 0:
            raise ConfigError("--peft adalora needs --max-steps (or --adalora-total-step): AdaLoRA's rank budget "
                             "falls on a schedule of that many steps")

    def _check_online(self) -> None:
        """GRPO / RLOO ranges (the trainer checks what depends on the data and the model)."""
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (the group baseline compares a prompt's completions), "
                              f"got {self.num_generations}")
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps_per_generation", "top_k", "epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 0:
            raise ConfigError(f"delta must be > 0, got {self.delta}")
        if self.beta is not None and self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        for name in ("reward_weights", "loss_weights"):
            parse_floats(getattr(self, name), name)

    def _check_reward_models(self) -> None:
        """--ensemble, --reward-aggregate, --ppo-mini-batch-size, --replay-rollouts."""
        if self.ensemble < 1:
            raise ConfigError(f"ensemble must be >= 1 (reward heads; 1: a plain reward model), got {self.ensemble}")
        if self.ensemble_adapters and (self.ensemble < 2 or self.peft != "lora" or self.lora_r == 0 or self.adapter):
            raise ConfigError("--ensemble-adapters gives each of --ensemble N >= 2 members a fresh LoRA adapter: it "
                              f"needs --ensemble >= 2 (got {self.ensemble}), --peft lora with --lora-r > 0 (got "
                              f"{self.peft}, {self.lora_r}) and no --adapter")
        if self.ensemble_adapters and self.grad_checkpointing:
            raise ConfigError("--ensemble-adapters with --grad-checkpointing: the recomputation in the backward runs "
                              "outside the per-row adapter choice, so it would mix the members; drop one of them")
        if self.reward_aggregate != "mean" and not self.reward_model:
            raise ConfigError(f"--reward-aggregate {self.reward_aggregate} combines an ensemble reward model's heads; "
                              "give --reward-model (a directory from 'peftkern rm --ensemble N')")
        if not self.reward_std_coef >= 0:
            raise ConfigError(f"reward_std_coef must be >= 0, got {self.reward_std_coef}")
        if self.reward_std_coef != 1.0 and self.reward_aggregate != "mean_minus_std":
            raise ConfigError("--reward-std-coef is the lambda of --reward-aggregate mean_minus_std, but "
                              f"--reward-aggregate is {self.reward_aggregate!r}")
        if self.ppo_mini_batch_size < 0:
            raise ConfigError(f"ppo_mini_batch_size must be >= 0 (0: one update per pass), got "
                              f"{self.ppo_mini_batch_size}")
        if self.replay_rollouts < 1:
            raise ConfigError(f"replay_rollouts must be >= 1 (1: no replay), got {self.replay_rollouts}")
        if self.ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be positive, got {self.ppo_epochs}")

    def _check_forgetting(self) -> None:
        """--ewc / --l2sp / --rehearsal-* / --mix-temperature ranges and combinations."""
        if not math.isfinite(self.ewc_lambda) or self.ewc_lambda < 0:
            raise ConfigError(f"ewc_lambda must be a finite number >= 0, got {self.ewc_lambda}")
        if self.ewc and self.l2sp:
            raise ConfigError("--ewc and --l2sp both given: L2-SP is EWC with F = 1; choose one")
        if not (0.0 <= self.rehearsal_ratio < 1.0):
            raise ConfigError(f"rehearsal_ratio must be in [0, 1), got {self.rehearsal_ratio}")
        if not math.isfinite(self.mix_temperature) or self.mix_temperature <= 0:
            raise ConfigError(f"mix_temperature must be a finite number > 0, got {self.mix_temperature}")


def parse_floats(text: str | None, name: str) -> list[float] | None:
    """A comma-separated list of finite numbers (``--reward-weights 1,0.5``), or None."""
    if text is None:
        return None
    out = []
    for part in str(text).split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected finite numbers, got {text!r}")
        out.append(value)
    return out


def split_list(text: str | None) -> list[str]:
    """The entries of a comma-joined setting (a repeated flag such as ``--reward-fn``)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def resolve_kind_defaults(cfg: "TrainConfig", kind: str) -> "TrainConfig":
    """``cfg`` with the settings left at None given trainer ``kind``'s default (KIND_DEFAULTS)."""
    for name, value in KIND_DEFAULTS.get(kind, {}).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    return cfg


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def _shown(value) -> str:
    return "null" if value is None else repr(value)


def coerce(f: dataclasses.Field, value, where: str = ""):
    """``value`` as field ``f``'s type. Numbers written as strings (``"1e-4"``, ``"8"``) and booleans
    written as words (``"false"``, ``"yes"``) are converted; anything else of the wrong type raises
    ``ConfigError("<where>key: expected ..., got ...")``."""
    kind = _type_name(f)
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")

    def bad(expected: str):
        return ConfigError(f"{where}{f.name}: expected {expected}, got {_shown(value)}")

    if value is None:
        if optional:
            return None
        raise bad({"int": "an integer", "float": "a number", "bool": "true or false"}.get(kind, "a string"))
    if kind == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
            try:
                value_num = float(value.strip())
            except ValueError:
                raise bad("an integer") from None
        elif isinstance(value, float):
            value_num = value
        else:
            raise bad("an integer")
        if math.isfinite(value_num) and value_num.is_integer():
            return int(value_num)
        raise bad("an integer")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a number")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise bad("true or false")
    if kind == "bool|str":  # --resume: a flag or a path
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "yes", "on", "1", "false", "no", "off", "0", ""):
                return low in ("true", "yes", "on", "1")
            return value
        raise bad("true, false or a checkpoint directory")
    # str
    if (f.name == "target_modules" or f.metadata.get("repeat")) and isinstance(value, (list, tuple)) \
            and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise bad("a string")


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, kind: str, defaults: dict | None = None) -> None:
    """Add ``--config`` and one flag per TrainConfig field that applies to trainer ``kind``."""
    defaults = {**KIND_DEFAULTS.get(kind, {}), **(defaults or {})}
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
        if _type_name(f) == "bool|str":
            parser.add_argument(flag, nargs="?", const=True, default=None, metavar="PATH", help=help_text)
            continue
        if f.metadata.get("repeat"):
            parser.add_argument(flag, default=None, action="append", help=help_text)
            continue
        conv = {"int": int, "float": float}.get(_type_name(f).removesuffix("|None"), str)
        parser.add_argument(flag, default=None, type=conv, choices=f.metadata["choices"], help=help_text)


def config_from_args(args: argparse.Namespace, kind: str, defaults: dict | None = None) -> TrainConfig:
    """TrainConfig from: field defaults, then ``defaults``, then the YAML file, then explicit flags."""
    values = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(load_yaml(args.config, kind))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, list):  # a repeated flag
            value = ",".join(value)
        if value is not None:
            values[name] = value
    return resolve_kind_defaults(TrainConfig(**values).check(), kind)


def load_yaml(path: str, kind: str | None = None) -> dict:
    """The settings of a YAML file, each coerced to its field's type; raises ConfigError
    (``path: key: expected ..., got ...``) for unknown keys, keys of another trainer and bad values."""
    import yaml

    if not os.path.isfile(path):
        raise PathError(f"--config {path}: no such file" if not os.path.isdir(path)
                        else f"--config {path}: is a directory, expected a YAML file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except (ValueError, RecursionError) as exc:  # e.g. a timestamp out of range, absurd nesting
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value, got {type(loaded).__name__}")
    return settings_from_mapping(loaded, path, kind)


def settings_from_mapping(values: dict, where: str, kind: str | None = None) -> dict:
    """``{field: value}`` from a mapping of setting names (``lora-r`` or ``lora_r``), each coerced to its
    field's type; ConfigError (``where: key: ...``) for unknown keys, keys of another trainer, bad values."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(fields))})")
        kinds = fields[name].metadata["kinds"]
        if kind is not None and kind not in kinds:
            raise ConfigError(f"{where}: {key}: a setting of peftkern {', '.join(kinds)}, not of peftkern {kind}")
        out[name] = coerce(fields[name], value, f"{where}: ")
    return out
