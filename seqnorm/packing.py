"""PackedSequence input for ``seqnorm.LSTM`` / ``seqnorm.RNN``: the padded layout the recurrences run on, and back.

A PackedSequence holds its sequences sorted longest first (``sorted_indices``
maps that row order to the caller's) and, per step t, the rows of the
``batch_sizes[t]`` sequences still active.  Online Normalization semantics:
at step t the normalizer's samples are the active sequences in that sorted
row order; padded positions never touch its statistics.  The reverse
direction reads each sequence backwards from its own last element (as
``torch.nn`` does), so its active rows at each of its steps are the same
prefix.  Because the active rows of a step are always a prefix, the steps fall
into runs of equal ``batch_sizes``; each run is one call of the recurrence on
its rows (``runs``), which is how every backend's kernels get the number of
active rows.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence


class Packing:
    """The layout of one PackedSequence: runs of equal batch size and the maps between packed and padded."""

    def __init__(self, packed: PackedSequence):
        sizes = packed.batch_sizes
        if sizes.dim() != 1 or sizes.numel() == 0 or sizes.device.type != "cpu" or sizes.is_floating_point():
            raise ValueError("PackedSequence.batch_sizes must be a non-empty 1-D integer tensor on the CPU, as "
                             "torch.nn.utils.rnn.pack_padded_sequence makes it")
        sizes = sizes.tolist()
        if sizes[-1] < 1 or any(a < b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"PackedSequence.batch_sizes must be positive and non-increasing, got {sizes}")
        if packed.data.shape[0] != sum(sizes):
            raise ValueError(f"PackedSequence.data has {packed.data.shape[0]} rows but batch_sizes sum to {sum(sizes)}")
        self.steps, self.batch = len(sizes), sizes[0]
        self.sorted_indices, self.unsorted_indices = packed.sorted_indices, packed.unsorted_indices
        self.runs = []  # (t0, t1, n): steps t0..t1-1 have rows 0..n-1 active
        for t, n in enumerate(sizes):
            if self.runs and self.runs[-1][2] == n:
                self.runs[-1] = (self.runs[-1][0], t + 1, n)
            else:
                self.runs.append((t, t + 1, n))
        device = packed.data.device
        self.index = torch.cat([torch.arange(n) + t * self.batch for t, n in enumerate(sizes)]).to(device)
        lengths = torch.tensor([sum(1 for n in sizes if n > b) for b in range(self.batch)])
        t = torch.arange(self.steps).unsqueeze(1)
        self.reversed_time = torch.where(t < lengths, lengths - 1 - t, t).to(device)  # (T, B), its own inverse

    def pad(self, data: torch.Tensor) -> torch.Tensor:
        """Packed rows (N, F) -> (T, B, F) in the sorted row order, zeros where a sequence has ended."""
        flat = data.new_zeros(self.steps * self.batch, data.shape[-1]).index_copy(0, self.index, data)
        return flat.view(self.steps, self.batch, -1)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(T, B, F) -> the packed rows (N, F)."""
        return padded.reshape(self.steps * self.batch, -1).index_select(0, self.index)

    def reverse(self, padded: torch.Tensor) -> torch.Tensor:
        """Each sequence of a (T, B, F) tensor reversed within its own length (padding stays where it is)."""
        return padded.gather(0, self.reversed_time.unsqueeze(-1).expand_as(padded))

    def sort_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The caller's (L, B, F) initial state in the packed row order."""
        return h if self.sorted_indices is None else h.index_select(1, self.sorted_indices)

    def unsort_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """A final (L, B, F) state back in the caller's order."""
        return h if self.unsorted_indices is None else h.index_select(1, self.unsorted_indices)

    def wrap(self, data: torch.Tensor, like: PackedSequence) -> PackedSequence:
        return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
