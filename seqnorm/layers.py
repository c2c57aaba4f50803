"""``seqnorm.LSTM`` and ``seqnorm.RNN``: drop-in for ``torch.nn.LSTM`` / ``torch.nn.RNN``.

Same constructor arguments (those that apply), forward signature, shapes and
parameter names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
``bias_hh_l0``, ...), so an ``nn.LSTM`` checkpoint loads with
``strict=False`` (the normalizers' own entries ``norm_l{k}.*`` stay at their
initial values).  Each layer k has one normalizer ``norm_l{k}`` over all its
gate features; for Online Normalization that is one statistics state shared
by every time step (and kept across calls, BPTT segments and epochs).

Each layer direction runs its input projections for all steps in one matmul,
then the recurrence with a hand-written backward: the custom op
``seqnorm::recurrence`` (``seqnorm.ops``; one fused Triton or C kernel per
step) or, on the eager torch path, ``sequence.RecurrenceFunction``, chosen by
``backend=`` (see ``seqnorm.backend``).
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import _checks, backend as backends, ops
from ._compile import assume_constant_result
from .cells import NONLINEARITIES, gru_step
from .norms import OnlineNormConfig, build_norm, canonical_norm, make_config
from .packing import Packing
from .sequence import RecurrenceFunction, RecurrenceSpec, plain_recurrence

PAPER_RNN_CONFIG = OnlineNormConfig(alpha_fwd=1 - 2**-14, alpha_bkw=1 - 2**-7)


def _tracing() -> bool:
    """Under torch.compile / torch.export (dynamo or not) or torch.jit.trace."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction pass (a sum is finite when every element is, unless it overflows: then the full test)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _recurrence(backend, spec_text, state, xproj, h0, c0, w_hh, gamma, beta, w_hr):
    """One direction of one layer: the torch path's autograd Function when eager, else the custom op."""
    if backend == "torch" and not _tracing():
        spec = ops.decode_spec(spec_text)
        return RecurrenceFunction.apply(spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)
    if _tracing() and torch.onnx.is_in_onnx_export():  # ONNX has no seqnorm op: plain ops, inference only
        spec = ops.decode_spec(spec_text)
        if spec.training:
            raise RuntimeError("ONNX export of seqnorm layers is for inference: call model.eval() first (in "
                               "training the statistics update and the backward need seqnorm's own op)")
        return plain_recurrence(spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)
    return ops.run(spec_text, backend, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)


@assume_constant_result
def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return backends.resolve(backend, device, dtype)


