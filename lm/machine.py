"""What a run's epoch ran on, recorded in its history: the processor (or GPU), the threads and the torch build.

A long run may be continued on other machines; its time per epoch means something only next to this.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device) -> str:
    """E.g. 'AMD EPYC, 1 thread, torch 2.13.0+cpu' or 'NVIDIA H200, torch 2.13.0+cu128'."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"
