"""Many processes through torchrun only: DDP or FSDP2 over one process group (NCCL on GPUs, gloo on
the CPU). A single process (no WORLD_SIZE, or 1) uses none of this."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from peftkern.train.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(strategy: str) -> Dist:
    """Read torchrun's environment, start the process group, pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy in ("ddp", "fsdp2") and world == 1 and "RANK" not in os.environ:
        raise ConfigError(f"--strategy {strategy} needs several processes: launch with torchrun --nproc_per_node N")
    if strategy == "none" and world > 1:
        raise ConfigError(f"--strategy none, but torchrun started {world} processes: each would train alone on "
                          "the same data and write the same --out; use --strategy ddp or fsdp2 (or auto), or "
                          "run one process without torchrun")
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=device, strategy="none")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local_rank, device, "ddp" if strategy == "auto" else strategy)


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun launch (or the only process), from the environment."""
    return os.environ.get("RANK", "0") == "0"


def wrap(model: nn.Module, d: Dist) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` on each decoder layer, then the root) around ``model``."""
    if d.world == 1:
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``value`` over every process (a copy; itself with one process)."""
    if d.world == 1:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def full_state(model: nn.Module, names: list[str], d: Dist) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the named parameters, on the CPU (FSDP2 gathers them)."""
    params = dict(unwrap(model).named_parameters())
    out = {}
    for n in names:
        p = params[n].detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out[n] = p.cpu()
    return out


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on the CPU (FSDP2 gathers it: every process calls); None (the
    module's own state) without FSDP2."""
    if d.strategy != "fsdp2":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def teardown(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
