"""The language model: embedding -> recurrent layers -> dropout -> decoder tied to the embedding.

Cells: ``lstm`` / ``rnn`` / ``gru`` are ``seqnorm.LSTM`` / ``seqnorm.RNN`` /
``seqnorm.GRU`` with ``norm`` online, layer or none; ``lstm-cudnn`` /
``rnn-cudnn`` / ``gru-cudnn`` are ``torch.nn.LSTM`` / ``torch.nn.RNN`` /
``torch.nn.GRU`` (cuDNN on a GPU), the paper's unnormalized baseline, and need
``norm='none'``.
"""
from __future__ import annotations

import torch
from torch import nn

import seqnorm
from seqnorm.warmup import detach_state, truncated_forward

from .config import ModelConfig

def build_recurrent(cfg: ModelConfig) -> nn.Module:
    dropout = cfg.dropout if cfg.nlayers > 1 else 0.0
    if cfg.cell == "lstm-cudnn":
        return nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout)
    if cfg.cell == "rnn-cudnn":
        return nn.RNN(cfg.emsize, cfg.nhid, cfg.nlayers, nonlinearity=cfg.nonlinearity, dropout=dropout)
    if cfg.cell == "gru-cudnn":
        return nn.GRU(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout)
    on = {k: v for k, v in (("alpha_fwd", cfg.alpha_fwd), ("alpha_bkw", cfg.alpha_bkw)) if v is not None}
    on["v_decay_min"] = cfg.v_decay_min
    norm = None if cfg.norm == "none" else cfg.norm
    if cfg.cell == "lstm":
        return seqnorm.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout, norm=norm, ecm=cfg.ecm, **on)
    if cfg.cell == "gru":
        return seqnorm.GRU(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=dropout, norm=norm, ecm=cfg.ecm, **on)
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

    def forward(self, ids: torch.Tensor, hidden=None, truncate: int | None = None):
        """``truncate=K``: backpropagate through at most K steps, cutting the graph (not the values) every K
        steps. The outputs and the statistics are those of one call (only between-layer dropout draws its masks
        per chunk); only the gradients change."""
        out, hidden = truncated_forward(self.rnn, self.drop(self.encoder(ids)), hidden, truncate)
        return self.decoder(self.drop(out)), hidden


def map_hidden(fn, hidden):
    """``fn`` applied to the hidden state: one tensor (RNN) or the (h, c) pair (LSTM)."""
    return tuple(fn(h) for h in hidden) if isinstance(hidden, tuple) else fn(hidden)


def detach_hidden(hidden):
    """Cut the graph between BPTT segments, keeping the values."""
    return detach_state(hidden)
