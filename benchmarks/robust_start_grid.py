"""The robust start's evidence: the first steps of every normalized preset on several seeds, in one table.

Each (preset, seed) trains ``--steps`` optimizer steps with the default start (exactly as ``seqnorm-lm train
--preset P --seed S --max-steps N --log-every 1`` does) into OUT/<preset>-seed<S>/, logging every step; a rerun
reuses finished runs.  ``--worker K/N`` runs every N-th job (run N processes side by side, one thread each); a
last call with ``--summarize`` writes OUT/table.md: per run the first segment's length, what the start did, the
largest gate-block norm of the first layer after the last step, and the peak training loss; and per preset
whether every run's largest block is within ``2x`` the preset's median and every loss under log(V) + 2.

    python benchmarks/robust_start_grid.py --out runs/grid --worker 0/2 &
    python benchmarks/robust_start_grid.py --out runs/grid --worker 1/2 &
    wait; python benchmarks/robust_start_grid.py --out runs/grid --summarize

Under another CPU's last bits: the same with ``MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 SEQNORM_CPU_ISA=x86-64-v2``
in the environment (``scripts/perturbed_numerics.py``'s other-cpu setting) and another ``--out``; then
``--summarize --against runs/grid`` compares each run's block with its preset's median under default numerics.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from lm.config import TrainConfig
from lm.presets import get_preset
from lm.train import Trainer, TrainingDiverged

PRESETS = ("paper-lstm-online", "paper-lstm-layer", "paper-rnn-online", "paper-rnn-layer", "gru-online", "gru-layer")
SEEDS = (0, 1, 2, 3, 6, 13)  # first segments 44, 115, 92, 16, 127, 121
VOCAB = 10_000  # PTB's


def run(args) -> None:
    torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.worker.split("/"))
    jobs = [(p, s) for p in args.presets for s in args.seeds][k::n]
    for preset, seed in jobs:
        out = Path(args.out) / f"{preset}-seed{seed}"
        if (out / "summary.json").exists() or (out / "diverged.json").exists():
            continue
        cfg = TrainConfig(**{**get_preset(preset).train_fields(), "data": args.data, "seed": seed,
                             "max_steps": args.steps, "out": str(out)})
        try:
            summary = Trainer(cfg, progress=False, log_every=1, force=True).run()
        except TrainingDiverged as err:
            (out / "diverged.json").write_text(json.dumps({"error": str(err), "step": err.step}) + "\n")
            continue
        if summary["status"] == "interrupted":  # Ctrl-C or SIGTERM: stop here, not only this run (rerun: again)
            return


def _finished(out: Path) -> bool:
    """A run that ended (its summary, or its divergence, written) and has its steps (the log or its digest)."""
    ended = (out / "summary.json").exists() or (out / "diverged.json").exists() or (out / "start.json").exists()
    return ended and ((out / "steps.jsonl").exists() or (out / "start.json").exists())


def describe(out: Path) -> dict:
    """One run's row: first segment, what fired, largest first-layer gate block at the end, peak loss; read from
    its steps.jsonl and kept in OUT/<run>/start.json (the file the table is made from where the log is gone)."""
    digest = out / "start.json"
    if not (out / "steps.jsonl").exists():
        return json.loads(digest.read_text())
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    fired = sorted([(r["step"], r["undone"]) for r in steps if r["undone"] != "as written"]
                   + [(r["step"], "pulled back") for r in steps if "pulled_back" in r]
                   + [(r["step"], "walked back") for r in steps if "walked_back" in r])
    row = {"segment": steps[0]["segment"], "fired": [f"{step}: {what}" for step, what in fired],
           "block": max(steps[-1]["gates"].values()), "peak": max(r["loss"] for r in steps),
           "diverged": (out / "diverged.json").exists(), "steps": len(steps)}
    digest.write_text(json.dumps(row, indent=1) + "\n")
    return row


def _fired(events: list[str]) -> str:
    """"undone at 0 (retaken), 16 (halved 1x); ceiling 3x; bound 1x", or "nothing"."""
    undone = [e.replace(": ", " (") + ")" for e in events if not e.endswith(("pulled back", "walked back"))]
    said = [f"undone at {', '.join(undone[:4])}{', …' if len(undone) > 4 else ''}" + (
        f" ({len(undone)} in all)" if len(undone) > 4 else "")] if undone else []
    for what, name in (("pulled back", "ceiling"), ("walked back", "bound")):
        n = sum(e.endswith(what) for e in events)
        said += [f"{name} {n}x"] if n else []
    return "; ".join(said) or "nothing"


def _rows(out: Path, preset: str, seeds) -> dict:
    folders = {s: out / f"{preset}-seed{s}" for s in seeds}
    return {s: describe(d) for s, d in folders.items() if _finished(d)}


def summarize(args) -> str:
    limit = math.log(VOCAB) + 2
    lines = ["| preset | seed | first segment | what the start did (step: outcome) | largest block | "
             "/ median | peak loss |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for preset in args.presets:
        rows = _rows(Path(args.out), preset, args.seeds)
        if not rows:
            continue
        reference = _rows(Path(args.against or args.out), preset, args.seeds)
        if not reference:
            raise SystemExit(f"--against {args.against}: no finished run of {preset} for seeds {args.seeds}")
        median = statistics.median(r["block"] for r in reference.values())
        for seed, r in rows.items():
            lines.append(f"| {preset} | {seed} | {r['segment']} | {_fired(r['fired'])}"
                         f"{' **diverged**' if r['diverged'] else ''} | {r['block']:.1f} | "
                         f"{r['block'] / median:.2f} | {r['peak']:.2f} |")
        worst = max(r["block"] / median for r in rows.values())
        ok = worst <= 2 and all(r["peak"] < limit and not r["diverged"] for r in rows.values())
        of = f"{len(rows)} seeds" if not args.against else f"the seeds in {args.against}"
        verdicts.append(f"- {preset}: largest block within {worst:.2f}x the median of {of}, peak "
                        f"{max(r['peak'] for r in rows.values()):.2f} (log(V) + 2 = {limit:.2f}): "
                        f"{'holds' if ok else '**does not hold**'}")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", help="the PTB folder (default: $SEQNORM_DATA or data/ptb)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--worker", default="0/1", help="K/N: run every N-th job starting at K")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summarize", action="store_true", help="write OUT/table.md from the finished runs")
    parser.add_argument("--against", metavar="DIR", help="with --summarize: each preset's median block from the "
                        "runs in DIR (e.g. the default numerics' grid) instead of OUT's")
    args = parser.parse_args(argv)
    if args.summarize:
        text = summarize(args)
        (Path(args.out) / "table.md").write_text(text)
        print(text)
    else:
        run(args)


if __name__ == "__main__":
    main()
