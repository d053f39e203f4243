"""A save killed part-way (SIGKILL to the writing process) never leaves a half-written adapter in
place of the good one that was there."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from peftkern.tuners import LoraConfig
from peftkern.tuners.io import write_adapter_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The child writes a new adapter (every tensor filled with 2.0, alpha 16) over the good one
# (1.0, alpha 8); `pause` stops it at one point of the write so the parent can kill it there.
CHILD = textwrap.dedent("""
    import os, sys, time, builtins
    import torch
    from peftkern.tuners import io
    from peftkern.tuners import LoraConfig
    directory, pause, big = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def stop():
        print("PAUSED", flush=True)
        time.sleep(600)

    if pause == "mid_write":  # half of the weights file reaches the temp file, then the process stops
        real_fdopen = os.fdopen
        class HalfWriter:
            def __init__(self, fh): self.fh = fh
            def __enter__(self): return self
            def __exit__(self, *exc): return self.fh.__exit__(*exc)
            def write(self, data):
                self.fh.write(data[: len(data) // 2]); self.fh.flush(); stop()
            def __getattr__(self, name): return getattr(self.fh, name)
        io.os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
    elif pause == "before_rename":  # both temp files complete, nothing renamed yet
        real_replace = os.replace
        io.os.replace = lambda a, b: (stop(), real_replace(a, b))
    tensors = {"base_model.model.lin.lora_A.weight": torch.full((4, big), 2.0),
               "base_model.model.lin.lora_B.weight": torch.full((big, 4), 2.0)}
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["lin"])
    print("START", flush=True)
    for _ in range(10000 if pause == "loop" else 1):
        io.write_adapter_files(directory, config.to_json(), tensors)
""")


def _good_adapter(directory, big, alpha=8, value=1.0):
    tensors = {"base_model.model.lin.lora_A.weight": torch.full((4, big), value),
               "base_model.model.lin.lora_B.weight": torch.full((big, 4), value)}
    write_adapter_files(str(directory), LoraConfig(r=4, lora_alpha=alpha, target_modules=["lin"]).to_json(), tensors)


def _start_child(directory, pause, big):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(directory), pause, str(big)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)


def _wait_for(proc, line):
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"writer exited early: {proc.wait()} {proc.stderr.read()[-2000:]}")


def _adapter_on_disk(directory):
    """(alpha, the single value every tensor holds) of the adapter in ``directory``; asserts the pair
    is whole and consistent."""
    config = LoraConfig.from_pretrained(directory)
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    values = {float(v) for t in tensors.values() for v in t.unique()}
    assert len(values) == 1, f"mixed tensor contents {values}"
    return config.lora_alpha, values.pop()


def test_killed_writer_leaves_a_whole_adapter(tmp_path):
    """Three writers over three good adapters (started together to share the import time), killed
    (1) with half the new weights in a temp file, (2) with both new files complete but not renamed,
    (3) at an arbitrary moment of repeated real saves of a checkpoint (same config, new weights).
    What is on disk afterwards is always one whole adapter: the old one for (1) and (2)."""
    scenarios = {"mid_write": 4096, "before_rename": 4096, "loop": 1 << 16}
    procs = {}
    try:
        for pause, big in scenarios.items():
            (tmp_path / pause).mkdir()
            _good_adapter(tmp_path / pause, big=big, alpha=16 if pause == "loop" else 8)
            procs[pause] = _start_child(tmp_path / pause, pause, big)
        for pause, proc in procs.items():
            _wait_for(proc, "START" if pause == "loop" else "PAUSED")
        time.sleep(1.0)  # the loop writer saves repeatedly meanwhile
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    for pause in ("mid_write", "before_rename"):
        assert _adapter_on_disk(tmp_path / pause) == (8, 1.0)
        assert any(n.endswith(".tmp") for n in os.listdir(tmp_path / pause)), "kill should hit a pending temp file"
    assert _adapter_on_disk(tmp_path / "loop") in {(16, 1.0), (16, 2.0)}
