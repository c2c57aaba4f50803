"""The robust start: what keeps training at the paper's settings from blowing up at initialization.

A normalized LSTM or RNN at initialization has gradients that explode through
time: the first step's gradient norm grows about 2x per 10 steps of the first
BPTT segment (docs/robust_start.md), and one long first segment (about 95
steps or more) at the paper's learning rates throws the run away.  The
reference implementation does the same with the same weights and batches.
Healthy training a few hundred steps later is not explosive any more.

The measures, each a ``TrainConfig`` field (``--as-written`` turns all off):

- ``warmup="truncate"``: for the first ``warmup_steps`` optimizer steps,
  backpropagate through at most K(step) time steps, K ramping linearly from
  ``warmup_from`` to ``bptt`` (``truncation``).  The segments, the data order,
  the forward and the normalization statistics are exactly as written; only
  the gradients of segments longer than K change, and only during warm-up.
- ``warmup="bptt"``: the segment lengths themselves are capped at K(step)
  (the same random draws, each capped; the run takes more, shorter steps).
- ``warmup="lr"``: the learning rate is scaled by (step + 1) / warmup_steps.
- ``warmup="retry"``: every step is taken as written unless, during the first
  ``warmup_steps`` steps, its gradient norm is more than ``retry_factor`` times
  a yardstick; then the step is taken again from the same state with the
  backward truncated at ``warmup_from`` steps (``RetryGuard``).  The yardstick
  is the median of the recent accepted norms or, before there are any, the
  norm of the same segment's truncated gradient.  A run that never retries is
  bit for bit the run as written.
- ``warmup="undo"``: every step is taken as written; during the first
  ``warmup_steps`` steps, a trial forward on the step's own segment checks the
  update just taken, and an update that multiplied the segment's perplexity by
  more than ``undo_factor`` (100; its loss rose by more than log 100) is undone
  (weights, statistics, random state) and taken again with the backward
  truncated at ``warmup_from`` steps; that retaken update is checked by the same rule,
  and when it does damage too it is halved until it does not, up to
  ``warmup_halvings`` (5) times; only when every halving does damage does the step
  make no update ("skipped").  Every update of the warm-up is checked, short segments too
  (``checked``).  From the first undone update on, the
  rest of the warm-up truncates every backward as ``"truncate"`` does (K(step)):
  a run that needed one undo is one whose gradients explode through time, and
  the next long segment would explode again (seed 6 of the ON-LSTM: the step
  after the undone one had a gradient norm of 61, and two steps later an update
  multiplied its segment's perplexity by 63, under the factor, and the run was at
  valid perplexity 15,000 after 40 steps).  It acts on damage done, not on a
  large gradient: the same gradient norm throws one preset away and not another
  (the learning rates differ).  A run that never undoes is bit for bit as written.
  ``undo_first="halve"`` (not the default; docs/robust_start.md) first halves
  the damaging update as written, up to ``warmup_halvings`` times, and keeps the
  first halving that does no damage; only when none does is the update retaken
  truncated as above (and only then does the warm-up go on truncated).
  With it, the ceiling (``ceiling``, 1.0): a warm-up step whose loss, before its
  update, is above log(V) + ``ceiling`` (V the vocabulary; a perplexity e times a
  uniform guess's) shows that the previous update took the model off the road,
  even when that update passed its own segment's check (a short segment's update
  can raise the next segments' loss from 8 to 11 without multiplying its own
  segment's perplexity by 100).  The previous update is halved (the weights moved
  to the midpoint between where it started and where it ended) and the segment
  forwarded again from the same hidden state, statistics and random state, up to
  ``warmup_halvings`` (5) times, until the loss is back under the ceiling (when
  none gets under it, the step starts from the point with the lowest loss).  The
  check costs nothing (it reads the loss the step computes anyway); only a step
  above the ceiling pays for the extra forwards, and a run that never reaches it
  is bit for bit the run without it.  The weights the last update started from
  are saved in ``last.pt`` during the warm-up, so resuming stays exact.
  And the bound (``bound``, 2.0): no warm-up step trains at a loss of log(V) +
  ``bound`` or more (a perplexity 7.4 times a uniform guess's).  When the
  ceiling's halvings leave the loss there, the damage is older than the previous
  update (measured: ON-RNN seed 6 under other last bits, step 70, 11.24 after
  five halvings), so the segment is forwarded again from the weights the last
  ``RECENT_STARTS`` (4) warm-up steps started from, the latest first, then from
  the run's first weights (where the loss is about log(V)), and the step starts
  from the first point under the bound (none under it: the lowest).  A run that
  never reaches the bound is bit for bit the run without it; those weights are
  saved in ``last.pt`` during the warm-up too.
- ``adaptive_clip=k``: the global gradient norm is clipped at k times the
  median of the last ``clip_window`` norms, so it is scale-free across presets
  and leaves healthy steps alone (``AdaptiveClip``; inactive until it has seen
  ``clip_window // 4`` norms, since a median of fewer says little).

The warm-ups but retry and undo are functions of the step count, so resuming
is exact with no extra state; the recent norms of the retry guard and of the
adaptive clip, the step of undo's first undone update and, during the warm-up,
the weights the ceiling would pull back to and the bound would walk back to, are
saved in ``last.pt``.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from seqnorm.warmup import truncation_schedule

RECENT_STARTS = 4  # the bound: how many earlier warm-up steps' starting weights are kept to walk back to
PEAK_STEPS = 300  # every run records the largest per-step training loss of its first PEAK_STEPS steps


def ramp_length(step: int, steps: int, start: int, end: int) -> int | None:
    """The length cap K before optimizer step ``step`` (0-based): ``start`` rising linearly to ``end`` over
    ``steps`` steps; None (no cap) from then on or once it reaches ``end``."""
    return truncation_schedule(step, steps, start, end)


def truncation(cfg, step: int, undone: bool = False) -> int | None:
    """How many time steps the backward of step ``step`` may reach (None: the whole segment): the ramp K(step)
    under ``warmup="truncate"``, and under ``warmup="undo"`` once an update has been undone (``undone``)."""
    ramped = cfg.warmup == "truncate" or (cfg.warmup == "undo" and undone)
    return ramp_length(step, cfg.warmup_steps, cfg.warmup_from, cfg.bptt) if ramped else None


def watched(cfg, step: int, segment_length: int) -> bool:
    """Whether ``warmup="retry"`` watches this step's gradient: during the warm-up, a segment longer than the
    truncation a retaken step would get (a shorter one would be retaken unchanged)."""
    return cfg.warmup == "retry" and step < cfg.warmup_steps and segment_length > cfg.warmup_from


def checked(cfg, step: int) -> bool:
    """Whether ``warmup="undo"`` checks the update of step ``step`` for damage: every step of the warm-up."""
    return cfg.warmup == "undo" and step < cfg.warmup_steps


def segment_cap(cfg, step: int) -> int | None:
    """The cap on the length of segment ``step`` (None: as drawn)."""
    return ramp_length(step, cfg.warmup_steps, cfg.warmup_from, cfg.bptt) if cfg.warmup == "bptt" else None


def lr_factor(cfg, step: int) -> float:
    """The factor on the learning rate of step ``step``."""
    if cfg.warmup != "lr" or step >= cfg.warmup_steps:
        return 1.0
    return (step + 1) / cfg.warmup_steps


class RecentNorms:
    """The last ``window`` accepted gradient norms and their median (non-finite norms never enter)."""

    def __init__(self, window: int):
        self.window = window
        self.norms: deque[float] = deque(maxlen=window)

    def add(self, norm: float) -> None:
        if math.isfinite(norm):
            self.norms.append(norm)

    def median(self) -> float | None:
        return statistics.median(self.norms) if self.norms else None

    def state_dict(self) -> dict:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.norms = deque(state["norms"], maxlen=self.window)


class AdaptiveClip(RecentNorms):
    """Clip the gradient norm at ``k`` times the running median of the last ``window`` norms (unclipped ones)."""

    def __init__(self, k: float, window: int):
        super().__init__(window)
        self.k = k

    def threshold(self) -> float:
        if len(self.norms) < max(1, self.window // 4):
            return float("inf")
        return self.k * self.median()

    def __call__(self, parameters) -> float:
        """Clip the gradients in place; returns the norm before clipping."""
        limit = self.threshold()
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, limit))
        self.add(norm)
        return norm


class RetryGuard(RecentNorms):
    """``warmup="retry"``: which steps to take again with the backward truncated at ``length`` time steps.

    The trainer asks only for the steps ``watched`` names.  A watched step is retried when its norm exceeds ``k`` times the yardstick: the median of the
    recent accepted norms, or, before there are any, the norm of the same segment's truncated gradient
    (``reference() is None`` asks the trainer for it).  The trainer records every step's accepted norm.
    """

    def __init__(self, k: float, steps: int, length: int, window: int):
        super().__init__(window)
        self.k, self.steps, self.length = k, steps, length

    def recording(self, step: int) -> bool:
        return step < self.steps

    def exceeds(self, norm: float, reference: float) -> bool:
        return not norm <= self.k * reference  # a non-finite norm exceeds any yardstick
