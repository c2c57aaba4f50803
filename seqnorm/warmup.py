"""Help for a normalized recurrent layer in your own training loop: the truncated backward that tames the
explosion at initialization, and the measure of the damage the loss does not show.

A normalized LSTM or RNN at initialization has gradients that grow about 2x per 10 steps of backpropagation
through time (docs/robust_start.md); with long segments and a high learning rate the first updates throw the
model away.  Cutting the backward at K steps for the first few hundred updates, K rising to the full segment,
removes that, while the forward, the outputs and the normalization statistics stay exactly those of the
uncut run.

A normalized gate is scale-invariant: norm(c W [x; h] + c b) = norm(W [x; h] + b) for c > 0, where W is the
gate's block of rows of ``[weight_ih | weight_hh | bias_ih | bias_hh]``.  So its gradient is orthogonal to
the block, an update of relative size r = ||dW|| / ||W|| grows the block by sqrt(1 + r^2), and the gate's
effective learning rate falls as lr / ||W||^2 for the rest of training, while the loss does not move.
``largest_gate_update`` measures r for every normalized gate block of a layer, so a training loop can refuse
such an update.  ``seqnorm-lm`` does all this with the same pieces (``lm/model.py``, ``lm/robust_start.py``).
"""
from __future__ import annotations

import torch

from .layers import _RecurrentLayers

GATE_NAMES = {"lstm": "ifgo", "gru": "rzn", "rnn": "a"}  # torch.nn's row order of each cell's gate blocks


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
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        raise TypeError("truncated_forward takes a padded (T, B, I) tensor, not a PackedSequence")
    if getattr(layer, "bidirectional", False) and k is not None and k < x.shape[0]:
        raise ValueError("truncated_forward cannot cut a bidirectional layer: its reverse direction runs from the "
                         "end of the whole sequence, so chunks would change the output; call the layer itself")
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


def gate_blocks(layer: torch.nn.Module, weights: dict | None = None) -> dict[str, torch.Tensor]:
    """Every normalized gate of a seqnorm layer as one block (its rows of ``[weight_ih | weight_hh | bias_ih |
    bias_hh]``), named ``l{k}{_reverse}.{gate}`` (gates: LSTM i, f, g, o; GRU r, z, n; RNN a).  ``weights``: the
    layer's parameters by name, e.g. a copy taken before an update (default: the layer's own, detached).
    An unnormalized layer (``norm=None``, a ``torch.nn`` layer) has no scale-invariant block: ``{}``."""
    if not isinstance(layer, _RecurrentLayers) or layer.norm_type is None:
        return {}
    weights = {n: p.detach() for n, p in layer.named_parameters()} if weights is None else weights
    H, gates = layer.hidden_size, GATE_NAMES[layer.cell]
    blocks = {}
    for k in range(layer.num_layers):
        for sfx in ("", "_reverse")[:layer.num_directions]:
            names = [f"{w}_l{k}{sfx}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            parts = [weights[n].reshape(len(gates) * H, -1) for n in names if weights.get(n) is not None]
            rows = torch.cat(parts, dim=1).reshape(len(gates), H, -1)
            blocks.update({f"l{k}{sfx}.{g}": rows[j] for j, g in enumerate(gates)})
    return blocks


def gate_norms(layer: torch.nn.Module) -> dict[str, float]:
    """The Frobenius norm of each normalized gate block (``gate_blocks``): where the damage shows."""
    return {name: float(torch.linalg.vector_norm(b)) for name, b in gate_blocks(layer).items()}


def largest_gate_update(layer: torch.nn.Module, before: dict) -> float:
    """The largest relative update ||W - W_before|| / ||W_before|| over the layer's normalized gate blocks, with
    ``before`` its parameters by name as they were (``{n: p.detach().clone() for n, p in
    layer.named_parameters()}``); 0.0 for an unnormalized layer.  Most updates of a run are below 1; an update
    on a segment whose gradient explodes through time gives 2.2 to 2,200 (docs/robust_start.md)."""
    old, new = gate_blocks(layer, before), gate_blocks(layer)
    if not old:
        return 0.0
    ratios = torch.stack([torch.linalg.vector_norm(new[n] - b) / torch.linalg.vector_norm(b) for n, b in old.items()])
    return float(torch.nan_to_num(ratios, nan=float("inf")).max())  # a non-finite block is the largest update
