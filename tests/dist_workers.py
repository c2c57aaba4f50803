"""Worker functions for tests/test_distributed.py, run in 2 gloo processes by torch.multiprocessing.spawn.

Each writes what it saw to OUT/rank<r>.pt; the test process makes the assertions.
"""
import os

import torch
import torch.distributed as dist

import seqnorm
from seqnorm.distributed import STATE, reconcile_statistics, wrap_ddp


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _state(model):
    return {k: getattr(model.norm_l0, k).clone() for k in STATE}


def _gather(state):
    """Every rank's state, gathered by hand with all_gather_object."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, state)
    return everyone


def _step(ddp, rank, k, backward=True):
    torch.manual_seed(100 * rank + k)  # each rank its own data
    out, _ = ddp(torch.randn(6, 3, 4) * (1 + rank))
    if backward:
        out.pow(2).mean().backward()


def reconcile(rank, world, port, out, plain_ddp):
    """A few DDP steps of an online LSTM; what the states look like before and after reconciling."""
    _init(rank, world, port)
    torch.manual_seed(0)
    model = seqnorm.LSTM(4, 5)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if plain_ddp else wrap_ddp(model)
    for k in range(3):
        _step(ddp, rank, k)
    after_backward = _gather(_state(model))
    _step(ddp, rank, 3, backward=False)  # a forward only: u, v are untouched by it
    after_forward = _gather(_state(model))
    reconcile_statistics(model)
    reconciled = _gather(_state(model))
    torch.save({"after_backward": after_backward, "after_forward": after_forward, "reconciled": reconciled},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # both ranks have written their results
    # leave without gloo's teardown, which is not under test: in torch 2.13 it aborts a rank now and then (SIGABRT,
    # "terminate called without an active exception"; 2 of about 430 runs). The torchrun tests check that
    # `seqnorm-lm train` tears down and exits with 0
    os._exit(0)
