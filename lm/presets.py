"""The paper's six PTB configurations (docs/design.md §4; Cerebras online-normalization, experiments/recurrent).

Shared by all: one layer of 200 units, tied 200-d embeddings, batch 20, BPTT
length uniform in 2..128 per segment, SGD without momentum, weight decay 1e-6,
no gradient clipping, dropout 0, no learning-rate decay (factor 1).  The
paper's figure is the median (min-max) validation perplexity of 25 runs, as a
mean of per-batch exp(loss).
"""
from __future__ import annotations

from dataclasses import dataclass

COMMON = dict(emsize=200, nhid=200, nlayers=1, dropout=0.0, tied=True, batch_size=20, bptt=128, bptt_mode="random",
              weight_decay=1e-6, clip=None, lr_decay=1.0, ecm="ls")


@dataclass(frozen=True)
class Preset:
    cell: str
    norm: str
    lr: float
    epochs: int
    alpha_fwd: float | None
    alpha_bkw: float | None
    paper_valid_ppl: tuple[float, float, float] | None  # median, min, max; None: not in the paper (the GRU)

    def train_fields(self) -> dict:
        """The TrainConfig fields this preset sets."""
        fields = dict(COMMON, cell=self.cell, norm=self.norm, lr=self.lr, epochs=self.epochs)
        if self.alpha_fwd is not None:
            fields.update(alpha_fwd=self.alpha_fwd, alpha_bkw=self.alpha_bkw)
        return fields


LSTM_ALPHAS = (1 - 2**-13, 1 - 2**-5)
RNN_ALPHAS = (1 - 2**-14, 1 - 2**-7)

PRESETS = {
    "paper-lstm-online": Preset("lstm", "online", 6.5, 25, *LSTM_ALPHAS, (113.4, 110.8, 123.0)),
    "paper-lstm-layer": Preset("lstm", "layer", 3.25, 25, None, None, (121.6, 118.2, 21217.6)),
    "paper-lstm-none": Preset("lstm-cudnn", "none", 3.5, 25, None, None, (124.4, 121.0, 133293.5)),
    "paper-rnn-online": Preset("rnn", "online", 1.7, 40, *RNN_ALPHAS, (129.2, 127.0, 181.3)),
    "paper-rnn-layer": Preset("rnn", "layer", 0.95, 40, None, None, (141.9, 136.3, 246.6)),
    "paper-rnn-none": Preset("rnn-cudnn", "none", 0.5, 40, None, None, (172.0, 157.5, 7106.9)),
}


# The paper has no GRU: same shared settings, learning rates from a 1-epoch sweep of 3-4 rates per norm, each the
# fastest that trained on seeds 0, 1 and 2 (benchmarks/gru_lr_sweep.py, docs/gru.md), the LSTM's Online
# Normalization decays, 25 epochs as the LSTM.
GRU_PRESETS = {
    "gru-online": Preset("gru", "online", 3.25, 25, *LSTM_ALPHAS, None),
    "gru-layer": Preset("gru", "layer", 1.625, 25, None, None, None),
    "gru-none": Preset("gru-cudnn", "none", 1.75, 25, None, None, None),
}
PRESETS.update(GRU_PRESETS)


def preset_name(cell: str, norm: str) -> str:
    """The preset for a (cell family, norm) pair: 'lstm'/'lstm-cudnn' -> 'paper-lstm-…', 'gru' -> 'gru-…'."""
    family = cell.split("-")[0]
    return f"{family}-{norm}" if family == "gru" else f"paper-{family}-{norm}"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
