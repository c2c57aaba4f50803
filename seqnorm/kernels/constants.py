"""Launch constants shared by the C (``cpu_step.c``) and Triton (``step.py``) step kernels.

Kept free of Triton so that the C kernels work in a plain install without it.
"""
import torch

NORM_CODES = {None: 0, "online": 1, "layer": 2}
ECM_CODES = {"none": 0, "ls": 1, "ac": 2}
NO_FLOOR = -torch.finfo(torch.float32).max  # a finite stand-in for -inf


def decay_floor(config) -> float:
    """The kernels' v-decay floor argument: ``config.v_decay_min``, or NO_FLOOR for None (eq. 11 as printed)."""
    return NO_FLOOR if config.v_decay_min is None else config.v_decay_min
