"""The learning-rate sweep behind the GRU presets (the paper has no GRU): 1 epoch of PTB per (norm, lr).

Every run uses the paper presets' shared settings (lm/presets.py COMMON: one
layer of 200, tied embeddings, batch 20, BPTT uniform in 2..128, SGD, weight
decay 1e-6, no clipping) with the default robust start, the LSTM's Online
Normalization decays for online, and ``--cell gru`` (``gru-cudnn``,
torch.nn.GRU, for none).  Runs go to OUT/<norm>-lr<lr>/ (resumable, reused
when finished); ``--summarize`` writes OUT/table.md: validation perplexity
after the epoch per norm and lr, diverged runs marked, the best lr per norm.

    python benchmarks/gru_lr_sweep.py --out runs/gru_sweep --worker 0/2 &
    python benchmarks/gru_lr_sweep.py --out runs/gru_sweep --worker 1/2 &
    wait; python benchmarks/gru_lr_sweep.py --out runs/gru_sweep --summarize
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lm.config import WARMUPS
from lm.presets import COMMON, LSTM_ALPHAS
from lm.train import TrainConfig, TrainingDiverged, train

# geometric steps of 2 around the paper's LSTM rates (online 6.5, layer 3.25, none 3.5); online and layer
# extended downwards once their best was the grid's lowest
LRS = {"online": (1.625, 3.25, 6.5, 13.0), "layer": (0.8125, 1.625, 3.25, 6.5), "none": (1.75, 3.5, 7.0)}


def config(norm: str, lr: float, out: Path, data, seed: int, warmup: str) -> TrainConfig:
    cell = "gru-cudnn" if norm == "none" else "gru"
    alphas = dict(zip(("alpha_fwd", "alpha_bkw"), LSTM_ALPHAS)) if norm == "online" else {}
    return TrainConfig(**{**COMMON, "cell": cell, "norm": norm, "lr": lr, "epochs": 1, "seed": seed, "data": data,
                          "out": str(out / f"{norm}-lr{lr:g}"), "warmup": warmup, **alphas})


def jobs(norms, lrs=None):
    """(norm, lr) of the sweep; ``lrs``: only these rates (e.g. one rate checked on more seeds)."""
    return [(norm, lr) for norm in norms for lr in LRS[norm] if lrs is None or lr in lrs]


def run(args) -> None:
    torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.worker.split("/"))
    for norm, lr in jobs(args.norms, args.lrs)[k::n]:
        cfg = config(norm, lr, Path(args.out), args.data, args.seed, args.warmup)
        if (Path(cfg.out) / "summary.json").exists() or (Path(cfg.out) / "diverged.json").exists():
            continue
        try:
            train(cfg, resume=True, progress=False, label=f"gru {norm} lr {lr:g}")
        except TrainingDiverged as err:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "diverged.json").write_text(json.dumps({"status": "diverged", "error": str(err),
                                                                       "step": err.step}) + "\n")


def summarize(args) -> str:
    lines = ["| norm | lr | valid ppl after 1 epoch | largest grad norm | retries |", "|---|---|---|---|---|"]
    best = {}
    for norm, lr in jobs(args.norms):
        d = Path(args.out) / f"{norm}-lr{lr:g}"
        if (d / "diverged.json").exists():
            lines.append(f"| {norm} | {lr:g} | diverged ({json.loads((d / 'diverged.json').read_text())['error'][:60]}…) "
                         "| — | — |")
        elif (d / "summary.json").exists():
            s = json.loads((d / "summary.json").read_text())
            (record,) = [r for r in s["history"] if r["event"] == "epoch"]
            ppl = s["best_valid_ppl"]
            shown = f"{ppl:.1f}" if ppl < 1e5 else f"{ppl:.3g} (blew up)"
            lines.append(f"| {norm} | {lr:g} | {shown} | {record['grad_norm_max']:.3g} | {record.get('retries', 0)} |")
            if norm not in best or s["best_valid_ppl"] < best[norm][1]:
                best[norm] = (lr, s["best_valid_ppl"])
    lines += ["", "Best lr per norm: " + ", ".join(f"{n} {lr:g} ({p:.1f})" for n, (lr, p) in best.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gru_sweep")
    p.add_argument("--data")
    p.add_argument("--norms", nargs="+", default=list(LRS), choices=list(LRS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", nargs="+", type=float, help="only these learning rates of the sweep (default: all)")
    p.add_argument("--warmup", default=TrainConfig.warmup, choices=WARMUPS, help="the robust start (default: the "
                   "trainer's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", default="0/1", help="K/N: run every N-th job starting at K")
    p.add_argument("--summarize", action="store_true", help="only write OUT/table.md from the finished runs")
    args = p.parse_args()
    if args.summarize:
        table = summarize(args)
        (Path(args.out) / "table.md").write_text(table)
        print(table)
    else:
        run(args)


if __name__ == "__main__":
    main()
