"""A small run for the resume tests: ``python -m tests.train.resume_worker OUT STOP_AT [KIND]`` trains
(KIND ``sft``, the default, or ``grpo``), and at step STOP_AT writes ``OUT/stopped`` and hangs until
the test kills it with SIGKILL.

* sft: 12 steps, a checkpoint every 4; LoRA dropout on, so the restored RNG matters; grad accumulation
  and warm-up, so does the scheduler.
* grpo: 8 steps, a checkpoint every 3; num_iterations 2, so the checkpoint at step 3 falls inside a
  rollout; beta > 0 (the reference pass) and a reward function from the tests.
"""
import os
import signal
import subprocess
import sys
import time

import torch

from peftkern.train.config import TrainConfig
from peftkern.train.run import build_trainer

COMMON = dict(model="tiny-micro", lora_r=4, lora_alpha=8, lr=1e-2, keep_last=2, quiet=True, log_every=1,
              strategy="none")
RUNS = {
    "sft": dict(lora_dropout=0.2, batch_size=4, grad_accum=2, max_steps=12, warmup_steps=3, save_every=4),
    "grpo": dict(lora_dropout=0.1, batch_size=2, max_steps=8, warmup_steps=2, save_every=3, num_generations=4,
                 max_completion_length=5, num_iterations=2, beta=0.05,
                 reward_fn="tests.train.grpo_rewards:lowercase_share"),
}
EVAL_EXAMPLES = {"sft": 8, "grpo": 4}


def config(out: str, resume: bool = False, kind: str = "sft") -> TrainConfig:
    return TrainConfig(**COMMON, **RUNS[kind], out=out, resume=resume).check()


def run(out: str, resume: bool = False, callbacks=(), kind: str = "sft"):
    trainer = build_trainer(kind, config(out, resume, kind), callbacks=callbacks)
    trainer.eval_examples = trainer.eval_examples[:EVAL_EXAMPLES[kind]]
    return trainer.train()


def run_until_killed(out: str, stop_at: int, kind: str = "sft") -> subprocess.Popen:
    """Run :func:`main` in a child process (``out`` must exist), SIGKILL it once it has reached step
    ``stop_at``; returns the finished process."""
    from tests.train.helpers import ROOT, env

    proc = subprocess.Popen([sys.executable, "-m", "tests.train.resume_worker", out, str(stop_at), kind], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(out, "stopped")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, f"the worker never reached step {stop_at}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


def main():
    out, stop_at = sys.argv[1], int(sys.argv[2])
    kind = sys.argv[3] if len(sys.argv) > 3 else "sft"
    torch.set_num_threads(1)

    def hang(trainer, step, record):
        if step == stop_at:
            with open(os.path.join(out, "stopped"), "w") as f:
                f.write(str(step))
            time.sleep(600)

    run(out, callbacks=[hang], kind=kind)


if __name__ == "__main__":
    main()
