"""Batchify a token stream into B parallel streams and cut it into BPTT segments.

``batchify`` turns N ids into an (L, B) tensor, L = N // B (the tail that does
not fill a row is dropped): column b is the contiguous stretch
``ids[b*L:(b+1)*L]``, so hidden state carried from one segment to the next
continues each column's text.  A segment starting at row ``pos`` of length
``n`` has inputs ``data[pos:pos+n]`` and targets ``data[pos+1:pos+n+1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = ids.numel() // batch_size
    if rows < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for batch size {batch_size} (need at least "
                         f"{2 * batch_size})")
    return ids[:rows * batch_size].view(batch_size, rows).t().contiguous()


@dataclass
class SegmentLengths:
    """Segment lengths: always ``bptt`` ("fixed"), or uniform in 2..bptt per segment ("random", as in the paper).

    Random lengths come from their own generator, whose state is saved in checkpoints.
    """

    bptt: int
    mode: str = "fixed"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("fixed", "random"):
            raise ValueError(f"bptt mode must be 'fixed' or 'random', got {self.mode!r}")
        if self.bptt < (2 if self.mode == "random" else 1):
            raise ValueError(f"bptt must be at least {2 if self.mode == 'random' else 1}, got {self.bptt}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def next(self) -> int:
        if self.mode == "fixed":
            return self.bptt
        return int(torch.randint(2, self.bptt + 1, (1,), generator=self.generator))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def segment(data: torch.Tensor, pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the segment at row ``pos`` (shortened at the end of the data)."""
    n = min(length, data.shape[0] - 1 - pos)
    return data[pos:pos + n], data[pos + 1:pos + 1 + n]


def longest_segment(tokens: int, batch_size: int, bptt: int) -> int:
    """The longest segment ``segments`` cuts from ``tokens`` ids in ``batch_size`` columns: ``bptt``, or the
    columns' rows less one where they are fewer."""
    return min(bptt, max(tokens // max(batch_size, 1) - 1, 1))


def segments(data: torch.Tensor, lengths: SegmentLengths | int, pos: int = 0):
    """Yield (pos, inputs, targets) from row ``pos`` to the end of ``data``."""
    if isinstance(lengths, int):
        lengths = SegmentLengths(lengths)
    while pos < data.shape[0] - 1:
        x, y = segment(data, pos, lengths.next())
        yield pos, x, y
        pos += x.shape[0]
