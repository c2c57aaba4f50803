"""The robust start: the first ``warmup_steps`` optimizer steps checked for damage, and the damage taken back.

A normalized LSTM or RNN at initialization has gradients that explode through time (about 2x per 10 steps of
the first BPTT segment; docs/robust_start.md), so one long early segment at the paper's learning rates throws
the run away.  The damage shows in one of two places:

- the loss (online norm): the update multiplies its own segment's perplexity by 100 or more;
- only the weights (layer norm): a normalized gate is scale-invariant, so the update leaves the loss flat but
  inflates the gate's block of weights (``seqnorm.warmup.gate_blocks``) by sqrt(1 + r^2), r = ||dW|| / ||W||,
  and the gate's effective learning rate falls as lr / ||W||^2 for good.  An update on an exploding segment
  has r of 2.2 to 2,200 on its largest block, most other updates stay below 1 (docs/robust_start.md).

The rule, with ``warmup="undo"`` (the default), on each of the first ``warmup_steps`` steps:

1. Before the backward, the ceiling: a loss above log(V) + ``ceiling`` shows that the previous update took the
   model off the road; that update is halved (the weights moved halfway back to where it started) until the loss
   is under the ceiling, up to ``warmup_halvings`` times (none under it: the point with the lowest loss).
2. The bound: a loss still at log(V) + ``bound`` or more means older damage; the segment is forwarded from the
   weights the last ``RECENT_STARTS`` steps started from, latest first, then from the run's first weights, and
   the step starts from the first point under the bound (none: the lowest).
3. The update is taken as written, then checked: a trial forward on its own segment, and the gate blocks.  An
   update that raised the segment's loss by more than log(``undo_factor``) or moved a normalized gate block by
   more than ``max_gate_update`` times its norm is undone (weights, statistics, random state) and retaken with
   the backward truncated at ``warmup_from`` steps; a retake that does damage too, or a segment too short to
   truncate, is halved until it does none, up to ``warmup_halvings`` times; else the step makes no update.
4. From the first undone update on, every backward of the warm-up is truncated at K(step), rising from
   ``warmup_from`` to ``bptt`` over the warm-up: a run whose gradients explode once will again.

Every check reads numbers the step has, or costs one forward; a run in which nothing fires is bit for bit the
run as written (``warmup="none"``, ``--as-written``).  ``warmup="truncate"`` truncates at K(step) from the
first step instead, checking nothing.  The Trainer calls ``RobustStart.step`` once per optimizer step with the
segment's two operations (``Segment``) and saves ``state_dict()`` in its checkpoints, so resuming is exact.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from seqnorm.warmup import gate_blocks, largest_gate_update, truncation_schedule

RECENT_STARTS = 4  # the bound: how many earlier warm-up steps' starting weights are kept to walk back to
PEAK_STEPS = 300  # every run records the largest per-step training loss of its first PEAK_STEPS steps


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Segment:
    """What a step of the robust start does to one BPTT segment, given by the training loop.

    ``forward(truncate)``: the segment's loss tensor, its value and the hidden state after it, from the model as
    it is now (``truncate``: backpropagate through at most that many time steps; None: all).
    ``learn(loss, value)``: the backward of ``loss`` and the optimizer step; returns the gradient norm.
    """

    forward: Callable[[int | None], tuple[torch.Tensor, float, Any]]
    learn: Callable[[torch.Tensor, float], float]
    length: int


class RobustStart:
    """The warm-up of one training run (module docstring).  ``cfg``: a ``TrainConfig`` (its ``warmup*``,
    ``undo_factor``, ``ceiling``, ``bound``, ``max_gate_update`` and ``bptt``); ``model``: what is trained
    (every seqnorm layer in it with a norm is checked); ``vocab_size``: V of the ceiling and the bound."""

    def __init__(self, cfg, model: torch.nn.Module, vocab_size: int):
        self.cfg, self.model = cfg, model
        offset = lambda nats: None if nats is None else math.log(vocab_size) + nats  # noqa: E731
        self.ceiling, self.bound = offset(cfg.ceiling), offset(cfg.bound)
        index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
        self.layers = [(layer, {n: index[f"{prefix}.{n}" if prefix else n] for n, _ in layer.named_parameters()})
                       for prefix, layer in model.named_modules() if gate_blocks(layer)]
        self.first_undo: int | None = None  # the step of the first undone update
        self.previous: list[torch.Tensor] | None = None  # the weights the last update started from
        self.recent: deque[list[torch.Tensor]] = deque(maxlen=RECENT_STARTS)  # the bound's earlier starts
        self.origin: list[torch.Tensor] | None = None  # the run's first weights
        self.peak: float | None = None  # the largest training loss of the first PEAK_STEPS steps

    # -- the step --------------------------------------------------------------------------------------------------
    def truncation(self, step: int) -> int | None:
        """How many time steps the backward of step ``step`` reaches (None: the whole segment)."""
        ramped = self.cfg.warmup == "truncate" or (self.cfg.warmup == "undo" and self.first_undo is not None)
        return truncation_schedule(step, self.cfg.warmup_steps, self.cfg.warmup_from, self.cfg.bptt) if ramped else None

    def step(self, step: int, seg: Segment) -> tuple[float, Any, float, dict]:
        """One optimizer step on ``seg``: returns the loss it trained on (before its update), the hidden state
        after the segment, the gradient norm of the update kept, and what the start did (for the step log)."""
        checked = self.cfg.warmup == "undo" and step < self.cfg.warmup_steps
        before = self._snapshot(params=True) if checked else None
        truncate = self.truncation(step)
        forward, record = seg.forward(truncate), {}
        if checked and self.ceiling is not None and self.previous is not None and not forward[1] <= self.ceiling:
            forward, record["pulled_back"] = self._pull_back(seg, before, truncate, forward)
        if checked and self.bound is not None and not forward[1] < self.bound:
            forward, record["walked_back"] = self._walk_back(step, seg, before, truncate, forward)
        loss, value, hidden = forward
        norm = seg.learn(loss, value)
        outcome = "as written"
        if checked:
            damaged, record["after"], record["gate_update"] = self._check(seg, value, before["params"])
            if damaged:
                norm, outcome = self._undo(step, seg, before, value, norm)
                truncate = self.cfg.warmup_from
        self._remember(checked, before, outcome)
        if step < PEAK_STEPS:
            self.peak = value if self.peak is None else max(self.peak, value)
        return value, hidden, norm, {"truncation": truncate, "undone": outcome, **record}

    def _check(self, seg: Segment, value: float, start: list[torch.Tensor]) -> tuple[bool, float, float]:
        """Whether the update just taken did damage: its segment's loss (a trial forward from the same hidden
        state; statistics and random state put back as the step left them) rose by more than log(undo_factor),
        or a normalized gate block moved by more than ``max_gate_update`` times its norm at ``start``.  Returns
        that, the trial loss and the largest relative gate update."""
        after = self._snapshot()
        with torch.no_grad():
            _, trial, _ = seg.forward(None)
        self._load(after)
        moved = self.gate_update(start)
        limit = self.cfg.max_gate_update
        damaged = not trial <= value + math.log(self.cfg.undo_factor) or (limit is not None and not moved <= limit)
        return damaged, trial, moved  # a non-finite trial or block counts as damage

    def gate_update(self, start: list[torch.Tensor]) -> float:
        """The largest ||W - W_start|| / ||W_start|| over the normalized gate blocks (``start``: the model's
        parameters in ``model.parameters()`` order); 0.0 when the model has none."""
        moved = [largest_gate_update(layer, {n: start[i] for n, i in index.items()}) for layer, index in self.layers]
        return max(moved, default=0.0)

    def _undo(self, step: int, seg: Segment, before: dict, value: float, norm: float) -> tuple[float, str]:
        """The update just taken did damage: retake it with the backward truncated at ``warmup_from`` (a segment
        that long or shorter would give the same update), then halve what does damage until it does none.
        Returns the gradient norm of the update kept and "retaken", "halved Nx" or "skipped"."""
        self.first_undo = step if self.first_undo is None else self.first_undo
        if seg.length > self.cfg.warmup_from:
            self._load(before)  # weights, statistics and random state as before the step
            loss, retaken, _ = seg.forward(self.cfg.warmup_from)
            norm = seg.learn(loss, retaken)
            if not self._check(seg, value, before["params"])[0]:
                return norm, "retaken"
        for halvings in range(1, self.cfg.warmup_halvings + 1):
            halve_toward(list(self.model.parameters()), before["params"])
            if not self._check(seg, value, before["params"])[0]:
                return norm, f"halved {halvings}x"
        self._load(before)  # no update: weights, statistics and random state as before the step
        return norm, "skipped"

    def _pull_back(self, seg: Segment, before: dict, truncate: int | None, first: tuple):
        """The ceiling: halve the previous update and forward the segment again until its loss is under the
        ceiling or ``warmup_halvings`` are spent; then, none under it, from the lowest point tried.  ``before``
        is left holding the weights the step now starts from.  Returns the forward and every loss tried."""
        points = [[w.clone() for w in before["params"]]]
        for _ in range(self.cfg.warmup_halvings):
            points.append([w.add(p).mul_(0.5) for w, p in zip(points[-1], self.previous)])
        forward, tried, _ = self._first_under(seg, before, truncate, first, points, lambda v: v <= self.ceiling)
        return forward, tried

    def _walk_back(self, step: int, seg: Segment, before: dict, truncate: int | None, first: tuple):
        """The bound: forward the segment from the weights the last warm-up steps started from, latest first,
        then from the run's first weights, and start from the first point under the bound (none: the lowest).
        Returns the forward and {"tried": every loss tried, "from_step": the step whose starting weights this
        step starts from}."""
        starts = [(step, [w.clone() for w in before["params"]])]
        starts += [(step - 1 - k, w) for k, w in enumerate(reversed(self.recent))]
        starts += [(0, self.origin)] if self.origin is not None else []
        forward, tried, at = self._first_under(seg, before, truncate, first, [w for _, w in starts],
                                               lambda v: v < self.bound)
        return forward, {"tried": tried, "from_step": starts[at][0]}

    def _first_under(self, seg, before, truncate, first: tuple, points: list, under):
        """Forward the segment from each of ``points[1:]`` (``points[0]`` gave ``first``) until ``under(loss)``;
        none: from the point with the lowest loss.  ``before`` is left holding that point.  Returns the forward,
        every loss tried (the first included, the one trained on last) and the point's index."""
        tried, forward = [first[1]], first
        for at, point in enumerate(points[1:], start=1):
            forward = self._forward_from(seg, before, truncate, point)
            tried.append(forward[1])
            if under(forward[1]):
                return forward, tried, at
        at = min(range(len(tried)), key=lambda j: tried[j] if math.isfinite(tried[j]) else math.inf)
        if at != len(tried) - 1:
            forward = self._forward_from(seg, before, truncate, points[at])
            tried.append(forward[1])
        return forward, tried, at

    def _forward_from(self, seg: Segment, before: dict, truncate: int | None, weights: list[torch.Tensor]):
        """The segment's forward from the step's starting statistics and random state with ``weights``;
        ``before`` is left holding those weights."""
        with torch.no_grad():
            for w, saved in zip(before["params"], weights):
                w.copy_(saved)
        self._load(before)
        return seg.forward(truncate)

    def _remember(self, checked: bool, before: dict | None, outcome: str) -> None:
        """Keep what the next steps' ceiling and bound go back to (nothing once the warm-up is over)."""
        self.previous = before["params"] if checked and outcome != "skipped" else None
        if checked and self.bound is not None:
            self.origin = before["params"] if self.origin is None else self.origin
            self.recent.append(before["params"])
        else:
            self.recent.clear()
            self.origin = None

    # -- state -----------------------------------------------------------------------------------------------------
    def _snapshot(self, params: bool = False) -> dict:
        """What a forward changes besides the graph (statistics buffers, random state); with ``params`` also the
        weights (all an SGD step changes: plain SGD keeps no optimizer state)."""
        snap = {"buffers": {k: b.clone() for k, b in self.model.named_buffers()}, "rng": rng_state()}
        if params:
            snap["params"] = [p.detach().clone() for p in self.model.parameters()]
        return snap

    def _load(self, snap: dict) -> None:
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                b.copy_(snap["buffers"][k])
            for p, saved in zip(self.model.parameters(), snap.get("params", ())):
                p.copy_(saved)
        set_rng_state(snap["rng"])

    def state_dict(self) -> dict:
        """For ``last.pt``: the step of the first undo, the peak and, during the warm-up, the weights the ceiling
        and the bound would go back to."""
        return {"first_undo": self.first_undo, "warmup_peak": self.peak, "previous": self.previous,
                "recent": list(self.recent), "origin": self.origin}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        move = lambda ws: None if ws is None else [w.to(device) for w in ws]  # noqa: E731
        self.first_undo, self.peak = state.get("first_undo"), state.get("warmup_peak")
        self.previous, self.origin = move(state.get("previous")), move(state.get("origin"))
        self.recent.clear()
        self.recent.extend(move(ws) for ws in state.get("recent") or ())


@torch.no_grad()
def halve_toward(weights: list[torch.Tensor], anchors: list[torch.Tensor]) -> None:
    """Halve an update in place: each weight to the midpoint between itself and its anchor (where it started)."""
    for w, a in zip(weights, anchors):
        w.add_(a).mul_(0.5)
