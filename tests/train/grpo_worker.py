"""A small GRPO run for the resume test: ``python -m tests.train.grpo_worker OUT STOP_AT`` trains, and at
step STOP_AT writes ``OUT/stopped`` and hangs until the test kills it with SIGKILL. num_iterations 2
and a checkpoint every 3 steps: the checkpoint at step 3 falls inside a rollout."""
import os
import sys
import time

import torch

from peftkern.train.config import TrainConfig
from peftkern.train.run import build_trainer

STEPS, SAVE_EVERY = 8, 3


def config(out: str, resume: bool = False) -> TrainConfig:
    return TrainConfig(model="tiny-micro", lora_r=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2, batch_size=2,
                       max_steps=STEPS, warmup_steps=2, save_every=SAVE_EVERY, keep_last=2, out=out, quiet=True,
                       log_every=1, strategy="none", resume=resume, num_generations=4, max_completion_length=5,
                       num_iterations=2, beta=0.05, reward_fn="tests.train.grpo_rewards:lowercase_share").check()


def run(out: str, resume: bool = False, callbacks=()):
    trainer = build_trainer("grpo", config(out, resume), callbacks=callbacks)
    trainer.eval_examples = trainer.eval_examples[:4]
    return trainer.train()


def main():
    out, stop_at = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)

    def hang(trainer, step, record):
        if step == stop_at:
            with open(os.path.join(out, "stopped"), "w") as f:
                f.write(str(step))
            time.sleep(600)

    run(out, callbacks=[hang])


if __name__ == "__main__":
    main()
