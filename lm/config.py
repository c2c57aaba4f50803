"""The settings of a language model and of a training run, as dataclasses.

No torch here: the command line builds its parser (and answers ``--help``)
from these without importing torch.  ``v_decay_min`` and the other Online
Normalization values are validated by seqnorm when the model is built.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CELLS = ("lstm", "rnn", "gru", "lstm-cudnn", "rnn-cudnn", "gru-cudnn")
NORMS = ("online", "layer", "none")
WARMUPS = ("undo", "truncate", "none")  # lm/robust_start.py
AS_WRITTEN = {"warmup": "none"}  # --as-written: no robust start
# settings of earlier versions, with the value every run of this code has: a saved run that names one with that
# value is the same run (lm/compare.py), one with another value was made by a start that no longer exists
RETIRED = {"retry_factor": 10.0, "undo_first": "truncate", "adaptive_clip": None, "clip_window": 100}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's architecture (saved in checkpoints, compared on resume)."""

    vocab_size: int
    cell: str = "lstm"
    norm: str = "online"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 1
    dropout: float = 0.0
    tied: bool = True
    nonlinearity: str = "tanh"
    alpha_fwd: float | None = None  # None: the layer's paper default (LSTM 1-2^-13, RNN 1-2^-14)
    alpha_bkw: float | None = None  # None: LSTM 1-2^-5, RNN 1-2^-7
    ecm: str = "ls"
    v_decay_min: float | None = 1e-5  # ON v-decay floor (docs/design.md §2); None: the paper's printed equations

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.cell.endswith("-cudnn") and self.norm != "none":
            raise ValueError(f"cell {self.cell!r} is torch.nn's unnormalized layer; it needs norm='none', "
                             f"got {self.norm!r}")
        if self.tied and self.emsize != self.nhid:
            raise ValueError(f"tied embeddings need emsize == nhid, got emsize={self.emsize}, nhid={self.nhid}; "
                             f"pass --no-tie or make them equal")
        for name in ("vocab_size", "emsize", "nhid", "nlayers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """All settings of a training run (the CLI flags of ``seqnorm-lm train``)."""

    data: str | None = None
    out: str = "runs/lm"
    cell: str = "lstm"
    norm: str = "online"
    nonlinearity: str = "tanh"
    emsize: int = 200
    nhid: int = 200
    nlayers: int = 1
    dropout: float = 0.0
    tied: bool = True
    alpha_fwd: float | None = None
    alpha_bkw: float | None = None
    ecm: str = "ls"
    v_decay_min: float | None = 1e-5
    epochs: int = 25
    max_steps: int | None = None
    lr: float = 6.5
    lr_decay: float = 1.0
    weight_decay: float = 1e-6
    clip: float | None = None
    warmup: str = "undo"  # the robust start (lm/robust_start.py); "none": the run as written
    warmup_steps: int = 300
    warmup_from: int = 32  # the truncation of a retaken step, and the warm-up's first K
    undo_factor: float = 100.0  # a warm-up update that multiplies its segment's perplexity by more is undone
    max_gate_update: float | None = 2.0  # ... and one that moves a normalized gate block by more than this x its norm
    ceiling: float | None = 1.0  # nats above log(V) a warm-up step's loss may reach before the last update is halved
    warmup_halvings: int = 5  # how often the ceiling may halve the previous update, and a damaging retake be halved
    bound: float | None = 2.0  # nats above log(V) no warm-up step trains at (earlier weights are taken instead)
    batch_size: int = 20
    bptt: int = 128
    bptt_mode: str = "random"
    eval_batch_size: int = 10
    eval_bptt: int = 32
    seed: int = 0
    device: str = "auto"  # CUDA when torch sees one, else the CPU
    tokenizer: str = "word"
    vocab_size: int | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "bptt", "eval_batch_size", "eval_bptt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1 or self.weight_decay < 0:
            raise ValueError(f"need lr > 0, 0 < lr_decay <= 1, weight_decay >= 0; got lr={self.lr}, "
                             f"lr_decay={self.lr_decay}, weight_decay={self.weight_decay}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}, got {self.warmup!r}")
        if self.ceiling is not None and not self.ceiling > 0:
            raise ValueError(f"ceiling must be positive (nats above log(V)) or None, got {self.ceiling}")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"bound must be positive (nats above log(V)) or None, got {self.bound}")
        if self.max_gate_update is not None and not self.max_gate_update > 0:
            raise ValueError(f"max_gate_update must be positive or None, got {self.max_gate_update}")
        if self.warmup_halvings < 0:
            raise ValueError(f"warmup_halvings must be 0 or more, got {self.warmup_halvings}")
        for name in ("warmup_steps", "warmup_from"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.undo_factor > 1:
            raise ValueError(f"undo_factor must be above 1, got {self.undo_factor}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def model_config(self, vocab_size: int) -> ModelConfig:
        arch = ("cell", "norm", "emsize", "nhid", "nlayers", "dropout", "tied", "nonlinearity", "alpha_fwd",
                "alpha_bkw", "ecm", "v_decay_min")
        return ModelConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in arch})
