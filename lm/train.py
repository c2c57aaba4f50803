"""Training: truncated BPTT with SGD, checkpoints every epoch, exact resume, metrics log.

Each epoch walks the (L, B) train tensor in segments (fixed length or uniform
in 2..bptt), carrying the detached hidden state from segment to segment (reset
at the start of an epoch).  After each epoch: validation perplexity, the lr
decay step, ``last.pt`` (everything needed to continue) and ``best.pt`` (the
best validation model so far), and ``metrics.jsonl`` rewritten from the run's
history.  SIGINT/SIGTERM (or ``should_stop``) stop at the next step boundary
and save ``last.pt`` with the position inside the epoch, so ``resume=True``
continues exactly: on CPU the resumed run ends with the same numbers as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from seqnorm.distributed import gather_states, load_states, reconcile_statistics, wrap_ddp
from seqnorm.warmup import gate_norms

from . import machine, parallel
from .batching import SegmentLengths, batchify, longest_segment, segment
from .checkpoint import (check_model_config, check_vocab, load_checkpoint, model_from_checkpoint, save_checkpoint)
from .data import corpus_fingerprint, load_corpus, resolve_data_dir, vocab_from_state
from .evaluate import evaluate, safe_exp
from .config import TrainConfig  # noqa: F401  (re-exported)
from .machine import check_scores_fit, resolve_device
from .model import RNNLM, detach_hidden, map_hidden
from .resume import apply_optimizer_changes, resume_changes
from .robust_start import RobustStart, Segment, rng_state, set_rng_state


class TrainingDiverged(FloatingPointError):
    """The training loss became non-finite at optimizer step ``step`` (1-based)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@contextlib.contextmanager
def stop_on_signals(flag: dict):
    """While active, SIGINT/SIGTERM set ``flag['stop']`` (a second SIGINT interrupts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.get("stop") and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _summary_writer(folder: str):
    """TensorBoard's writer (``--tensorboard``), from the optional ``tensorboard`` package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {err}") from err
    return SummaryWriter(folder)


RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "steps.jsonl", "diverged.json")


