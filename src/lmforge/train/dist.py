"""Distributed training through torchrun: the same command runs on one process or many.

`setup()` reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) and joins the process group: NCCL on
GPUs, gloo on CPUs. `wrap()` applies DDP or FSDP2 (`fully_shard` on each block, then the root) from outside
the model. Multi-node is torchrun's own `--nnodes`/`--rdzv-endpoint`; there is no launcher of ours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.errors import LMForgeError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if there is one; return this process's place and device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name
    if device_type.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LMForgeError(f"train.device={device_name} but no CUDA device is available; use --train.device cpu")
        device = torch.device("cuda", info.local_rank) if info.enabled else torch.device(device_type)
        torch.cuda.set_device(device)
    else:
        try:
            device = torch.device(device_type)
        except RuntimeError:  # torch's own message lists every device type it was built with
            raise LMForgeError(f"train.device takes auto, cpu, cuda, cuda:N or mps, not {device_name!r}") from None
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise LMForgeError("train.device=mps but this machine has no MPS device; use --train.device cpu")
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def wrap(model: torch.nn.Module, mode: str, info: Dist, device: torch.device) -> torch.nn.Module:
    """The model as the training loop should call it: itself, DDP-wrapped, or FSDP2-sharded (in place)."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_mean(value: float, info: Dist, device: torch.device) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def all_agree(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every rank if flag is true on any rank (used to stop or skip together, never to hang)."""
    return all_agree_each([flag], info, device)[0]


def all_agree_each(flags: list[bool], info: Dist, device: torch.device) -> list[bool]:
    """all_agree for several flags in one all-reduce."""
    if not info.enabled:
        return list(flags)
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
