"""Data-parallel training with Online Normalization: DDP without buffer broadcast, and reconciled statistics.

Online Normalization's state (``running_mean``, ``running_var``, ``control_u``,
``control_v``) is a streaming estimate that each rank updates from its own
samples (docs/design.md §2).  Plain DDP broadcasts rank 0's buffers to every rank at
each forward, which throws the other ranks' statistics and their whole control
process away every step.  So:

- ``wrap_ddp(model, **kwargs)`` builds ``DistributedDataParallel`` without the
  per-forward buffer broadcast (``forward_sync_buffers=False`` where torch
  has it, else ``broadcast_buffers=False``); every other argument passes
  through.  Each rank then keeps its own statistics stream.
- ``reconcile_statistics(model)`` makes every rank's Online Normalization
  state the same, combined over the ranks (all-reduce, float64):

      mu  = mean_r mu_r
      var = mean_r var_r + mean_r (mu_r - mu)**2      (the variance of the pooled samples
                                                       when the ranks saw equally many)
      u   = mean_r u_r,  v = mean_r v_r

  u and v are averaged, not reset: they are running estimates of the same
  gradient statistics (eqs. 11-12) from disjoint samples, just as mu is, and
  a reset would throw the control process's memory away; keeping them per
  rank would leave a checkpoint or an evaluation with no single state.
  It is a no-op without an initialized process group.  Layer norm and no norm
  have no state and need nothing.
"""
import inspect

import torch
import torch.distributed as dist
from torch import nn

from .online_norm import OnlineNorm

STATE = ("running_mean", "running_var", "control_u", "control_v")


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that leaves each rank's buffers alone at every forward."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        ddp_kwargs.setdefault("forward_sync_buffers", False)
    else:
        ddp_kwargs.setdefault("broadcast_buffers", False)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def online_norms(model: nn.Module) -> list[tuple[str, OnlineNorm]]:
    """The Online Normalization modules of ``model``, by name, in a fixed order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, OnlineNorm)]


def active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@torch.no_grad()
def reconcile_statistics(model: nn.Module, group=None) -> None:
    """Replace every rank's Online Normalization state with the combination over ranks (module docstring)."""
    norms = online_norms(model)
    if not norms or not active(group):
        return
    world = dist.get_world_size(group)
    mus = torch.cat([m.running_mean.double() for _, m in norms])
    parts = [mus, mus * mus] + [torch.cat([getattr(m, k).double() for _, m in norms]) for k in STATE[1:]]
    total = torch.stack(parts)  # (5, F): mu, mu^2, var, u, v
    dist.all_reduce(total, group=group)
    mean = total / world
    mu, mu2, var, u, v = mean
    pooled_var = var + (mu2 - mu * mu).clamp_min(0)  # mean of var_r + variance of the mu_r
    offset = 0
    for _, m in norms:
        n = m.num_features
        for name, value in zip(STATE, (mu, pooled_var, u, v)):
            getattr(m, name).copy_(value[offset:offset + n])
        offset += n


def gather_states(model: nn.Module, group=None) -> list[dict] | None:
    """Every rank's own Online Normalization buffers, as one state dict per rank (on every rank), or None."""
    norms = online_norms(model)
    if not norms or not active(group):
        return None
    flat = torch.cat([getattr(m, k).double().reshape(-1) for _, m in norms for k in STATE])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    states = []
    for values in gathered:
        state, offset = {}, 0
        for name, m in norms:
            for k in STATE:
                buf = getattr(m, k)
                state[f"{name}.{k}" if name else k] = values[offset:offset + buf.numel()].to(buf.dtype).cpu()
                offset += buf.numel()
        states.append(state)
    return states


@torch.no_grad()
def load_states(model: nn.Module, state: dict) -> None:
    """Put one rank's gathered state (from ``gather_states``) back into ``model``'s buffers."""
    for name, m in online_norms(model):
        for k in STATE:
            getattr(m, k).copy_(state[f"{name}.{k}" if name else k])
