"""The language model: embedding -> recurrent layers -> dropout -> decoder tied to the embedding.

Cells: ``lstm`` / ``rnn`` are ``seqnorm.LSTM`` / ``seqnorm.RNN`` with ``norm``
online, layer or none; ``lstm-cudnn`` / ``rnn-cudnn`` are ``torch.nn.LSTM`` /
``torch.nn.RNN`` (cuDNN on a GPU), the paper's unnormalized baseline, and
need ``norm='none'``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

import seqnorm

CELLS = ("lstm", "rnn", "lstm-cudnn", "rnn-cudnn")
NORMS = ("online", "layer", "none")


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
    v_decay_min: float | None = 1e-5  # ON v-decay floor (DESIGN §2); None: the paper's printed equations

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
        seqnorm.OnlineNormConfig(v_decay_min=self.v_decay_min)  # validates it

    def to_dict(self) -> dict:
        return asdict(self)


def build_recurrent(cfg: ModelConfig) -> nn.Module:
    dropout = cfg.dropout if cfg.nlayers > 1 else 0.0
    if cfg.cell == "lstm-cudnn":
        return nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout)
    if cfg.cell == "rnn-cudnn":
        return nn.RNN(cfg.emsize, cfg.nhid, cfg.nlayers, nonlinearity=cfg.nonlinearity, dropout=dropout)
    on = {k: v for k, v in (("alpha_fwd", cfg.alpha_fwd), ("alpha_bkw", cfg.alpha_bkw)) if v is not None}
    on["v_decay_min"] = cfg.v_decay_min
    norm = None if cfg.norm == "none" else cfg.norm
    if cfg.cell == "lstm":
        return seqnorm.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout, norm=norm, ecm=cfg.ecm, **on)
    return seqnorm.RNN(cfg.emsize, cfg.nhid, cfg.nlayers, nonlinearity=cfg.nonlinearity, dropout=dropout, norm=norm,
                       ecm=cfg.ecm, **on)


class RNNLM(nn.Module):
    """forward(ids (T, B), hidden) -> logits (T, B, vocab), hidden."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Embedding(cfg.vocab_size, cfg.emsize)
        self.rnn = build_recurrent(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.nhid, cfg.vocab_size)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not cfg.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    @property
    def is_lstm(self) -> bool:
        return self.cfg.cell.startswith("lstm")

    def init_hidden(self, batch_size: int):
        w = self.encoder.weight
        h = w.new_zeros(self.cfg.nlayers, batch_size, self.cfg.nhid)
        return (h, h.clone()) if self.is_lstm else h

    def forward(self, ids: torch.Tensor, hidden=None):
        emb = self.drop(self.encoder(ids))
        out, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(out)), hidden


def detach_hidden(hidden):
    """Cut the graph between BPTT segments, keeping the values."""
    if isinstance(hidden, tuple):
        return tuple(h.detach() for h in hidden)
    return hidden.detach()
