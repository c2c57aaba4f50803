"""Checkpoints: written atomically, read with clear errors, and a Python API to get a trained model back.

A checkpoint is one ``torch.save`` dict (loaded with ``weights_only=True``):
``format``, ``model_config``, ``vocab`` (the tokenizer state: word list or
SentencePiece model bytes), ``model`` (state_dict, ON statistics included) and,
for resuming, ``train`` (optimizer, lr schedule, RNG states, epoch, position in
the data, the carried hidden state, running epoch sums).
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch

from .data import vocab_from_state
from .model import ModelConfig, RNNLM

FORMAT = "seqnorm-lm/1"
MODEL_DEFAULTS = {f.name: f.default for f in fields(ModelConfig) if f.name != "vocab_size"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the data or the requested model."""


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        held = " or ".join(str(path / n) for n in ("best.pt", "last.pt") if (path / n).is_file())
        raise FileNotFoundError(f"checkpoint {path} is a folder, not a checkpoint file"
                                + (f"; pass {held}" if held else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises many types for damaged or foreign files, with advice that does not apply
        raise CheckpointError(f"{path} is unreadable as a checkpoint: it is corrupt, truncated, or not a file "
                              "written by seqnorm-lm") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a seqnorm-lm checkpoint (format {FORMAT})")
    missing = [k for k in ("model_config", "vocab", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return ckpt


def check_model_config(ckpt: dict, cfg: ModelConfig, path) -> None:
    """Error naming every architecture field where ``cfg`` differs from the checkpoint's."""
    saved = {**MODEL_DEFAULTS, **ckpt["model_config"]}  # fields added later: older checkpoints had the default
    diffs = [f"{k}={saved.get(k)!r} in the checkpoint vs {v!r} requested" for k, v in cfg.to_dict().items()
             if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made for another model: " + "; ".join(diffs))


def check_vocab(ckpt: dict, vocab, path) -> None:
    saved = vocab_from_state(ckpt["vocab"])
    if saved != vocab:
        size = getattr(vocab, "uncapped_size", len(vocab))  # the data's own size, not a cap taken from the checkpoint
        raise CheckpointError(f"checkpoint {path} has another vocabulary ({saved.kind}, {len(saved)} entries) than "
                              f"this data ({vocab.kind}, {size} entries)")


def model_from_checkpoint(ckpt: dict, path="checkpoint", device="cpu") -> RNNLM:
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        model = RNNLM(cfg)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())  # torch's load_state_dict message spans lines
        raise CheckpointError(f"checkpoint {path} does not hold a valid model: {detail}") from e
    return model.to(device)


def load_model(path: str | os.PathLike, device="cpu"):
    """Load a trained model for use: returns (model in eval mode, tokenizer, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path, device)
    return model.eval(), vocab_from_state(ckpt["vocab"]), ckpt
