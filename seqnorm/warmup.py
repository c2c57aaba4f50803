"""Help for a normalized recurrent layer in your own training loop: the truncated backward that tames the
explosion at initialization.

A normalized LSTM or RNN at initialization has gradients that grow about 2x per 10 steps of backpropagation
through time (docs/robust_start.md); with long segments and a high learning rate the first updates throw the
model away.  Cutting the backward at K steps for the first few hundred updates, K rising to the full segment,
removes that, while the forward, the outputs and the normalization statistics stay exactly those of the
uncut run.  ``seqnorm-lm`` does this with the same two pieces (``lm/model.py``, ``lm/robust_start.py``).
"""
from __future__ import annotations

import torch


def detach_state(hx):
    """The hidden state with its graph cut and its values kept: a tensor (RNN, GRU) or an (h, c) pair (LSTM)."""
    if hx is None:
        return None
    return tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()


def truncated_forward(layer: torch.nn.Module, x: torch.Tensor, hx=None, k: int | None = None):
    """``layer(x, hx)`` with backpropagation through at most ``k`` time steps: the sequence (time-major, dim 0)
    runs in chunks of ``k`` steps, the hidden state detached between chunks.  The output and final state are
    those of one call (the statistics see the rows in the same order); only the gradients change.  ``k=None``,
    or ``k`` at least the length, is the plain call.  Returns ``(output, final state)`` as the layer does."""
    if k is not None and k < 1:
        raise ValueError(f"k must be a positive number of time steps, got {k}")
    if getattr(layer, "batch_first", False):
        raise ValueError("truncated_forward takes time-major input; build the layer with batch_first=False")
    if k is None or k >= x.shape[0]:
        return layer(x, hx)
    outs = []
    for start in range(0, x.shape[0], k):
        if start:
            hx = detach_state(hx)
        out, hx = layer(x[start:start + k], hx)
        outs.append(out)
    return torch.cat(outs), hx


def truncation_schedule(step: int, warmup_steps: int = 300, start: int = 32, full: int | None = None) -> int | None:
    """K for optimizer step ``step`` (0-based): ``start`` rising linearly to ``full`` over ``warmup_steps``
    steps, then None (no cut).  With ``full=None`` the cut stays at ``start`` for the whole warm-up."""
    if step >= warmup_steps:
        return None
    if full is None:
        return start
    k = start + (full - start) * step // warmup_steps
    return k if k < full else None
