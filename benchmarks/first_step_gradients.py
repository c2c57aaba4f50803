"""First-step gradient norm against first BPTT segment length, at initialization, on PTB.

For each preset's model (paper-{lstm,rnn}-{online,layer,none}) and seed, the
model is built exactly as ``seqnorm-lm train`` builds it, then one forward and
backward runs on the first L rows of the training batch (batch 20, zero initial
state) and the global gradient norm is recorded, for L from 8 to 128.  With
``--float64`` the seqnorm models also run in float64 on the plain-PyTorch path
(``backend="torch"``), the per-step reference, to show the growth is the
algorithm's and not float32's or a kernel's.  With ``--truncate K`` the backward
reaches at most K steps (the robust start's first step).  Writes a JSON file
and, with matplotlib, a log-scale plot.

``--after-steps N ...`` measures instead how long the explosion lasts: the
preset trains with its default (robust) start, and before step N the gradient
norm of a 128-step probe segment (full backpropagation, from a zero state, at a
fixed position of the training data, on a copy of the model) is recorded.

    python benchmarks/first_step_gradients.py --out docs/figures/first_step_gradients --float64 --truncate 32
    python benchmarks/first_step_gradients.py --out docs/figures/after_steps --after-steps 0 1 2 3 5 10 20 50
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.batching import batchify
from lm.data import load_corpus
from lm.model import RNNLM
from lm.presets import PRESETS
from lm.train import TrainConfig, Trainer

LENGTHS = (8, 16, 32, 48, 64, 80, 96, 112, 128)


def first_step_norm(preset: str, seed: int, data: torch.Tensor, length: int, float64: bool = False,
                    truncate: int | None = None) -> float:
    cfg = TrainConfig(**PRESETS[preset].train_fields(), seed=seed)
    torch.manual_seed(seed)  # as the Trainer seeds before building the model
    model = RNNLM(cfg.model_config(10_000))
    if float64:
        model = model.double()
        if hasattr(model.rnn, "backend"):
            model.rnn.backend = "torch"
    x, y = data[:length], data[1:length + 1]
    logits, _ = model(x, model.init_hidden(data.shape[1]), truncate=truncate)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def probe_after_steps(preset: str, seed: int, marks: list[int], out: Path) -> list[float]:
    """The 128-step probe's gradient norm before each step in ``marks``, training with the default start."""
    cfg = TrainConfig(**PRESETS[preset].train_fields(), seed=seed, out=str(out), max_steps=max(marks) + 1)
    trainer = Trainer(cfg, progress=False)
    x, y = trainer.train_data[5000:5128], trainer.train_data[5001:5129]
    norms, train_step = {}, trainer._train_step

    def step(*args):
        if trainer.step in marks:
            model = copy.deepcopy(trainer.model)  # the probe moves no statistics of the run
            logits, _ = model(x, model.init_hidden(x.shape[1]))
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
            norms[trainer.step] = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                                        if p.grad is not None]))
        return train_step(*args)

    trainer._train_step = step
    trainer.run()
    return [norms[m] for m in marks]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({k.split("-")[1] for k in results["norms"]})
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4.5), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for k, (name, runs) in enumerate((n, r) for n, r in results["norms"].items() if n.split("-")[1] == cell):
            for label, style in (("float32", "-"), ("float64", ":"), ("truncated", "--")):
                if label not in runs:
                    continue
                for s, norms in enumerate(runs[label]):
                    ax.plot(results["lengths"], norms, style, color=f"C{k}", marker="o", markersize=3, alpha=0.8,
                            label=f"{name.split('-')[2]} ({label})" if s == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("length of the first BPTT segment")
        ax.set_ylabel("gradient norm of the first step, at initialization")
        ax.set_title(f"PTB {cell.upper()} at initialization: {len(results['seeds'])} seeds per line style"
                     + (f"; truncated at {results['truncate']}" if results.get("truncate") else ""), fontsize=9)
        ax.axhline(0.6, color="gray", linewidth=0.8)
        ax.text(results["lengths"][0], 0.65, "healthy training, 90th percentile", fontsize=7, color="gray")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="PTB folder (default: $SEQNORM_DATA, else data/ptb)")
    p.add_argument("--out", default="benchmarks/results/first_step_gradients", help="writes OUT.json and OUT.png")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--float64", action="store_true", help="also the seqnorm models in float64 on the torch path")
    p.add_argument("--truncate", type=int, help="also with the backward truncated at this many steps")
    p.add_argument("--after-steps", nargs="+", type=int, help="instead: the 128-step probe before these steps")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.after_steps:
        with tempfile.TemporaryDirectory() as runs:  # the training runs' checkpoints are not kept
            results = {"after_steps": args.after_steps, "seeds": args.seeds, "norms": {
                preset: [probe_after_steps(preset, s, args.after_steps, Path(runs) / f"{preset}-{s}") for s in args.seeds]
                for preset in args.presets if not PRESETS[preset].cell.endswith("cudnn")}}
        for preset, runs in results["norms"].items():
            print(preset, [f"{min(c):.3g}-{max(c):.3g}" for c in zip(*runs)])
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        return
    data = batchify(load_corpus(args.data, "word").train, 20)
    results = {"lengths": args.lengths, "seeds": args.seeds, "truncate": args.truncate, "norms": {}}
    for preset in args.presets:
        runs = {"float32": [[first_step_norm(preset, s, data, n) for n in args.lengths] for s in args.seeds]}
        if args.float64 and not PRESETS[preset].cell.endswith("cudnn"):
            runs["float64"] = [[first_step_norm(preset, s, data, n, True) for n in args.lengths] for s in args.seeds]
        if args.truncate:
            runs["truncated"] = [[first_step_norm(preset, s, data, n, truncate=args.truncate) for n in args.lengths]
                                 for s in args.seeds]
        results["norms"][preset] = runs
        print(preset, {k: [f"{min(c):.3g}-{max(c):.3g}" for c in zip(*v)] for k, v in runs.items()}, flush=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
