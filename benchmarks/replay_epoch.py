"""Replay one epoch of a finished ``seqnorm-lm`` run step by step, to see which update moved validation.

A run keeps ``best.pt`` (the weights after its best epoch) but not the state before every epoch.  For a run
whose best epoch is the one before the epoch to replay, and whose start undid nothing (so that one segment
length was drawn per step), the epoch is replayed exactly from ``best.pt``: plain SGD keeps no optimizer state,
the hidden state starts from zero each epoch, and the segment lengths come from their own generator, advanced
here by the steps already taken.  The replay checks itself: its validation perplexity at the end must equal
the one the run logged for that epoch.

    python benchmarks/replay_epoch.py docs/results/compare_6epochs/paper-rnn-none-seed1 --epoch 6 \\
        --eval-steps 3600 3700 3800 3900 4000 4100 4200 4257 4258 --out runs/replay.json

Writes one record per step (step, row position, segment length, loss, gradient norm before the update, and the
validation perplexity after the update where asked) to ``--out``, and prints the evaluated ones.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm.checkpoint import load_checkpoint
from lm.train import TrainConfig, Trainer


def replay(run: Path, epoch: int, eval_steps: set[int]) -> tuple[list[dict], float, float]:
    """The per-step trace of ``epoch``, the validation perplexity after it, and the one the run logged."""
    summary = json.loads((run / "summary.json").read_text())
    history = [h for h in summary["history"] if h["event"] == "epoch"]
    if summary["best_epoch"] != epoch - 1:
        raise ValueError(f"{run}: best.pt holds epoch {summary['best_epoch']}, not epoch {epoch - 1}")
    if any(h["retries"] for h in history[:epoch - 1]):
        raise ValueError(f"{run}: the start retook updates, so the segment lengths cannot be replayed from steps")
    before, logged = history[epoch - 2], history[epoch - 1]
    best = load_checkpoint(run / "best.pt")
    trainer = Trainer(TrainConfig(**{**best["train_config"], "out": "/tmp/seqnorm-replay"}), resume=False)
    trainer.progress = False
    trainer.model.load_state_dict(best["model"])
    for _ in range(before["step"]):
        trainer.lengths.next()
    trainer.step, trainer.epoch = before["step"], epoch - 1
    trace = []
    update, train_step = trainer._update, trainer._train_step

    def traced_update():  # the gradient of this step is in place: its norm, then the update
        trace.append({"step": trainer.step + 1, "pos": trainer.pos, "grad_norm": trainer._grad_norm()})
        update()

    def traced_step(x, y):
        loss = train_step(x, y)
        trace[-1].update(length=x.shape[0], loss=loss)
        if trace[-1]["step"] in eval_steps:
            trace[-1]["valid_ppl"] = trainer._evaluate("valid")["perplexity"]
            print(json.dumps(trace[-1]), flush=True)
        return loss

    trainer._update, trainer._train_step = traced_update, traced_step
    trainer._run_epoch({}, None)
    return trace, trainer._evaluate("valid")["perplexity"], logged["valid_ppl"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run folder with summary.json and best.pt")
    p.add_argument("--epoch", type=int, required=True, help="the epoch to replay (its previous one must be the best)")
    p.add_argument("--eval-steps", type=int, nargs="*", default=[], help="steps after which to validate")
    p.add_argument("--out", type=Path, default=Path("runs/replay.json"), help="the per-step trace (JSON)")
    args = p.parse_args()
    trace, end, logged = replay(args.run, args.epoch, set(args.eval_steps))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(trace) + "\n")
    print(f"epoch {args.epoch} replayed: valid ppl {end:.4f}, the run logged {logged:.4f}"
          f" ({'equal' if abs(end - logged) <= 1e-6 * logged else 'NOT equal'}); trace in {args.out}")


if __name__ == "__main__":
    main()
