"""``seqnorm-lm compare``: a grid of {online, layer, none} x {lstm, rnn} x seeds, summarized beside the paper.

Each run trains into ``OUT/<preset>-seed<S>/`` with ``resume=True``, so an
interrupted grid continues where it stopped when the same command is run
again.  Writes ``results.json``, ``results.md`` (median/min/max valid and test
perplexity per configuration, with the paper's figure) and, when matplotlib
is installed, ``valid_ppl.png`` (validation perplexity against training step).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from .presets import PRESETS, preset_name
from .train import TrainConfig, train


def run_grid(out, data=None, cells=("lstm", "rnn"), norms=("online", "layer", "none"), seeds=(0,), epochs=None,
             max_steps=None, device="cpu", progress=True, clip=None) -> dict:
    """Train every configuration (presets, shrunk by ``epochs``/``max_steps``; ``clip`` for all) and summarize."""
    out = Path(out)
    runs = []
    for cell in cells:
        for norm in norms:
            name = preset_name(cell, norm)
            base = TrainConfig(**PRESETS[name].train_fields(), data=data, device=device)
            if epochs is not None:
                base = replace(base, epochs=epochs)
            if max_steps is not None:
                base = replace(base, max_steps=max_steps)
            if clip is not None:
                base = replace(base, clip=clip)
            for seed in seeds:
                cfg = replace(base, seed=seed, out=str(out / f"{name}-seed{seed}"))
                summary = _train_or_diverge(cfg, progress)
                if summary["status"] == "interrupted":
                    return {"status": "interrupted", "runs": runs}
                runs.append({"preset": name, "seed": seed, **summary})
    results = {"status": "finished", "runs": runs, "table": summarize(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results["table"]))
    plot_validation(runs, out / "valid_ppl.png")
    return results


def _train_or_diverge(cfg: TrainConfig, progress: bool) -> dict:
    """Train (resuming); a divergence is recorded in ``diverged.json`` and not retried on a rerun."""
    marker = Path(cfg.out) / "diverged.json"
    if marker.exists():
        return json.loads(marker.read_text())
    try:
        return train(cfg, resume=True, progress=progress)
    except FloatingPointError as e:
        summary = {"status": "diverged", "error": str(e)}
        marker.write_text(json.dumps(summary) + "\n")
        return summary


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Per preset: best-validation and test perplexity statistics over the finished seeds."""
    table = {}
    for name in dict.fromkeys(r["preset"] for r in runs):
        done = [r for r in runs if r["preset"] == name and r["status"] == "finished"]
        table[name] = {"valid": _stats([r["best_valid_ppl"] for r in done]),
                       "test": _stats([r["test_ppl"] for r in done]),
                       "diverged": sum(r["preset"] == name and r["status"] == "diverged" for r in runs),
                       "steps": sorted({r["steps"] for r in done}),
                       "paper_valid": dict(zip(("median", "min", "max"), PRESETS[name].paper_valid_ppl))}
    return table


def _fmt(s: dict | None) -> str:
    return "—" if s is None else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def markdown_table(table: dict) -> str:
    lines = ["| configuration | runs | steps | valid ppl median (min–max) | test ppl median (min–max) | "
             "paper valid ppl (25 epochs LSTM / 40 RNN) |", "|---|---|---|---|---|---|"]
    for name, row in table.items():
        n = row["valid"]["n"] if row["valid"] else 0
        runs = f"{n}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else "")
        steps = ", ".join(str(s) for s in row["steps"])
        lines.append(f"| {name} | {runs} | {steps} | {_fmt(row['valid'])} | {_fmt(row['test'])} | "
                     f"{_fmt(row['paper_valid'])} |")
    return "\n".join(lines) + "\n\nPerplexity is exp(total NLL / total tokens); the paper's is a mean of per-batch " \
                              "exp(loss), which reads higher.\n"


def plot_validation(runs: list[dict], path: Path) -> bool:
    """Validation perplexity per evaluation, one line per run; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r["status"] != "finished":
            continue
        hist = r["history"]
        ax.plot([h["step"] for h in hist], [h["valid_ppl"] for h in hist], marker="o",
                label=f"{r['preset']} seed {r['seed']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
