"""The grid that chooses the robust start: presets x seeds x stabilizers, on PTB, summarized in one table.

Each stabilizer ("variant") is a set of TrainConfig overrides; each (variant,
preset, seed) trains with ``seqnorm-lm compare``'s machinery into
OUT/<variant>/<preset>-seed<S>/, so a rerun continues an interrupted grid and
reuses finished runs.  ``--worker K/N`` runs every N-th job (run N processes
in parallel, one thread each); a last call with ``--summarize`` writes
OUT/table.md: per variant and preset the median (min-max) validation
perplexity, the divergences, the worst run against its preset's median, and
on the seeds that train as written (within 1.3x the preset's best as-written
run) the largest change against as written; and OUT/valid_ppl.png, one marker
per run.

    python benchmarks/robust_start_grid.py --out runs/robust --epochs 1 --worker 0/2 &
    python benchmarks/robust_start_grid.py --out runs/robust --epochs 1 --worker 1/2 &
    wait; python benchmarks/robust_start_grid.py --out runs/robust --epochs 1 --summarize
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lm.compare import run_grid
from lm.config import AS_WRITTEN
from lm.presets import PRESETS

VARIANTS = {
    "as-written": dict(AS_WRITTEN),
    "truncate300": dict(warmup="truncate", warmup_steps=300),
    "truncate10": dict(warmup="truncate", warmup_steps=10),
    "retry10": dict(warmup="retry", retry_factor=10.0),
    "undo100": dict(warmup="undo", undo_factor=100.0, ceiling=None, warmup_halvings=0, bound=None),
    "ceiling1": dict(warmup="undo", undo_factor=100.0, ceiling=1.0, bound=None),
    "ceiling1-u1e30": dict(warmup="undo", undo_factor=1e30, ceiling=1.0, bound=None),
    "ceiling1-halve": dict(warmup="undo", undo_factor=100.0, ceiling=1.0, undo_first="halve", bound=None),
    "bound2": dict(warmup="undo", undo_factor=100.0, ceiling=1.0, bound=2.0),  # the default since 2026-12-05
    "bptt": dict(warmup="bptt"),
    "lr": dict(warmup="lr"),
    "clip10": dict(AS_WRITTEN, clip=10.0),
    "adaptive4": dict(AS_WRITTEN, adaptive_clip=4.0),
    "truncate10+adaptive4": dict(warmup="truncate", warmup_steps=10, adaptive_clip=4.0),
}
SEEDS = (0, 1, 2, 3, 6, 13)  # first segments 44, 115, 92, 16, 127, 121 (13: then 115, 116)


def jobs(variants, presets, seeds):
    return [(v, p, s) for v in variants for p in presets for s in seeds]


def run(args) -> None:
    torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.worker.split("/"))
    for variant, preset, seed in jobs(args.variants, args.presets, args.seeds)[k::n]:
        cell, norm = preset.split("-")[1:]
        result = run_grid(Path(args.out) / variant, args.data, (cell,), (norm,), (seed,), args.epochs,
                          args.max_steps, progress=False, overrides=VARIANTS[variant])
        if result["status"] == "interrupted":  # Ctrl-C or SIGTERM: last.pt saved; stop, do not start the next job
            return


def load(out: Path, variant: str, preset: str, seed: int) -> dict | None:
    d = out / variant / f"{preset}-seed{seed}"
    for name in ("summary.json", "diverged.json"):
        if (d / name).exists():
            return json.loads((d / name).read_text())
    return None


def trains_as_written(written: dict, preset: str) -> set[int]:
    """The seeds whose as-written run finished within 1.3x the preset's best as-written run."""
    ppl = {s: v for (p, s), v in written.items() if p == preset}
    return {s for s, v in ppl.items() if v <= 1.3 * min(ppl.values())} if ppl else set()


def row(variant: str, preset: str, rs: dict, written: dict) -> str:
    done = {s: r for s, r in rs.items() if r["status"] == "finished"}
    diverged = sorted(s for s, r in rs.items() if r["status"] == "diverged")
    ppl = [r["best_valid_ppl"] for r in done.values()]
    med = statistics.median(ppl) if ppl else None
    fine = sorted(trains_as_written(written, preset) & set(done))
    change = [done[s]["best_valid_ppl"] / written[(preset, s)] - 1 for s in fine]
    grad = max((h.get("grad_norm_max") or 0.0 for r in done.values() for h in r["history"]), default=0.0)
    peaks = [p for p in map(warmup_peak, done.values()) if p is not None]
    cells = [variant, preset, str(len(done)), f"{len(diverged)}" + (f" (seeds {diverged})" if diverged else ""),
             f"{med:.1f} ({min(ppl):.1f}–{max(ppl):.1f})" if ppl else "—", f"{max(ppl) / med:.2f}" if ppl else "—",
             (f"{100 * max(change, key=abs):+.1f}% (seeds {fine})" if change else "—"), f"{grad:.3g}",
             f"{max(peaks):.2f}" if peaks else "—"]
    return "| " + " | ".join(cells) + " |"


