"""``peftkern rm-calibrate``: temperature scaling of a reward model on held-out pairs (or rankings),
its ECE before and after and a reliability plot; the temperature is saved in the reward model's
``calibration.json``, which every later load applies (docs/reward_models.md)."""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

from peftkern.train.errors import PathError, TrainError


def add_parser(sub) -> None:
    p = sub.add_parser("rm-calibrate", help="fit a reward model's temperature on held-out pairs: ECE before/after, "
                       "reliability plot; saved with the model",
                       description="Scores every pair of --data (pairwise records, or the pairs each ranking "
                       "implies) with the reward model, fits the temperature T of sigmoid((s_a - s_b) / T) by "
                       "maximum likelihood, prints ECE / NLL before and after, draws the reliability diagram and "
                       "writes T to <reward-model>/calibration.json; ppo, grpo, rloo and eval then score with "
                       "the scores divided by T.")
    p.add_argument("--reward-model", required=True, help="a reward_model/ directory written by 'peftkern rm'")
    p.add_argument("--data", required=True, help="held-out JSONL: 'prompt'/'chosen'/'rejected' or "
                   "'prompt'/'completions'/'ranking' (not the training data)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the reward model's own)")
    p.add_argument("--plot", default=None, help="reliability PNG (default: <reward-model>/reliability.png)")
    p.add_argument("--bins", type=int, default=10, help="confidence bins of the ECE and the plot (default 10)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="lists scored at once (default 16)")
    p.add_argument("--no-save", action="store_true", help="report only: leave calibration.json as it is")
    p.set_defaults(func=run)


def calibrate_reward_model(path: str, data: str, tokenizer_dir: str | None = None, plot: str | None = None,
                           bins: int = 10, max_length: int = 256, batch_size: int = 16, save: bool = True) -> dict:
    """Fit, report and (``save``) store the temperature of the reward model in ``path``; returns the
    calibration record (``peftkern.train.calibration.calibrate``'s, plus ``data`` and ``plot``)."""
    from transformers import AutoTokenizer

    from peftkern.train.loading import check_tokenizer_dir
    from peftkern.train.rm import SCORE_HEAD_FILE, calibrate_saved, rm_examples

    if not os.path.isdir(path):
        raise PathError(f"--reward-model {path}: no such directory (a reward_model/ folder from 'peftkern rm')")
    if not os.path.isfile(os.path.join(path, SCORE_HEAD_FILE)):
        raise PathError(f"--reward-model {path}: not a reward model directory (no {SCORE_HEAD_FILE}); train one "
                        "with 'peftkern rm'")
    if bins < 1 or max_length < 2 or batch_size < 1:
        raise ValueError(f"--bins, --batch-size must be >= 1 and --max-length >= 2; got {bins}, {batch_size}, "
                         f"{max_length}")
    tok_dir = tokenizer_dir or path
    if tokenizer_dir is None and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise PathError(f"--reward-model {path}: has no tokenizer files (written by an older 'peftkern rm'); give "
                        "--tokenizer DIR")
    check_tokenizer_dir(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples = rm_examples(tok, data, SimpleNamespace(max_length=max_length))
    return calibrate_saved(path, examples, tok.pad_token_id, data, plot, bins, batch_size, save)


def run(args) -> int:
    try:
        record = calibrate_reward_model(args.reward_model, args.data, args.tokenizer, args.plot, args.bins,
                                        args.max_length, args.batch_size, save=not args.no_save)
    except (TrainError, ValueError, FileNotFoundError) as exc:
        print(f"peftkern rm-calibrate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=1))
    return 0
