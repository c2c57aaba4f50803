"""Training throughput of ``seqnorm-lm train`` presets, measured in one process: tokens/s of each preset at a
fixed BPTT length, and each one's ratio to the first.

    python benchmarks/lm_tokens_per_s.py --presets paper-lstm-none paper-lstm-online --steps 150 --bptt 35

Each preset trains ``--steps`` optimizer steps exactly as ``seqnorm-lm train --preset P --bptt 35
--bptt-mode fixed --max-steps 150`` would (robust start included, or with ``--as-written`` without it), into a
temporary folder; the figure is the
trainer's own tokens/s (training steps only, without validation).  Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import seqnorm
from lm.config import AS_WRITTEN
from lm.presets import PRESETS
from lm.train import TrainConfig, train


def tokens_per_s(preset: str, steps: int, bptt: int, data, out: Path, as_written: bool) -> float:
    cfg = TrainConfig(**{**PRESETS[preset].train_fields(), "bptt": bptt, "bptt_mode": "fixed", "max_steps": steps,
                         "data": data, "out": str(out / preset), **(AS_WRITTEN if as_written else {})})
    summary = train(cfg, progress=False)
    (record,) = summary["history"]
    return record["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["paper-lstm-none", "paper-lstm-online"], choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--data")
    p.add_argument("--as-written", action="store_true", help="without the robust start (whose trial forwards during "
                   "the first 300 steps are part of the default run's cost)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {name: tokens_per_s(name, args.steps, args.bptt, args.data, Path(tmp), args.as_written)
                 for name in args.presets}
    first = rates[args.presets[0]]
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_loop": seqnorm.backend.cpu_loop(),
            "machine": platform.machine(), "steps": args.steps, "bptt": args.bptt, "as_written": args.as_written}
    print(meta)
    for name, rate in rates.items():
        print(f"{name:20s} {rate:9.0f} tokens/s   {rate / first:5.2f}x {args.presets[0]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "tokens_per_s": rates}, indent=2) + "\n")


if __name__ == "__main__":
    main()
