"""One code path for one process and for many under torchrun: rank, world size, reductions.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a process it launched always joins a process group, one
process too (so one GPU exercises the NCCL path). Without them the process is alone (rank 0 of 1) and
every helper here is a no-op, so the training loop never asks which case it is in.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size), joining the process group when launched by torchrun."""
    if not launched_by_torchrun():
        return 0, 0, 1
    rank, local_rank, world_size = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
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


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true in any process: every process gets the same answer (a host synchronisation)."""
    return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0


def backend() -> str | None:
    return dist.get_backend() if is_distributed() else None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
