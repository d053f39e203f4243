"""Under torchrun: ``python -m torch.distributed.run --nproc_per_node 2 -m tests.train.signal_worker OUT``.
Only rank 1 gets a SIGTERM, after step 2; every rank prints its summary as one JSON line."""
import json
import os
import signal
import sys

import torch

from peftkern.train.distributed import teardown
from tests.train.helpers import micro, trainer


def main():
    out = sys.argv[1]
    torch.set_num_threads(1)

    def preempt_rank1(t, step, record):
        if step == 2 and t.dist.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    t = trainer("sft", micro(out, max_steps=8, save_every=0, strategy="ddp"), callbacks=[preempt_rank1])
    try:
        summary = t.train()
    finally:
        teardown(t.dist)
    print(json.dumps({"rank": int(os.environ["RANK"]), **summary}), flush=True)


if __name__ == "__main__":
    main()
