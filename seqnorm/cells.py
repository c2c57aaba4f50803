"""Normalized recurrent cells: one time step, differentiated by autograd.

LSTM (docs/design.md §3): the four gate pre-activations (i, f, g, o, the layout of
``torch.nn.LSTMCell``) are normalized together by one normalizer whose
grouped parts (layer scaling, layer norm) work per gate; the memory cell is
not normalized unless ``norm_cell=True``, which normalizes c' before the
output tanh:

    gates = norm(W_ih x + b_ih + W_hh h + b_hh);  i, f, o = sigmoid, g = tanh
    c' = f * c + i * g;  h' = o * tanh(c')

RNN (Elman): h' = act(norm(W_ih x + b_ih + W_hh h + b_hh)), act = tanh or relu.

GRU (gates r, z, n, the layout of ``torch.nn.GRUCell``): the normalized
quantities are the gate pre-activations, the arguments of the sigmoids and of
the tanh; the carried state h is not normalized (docs/gru.md):

    r, z = sigmoid(norm(W_i{r,z} x + b_i{r,z} + W_h{r,z} h + b_h{r,z}))
    n = tanh(norm(W_in x + b_in + r * (W_hn h + b_hn)))
    h' = (1 - z) * n + z * h

One normalizer of 3H features: the r, z features first, then n's (which need
r); every feature's samples still come in row order, so the state is what one
3H call would leave.

These cells are the per-step reference that the fused sequence layers
(``seqnorm.layers``) are tested against.
"""
import math

import torch
from torch import nn

from . import _checks
from .norms import OnlineNormConfig, build_norm, canonical_norm, make_config

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu}


def check_step_input(x: torch.Tensor, input_size: int, ref: torch.Tensor):
    """Validate a cell's input; returns it as (B, I) and whether it was unbatched."""
    _checks.check_floating("input", x)
    if x.dim() not in (1, 2) or x.shape[-1] != input_size:
        raise ValueError(f"input must have shape (batch, {input_size}) or ({input_size},), got {tuple(x.shape)}")
    _checks.check_device("input", x, ref.device)
    if x.shape[0] == 0:
        raise ValueError(f"input is empty: shape {tuple(x.shape)}")
    return (x, False) if x.dim() == 2 else (x.unsqueeze(0), True)


def check_state(name: str, h: torch.Tensor, batch: int, hidden_size: int, unbatched: bool, ref: torch.Tensor):
    _checks.check_floating(name, h)
    expected = (hidden_size,) if unbatched else (batch, hidden_size)
    if tuple(h.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(h.shape)}")
    _checks.check_device(name, h, ref.device)
    return h.unsqueeze(0) if unbatched else h


class _NormalizedCell(nn.Module):
    def __init__(self, input_size, hidden_size, gates, bias, norm, config, device, dtype):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.norm_type = canonical_norm(norm)
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.weight_ih = nn.Parameter(torch.empty(gates * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(gates * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(gates * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.norm = build_norm(self.norm_type, gates * hidden_size, hidden_size, self.config, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)

    def _input_and_state(self, input, hx):
        """(x (B, I), h (B, H), unbatched) for a cell with one state tensor; h zeros when hx is None."""
        x, unbatched = check_step_input(input, self.input_size, self.weight_ih)
        if hx is None:
            return x, x.new_zeros(x.shape[0], self.hidden_size), unbatched
        return x, check_state("hx", hx, x.shape[0], self.hidden_size, unbatched, self.weight_ih), unbatched

    def _preactivation(self, x, h):
        pre = torch.nn.functional.linear(x, self.weight_ih, self.bias_ih) + torch.nn.functional.linear(h, self.weight_hh, self.bias_hh)
        return pre if self.norm is None else self.norm(pre)


class LSTMCell(_NormalizedCell):
    """``torch.nn.LSTMCell`` with normalized gate pre-activations.

    forward(input, hx=None) -> (h', c'); input (B, input_size) or (input_size,).
    Online Normalization settings: ``config=OnlineNormConfig(...)`` or its fields as keywords.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, norm="online",
                 config: OnlineNormConfig | None = None, norm_cell: bool = False, device=None, dtype=None,
                 **config_fields):
        super().__init__(input_size, hidden_size, 4, bias, norm, make_config(config, config_fields), device, dtype)
        self.norm_cell = norm_cell
        self.cell_norm = build_norm(self.norm_type, hidden_size, hidden_size, self.config, device, dtype) if norm_cell else None

    def forward(self, input: torch.Tensor, hx=None):
        x, unbatched = check_step_input(input, self.input_size, self.weight_ih)
        if hx is None:
            h = c = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h = check_state("hx[0]", hx[0], x.shape[0], self.hidden_size, unbatched, self.weight_ih)
            c = check_state("hx[1]", hx[1], x.shape[0], self.hidden_size, unbatched, self.weight_ih)
        i, f, g, o = self._preactivation(x, h).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c_new if self.cell_norm is None else self.cell_norm(c_new)
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        return (h_new[0], c_new[0]) if unbatched else (h_new, c_new)


class RNNCell(_NormalizedCell):
    """``torch.nn.RNNCell`` (tanh or relu) with a normalized pre-activation.

    Online Normalization settings: ``config=OnlineNormConfig(...)`` or its fields as keywords.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 norm="online", config: OnlineNormConfig | None = None, device=None, dtype=None, **config_fields):
        super().__init__(input_size, hidden_size, 1, bias, norm, make_config(config, config_fields), device, dtype)
        self.nonlinearity = _checks.check_choice("nonlinearity", nonlinearity, tuple(NONLINEARITIES))

    def forward(self, input: torch.Tensor, hx=None):
        x, h, unbatched = self._input_and_state(input, hx)
        h_new = NONLINEARITIES[self.nonlinearity](self._preactivation(x, h))
        return h_new[0] if unbatched else h_new


def gru_step(gi, gh, h, norm, hidden_size: int):
    """One GRU step from gi = W_ih x + b_ih and gh = W_hh h + b_hh (B, 3H): r, z first, then n (needs r).
    ``norm``: the 3H normalizer (``features=`` slices), or None."""
    H = hidden_size

    def normalize(a, first_gate):
        return a if norm is None else norm(a, slice(first_gate * H, first_gate * H + a.shape[1]))

    r, z = torch.sigmoid(normalize(gi[:, :2 * H] + gh[:, :2 * H], 0)).chunk(2, 1)
    n = torch.tanh(normalize(gi[:, 2 * H:] + r * gh[:, 2 * H:], 2))
    return (1 - z) * n + z * h


class GRUCell(_NormalizedCell):
    """``torch.nn.GRUCell`` with normalized gate pre-activations (r, z and the argument of n's tanh).

    forward(input, hx=None) -> h'; input (B, input_size) or (input_size,).
    Online Normalization settings: ``config=OnlineNormConfig(...)`` or its fields as keywords.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, norm="online",
                 config: OnlineNormConfig | None = None, device=None, dtype=None, **config_fields):
        super().__init__(input_size, hidden_size, 3, bias, norm, make_config(config, config_fields), device, dtype)

    def forward(self, input: torch.Tensor, hx=None):
        x, h, unbatched = self._input_and_state(input, hx)
        gi = torch.nn.functional.linear(x, self.weight_ih, self.bias_ih)
        gh = torch.nn.functional.linear(h, self.weight_hh, self.bias_hh)
        h_new = gru_step(gi, gh, h, self.norm, self.hidden_size)
        return h_new[0] if unbatched else h_new