class _RecurrentLayers(nn.Module):
    cell = ""
    gates = 1
    fold_hidden_bias = True  # b_hh joins b_ih in the input projection (not for the GRU: r multiplies b_hn)

    def __init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                 norm, config, nonlinearity, backend, device, dtype):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size must be an int in [0, hidden_size={hidden_size}), got {proj_size!r}")
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.num_directions = 2 if bidirectional else 1
        self.output_size = proj_size or hidden_size  # what h and each direction's output hold
        self.backend = backends.check_backend("backend", backend)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.norm_type = canonical_norm(norm)
        self.config = config
        self.nonlinearity = nonlinearity
        self._spec_texts = self._encode_specs()
        kw = dict(device=device, dtype=dtype)
        width = self.gates * hidden_size
        for k in range(num_layers):
            layer_input = input_size if k == 0 else self.output_size * self.num_directions
            for sfx in self._suffixes:  # "" and, bidirectional, "_reverse": torch.nn's names
                self.register_parameter(f"weight_ih_l{k}{sfx}", nn.Parameter(torch.empty(width, layer_input, **kw)))
                self.register_parameter(f"weight_hh_l{k}{sfx}",
                                        nn.Parameter(torch.empty(width, self.output_size, **kw)))
                for name in (f"bias_ih_l{k}{sfx}", f"bias_hh_l{k}{sfx}"):
                    self.register_parameter(name, nn.Parameter(torch.empty(width, **kw)) if bias else None)
                if proj_size:  # h = W_hr (o * tanh c)
                    self.register_parameter(f"weight_hr_l{k}{sfx}",
                                            nn.Parameter(torch.empty(proj_size, hidden_size, **kw)))
                self.add_module(f"norm_l{k}{sfx}", build_norm(self.norm_type, width, hidden_size, config, **kw))
        self.reset_parameters()

    def _encode_specs(self) -> dict:
        """The op's spec argument for train mode, eval mode and inference (eval without autograd), made once
        (a string: pickles and traces as one)."""
        spec = lambda mode, saves=True: ops.encode_spec(RecurrenceSpec(  # noqa: E731
            self.cell, self.norm_type, self.hidden_size, self.config, self.nonlinearity, mode, saves))
        return {True: spec(True), False: spec(False), "inference": spec(False, saves=False)}

    def _spec_text(self, needs_grad: bool = True) -> str:
        """Inference, where the fused forward keeps nothing for a backward: eval mode, no gradient wanted, eager
        (a traced program keeps one spec for every call), and not the GRU (whose kernels always keep it)."""
        if "inference" not in self.__dict__.get("_spec_texts", {}):  # a module pickled before the key existed
            self._spec_texts = self._encode_specs()
        if not self.training and not needs_grad and not _tracing() and self.cell != "gru":
            return self._spec_texts["inference"]
        return self._spec_texts[self.training]

    @property
    def _suffixes(self) -> tuple:
        return ("", "_reverse")[:self.num_directions]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith(("weight_", "bias_ih", "bias_hh")):
                nn.init.uniform_(p, -bound, bound)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer [weight_ih, weight_hh, bias_ih, bias_hh] (without the biases when bias=False), as torch.nn."""
        names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ()) + \
            (("weight_hr",) if self.proj_size else ())
        return [[getattr(self, f"{n}_l{k}{sfx}") for n in names] for k in range(self.num_layers) for sfx in self._suffixes]

    def flatten_parameters(self) -> None:
        """A no-op, for code written for torch.nn: cuDNN's flat weight buffer does not apply here."""

    @classmethod
    def from_torch(cls, module: nn.Module, **kwargs) -> "_RecurrentLayers":
        """The equivalent layer for a ``torch.nn.LSTM`` / ``torch.nn.RNN``, with its weights (strictly).

        ``kwargs``: this class's own keywords (``norm=``, ``config=``, ``backend=``, config fields); the
        normalizers start at their initial state.
        """
        want = cls.torch_class
        if not isinstance(module, want):
            raise TypeError(f"{cls.__name__}.from_torch needs a torch.nn.{want.__name__}, got {type(module).__name__}")
        p = next(module.parameters())
        args = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                    dropout=module.dropout, bidirectional=module.bidirectional, device=p.device, dtype=p.dtype)
        if cls is LSTM:
            args["proj_size"] = module.proj_size
        elif cls is RNN:
            args["nonlinearity"] = module.nonlinearity
        layer = cls(module.input_size, module.hidden_size, **args, **kwargs)
        missing, unexpected = layer.load_state_dict(module.state_dict(), strict=False)
        shared_missing = [k for k in missing if not k.startswith("norm_l")]
        if shared_missing or unexpected:
            raise ValueError(f"weights do not match: missing {shared_missing}, unexpected {unexpected}")
        return layer

    def _layer_params(self, k, sfx=""):
        get = lambda name: getattr(self, f"{name}_l{k}{sfx}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("norm"), get("weight_hr")

    def _check_input(self, input):
        _checks.check_floating("input", input)
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            layout = "(batch, seq, input_size)" if self.batch_first else "(seq, batch, input_size)"
            raise ValueError(f"input must have shape {layout} or (seq, input_size) with input_size={self.input_size}, "
                             f"got {tuple(input.shape)}")
        if input.shape[-2 if input.dim() == 2 else 0] == 0 or input.numel() == 0:
            raise ValueError(f"input is empty: shape {tuple(input.shape)}")
        _checks.check_device("input", input, self.weight_ih_l0.device)
        _checks.check_dtype_matches("input", input, self.weight_ih_l0)

    def _check_state(self, name, h, batch, unbatched, size):
        _checks.check_floating(name, h)
        layers = self.num_layers * self.num_directions
        expected = (layers, size) if unbatched else (layers, batch, size)
        if tuple(h.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(h.shape)}")
        _checks.check_device(name, h, self.weight_ih_l0.device)
        _checks.check_dtype_matches(name, h, self.weight_ih_l0)
        return h.unsqueeze(1) if unbatched else h

    def _check_packed(self, input):
        data = input.data
        _checks.check_floating("PackedSequence.data", data)
        if data.dim() != 2 or data.shape[-1] != self.input_size:
            raise ValueError(f"PackedSequence.data must have shape (rows, input_size={self.input_size}), "
                             f"got {tuple(data.shape)}")
        _checks.check_device("PackedSequence.data", data, self.weight_ih_l0.device)
        _checks.check_dtype_matches("PackedSequence.data", data, self.weight_ih_l0)

    def _to_time_major(self, input):
        """(x (T, B, I), packing or None, unbatched) for a tensor or a PackedSequence."""
        if isinstance(input, PackedSequence):
            self._check_packed(input)
            packing = Packing(input)
            return packing.pad(input.data), packing, False
        self._check_input(input)
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        return x, None, unbatched

    def _from_time_major(self, out, packing, unbatched, input):
        if packing is not None:
            return packing.wrap(packing.pack(out), input)
        if unbatched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    def _initial(self, name, hx, B, unbatched, size, packing):
        """The initial state for layers x directions: zeros, or ``hx`` checked (and sorted for packed input)."""
        if hx is None:
            return self.weight_ih_l0.new_zeros(self.num_layers * self.num_directions, B, size)
        h = self._check_state(name, hx, B, unbatched, size)
        return h if packing is None else packing.sort_hidden(h)

    @staticmethod
    def _final(hs, packing, unbatched):
        h = torch.stack(hs)
        if packing is not None:
            return packing.unsort_hidden(h)
        return h.squeeze(1) if unbatched else h

    def _run_layers(self, x, h0, c0, packing=None):
        """x: (T, B, I) time-major; h0, c0: (num_layers * num_directions, B, H). Returns out, [h_T], [c_T].

        The reverse direction runs the same recurrence over the time-reversed sequence: its normalizer's
        samples come in its processing order, steps T-1 ... 0, rows in order within a step.  With a
        ``packing`` (PackedSequence input, x padded in its sorted row order) each sequence is reversed
        within its own length, and only the active rows of each step run (``_Packing.runs``).
        """
        runs = [(0, x.shape[0], x.shape[1])] if packing is None else packing.runs
        reverse = (lambda t: t.flip(0)) if packing is None else packing.reverse
        h_n, c_n = [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            outs = []
            for d, sfx in enumerate(self._suffixes):
                i = k * self.num_directions + d
                xin = x if d == 0 else reverse(x)
                out, h, c = self._run_direction(xin, k, sfx, h0[i], None if c0 is None else c0[i], runs)
                outs.append(out if d == 0 else reverse(out))
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        return x, h_n, c_n

    def _run_direction(self, x, k, sfx, h0, c0, runs):
        """One direction of layer k over ``runs``: (t0, t1, n), steps t0..t1-1 with rows 0..n-1 active.

        Each run is one call of the recurrence on its active rows; the normalizer's state carries from run
        to run, so its samples come in order (steps, then rows) and padded positions never reach it.  The
        final h, c of a row is the one after its last active step; padded outputs are zero.
        """
        w_ih, w_hh, b_ih, b_hh, norm, w_hr = self._layer_params(k, sfx)
        xproj = F.linear(x, w_ih, b_ih if b_ih is None or not self.fold_hidden_bias else b_ih + b_hh)
        needs_grad = torch.is_grad_enabled() and (xproj.requires_grad or h0.requires_grad
                                                  or (c0 is not None and c0.requires_grad))
        spec_text = self._spec_text(needs_grad)
        state = norm.state if self.norm_type == "online" else None
        B, h, c = x.shape[1], h0, c0
        outs, ended_h, ended_c = [], [], []  # rows whose sequences ended before a run, latest first
        rows = runs[0][2]
        for t0, t1, n in runs:
            if n < rows:
                rows = n
                ended_h.insert(0, h[n:])
                h = h[:n]
                if c is not None:
                    ended_c.insert(0, c[n:])
                    c = c[:n]
            chunk = xproj[t0:t1] if n == B else xproj[t0:t1, :n].contiguous()
            out, h, c = self._recurrence(spec_text, state, chunk, h, c, w_hh, b_hh, norm, w_hr)
            outs.append(out if n == B else F.pad(out, (0, 0, 0, B - n)))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        h = torch.cat([h, *ended_h]) if ended_h else h
        c = torch.cat([c, *ended_c]) if ended_c else c
        self._warn_if_skipped(out, f"{k}{sfx}")
        return out, h, c

    def _recurrence(self, spec_text, state, xproj, h, c, w_hh, b_hh, norm, w_hr):
        """One call of the recurrence over ``xproj`` (T, n, G*H) from (h, c): (out, h_T, c_T)."""
        backend = _resolve_backend(self.backend, xproj.device, xproj.dtype)  # bf16 under autocast
        gamma, beta = (norm.weight, norm.bias) if norm is not None else (None, None)
        return _recurrence(backend, spec_text, state, xproj, h, c, w_hh, gamma, beta, w_hr)

    def _warn_if_skipped(self, out, k):
        """Once per layer module, in training on CPU (a free check there): non-finite samples were skipped."""
        if (self.training and self.norm_type == "online" and out.device.type == "cpu" and not _tracing()
                and not getattr(self, "_warned_nonfinite", False) and not _all_finite(out)):
            self._warned_nonfinite = True
            warnings.warn(f"{type(self).__name__} layer {k}: non-finite values in the input or state; their "
                          "samples' outputs are non-finite and their updates of the Online Normalization statistics "
                          "were skipped (the statistics stay finite)", RuntimeWarning, stacklevel=4)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm_type!r}"
        if self.cell == "rnn":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class LSTM(_RecurrentLayers):
    """Multi-layer LSTM with normalized gate pre-activations (memory cell unnormalized).

    forward(input, hx=None) -> output, (h_n, c_n) with the shapes of ``torch.nn.LSTM``.
    norm: "online" (default), "layer" or None.  Online Normalization
    hyperparameters default to the paper's PTB LSTM (``OnlineNormConfig()``:
    alpha_fwd = 1 - 2**-13, alpha_bkw = 1 - 2**-5, eps = 1e-5, layer scaling
    per gate, v_decay_min = 1e-5 as in the reference's recurrent experiments);
    pass ``config=OnlineNormConfig(...)`` or the fields as keywords.
    backend: "auto" (default), "torch", "triton" or "cpu" (see ``seqnorm.backend``).
    """

    cell = "lstm"
    gates = 4
    mode = "LSTM"
    torch_class = nn.LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, norm="online", config: OnlineNormConfig | None = None,
                 backend: str = "auto", **config_fields):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                         norm, make_config(config, config_fields), "tanh", backend, device, dtype)

    def forward(self, input, hx=None):
        """input: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or a PackedSequence."""
        x, packing, unbatched = self._to_time_major(input)
        B = x.shape[1]
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("hx must be a tuple (h_0, c_0) for an LSTM")
        h0 = self._initial("h_0", None if hx is None else hx[0], B, unbatched, self.output_size, packing)
        c0 = self._initial("c_0", None if hx is None else hx[1], B, unbatched, self.hidden_size, packing)
        out, h_n, c_n = self._run_layers(x, h0, c0, packing)
        finals = (self._final(h_n, packing, unbatched), self._final(c_n, packing, unbatched))
        return self._from_time_major(out, packing, unbatched, input), finals