def warmup_peak(run: dict) -> float | None:
    """The largest per-step training loss of the run's first 300 steps (recorded since 2026-12-04)."""
    return max((h["warmup_peak_loss"] for h in run["history"] if h.get("warmup_peak_loss") is not None), default=None)


def seed_table(runs: dict, variants, presets, seeds) -> str:
    """Per variant, preset and seed: validation perplexity, and in brackets the warm-up peak loss and what the start
    did (u: updates undone, s: steps skipped, p: steps that pulled the previous update back)."""
    lines = ["| variant | preset | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (2 + len(seeds)) + "|"]
    for variant in variants:
        for preset in presets:
            cells = []
            for s in seeds:
                r = runs[(variant, preset, s)]
                if r is None or r["status"] != "finished":
                    cells.append("—" if r is None else r["status"])
                    continue
                acts = {k: sum(h.get(k, 0) for h in r["history"]) for k in ("retries", "skipped", "pulled_back")}
                peak = warmup_peak(r)
                cells.append(f"{r['best_valid_ppl']:.1f} (" + (f"{peak:.2f}, " if peak is not None else "") +
                             f"u{acts['retries']} s{acts['skipped']} p{acts['pulled_back']})")
            if any(c != "—" for c in cells):
                lines.append(f"| {variant} | {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(args) -> str:
    out = Path(args.out)
    runs = {(v, p, s): load(out, v, p, s) for v, p, s in jobs(args.variants, args.presets, args.seeds)}
    written = {(p, s): r["best_valid_ppl"] for (v, p, s), r in runs.items()
               if v == "as-written" and r and r["status"] == "finished"}
    lines = ["| variant | preset | finished | diverged | valid ppl median (min–max) | worst / median | "
             "largest change vs as written, on the seeds that train as written | largest grad norm | "
             "largest warm-up peak loss |",
             "|---" * 9 + "|"]
    for variant in args.variants:
        for preset in args.presets:
            rs = {s: runs[(variant, preset, s)] for s in args.seeds if runs[(variant, preset, s)]}
            if rs:
                lines.append(row(variant, preset, rs, written))
    return "\n".join(lines) + "\n\n" + seed_table(runs, args.variants, args.presets, args.seeds)


def plot(args, path: Path) -> None:
    """Validation perplexity after the budget, one marker per seed, per preset and variant; diverged at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, top = Path(args.out), 3e4
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(args.variants)
    for k, variant in enumerate(args.variants):
        for i, preset in enumerate(args.presets):
            runs = [load(out, variant, preset, s) for s in args.seeds]
            xs = [i + (k - (len(args.variants) - 1) / 2) * width + 0.02 * j for j in range(len(runs))]
            ppl = [None if r is None else (r["best_valid_ppl"] if r["status"] == "finished" else top) for r in runs]
            ok = [(x, min(v, top)) for x, v in zip(xs, ppl) if v is not None and v < top]
            bad = [(x, top) for x, v in zip(xs, ppl) if v is not None and v >= top]
            if ok:
                ax.plot(*zip(*ok), "o", color=f"C{k}", alpha=0.8, label=variant if i == 0 else None)
            if bad:
                ax.plot(*zip(*bad), "x", color=f"C{k}", markersize=9)
    ax.set_yscale("log")
    ax.set_xticks(range(len(args.presets)), [p.replace("paper-", "") for p in args.presets])
    ax.set_ylabel("validation perplexity (corpus)")
    ax.set_title(f"PTB, {args.epochs} epoch(s), seeds {list(args.seeds)}: x = diverged or above {top:.0e}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/robust")
    p.add_argument("--data")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", default="0/1", help="K/N: run every N-th job starting at K")
    p.add_argument("--summarize", action="store_true", help="only write OUT/table.md from the finished runs")
    args = p.parse_args()
    if not args.summarize:  # a worker's share: the table is written once, by the --summarize call after all
        run(args)
        return
    table = summarize(args)
    (Path(args.out) / "table.md").write_text(table)
    print(table)
    try:
        plot(args, Path(args.out) / "valid_ppl.png")
    except ImportError:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
