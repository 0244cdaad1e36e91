"""One code path for one process and for many under torchrun: rank, world size, reductions.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the process is alone (rank 0 of 1) and
every helper here is a no-op, so the training loop never asks which case it is in.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size), joining the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=30))
    return rank, local_rank, world_size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all processes (a copy; the input is left alone)."""
    tensor = tensor.clone()
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(items: list) -> list:
    """Every process's list concatenated on rank 0, in rank order (other ranks get an empty list)."""
    if not is_distributed():
        return items
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else []


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