class RNN(_RecurrentLayers):
    """Multi-layer Elman RNN (tanh or relu) with a normalized pre-activation.

    forward(input, hx=None) -> output, h_n with the shapes of ``torch.nn.RNN``.
    Online Normalization hyperparameters default to the paper's PTB RNN
    (alpha_fwd = 1 - 2**-14, alpha_bkw = 1 - 2**-7, layer scaling over H).
    backend: "auto" (default), "torch", "triton" or "cpu" (see ``seqnorm.backend``).
    """

    cell = "rnn"
    gates = 1
    torch_class = nn.RNN

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, norm="online", config: OnlineNormConfig | None = None,
                 backend: str = "auto", **config_fields):
        _checks.check_choice("nonlinearity", nonlinearity, tuple(NONLINEARITIES))
        config = make_config(config, config_fields, PAPER_RNN_CONFIG)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, norm,
                         config, nonlinearity, backend, device, dtype)
        self.mode = f"RNN_{nonlinearity.upper()}"

    def forward(self, input, hx=None):
        """input: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or a PackedSequence."""
        x, packing, unbatched = self._to_time_major(input)
        h0 = self._initial("h_0", hx, x.shape[1], unbatched, self.hidden_size, packing)
        out, h_n, _ = self._run_layers(x, h0, None, packing)
        return self._from_time_major(out, packing, unbatched, input), self._final(h_n, packing, unbatched)


