"""The machine of a run: the device a command asks for (``resolve_device``), and what each epoch ran on,
recorded in its history: the processor (or GPU), the instruction set torch's CPU kernels use on it, the threads
and the torch build.

A long run may be continued on other machines; its time per epoch means something only next to this. Two CPUs of
one model name can differ in speed and in a run's last bits (torch's CPU kernels take AVX-512 paths where the
CPU has them), so the instruction set is named too.
"""
from __future__ import annotations

import platform
import re
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
    """E.g. 'AMD EPYC (AVX512), 1 thread, torch 2.13.0+cpu' or 'NVIDIA H200, torch 2.13.0+cu128'."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} ({isa}), {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"


def threads_of(machine: str | None) -> int:
    """The CPU threads a ``describe`` string names (1 where it names none: a GPU, or a record without one)."""
    match = re.search(r", (\d+) threads?, ", machine or "")
    return int(match[1]) if match else 1


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto; a clear ValueError for anything else or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but there are {torch.cuda.device_count()} GPUs")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on ``device``: the GPU's free memory, or Linux's MemAvailable plus free
    swap; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None


def check_scores_fit(what: str, steps: int, rows: int, words: int, device: torch.device, flags: str) -> None:
    """A ValueError, before any work, when a step's decoder scores and their log-softmax, which coexist in every
    step (2 x steps x rows x words float32: a floor of the step's peak), do not fit in the memory ``device`` has
    left: such a run would end in the allocator's error, or on Linux in a kill by the kernel's out-of-memory
    killer with no message at all."""
    free = available_memory(device)
    need = 4 * 2 * steps * rows * words
    if free is not None and need > free:
        where = "this machine" if device.type == "cpu" else str(device)
        raise ValueError(f"{what}'s scores (2 x {steps} steps x {rows} rows x {words} words, float32) need at least "
                         f"{need / 1e9:.1f} GB and {where} has {free / 1e9:.1f} GB available: lower {flags}")
