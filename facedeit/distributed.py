"""torch.distributed set-up for runs launched by torchrun; a single process needs none of it."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; size 1 for a plain `python -m facedeit`."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str | None = None) -> torch.device:
    """Return the named torch device, or CUDA when present and the CPU otherwise."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_world(device_name: str | None = None) -> tuple[World, torch.device]:
    """Join the process group that torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK.

    NCCL on CUDA with one GPU per local rank, gloo on the CPU. Without
    torchrun (WORLD_SIZE unset or 1) it returns World() and the requested or
    default device.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), pick_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_name is None or device_name.startswith("cuda"))
    # NOTE: only the gloo (CPU) path is tested; NCCL on several GPUs has not been run yet.
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(size, rank, local_rank), device


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, world: World) -> float:
    """Return the mean of a scalar tensor over all ranks as a float."""
    if world.size == 1:
        return value.item()
    total = value.detach().float().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() / world.size


def gather_objects(obj, world: World) -> list:
    """Return every rank's `obj`, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