class Trainer:
    """One training run writing into ``cfg.out``; ``run()`` trains and returns the summary dict."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, label: str = "",
                 log_every: int | None = None, log_interval: int | None = None, force: bool = False,
                 tensorboard: str | None = None):
        data_dir = resolve_data_dir(cfg.data)
        cfg = replace(cfg, data=str(data_dir))  # the saved config names the folder actually used
        self.cfg, self.label = cfg, f"{label} " if label else ""
        self.out = Path(cfg.out)
        self.ranks, self.device = parallel.setup(resolve_device(cfg.device))  # under torchrun: joins the group
        self.progress = progress and self.ranks.main
        columns = self.ranks.columns(cfg.batch_size)
        last = self.out / "last.pt"
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")
        self._claim_folder(resume, force)
        ckpt = load_checkpoint(last) if resume and last.exists() else None
        vocab = vocab_from_state(ckpt["vocab"]) if ckpt and cfg.tokenizer == "sentencepiece" else None
        self.corpus = load_corpus(data_dir, cfg.tokenizer, cfg.vocab_size, vocab=vocab)
        self.corpus_sha256 = corpus_fingerprint(data_dir)  # recorded with the run: its data wherever it lies
        self.model_cfg = cfg.model_config(len(self.corpus.vocab))
        self.train_data = batchify(self.corpus.train, cfg.batch_size)[:, columns].to(self.device)
        if cfg.bptt >= len(self.train_data):
            raise ValueError(f"bptt {cfg.bptt} is longer than the train split's batch columns allow: at batch size "
                             f"{cfg.batch_size} a segment has at most {len(self.train_data) - 1} steps")
        self._check_fits(len(self.corpus.vocab))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = RNNLM(self.model_cfg).to(self.device)
        self.net = self.model  # what the training steps call: DDP around the model under torchrun
        if self.ranks.world > 1:
            self.net = wrap_ddp(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.lr_decay)
        self.lengths = SegmentLengths(cfg.bptt, cfg.bptt_mode, seed=cfg.seed)
        self.start = RobustStart(cfg, self.model, len(self.corpus.vocab))
        self.epoch, self.pos, self.step = 0, 0, 0
        if log_every is not None and log_every < 1:
            raise ValueError(f"log_every must be positive, got {log_every}")
        self.log_every, self.steps_log = log_every, self.out / "steps.jsonl"
        if log_interval is not None and log_interval < 1:
            raise ValueError(f"log_interval must be positive, got {log_interval}")
        self.log_interval = log_interval
        self.board = _summary_writer(tensorboard) if tensorboard and self.ranks.main else None
        self.hidden = self.model.init_hidden(self.train_data.shape[1])
        self.sums = {"loss": 0.0, "tokens": 0, "seconds": 0.0}
        self.best = {"valid_ppl": None}
        self.history: list[dict] = []
        if ckpt is not None:
            self._restore(ckpt, last)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _payload(self, with_train: bool, rank_states=None) -> dict:
        """The checkpoint; under torchrun called by every rank (it gathers), inside ``_reconciled``."""
        payload = {"model_config": self.model_cfg.to_dict(), "vocab": self.corpus.vocab.state(),
                   "model": self.model.state_dict(), "train_config": asdict(self.cfg),
                   "corpus_sha256": self.corpus_sha256}
        if with_train:
            hidden = map_hidden(lambda h: parallel.gather_columns(h, self.ranks), self.hidden)
            payload["train"] = {
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "lengths": self.lengths.state_dict(), "rng": rng_state(), "epoch": self.epoch, "pos": self.pos,
                "step": self.step, "hidden": hidden, "sums": dict(self.sums), "best": dict(self.best),
                "history": list(self.history), "world_size": self.ranks.world, "rank_states": rank_states,
                "start": self.start.state_dict()}
        return payload

    @contextlib.contextmanager
    def _reconciled(self):
        """Inside: the Online Normalization statistics combined over ranks (what checkpoints and validation use),
        yielding every rank's own state; after: each rank's own state again, so training never depends on it."""
        own = gather_states(self.model) if self.ranks.world > 1 else None
        if own is None:
            yield None
            return
        reconcile_statistics(self.model)
        try:
            yield own
        finally:
            load_states(self.model, own[self.ranks.rank])

    def _check_fits(self, words: int) -> None:
        """Training's longest step (bptt) and evaluation's (on the longer of valid and test) fit in memory."""
        check_scores_fit("a training step", self.cfg.bptt, self.train_data.shape[1], words, self.device,
                         "--batch-size or --bptt")
        tokens = max(len(self.corpus.valid), len(self.corpus.test))
        check_scores_fit("an evaluation step", longest_segment(tokens, self.cfg.eval_batch_size, self.cfg.eval_bptt),
                         self.cfg.eval_batch_size, words, self.device, "--eval-batch-size or --eval-bptt")

    def _claim_folder(self, resume: bool, force: bool) -> None:
        """A new run never overwrites another: ``--out`` holding a run's files is an error unless ``resume``
        (continue it) or ``force`` (its files are removed first)."""
        held = [name for name in RUN_FILES if (self.out / name).exists()]
        if not held or resume:
            return
        if not force:
            raise ValueError(f"{self.out} already holds a run ({', '.join(held)}); continue it with --resume, or "
                             f"replace it with --force")
        self._say(f"--force: replacing the run in {self.out} ({', '.join(held)})")
        if self.ranks.main:
            for name in held:
                (self.out / name).unlink()

    def _restore(self, ckpt: dict, path: Path) -> None:
        check_vocab(ckpt, self.corpus.vocab, path)
        check_model_config(ckpt, self.model_cfg, path)
        changes = resume_changes(ckpt, self.cfg, self.corpus_sha256, path)
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
        if "train" not in ckpt:
            raise ValueError(f"checkpoint {path} has no training state to resume from")
        t = ckpt["train"]
        saved_world = t.get("world_size", 1)
        if saved_world != self.ranks.world:
            raise ValueError(f"checkpoint {path} was written by a run of {saved_world} process(es) and resumes only "
                             f"with as many (this run has {self.ranks.world}); eval and generate load it in one")
        self.model.load_state_dict(ckpt["model"])
        if t.get("rank_states"):
            load_states(self.model, t["rank_states"][self.ranks.rank])
        self.optimizer.load_state_dict(t["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        apply_optimizer_changes(self.optimizer, self.scheduler, self.cfg, changes)
        self._say(f"resuming {self.out} at epoch {t['epoch'] + 1}, step {t['step']}: "
                  + (f"applying {said} from here on" if changes else "every setting as saved"))
        self.lengths.load_state_dict(t["lengths"])
        set_rng_state(t["rng"])
        self.epoch, self.pos, self.step = t["epoch"], t["pos"], t["step"]
        columns = self.ranks.columns(self.cfg.batch_size)  # the saved hidden state holds the global batch
        self.hidden = map_hidden(lambda h: h[:, columns].to(self.device), t["hidden"])
        self.sums, self.best, self.history = dict(t["sums"]), dict(t["best"]), list(t["history"])
        self.start.load_state_dict(t.get("start", t), self.device)  # before 2026-12-07: the same keys in "train"
        if self.log_every is not None and self.ranks.main and self.steps_log.exists():  # the lines after the
            records = map(json.loads, self.steps_log.read_text().splitlines())  # checkpoint are retaken
            self._write_json_lines(self.steps_log, [r for r in records if r["step"] < self.step])

    def save(self) -> None:
        with self._reconciled() as own:
            self._check_finite_state()
            payload = self._payload(with_train=True, rank_states=own)
            if self.ranks.main:
                save_checkpoint(self.out / "last.pt", payload)
        if self.ranks.main:
            self._write_json_lines(self.out / "metrics.jsonl", self.history)

    @staticmethod
    def _write_json_lines(path: Path, records: list[dict]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)

    # -- training --------------------------------------------------------------------------------------------------
    def _limits_reached(self) -> bool:
        return self.epoch >= self.cfg.epochs or (self.cfg.max_steps is not None and self.step >= self.cfg.max_steps)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on the segment (x, y), through the robust start; returns the segment's loss before
        the update (and logs the step when asked)."""
        self.hidden = detach_hidden(self.hidden)
        segment = Segment(forward=lambda truncate: self._forward(x, y, truncate), learn=self._learn, length=x.shape[0])
        value, self.hidden, norm, done = self.start.step(self.step, segment)
        s = self.sums
        for name, happened in (("retries", done["undone"] != "as written"), ("skipped", done["undone"] == "skipped"),
                               ("pulled_back", "pulled_back" in done), ("walked_back", "walked_back" in done)):
            s[name] = s.get(name, 0) + happened
        s["grad_norm_max"] = max(s.get("grad_norm_max", 0.0), norm)
        if self.log_every is not None and self.ranks.main and self.step % self.log_every == 0:
            record = {"step": self.step, "segment": x.shape[0], "loss": value, "grad_norm": norm,
                      "lr": self.optimizer.param_groups[0]["lr"], **done, "gates": self._gate_norms()}
            with open(self.steps_log, "a") as f:
                f.write(json.dumps(record) + "\n")
        return value

    def _gate_norms(self) -> dict | None:
        """The norm of each gate block of the first layer (forward direction); None without normalized gates."""
        norms = {name[3:]: v for name, v in gate_norms(self.model.rnn).items() if name.startswith("l0.")}
        return norms or None

    def _learn(self, loss: torch.Tensor, value: float) -> float:
        """The backward of ``loss`` (once its value is known to be finite), clipping when asked for, and the SGD
        step; returns the gradient norm before clipping."""
        self._backward(loss, value)
        norm = self._grad_norm()
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        return norm

    def _forward(self, x: torch.Tensor, y: torch.Tensor, truncate: int | None):
        """The segment's loss tensor, its value (the same on every rank) and the hidden state after it."""
        logits, hidden = self.net(x, self.hidden, truncate=truncate)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        return loss, parallel.global_mean(loss, y.numel(), self.ranks), hidden

    def _backward(self, loss: torch.Tensor, value: float) -> None:
        """The gradients of ``loss``, once its value is known to be finite (else the weights stay as they were)."""
        if not math.isfinite(value):
            raise self._diverged(f"loss is {value}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def _diverged(self, what: str, step: int | None = None) -> "TrainingDiverged":
        """The error for a non-finite loss at the coming step, or a non-finite state after ``step``."""
        step = self.step + 1 if step is None else step
        last = self.out / "last.pt"
        kept = f"{last} was not overwritten" if last.exists() else "no checkpoint was written"
        return TrainingDiverged(f"training diverged: {what} at step {step} (epoch {self.epoch + 1}); {kept}. "
                                "A smaller --lr or --clip may help", step)

    def _check_finite_state(self) -> None:
        """Never write a checkpoint holding a non-finite weight or statistic."""
        bad = [name for name, t in self.model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise self._diverged(f"non-finite values in {', '.join(bad[:3])}", step=self.step)

    def _run_epoch(self, stop: dict, should_stop) -> bool:
        """Train from ``self.pos`` to the end of the epoch; False when stopped early (limit or signal)."""
        rows, B = self.train_data.shape[0], self.cfg.batch_size  # the global batch
        desc = f"{self.label}epoch {self.epoch + 1}/{self.cfg.epochs}"
        if self.cfg.max_steps is None:  # the bar counts this epoch's tokens
            bar = tqdm(total=(rows - 1) * B, initial=self.pos * B, unit="tok", unit_scale=True, leave=False,
                       desc=desc, disable=not self.progress)
        else:  # the bar counts steps up to --max-steps, so its estimate is for the whole run
            bar = tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", leave=False, desc=desc,
                       disable=not self.progress)
        with bar:
            while self.pos < rows - 1:
                if parallel.any_rank(stop.get("stop"), self.ranks, self.device):  # every rank stops at the same step
                    stop["stop"] = True
                if stop.get("stop") or self._limits_reached():
                    return False
                t0 = time.perf_counter()
                x, y = segment(self.train_data, self.pos, self.lengths.next())
                loss = self._train_step(x, y)
                self.pos += x.shape[0]
                self.step += 1
                tokens = y.numel() * self.ranks.world  # every rank's share of the global batch
                self.sums["loss"] += loss * tokens
                self.sums["tokens"] += tokens
                self.sums["seconds"] += time.perf_counter() - t0
                bar.update(tokens if self.cfg.max_steps is None else 1)
                mean = self.sums["loss"] / self.sums["tokens"]
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{safe_exp(mean):.1f}",
                                tok_s=f"{self.sums['tokens'] / self.sums['seconds']:.0f}")
                if self.log_interval and self.step % self.log_interval == 0:
                    self._say(f"epoch {self.epoch + 1} | step {self.step} | loss {mean:.3f} | ppl {safe_exp(mean):.1f} | "
                              f"lr {self.optimizer.param_groups[0]['lr']:.4g} | "
                              f"{self.sums['tokens'] / self.sums['seconds']:.0f} tok/s | undone {self.sums.get('retries', 0)}")
                if should_stop is not None and should_stop(self.step):
                    stop["stop"] = True
        return True

    def _evaluate(self, split: str) -> dict:
        return evaluate(self.model, self.corpus.split(split), self.cfg.eval_batch_size, self.cfg.eval_bptt,
                        progress=self.progress, desc=f"{self.label}{split}")

    def _record(self, kind: str) -> dict:
        """Validate, log a history record, and keep ``best.pt`` up to date (with the reconciled statistics)."""
        with self._reconciled():
            valid = self._evaluate("valid")
            is_best = self.best["valid_ppl"] is None or valid["perplexity"] < self.best["valid_ppl"]
            if is_best:
                self._check_finite_state()  # on every rank, so that all raise together
                if self.ranks.main:
                    save_checkpoint(self.out / "best.pt", self._payload(with_train=False))
        s = self.sums
        record = {"event": kind, "epoch": self.epoch + 1, "step": self.step,
                  "train_loss": s["loss"] / max(s["tokens"], 1), "train_ppl": safe_exp(s["loss"] / max(s["tokens"], 1)),
                  "valid_loss": valid["loss"], "valid_ppl": valid["perplexity"],
                  "valid_ppl_mean_batch_exp": valid["perplexity_mean_batch_exp"],
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm_max": s.get("grad_norm_max"),
                  "retries": s.get("retries", 0), "skipped": s.get("skipped", 0),
                  "pulled_back": s.get("pulled_back", 0), "walked_back": s.get("walked_back", 0),
                  "warmup_peak_loss": self.start.peak, "gates": self._gate_norms(),
                  "time_s": s["seconds"], "machine": machine.describe(self.device),
                  "tokens_per_s": s["tokens"] / s["seconds"] if s["seconds"] else None}
        self.history.append(record)
        if is_best:
            self.best = {"valid_ppl": valid["perplexity"], "epoch": self.epoch + 1, "step": self.step}
        if self.board is not None:
            for name in ("train_ppl", "valid_ppl", "lr", "retries", "tokens_per_s"):
                if record[name] is not None:
                    self.board.add_scalar(f"{self.label}{name}".strip(), record[name], record["step"])
            self.board.flush()
        self._say(f"epoch {record['epoch']}/{self.cfg.epochs}{' (stopped)' if kind == 'end' else ''} | step "
                  f"{record['step']} | train ppl {record['train_ppl']:.1f} | valid ppl {record['valid_ppl']:.1f} | "
                  f"lr {record['lr']:.4g} | {record['time_s']:.0f} s | {record['tokens_per_s'] or 0:.0f} tok/s | "
                  f"undone {record['retries']} | best {self.best['valid_ppl']:.1f} (epoch {self.best['epoch']})")
        return record

    def _say(self, line: str) -> None:
        """A progress line on stderr (the main process; below any progress bar)."""
        if self.ranks.main:
            tqdm.write(f"{self.label}{line}", file=sys.stderr)

    def run(self, should_stop=None) -> dict:
        """Train until ``cfg.epochs`` or ``cfg.max_steps``; returns the summary (also written to summary.json).

        ``should_stop(step) -> bool`` is asked after every step (a programmatic interruption).
        On interruption ``last.pt`` is saved and the summary has ``status='interrupted'``.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        stop: dict = {}
        with stop_on_signals(stop):
            while not self._limits_reached():
                if not self._run_epoch(stop, should_stop):
                    break
                self._record("epoch")
                self.scheduler.step()
                self.epoch, self.pos = self.epoch + 1, 0
                self.sums = {"loss": 0.0, "tokens": 0, "seconds": 0.0}
                self.hidden = self.model.init_hidden(self.train_data.shape[1])
                self.save()
            if parallel.any_rank(stop.get("stop"), self.ranks, self.device) and not self._limits_reached():
                self.save()
                return {"status": "interrupted", "epoch": self.epoch + 1, "step": self.step,
                        "checkpoint": str(self.out / "last.pt")}
            if self.pos > 0 and (not self.history or self.history[-1]["step"] != self.step):
                self._record("end")
            self.save()
        return self._finish()

    def _finish(self) -> dict:
        """Test perplexity of the best-validation model; summary.json."""
        best = load_checkpoint(self.out / "best.pt", map_location=self.device) if self.ranks.main else None
        if self.ranks.world > 1:  # rank 0's file, to every rank (no shared filesystem needed)
            shared = [best]
            torch.distributed.broadcast_object_list(shared, src=0, device=self.device)
            best = shared[0]
        model = model_from_checkpoint(best, self.out / "best.pt", self.device)
        test = evaluate(model, self.corpus.test, self.cfg.eval_batch_size, self.cfg.eval_bptt, progress=self.progress,
                        desc=f"{self.label}test")
        last = self.history[-1]
        summary = {"status": "finished", "steps": self.step, "epochs_completed": self.epoch,
                   "best_valid_ppl": self.best["valid_ppl"], "best_epoch": self.best["epoch"],
                   "best_step": self.best["step"], "final_valid_ppl": last["valid_ppl"],
                   "test_ppl": test["perplexity"], "test_ppl_mean_batch_exp": test["perplexity_mean_batch_exp"],
                   "train_seconds": sum(r["time_s"] for r in self.history if r["event"] == "epoch")
                   + (last["time_s"] if last["event"] == "end" else 0.0),
                   "history": self.history, "config": asdict(self.cfg), "corpus_sha256": self.corpus_sha256}
        if self.ranks.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, should_stop=None, label: str = "",
          force: bool = False) -> dict:
    """Train (``label`` names the run on its progress bars and lines); returns the summary."""
    return Trainer(cfg, resume=resume, progress=progress, label=label, force=force).run(should_stop)
