"""Resuming a run: which settings given now may differ from the checkpoint's, and how a new rate applies.

A resumed run continues exactly where it stopped.  Settings that only say where the run lies, runs or reads its
corpus (``RESUME_IGNORED``) may differ freely; those that would make it another run (``RESUME_REFUSED``, another
corpus, another architecture) are an error; any other setting given anew (a learning rate, the number of epochs)
applies from the resume on, and the Trainer says which.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .config import TrainConfig

RESUME_IGNORED = ("out", "device", "data")  # where a run lies, runs and reads its corpus (checked by SHA-256)
RESUME_REFUSED = ("seed", "batch_size", "tokenizer", "vocab_size")  # another run; architecture: check_model_config


def resume_changes(ckpt: dict, cfg: TrainConfig, corpus_sha256: str, path: Path) -> dict:
    """The training settings of ``cfg`` that differ from the checkpoint's: {name: (saved, given)}; a ValueError
    naming them for those that would make it another run."""
    saved = {**asdict(TrainConfig()), **ckpt.get("train_config", {})}
    given = asdict(cfg)
    changes = {k: (saved[k], given[k]) for k in given if k not in RESUME_IGNORED and saved.get(k) != given[k]}
    saved_corpus = ckpt.get("corpus_sha256")
    if saved_corpus is not None and saved_corpus != corpus_sha256:
        raise ValueError(f"checkpoint {path} was trained on another corpus (SHA-256 {saved_corpus[:12]}…, this "
                         f"data {corpus_sha256[:12]}…)")
    refused = {k: v for k, v in changes.items() if k in RESUME_REFUSED}
    if refused:
        said = ", ".join(f"--{k.replace('_', '-')} {b!r} (the run has {a!r})" for k, (a, b) in refused.items())
        raise ValueError(f"cannot resume {path} with {said}: that would be another run; use another --out")
    return changes


def apply_optimizer_changes(optimizer, scheduler, cfg: TrainConfig, changes: dict) -> None:
    """A new lr, lr_decay or weight_decay over the restored optimizer and schedule (which carry the saved ones):
    lr is the base rate, decayed by the epochs already done."""
    if "weight_decay" in changes:
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay
    if "lr_decay" in changes:
        scheduler.gamma = cfg.lr_decay
    if "lr" in changes or "lr_decay" in changes:
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * cfg.lr_decay ** scheduler.last_epoch
