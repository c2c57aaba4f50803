"""Multi-process training under ``torchrun``: the process group, each rank's columns, and agreement.

``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with
WORLD_SIZE=1) training is single-process and nothing here does anything.
The backend is gloo on CPU and nccl on CUDA (one GPU per process, by
LOCAL_RANK).  ``--batch-size`` is the global batch: its columns are split
into equal contiguous blocks, one per rank, so the presets mean the same
with any number of processes.  Every rank draws the same BPTT segment
lengths (same seed), so all take the same steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes files and shows progress."""
        return self.rank == 0

    def columns(self, batch_size: int) -> slice:
        """This rank's block of the global batch's columns."""
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by the number "
                             f"of processes ({self.world})")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (if any); returns the ranks and this process's device."""
    world = world_size()
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise ValueError(f"--device cuda with {local_world} processes on this host needs {local_world} GPUs "
                             f"(one per process), but {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def any_rank(flag: bool, ranks: Ranks, device) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request, say)."""
    if ranks.world == 1:
        return bool(flag)
    t = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def global_mean(mean: torch.Tensor, count: int, ranks: Ranks) -> float:
    """The mean over every rank's ``count`` items of a per-rank ``mean`` (the same value on every rank)."""
    if ranks.world == 1:
        return mean.item()
    t = torch.stack([mean.detach().double() * count, torch.tensor(float(count), dtype=torch.float64,
                                                                   device=mean.device)])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def gather_columns(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Each rank's (..., b, ...) block along dim 1, concatenated in rank order (the global batch's columns)."""
    if ranks.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(ranks.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 1)
