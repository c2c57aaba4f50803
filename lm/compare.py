"""``seqnorm-lm compare``: a grid of {online, layer, none} x {lstm, rnn} x seeds, summarized beside the paper.

Each run trains into ``OUT/<preset>-seed<S>/`` with ``resume=True``, so an
interrupted grid continues where it stopped when the same command is run
again; a run that finished with the same settings is read from its
summary.json, not trained or evaluated again.  Writes ``results.json``,
``results.md`` (median/min/max valid and test perplexity per configuration,
the paper's per-batch measure beside it, epoch time, and the paper's figure;
then one row per run with its validation perplexity after each epoch) and,
when matplotlib is installed, ``valid_ppl.png`` (validation perplexity
after each epoch, one line per run; diverged runs marked).  With
``train_missing=False`` (``--summarize``) nothing is trained: the table and
plot cover the runs already finished or diverged, and name the ones missing,
so a grid that takes several sessions has an interim table.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import RETIRED
from .data import PTB_FINGERPRINT, corpus_fingerprint, resolve_data_dir
from .machine import threads_of
from .presets import PRESETS, preset_name
from .train import TrainConfig, TrainingDiverged, train


def run_grid(out, data=None, cells=("lstm", "rnn"), norms=("online", "layer", "none"), seeds=(0,), epochs=None,
             max_steps=None, device="auto", progress=True, overrides=None, train_missing=True) -> dict:
    """Train every configuration (presets, shrunk by ``epochs``/``max_steps``; ``overrides``, TrainConfig
    fields, for all: e.g. ``AS_WRITTEN`` for no robust start) and summarize.  ``train_missing=False``: train
    nothing, summarize the runs recorded in ``out`` and list the others under ``"missing"``."""
    for flag, values in (("--cells", cells), ("--norms", norms), ("--seeds", seeds)):
        _refuse_repeats(flag, values)
    out = Path(out)
    runs, missing = [], []
    for cell in cells:
        for norm in norms:
            name = preset_name(cell, norm)
            base = TrainConfig(**PRESETS[name].train_fields(), data=data, device=device)
            if epochs is not None:
                base = replace(base, epochs=epochs)
            if max_steps is not None:
                base = replace(base, max_steps=max_steps)
            base = replace(base, **(overrides or {}))
            for seed in seeds:
                cfg = replace(base, seed=seed, out=str(out / f"{name}-seed{seed}"))
                label = f"{name} seed {seed}"
                summary = _train_or_diverge(cfg, progress, label) if train_missing else _recorded(cfg)
                if summary is None:
                    missing.append(label)
                    continue
                if summary["status"] == "interrupted":
                    return {"status": "interrupted", "runs": runs}
                if summary["status"] == "diverged":
                    print(f"{name} seed {seed}: diverged at step {summary.get('step')}", file=sys.stderr)
                runs.append({"preset": name, "seed": seed, **summary})
    if not runs:
        raise ValueError(f"{out} holds no finished or diverged run of this grid (missing: {', '.join(missing)})")
    results = {"status": "finished", "runs": runs, "table": summarize(runs), "missing": missing}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(cell_table(runs) + "\n" + paired_table(runs) + "\n"
                                    + markdown_table(results["table"], missing) + "\n" + runs_table(runs) + "\n"
                                    + compute_line(runs))
    results["plot"] = plot_validation(runs, out / "valid_ppl.png")
    return results


BUDGET = ("epochs", "max_steps")  # a run may be continued to a larger budget; any other setting is the run's own


def _differences(saved: dict, cfg: TrainConfig, saved_corpus: str | None = None) -> dict:
    """The settings in which a saved run config differs from ``cfg``: {name: (saved, wanted)}, ignoring ``out``
    (a run folder may be moved, e.g. into the committed results), ``device`` (where a run continues is not what
    it is), ``data`` when the corpus is the same (``_same_corpus``; ``saved_corpus``: the SHA-256 recorded
    with the run), and settings the saved config does not name: they were added to the code after that run was
    made, and the run is what the code of its time made of its preset (docs/results.md says which code made
    which committed run), not another run; so are retired settings at the value every run now has
    (``RETIRED``)."""
    want = json.loads(json.dumps(asdict(cfg)))
    resolve = lambda c: {**c, "data": str(resolve_data_dir(c.get("data"))), "out": None, "device": None}  # noqa: E731
    saved = {k: v for k, v in saved.items() if not (k in RETIRED and v == RETIRED[k])}  # the same as today's
    saved, want = resolve(saved), resolve(want)
    if _same_corpus(saved["data"], saved_corpus, want["data"]):
        saved["data"] = want["data"]
    return {k: (saved.get(k), want.get(k)) for k in sorted(saved) if saved[k] != want.get(k)}


def _same_corpus(saved_data: str, saved_corpus: str | None, wanted_data: str) -> bool:
    """The same folder, or corpus files with the same SHA-256: the one recorded with the run, else read from
    its folder if this machine has it; so a run recorded on another machine is read back here.  A wanted
    folder this machine lacks stands for the presets' corpus, the verified PTB (known by its shipped
    SHA-256s): reading committed PTB runs back needs no copy of PTB."""
    if saved_data == wanted_data:
        return True
    wanted = _fingerprint(wanted_data) or PTB_FINGERPRINT
    return wanted == (saved_corpus or _fingerprint(saved_data))


def _fingerprint(directory: str) -> str | None:
    try:
        return corpus_fingerprint(directory)
    except FileNotFoundError:
        return None


def _check_same_run(saved: dict, cfg: TrainConfig, path: Path, saved_corpus: str | None = None) -> dict:
    """The differences, after making sure they are only the budget: another setting (an as-written run where
    the robust start is asked for, another lr, another corpus) is an error, never a run relabeled."""
    diff = _differences(saved, cfg, saved_corpus)
    other = {k: v for k, v in diff.items() if k not in BUDGET}
    if other:
        said = ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in other.items())
        if "data" in other:
            said += " (a corpus is the run's when its files' SHA-256 match)"
        raise ValueError(f"{path} holds a run with other settings ({said}); use another --out or remove it")
    return diff


def _recorded(cfg: TrainConfig) -> dict | None:
    """The summary of the run in ``cfg.out`` if it diverged, or finished with these settings and budget;
    None if it is absent, unfinished or finished with a smaller budget.  Other settings are an error."""
    out = Path(cfg.out)
    marker, done = out / "diverged.json", out / "summary.json"
    if marker.exists():
        summary = json.loads(marker.read_text())
        _check_same_run(summary.get("config", json.loads(json.dumps(asdict(cfg)))), cfg, marker,
                        summary.get("corpus_sha256"))
        return summary
    if done.exists():
        summary = json.loads(done.read_text())
        budget_grew = _check_same_run(summary.get("config", {}), cfg, done, summary.get("corpus_sha256"))
        if not budget_grew and summary.get("status") == "finished":
            return summary
    return None


def _refuse_repeats(what: str, values) -> None:
    """A value listed twice would count its run twice in the medians."""
    values = list(values)
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} given more than once in {what}")


def _train_or_diverge(cfg: TrainConfig, progress: bool, label: str = "") -> dict:
    """Train (resuming); a finished run with these settings is reused (continued when the budget grew), a
    divergence is recorded in ``diverged.json`` and not retried on a rerun.  A folder holding a run with other
    settings is an error."""
    summary = _recorded(cfg)
    if summary is not None:
        return summary
    out = Path(cfg.out)
    marker, last = out / "diverged.json", out / "last.pt"
    if not (out / "summary.json").exists() and last.exists():
        ckpt = load_checkpoint(last)
        _check_same_run(ckpt["train_config"], cfg, last, ckpt.get("corpus_sha256"))
    try:
        return train(cfg, resume=True, progress=progress, label=label)
    except TrainingDiverged as e:
        summary = {"status": "diverged", "error": str(e), "step": e.step, "config": json.loads(json.dumps(asdict(cfg))),
                   "corpus_sha256": _fingerprint(str(resolve_data_dir(cfg.data)))}
        marker.write_text(json.dumps(summary) + "\n")
        return summary


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _best_record(run: dict) -> dict:
    return next(h for h in run["history"] if h["step"] == run["best_step"])


def summarize(runs: list[dict]) -> dict:
    """Per preset: best-validation and test perplexity statistics over the finished seeds, epoch time."""
    table = {}
    for name in dict.fromkeys(r["preset"] for r in runs):
        done = [r for r in runs if r["preset"] == name and r["status"] == "finished"]
        table[name] = {"valid": _stats([r["best_valid_ppl"] for r in done]),
                       "valid_mean_batch_exp": _stats([_best_record(r)["valid_ppl_mean_batch_exp"] for r in done]),
                       "test": _stats([r["test_ppl"] for r in done]),
                       "test_mean_batch_exp": _stats([r["test_ppl_mean_batch_exp"] for r in done]),
                       "epoch_seconds": _stats([h["time_s"] for r in done for h in r["history"]
                                                if h["event"] == "epoch"]),
                       "diverged": sum(r["preset"] == name and r["status"] == "diverged" for r in runs),
                       "retaken": sum(_retaken(r) for r in done),
                       "steps": sorted({r["steps"] for r in done}),
                       "paper_valid": _paper(PRESETS[name].paper_valid_ppl) if name in PRESETS else None}
    return table


def _retaken(run: dict) -> int:
    """Updates the robust start undid and retook in a run: every epoch's, and those of the epoch a run stopped in
    (``--max-steps``: its last record is an "end" record; an earlier one is counted again in its epoch's)."""
    history = run["history"]
    ended = history[-1].get("retries", 0) if history and history[-1]["event"] == "end" else 0
    return ended + sum(h.get("retries", 0) for h in history if h["event"] == "epoch")


def _family(run: dict) -> str:
    """'lstm', 'rnn' or 'gru': the cell family of a run."""
    return run["config"]["cell"].split("-")[0]


def _kind(cell: str) -> str:
    return "GRU presets, not in the paper" if cell == "gru" else "paper presets"


def _paper(figures) -> dict | None:
    return None if figures is None else dict(zip(("median", "min", "max"), figures))


def _fmt(s: dict | None) -> str:
    return "—" if s is None else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def _median(s: dict | None, digits: int = 1) -> str:
    return "—" if s is None else f"{s['median']:.{digits}f}"


def markdown_table(table: dict, missing=()) -> str:
    lines = ["| configuration | runs | steps | valid ppl, corpus: median (min–max) | valid ppl, per-batch: median "
             "(min–max) | paper valid ppl, per-batch¹ | test ppl, corpus | test ppl, per-batch | steps retaken² | "
             "epoch time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        n = row["valid"]["n"] if row["valid"] else 0
        runs = f"{n}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else "")
        steps = ", ".join(str(s) for s in row["steps"])
        lines.append(f"| {name} | {runs} | {steps} | {_fmt(row['valid'])} | {_fmt(row['valid_mean_batch_exp'])} | "
                     f"{_fmt(row['paper_valid'])} | {_fmt(row['test'])} | {_fmt(row['test_mean_batch_exp'])} | "
                     f"{row['retaken']} | {_median(row['epoch_seconds'], 0)} |")
    return "\n".join(lines) + (
        "\n\nPerplexity of the best-validation epoch in two measures: 'corpus' is exp(total NLL / total tokens), "
        "seqnorm's figure; 'per-batch' is the paper's, the mean over batches of exp(batch loss), which reads higher. "
        "Epoch time: median training seconds per epoch, evaluation excluded.\n"
        "¹ The paper's median and (min–max) validation perplexity over 25 runs of 25 (LSTM) or 40 (RNN) epochs on "
        "a GPU, in its per-batch measure; a max in the thousands means some of its runs diverged or failed to train.\n"
        "² Updates the robust start undid and retook, summed over the finished runs (each run's metrics.jsonl also "
        "counts the steps its ceiling and bound acted on).\n"
        + (f"\nNot in the table, not finished yet: {', '.join(missing)}.\n" if missing else ""))


NORMS = ("online", "layer", "none")


def _spread(values: list[float]) -> str:
    """'median (min–max)' of some runs' figures; one run: its figure; none: a dash."""
    s = _stats(values)
    return "—" if s is None else f"{s['median']:.1f}" if s["n"] == 1 else _fmt(s)


def _seeds_label(per_norm: list[list[int]]) -> str:
    """The seeds of a cell's row: one list when every norm with runs has the same seeds, else one per norm
    (``0, 1 / 0 / —``), so a median over two seeds is not labelled as one over three."""
    lists = [", ".join(str(s) for s in seeds) or "—" for seeds in per_norm]
    present = {x for x in lists if x != "—"}
    return present.pop() if len(present) == 1 else " / ".join(lists)


def cell_table(runs: list[dict]) -> str:
    """The comparison at a glance: per cell, the best validation perplexity of each norm, median (min–max) over
    the finished seeds, in the corpus measure and the paper's per-batch one, with the paper's figure (per-batch)
    beside them."""
    lines = ["| cell: lr (online / layer / none), epochs, seeds | measure | " + " | ".join(NORMS) + " |",
             "|---|---|" + "---|" * len(NORMS)]
    done = [r for r in runs if r["status"] == "finished"]
    for cell in dict.fromkeys(_family(r) for r in done):
        mine = [r for r in done if _family(r) == cell]
        by_norm = {n: [r for r in mine if r["config"]["norm"] == n] for n in NORMS}
        lrs = " / ".join("/".join(f"{x:g}" for x in sorted({r["config"]["lr"] for r in by_norm[n]})) or "—"
                         for n in NORMS)
        epochs = "/".join(str(e) for e in sorted({r["config"]["epochs"] for r in mine}))
        seeds = _seeds_label([sorted({r["seed"] for r in by_norm[n]}) for n in NORMS])
        name = cell.upper() + (" tanh" if cell == "rnn" else "")
        corpus = [_spread([r["best_valid_ppl"] for r in by_norm[n]]) for n in NORMS]
        batch = [_spread([_best_record(r)["valid_ppl_mean_batch_exp"] for r in by_norm[n]]) for n in NORMS]
        lines.append(f"| {name}: lr {lrs}, {epochs} epochs, seeds {seeds} | corpus | " + " | ".join(corpus) + " |")
        lines.append("| | per-batch | " + " | ".join(batch) + " |")
        paper = [_paper(PRESETS[preset_name(cell, n)].paper_valid_ppl) if preset_name(cell, n) in PRESETS else None
                 for n in NORMS]
        if any(paper):
            lines.append("| | paper, per-batch | " + " | ".join(_fmt(p) for p in paper) + " |")
    return "\n".join(lines) + (
        "\n\nBest validation perplexity, median (min–max) over the seeds (one seed: its figure). 'corpus': exp(total "
        "NLL / total tokens), seqnorm's measure; 'per-batch': the mean of exp(batch loss), the paper's measure; "
        "'paper': its median (min–max) of 25 runs on a GPU, 25 (LSTM) or 40 (RNN) epochs.\n")


PAIRS = (("online", "layer"), ("layer", "none"))  # the paired differences: the paper's order, neighbour by neighbour


def paired_table(runs: list[dict]) -> str:
    """Per cell and seed, the difference in best validation perplexity between the norms of ``PAIRS`` (same seed:
    same initialization draws and data order), in the corpus measure and the paper's per-batch one; a negative
    difference means the first norm of the pair is better.  Empty when no seed has a finished pair."""
    best = {(_family(r), r["config"]["norm"], r["seed"]): r for r in runs if r["status"] == "finished"}
    rows = []
    for cell, seed in dict.fromkeys((c, s) for c, _, s in best):
        cells = []
        for a, b in PAIRS:
            ra, rb = best.get((cell, a, seed)), best.get((cell, b, seed))
            if ra is None or rb is None:
                cells.append("—")
                continue
            corpus = ra["best_valid_ppl"] - rb["best_valid_ppl"]
            batch = _best_record(ra)["valid_ppl_mean_batch_exp"] - _best_record(rb)["valid_ppl_mean_batch_exp"]
            cells.append(f"{corpus:+.1f} ({batch:+.1f})")
        if any(c != "—" for c in cells):
            rows.append(f"| {cell} | {seed} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = " | ".join(f"{a} − {b}" for a, b in PAIRS)
    return ("| cell | seed | " + head + " |\n|---|---|" + "---|" * len(PAIRS) + "\n" + "\n".join(rows) +
            "\n\nPaired differences of best validation perplexity, same seed: corpus measure (per-batch measure); "
            "negative: the first norm is better.\n")


def compute_line(runs: list[dict]) -> str:
    """The training time the finished runs took (evaluation excluded): summed over their epochs as they ran, and
    at each run's median epoch time, which does not count epochs slowed by other work on the machine (the
    estimate of what a reproduction takes), per thread count: one-thread runs also as two side by side."""
    done = [[h for h in r["history"] if h["event"] == "epoch"] for r in runs if r["status"] == "finished"]
    seconds = sum(h["time_s"] for epochs in done for h in epochs)
    typical = {}  # threads: seconds at each run's median epoch time
    for epochs in done:
        by_threads = {}
        for h in epochs:
            by_threads.setdefault(threads_of(h.get("machine")), []).append(h["time_s"])
        for threads, times in by_threads.items():
            typical[threads] = typical.get(threads, 0.0) + statistics.median(times) * len(times)
    typical = typical or {1: 0.0}
    machines = sorted({h["machine"] for r in runs for h in r.get("history", []) if h.get("machine")})
    where = f" on {'; '.join(machines)}" if machines else ""
    parts = [f"{typical[1] / 3600:.1f} hours of single-thread runs, {typical[1] / 7200:.1f} hours of wall time with "
             "two side by side on a 2-core CPU"] if 1 in typical else []
    parts += [f"{typical[n] / 3600:.1f} hours of {n}-thread runs" for n in sorted(typical) if n != 1]
    return (f"Training time of these runs, summed: {seconds / 3600:.1f} hours{where}; at each run's median epoch "
            f"time: {'; '.join(parts)}.\n")


def runs_table(runs: list[dict]) -> str:
    """One row per run: validation perplexity after each epoch, the best and its test perplexity, the updates
    the robust start retook, and the largest gate block of the first layer at the end (the numbers behind the
    plot)."""
    epochs = max((h["epoch"] for r in runs for h in r.get("history", []) if h["event"] == "epoch"), default=0)
    head = ["run", *(f"epoch {e}" for e in range(1, epochs + 1)), "best valid", "test", "retaken",
            "largest gate block"]
    rows = []
    for r in runs:
        label = f"{r['preset']} seed {r['seed']}"
        if r["status"] != "finished":
            rows.append([label, f"diverged at step {r.get('step')}", *[""] * (len(head) - 2)])
            continue
        ppl = {h["epoch"]: f"{h['valid_ppl']:.1f}" for h in r["history"] if h["event"] == "epoch"}
        gates = r["history"][-1].get("gates")
        rows.append([label, *(ppl.get(e, "") for e in range(1, epochs + 1)), f"{r['best_valid_ppl']:.1f}",
                     f"{r['test_ppl']:.1f}", str(_retaken(r)), f"{max(gates.values()):.1f}" if gates else "—"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|", *("| " + " | ".join(row) + " |" for row in rows)]
    return "\n".join(lines) + ("\n\nCorpus validation perplexity after each epoch, per run. Largest gate block: the "
                               "largest norm of a first-layer gate's weights at the run's end, where damage that the "
                               "loss does not show stays visible (docs/robust_start.md; — where the run has no "
                               "normalized gate or predates the record).\n")


def _series(run: dict) -> str:
    """What a line's color stands for: the norm in a preset grid, the group in ``summarize_folders``."""
    return run.get("group", run["config"]["norm"])


OFF_SCALE = 2e4  # validation perplexity above this (a blown-up run) is drawn as an x at the top


def plot_validation(runs: list[dict], path: Path) -> bool:
    """Validation perplexity per evaluation, one line per run; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cells = list(dict.fromkeys(_family(r) for r in runs))
    fig, axes = plt.subplots(1, len(cells), figsize=(9 * len(cells), 4.5), squeeze=False)
    colors = {name: f"C{k}" for k, name in enumerate(dict.fromkeys(_series(r) for r in runs))}
    finite = [h["valid_ppl"] for r in runs if r["status"] == "finished" for h in r["history"]]
    top = min(max(finite, default=OFF_SCALE), OFF_SCALE)
    for ax, cell in zip(axes[0], cells):
        for r in (r for r in runs if _family(r) == cell):
            label = f"{r['group'] if 'group' in r else cell + '-' + r['config']['norm']} seed {r['seed']}"
            style = dict(color=colors[_series(r)], linestyle=("-", "--", ":", "-.")[r["seed"] % 4])
            if r["status"] == "diverged":
                ax.axvline(r.get("step", 0), **style, label=f"{label}: diverged at step {r.get('step')}")
                continue
            steps, ppl = [h["step"] for h in r["history"]], [h["valid_ppl"] for h in r["history"]]
            off = any(v > top for v in ppl)
            ax.plot(steps, [min(v, top) for v in ppl], marker="o", **style, alpha=0.85,
                    label=label + (f" (× above {top:.0e}, off scale)" if off else ""))
            ax.plot([s for s, v in zip(steps, ppl) if v > top], [top] * sum(v > top for v in ppl), "x",
                    color=colors[_series(r)], markersize=10)
        ax.set_title(f"PTB {cell.upper()}: validation perplexity per epoch ({_kind(cell)})", fontsize=10)
        ax.set_xlabel("training step (optimizer updates)")
        ax.set_ylabel("validation perplexity (corpus, log scale)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


GROUP_IGNORED = ("seed", "out", "data", "device")  # runs that differ only in these form one group


def summarize_folders(folders, out) -> dict:
    """``seqnorm-lm summarize``: the table and per-epoch plot of any run folders, grouped by configuration (all
    settings but seed, folder, data path and device).  A group is named by its preset when it is one, else by
    its cell and norm and the settings in which the groups differ.  Writes ``results.json``, ``results.md`` and
    ``valid_ppl.png`` into ``out``; folders without a finished or diverged run are listed as unfinished."""
    _refuse_repeats("the folders", [Path(f).resolve() for f in folders])
    runs, unfinished = [], []
    for folder in map(Path, folders):
        record = next((folder / n for n in ("summary.json", "diverged.json") if (folder / n).exists()), None)
        summary = json.loads(record.read_text()) if record is not None else None
        if summary is None or summary.get("status") not in ("finished", "diverged") or "config" not in summary:
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder")
            unfinished.append(str(folder))
            continue
        runs.append({**summary, "folder": str(folder), "seed": summary["config"]["seed"]})
    if not runs:
        raise ValueError(f"none of {', '.join(map(str, folders))} holds a finished or diverged run (summary.json)")
    names = _group_names([r["config"] for r in runs])
    for run in runs:
        run["preset"] = run["group"] = names[_group_key(run["config"])]
    results = {"status": "finished", "runs": runs, "table": summarize(runs), "missing": unfinished}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    folders_table = "\n".join(f"- {r['preset']} seed {r['seed']}: `{r['folder']}`" for r in runs)
    (out / "results.md").write_text(markdown_table(results["table"], unfinished) + "\n" + runs_table(runs) + "\n"
                                    + compute_line(runs)
                                    + "\nRun folders:\n\n" + folders_table + "\n")
    results["plot"] = plot_validation(runs, out / "valid_ppl.png")
    return results


def _group_key(config: dict) -> str:
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in GROUP_IGNORED})


def _group_names(configs: list[dict]) -> dict:
    """{group key: name}: the preset's name where a group is a preset with every other setting at its default,
    else cell-norm and the settings that tell the groups apart."""
    groups = {_group_key(c): c for c in configs}
    varying = sorted(k for k in set().union(*groups.values()) if k not in GROUP_IGNORED
                     and len({json.dumps(c.get(k)) for c in groups.values()}) > 1)
    names = {}
    for key, config in groups.items():
        preset = next((n for n, p in PRESETS.items() if _sets(config, p.train_fields())), None)
        if preset:  # named by the preset, and by what it does not leave at the default
            own, default = PRESETS[preset].train_fields(), json.loads(json.dumps(asdict(TrainConfig())))
            shown = [k for k in varying if k not in own and json.dumps(config.get(k)) != json.dumps(default.get(k))]
        else:
            shown = [k for k in varying if k not in ("cell", "norm")]
        detail = ", ".join(f"{k}={config.get(k)}" for k in shown)
        names[key] = (preset or f"{config['cell']}-{config['norm']}") + (f" ({detail})" if detail else "")
    return names


def _sets(config: dict, fields: dict) -> bool:
    """Whether a run's saved config has every one of a preset's settings."""
    return all(json.dumps(config.get(k)) == json.dumps(v) for k, v in json.loads(json.dumps(fields)).items())
