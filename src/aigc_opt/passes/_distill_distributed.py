"""The distributed side of distillation, and the states its checkpoints hold: joining the process
group ``torchrun`` describes, DDP / FSDP wrapping, means across ranks, full model and optimizer
states (gathered from the shards under FSDP) and the atomic checkpoint file rank 0 writes.

Process groups come only from ``torch.distributed.init_process_group`` reading the ``torchrun``
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...); nothing here schedules processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._store import atomic_write

__all__ = ["CHECKPOINT_FILE", "world", "init_from_torchrun", "wrap", "mean_across", "atomic_save", "checkpoint_path",
           "full_state", "optimizer_state", "student_state", "load_full_state"]

CHECKPOINT_FILE = "last.pt"


# ---------------------------------------------------------------------- distributed (torchrun)
def world() -> tuple[int, int]:
    """(rank, world size): from the initialized default group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_torchrun() -> bool:
    """Join the process group torchrun describes in the environment; True when we started it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def wrap(trainee: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard  # FSDP2: CPU (gloo) and GPU (nccl)

        for child in trainee.student.children():  # each top-level block is its own shard unit
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        return fully_shard(trainee)
    return DDP(trainee, device_ids=[device] if device.type == "cuda" else None)


def mean_across(value: torch.Tensor, size: int) -> torch.Tensor:
    if size > 1:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        value /= size
    return value


# ---------------------------------------------------------------------- checkpoints
def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_path(where: str | os.PathLike[str]) -> Path:
    path = Path(where)
    return path / CHECKPOINT_FILE if path.is_dir() or not path.suffix else path


def full_state(wrapped: nn.Module, trainee: nn.Module, strategy: str, size: int) -> dict[str, torch.Tensor]:
    if size > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    else:
        state = trainee.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def optimizer_state(wrapped: nn.Module, optimizer: Any, strategy: str, size: int) -> dict[str, Any]:
    if size > 1 and strategy == "fsdp":  # gather the shards: rank 0 writes the whole state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def student_state(wrapped: nn.Module, trainee: nn.Module, strategy: str, size: int) -> dict[str, torch.Tensor]:
    return {k[len("student."):]: v for k, v in full_state(wrapped, trainee, strategy, size).items()
            if k.startswith("student.")}


def load_full_state(wrapped: nn.Module, trainee: nn.Module, state: dict[str, torch.Tensor],
                     strategy: str, size: int) -> None:
    if size > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(wrapped, state, options=StateDictOptions(full_state_dict=True))
    else:
        trainee.load_state_dict(state)
