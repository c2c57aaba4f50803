"""What the C kernels' build costs a process: wall time of a first layer call and of ``seqnorm-lm eval``, each a
fresh process, for code without the build cache (``--before``: a checkout of an older commit) and for this
checkout with a cold cache (an empty ``$SEQNORM_CACHE_DIR``: the first process builds) and a warm one.

    python benchmarks/first_call.py --before ../seqnorm-old --checkpoint runs/x/best.pt --rounds 3

The settings run alternately, ``--rounds`` times, one process at a time; the median of each is printed.  The
checkpoint must be one both checkouts read (e.g. written by the older one with ``train --max-steps 1``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
FIRST_CALL = "import torch, seqnorm; seqnorm.LSTM(200, 200, norm='online')(torch.randn(35, 20, 200))"


def timed(code_root: Path, argv: list[str], cache: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(code_root), "SEQNORM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, check=True, capture_output=True, cwd=code_root)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of code without the build cache")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", default=os.environ.get("SEQNORM_DATA"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    commands = {"first layer call": ["-c", FIRST_CALL],
                "seqnorm-lm eval": ["-m", "lm", "eval", "--checkpoint", str(args.checkpoint.resolve()),
                                    "--threads", "1", "--no-progress"] + (["--data", args.data] if args.data else [])}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for what, argv in commands.items():
            with tempfile.TemporaryDirectory() as cache:
                times.setdefault((what, "before (no cache)"), []).append(timed(args.before, argv, cache))
                times.setdefault((what, "cold cache"), []).append(timed(HERE, argv, cache))
                times.setdefault((what, "warm cache"), []).append(timed(HERE, argv, cache))
    print("| command | setting | wall s, median | all |\n|---|---|---|---|")
    for (what, setting), ts in times.items():
        print(f"| {what} | {setting} | {statistics.median(ts):.2f} | {' '.join(f'{t:.2f}' for t in ts)} |")


if __name__ == "__main__":
    main()
