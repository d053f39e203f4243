"""From a TrainConfig to a finished run: model, tokenizer, data (the bundled set for the tiny
models when no ``--data`` is given), the trainer of the right kind."""
from __future__ import annotations

from peftkern.train import outdir
from peftkern.train.config import TrainConfig, resolve_kind_defaults
from peftkern.train.distributed import is_main_process
from peftkern.train.errors import ConfigError
from peftkern.train.init_adapter import merge_init_adapter
from peftkern.train.loading import check_paths, data_paths, is_embedded, load_lm, load_tokenizer
from peftkern.train.mixing import attach_mixture, is_mixture, task_examples
from peftkern.train.multi_adapter_run import run_multi_adapter

BUNDLED_TRAIN, BUNDLED_EVAL = 480, 48


def bundled_records(kind: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of the bundled tasks in ``kind``'s format."""
    from peftkern.models import tasks

    train, held_out = tasks.split(BUNDLED_TRAIN, BUNDLED_EVAL, seed)
    make = {"sft": tasks.sft_records, "dpo": tasks.preference_records, "rm": tasks.preference_records,
            "kto": tasks.kto_records, "ppo": tasks.prompt_records, "grpo": tasks.prompt_records,
            "rloo": tasks.prompt_records, "orpo": tasks.preference_records, "simpo": tasks.preference_records,
            "cpo": tasks.preference_records}[kind]
    return make(train), make(held_out)


def _sources(kind: str, cfg: TrainConfig):
    if cfg.data:
        return cfg.data, cfg.eval_data
    if not is_embedded(cfg.model):
        raise ConfigError(f"peftkern {kind}: --data is required with --model {cfg.model} "
                         "(the bundled data fits the tiny models' tokenizer only)")
    train, held_out = bundled_records(kind, cfg.seed)
    return train, (cfg.eval_data or held_out)


def build_trainer(kind: str, cfg: TrainConfig, callbacks=()):
    """The trainer of ``kind`` ready to ``train()``. Paths and ``--out`` are checked first, so a wrong one
    fails before any model loads."""
    import torch

    from peftkern.train.model import LMWithHeads, check_packed_attention, prepare_lm

    resolve_kind_defaults(cfg, kind)
    check_paths(cfg, kind)
    check_more_paths(cfg, kind)
    if is_main_process():
        outdir.preflight(cfg)
    tok = load_tokenizer(cfg)
    train_src, eval_src = _sources(kind, cfg)
    lm, base = load_lm(cfg, quiet=cfg.quiet), None
    if cfg.init_adapter:
        lm, base = merge_init_adapter(cfg, lm, tok)
    torch.manual_seed(cfg.seed)  # adapter and head initialisation: the same run gives the same model
    lm = prepare_lm(cfg, lm)
    if kind == "sft" and cfg.packing:
        check_packed_attention(lm)
    model = LMWithHeads(lm, value_head=kind == "ppo", score_head=cfg.ensemble if kind == "rm" else False,
                        autocast_bf16=cfg.bf16)
    if kind == "sft":
        from peftkern.train.sft import SFTTrainer, sft_examples

        make, cls = sft_examples, SFTTrainer
    elif kind == "dpo":
        from peftkern.train.dpo import DPOTrainer, pair_examples

        make, cls = pair_examples, DPOTrainer
    elif kind == "rm":
        from peftkern.train.rm import RewardTrainer, rm_examples

        make, cls = rm_examples, RewardTrainer
    elif kind == "kto":
        from peftkern.train.kto import KTOTrainer, kto_examples

        make, cls = kto_examples, KTOTrainer
    elif kind == "ppo":
        from peftkern.train.ppo import PPOTrainer, ppo_prompts

        make, cls = ppo_prompts, PPOTrainer
    elif kind in ("grpo", "rloo"):
        from peftkern.train.grpo import GRPOTrainer, RLOOTrainer, online_prompts

        make, cls = online_prompts, (GRPOTrainer if kind == "grpo" else RLOOTrainer)
    elif kind in ("orpo", "simpo", "cpo"):
        from peftkern.train.dpo import pair_examples
        from peftkern.train.preference import TRAINERS as PREFERENCE

        make, cls = pair_examples, PREFERENCE[kind]
    else:
        raise ValueError(f"unknown trainer {kind!r}")
    if kind == "sft" and cfg.eval_data and len(data_paths(cfg.eval_data, "--eval-data", kind)) > 1:
        evals = [e for ex in task_examples(tok, cfg.eval_data, None, cfg, make, "--eval-data")[0].values() for e in ex]
    else:
        evals = make(tok, eval_src, cfg) if eval_src is not None else []
    if kind == "sft" and is_mixture(cfg):  # several tasks, weights or rehearsal: a sampler fills each step
        trainer = cls(cfg, model, tok, [], evals, callbacks=callbacks)
        attach_mixture(trainer, tok, cfg, train_src, make)
        return trainer
    train = make(tok, train_src, cfg)
    trainer = cls(cfg, model, tok, train, evals, callbacks=callbacks,
                  base_model_path=None if base is None else base.path)
    trainer.pending_base = base  # written into --out once the run holds it (before_train)
    return trainer


def check_more_paths(cfg: TrainConfig, kind: str) -> None:
    """The paths of the settings check_paths does not know (GRPO / RLOO's --reward-model, --init-adapter)."""
    import os

    from peftkern.train.errors import PathError
    from peftkern.train.loading import check_model_dir

    if kind in ("grpo", "rloo") and cfg.reward_model:
        check_model_dir(cfg.reward_model, "--reward-model")
    if kind == "rm" and cfg.calibrate_on:
        from peftkern.train.loading import check_data_file

        check_data_file(cfg.calibrate_on, "--calibrate-on")
    if cfg.init_adapter and not os.path.isfile(os.path.join(cfg.init_adapter, "adapter_config.json")):
        raise PathError(f"--init-adapter {cfg.init_adapter}: no adapter_config.json in it: not a PEFT adapter folder "
                        "(a run's <out>/adapter)")


def run(kind: str, cfg: TrainConfig) -> dict:
    if kind == "sft" and cfg.multi_adapter:
        return run_multi_adapter(cfg)
    trainer = build_trainer(kind, cfg)
    try:
        return trainer.train()
    finally:
        from peftkern.train.distributed import teardown

        teardown(trainer.dist)