class GRU(_RecurrentLayers):
    """Multi-layer GRU with normalized gate pre-activations (r, z and the argument of n's tanh; h unnormalized).

    forward(input, hx=None) -> output, h_n with the shapes of ``torch.nn.GRU``; parameters and gate layout
    (r, z, n) as torch.nn's.  One normalizer of 3H features per layer and direction (``seqnorm.cells``,
    docs/gru.md).  Online Normalization hyperparameters default to ``OnlineNormConfig()``.
    ``backend``: "cpu" and "triton" run each layer direction through the custom op ``seqnorm::recurrence`` on the
    C kernels (float32 CPU tensors; the time loop in C, as for the LSTM) or the Triton kernels; "torch" runs the
    steps through autograd (any device and dtype; double backward); "auto" picks as for the LSTM.
    """

    cell = "gru"
    gates = 3
    mode = "GRU"
    torch_class = nn.GRU
    fold_hidden_bias = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, norm="online", config: OnlineNormConfig | None = None, backend: str = "auto",
                 **config_fields):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, norm,
                         make_config(config, config_fields), "tanh", backend, device, dtype)

    def _recurrence(self, spec_text, state, xproj, h, c, w_hh, b_hh, norm, w_hr):
        backend = _resolve_backend(self.backend, xproj.device, xproj.dtype)
        if backend in ("cpu", "triton"):
            gamma, beta = (norm.weight, norm.bias) if norm is not None else (None, None)
            return ops.run(spec_text, backend, state, xproj, h, None, w_hh, gamma, beta, None, b_hh)
        outs = []  # the torch path: per-step autograd
        for gi in xproj.unbind(0):
            h = gru_step(gi, F.linear(h, w_hh, b_hh), h, norm, self.hidden_size)
            outs.append(h)
        return torch.stack(outs), h, None

    def forward(self, input, hx=None):
        """input: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or a PackedSequence."""
        x, packing, unbatched = self._to_time_major(input)
        h0 = self._initial("h_0", hx, x.shape[1], unbatched, self.hidden_size, packing)
        out, h_n, _ = self._run_layers(x, h0, None, packing)
        return self._from_time_major(out, packing, unbatched, input), self._final(h_n, packing, unbatched)
