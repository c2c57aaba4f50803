"""The recurrence of one layer as the torch custom op ``seqnorm::recurrence``, with its backward op.

Registered with ``torch.library.custom_op`` (a fake implementation for
shapes, and autograd through ``seqnorm::recurrence_backward``), so that
``torch.compile(fullgraph=True)``, ``torch.export`` and ``torch.jit.trace``
see one opaque operator per layer and direction instead of Python loops over
data pointers.  The fused backends (``"cpu"``, ``"triton"``) always run
through it; the eager ``"torch"`` path keeps its autograd Function
(``sequence.RecurrenceFunction``, which holds its step objects for the
backward) and uses the op only under a tracer, where its backward recomputes
the forward from the saved pre-call statistics.

An op may not mutate the inputs it differentiates, so the Online
Normalization state goes in as tensors and comes out as new tensors (the
forward's mu and var, the backward's u and v); the layer (forward) and this
module's autograd formula (backward) copy them into the buffers, in the order
of docs/design.md §2.  Absent optional results come back as empty tensors.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import torch
from torch import Tensor

from .norms import OnlineNormConfig
from .online_norm import OnlineNormState
from .sequence import RecurrenceSpec, torch_backward, torch_forward


def _cpu_step():
    from .kernels.cpu_step import CPUStep

    return CPUStep


def _triton_step():
    from .kernels.step import TritonStep

    return TritonStep


# what makes a fused backend's step launcher (imported at first use); tests swap in other launch geometries
STEP_FACTORIES = {"cpu": _cpu_step, "triton": _triton_step}


def encode_spec(spec: RecurrenceSpec) -> str:
    """The spec as the op's string argument (ops take no Python objects)."""
    fields = dataclasses.asdict(spec)
    return json.dumps(fields, sort_keys=True)


@functools.lru_cache(maxsize=256)
def decode_spec(text: str) -> RecurrenceSpec:
    fields = json.loads(text)
    return RecurrenceSpec(**{**fields, "config": OnlineNormConfig(**fields["config"])})


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _shapes(spec: RecurrenceSpec, xproj: Tensor, h0: Tensor, backend: str, has_proj: bool, mu: Optional[Tensor]):
    """(shape, dtype) of each forward output: h_all, c_all, new mu, new var, then what the backward keeps."""
    T, B, GH = xproj.shape
    H, P, x_dt = spec.hidden_size, h0.shape[-1], xproj.dtype
    lstm, online = spec.cell == "lstm", spec.norm == "online"
    f32 = torch.float32
    state = [(tuple(mu.shape), mu.dtype)] * 2 if mu is not None else [((0,), f32)] * 2
    if backend == "torch":
        dt = torch.promote_types(x_dt, f32)
        c_all = ((B, H), dt) if lstm else ((0,), dt)  # the torch path keeps only the last cell
        return [((T + 1, B, P), x_dt), c_all, *state, *state]  # saved: the statistics before the call
    normed, ls = spec.norm is not None, online and spec.config.ecm == "ls"
    one = ((1,), f32)
    cells = {"lstm": ((T + 1, B, H), f32), "gru": ((T, B, H), f32)}  # the LSTM's cell; the GRU's W_hn h + b_hn
    kept = T if spec.saves else 1  # inference: one step's scratch
    return [((T + 1, B, P), x_dt), cells.get(spec.cell, one), *state,
            ((T, B, H), x_dt) if has_proj else one, ((kept, B, GH), f32), ((kept, B, GH), f32) if normed else one,
            ((kept, B, GH), f32) if normed else one, ((kept, B, spec.gates), f32) if ls else one]


@torch.library.custom_op("seqnorm::recurrence", mutates_args=())
def recurrence(xproj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor, gamma: Optional[Tensor],
               beta: Optional[Tensor], w_hr: Optional[Tensor], mu: Optional[Tensor], var: Optional[Tensor],
               u: Optional[Tensor], v: Optional[Tensor], spec: str, backend: str,
               b_hh: Optional[Tensor]) -> list[Tensor]:
    """-> [h_all (T+1,B,P), c_all, mu', var', *saved]: h_all[0] = h0, mu'/var' the statistics after the call.

    ``u``, ``v``: the control state the backward starts from (read there, when it runs, not here).
    ``b_hh``: the GRU's hidden bias (r multiplies b_hn, so it cannot join xproj); None for the LSTM and RNN,
    whose layers fold it into xproj.  For the GRU, c_all holds each step's W_hn h + b_hn.
    """
    s = decode_spec(spec)
    online = s.norm == "online" and mu is not None
    new_mu, new_var = (mu.clone(), var.clone()) if mu is not None else (_empty(xproj).float(), _empty(xproj).float())
    if s.cell == "gru":
        _check_gru_backend(backend)
        from .kernels.recurrence import gru_forward

        h_all, *rest = gru_forward(s, xproj, h0, w_hh, b_hh, gamma, beta, new_mu, new_var, STEP_FACTORIES[backend]())
        one = torch.empty(1, dtype=torch.float32, device=xproj.device)
        return [h_all, rest[0], new_mu, new_var, one, *rest[1:]]
    if backend == "torch":
        state = OnlineNormState(new_mu, new_var, None, None) if online else None
        _, cell, h_all, _, _, _ = torch_forward(s, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)
        c_last = cell.final_cell()
        c_out = c_last.clone() if c_last is not None else _empty(h_all)
        before = [mu.clone(), var.clone()] if mu is not None else [new_mu.clone(), new_var.clone()]
        return [h_all.to(xproj.dtype), c_out, new_mu, new_var, *before]
    from .kernels.recurrence import fused_forward

    saved = fused_forward(s, xproj, h0, c0, w_hh, gamma, beta, w_hr, new_mu, new_var, STEP_FACTORIES[backend]())
    h_all, m_all, c_all, *rest = saved
    m_out = m_all if w_hr is not None else torch.empty(1, dtype=torch.float32, device=xproj.device)
    return [h_all, c_all, new_mu, new_var, m_out, *rest]


def _check_gru_backend(backend: str) -> None:
    if backend not in STEP_FACTORIES:
        raise NotImplementedError(f"seqnorm::recurrence runs the GRU on the fused backends ({', '.join(STEP_FACTORIES)})"
                                  f"; the GRU's torch path is per-step autograd outside the op, got {backend!r}")


@recurrence.register_fake
def _(xproj, h0, c0, w_hh, gamma, beta, w_hr, mu, var, u, v, spec, backend, b_hh):
    return [xproj.new_empty(shape, dtype=dt) for shape, dt in _shapes(decode_spec(spec), xproj, h0, backend,
                                                                       w_hr is not None, mu)]


@torch.library.custom_op("seqnorm::recurrence_backward", mutates_args=())
def recurrence_backward(d_h_all: Tensor, d_c_last: Tensor, xproj: Tensor, h0: Tensor, c0: Optional[Tensor],
                        w_hh: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor], w_hr: Optional[Tensor],
                        outputs: list[Tensor], u: Optional[Tensor], v: Optional[Tensor], spec: str,
                        backend: str, b_hh: Optional[Tensor]) -> list[Tensor]:
    """-> [d_xproj, d_h0, d_c0, d_w_hh, d_gamma, d_beta, d_w_hr, u', v', d_b_hh] (empty where absent)."""
    s = decode_spec(spec)
    online_training = s.norm == "online" and s.training and u is not None
    new_u, new_v = (u.clone(), v.clone()) if online_training else (None, None)
    d_out, d_cn = d_h_all[1:], (d_c_last if s.cell == "lstm" and d_c_last.numel() else None)
    d_b_hh = None
    if s.cell == "gru":
        _check_gru_backend(backend)
        from .kernels.recurrence import gru_backward

        h_all, ghn_all, _, _, _, *rest = outputs
        d_pre, d_h0, d_w, d_gamma, d_beta, d_b_hh = gru_backward(s, (h_all, ghn_all, *rest), d_out, w_hh, gamma, beta,
                                                                 new_u, new_v, STEP_FACTORIES[backend]())
        grads = (d_pre, d_h0, None, d_w, d_gamma, d_beta, None)
    elif backend == "torch":
        mu, var = outputs[4].clone(), outputs[5].clone()
        state = OnlineNormState(mu, var, new_u, new_v) if s.norm == "online" and mu.numel() else None
        forward = torch_forward(s, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)
        grads = torch_backward(s, forward, d_out, None, d_cn)
    else:
        from .kernels.recurrence import fused_backward

        h_all, c_all, _, _, m_out, *rest = outputs
        saved = (h_all, h_all[1:] if w_hr is None else m_out, c_all, *rest)
        grads = fused_backward(s, saved, d_out, None, d_cn, w_hh, gamma, beta, w_hr, new_u, new_v,
                               STEP_FACTORIES[backend]())
    inputs = (xproj, h0, c0, w_hh, gamma, beta, w_hr)  # xproj: its dtype (the fused backward needs no values)
    result = [_empty(h0) if g is None else g.to(x.dtype).contiguous() for g, x in zip(grads, inputs)]
    state = [new_u, new_v] if online_training else [_empty(h0).float(), _empty(h0).float()]
    return result + state + [_empty(h0) if d_b_hh is None or b_hh is None else d_b_hh.to(b_hh.dtype)]


@recurrence_backward.register_fake
def _(d_h_all, d_c_last, xproj, h0, c0, w_hh, gamma, beta, w_hr, outputs, u, v, spec, backend, b_hh):
    s = decode_spec(spec)
    T, B = d_h_all.shape[0] - 1, d_h_all.shape[1]
    d_xproj = xproj.new_empty(T, B, w_hh.shape[0])
    grads = [d_xproj] + [torch.empty_like(x) if x is not None else _empty(h0) for x in (h0, c0, w_hh, gamma, beta, w_hr)]
    online_training = s.norm == "online" and s.training and u is not None
    state = [torch.empty_like(u), torch.empty_like(v)] if online_training else [_empty(h0).float(), _empty(h0).float()]
    return grads + state + [_empty(h0) if b_hh is None else torch.empty_like(b_hh)]


def _setup_context(ctx, inputs, output):
    xproj, h0, c0, w_hh, gamma, beta, w_hr, mu, var, u, v, spec, backend, b_hh = inputs
    ctx.spec, ctx.backend = spec, backend
    ctx.set_materialize_grads(False)  # the saved outputs get no gradient: no zero-filled (T, B, 4H) buffers
    ctx.state = (u, v) if u is not None else None  # not saved tensors: the backward of a later call changes them
    ctx.dtypes = [None if t is None else t.dtype for t in (xproj, h0, c0, w_hh, gamma, beta, w_hr)]
    ctx.b_hh_dtype = None if b_hh is None else b_hh.dtype
    kept = xproj if backend == "torch" else xproj.new_empty(0)  # the fused backward needs only its dtype
    ctx.save_for_backward(kept, h0, c0, w_hh, gamma, beta, w_hr, b_hh, *output)


def _backward(ctx, grads):
    if torch.is_grad_enabled():
        raise RuntimeError(f"double backward (create_graph=True) is not supported by backend={ctx.backend!r}: "
                           "use backend='torch'")
    d_h_all, d_c = grads[0], grads[1]
    xproj, h0, c0, w_hh, gamma, beta, w_hr, b_hh, *outputs = ctx.saved_tensors
    lstm = decode_spec(ctx.spec).cell == "lstm"
    if d_c is None or not lstm:
        d_c_last = h0.new_empty(0)
    else:
        d_c_last = d_c if ctx.backend == "torch" else d_c[-1]  # the fused forward returns every step's cell
    if d_h_all is None:
        d_h_all = torch.zeros_like(outputs[0])
    u, v = ctx.state if ctx.state is not None else (None, None)
    *d_inputs, new_u, new_v, d_b_hh = torch.ops.seqnorm.recurrence_backward(
        d_h_all, d_c_last, xproj, h0, c0, w_hh, gamma, beta, w_hr, outputs, u, v, ctx.spec, ctx.backend, b_hh)
    if u is not None and new_u.numel():
        with torch.no_grad():
            u.copy_(new_u)
            v.copy_(new_v)
    # empty: no such input, or one this spec ignores (gamma, beta without a norm); inputs are never empty
    d_inputs = [None if dt is None or not d.numel() else d.to(dt) for d, dt in zip(d_inputs, ctx.dtypes)]
    d_b_hh = None if ctx.b_hh_dtype is None or not d_b_hh.numel() else d_b_hh.to(ctx.b_hh_dtype)
    return (*d_inputs, None, None, None, None, None, None, d_b_hh)


recurrence.register_autograd(_backward, setup_context=_setup_context)


def run(spec_text: str, backend: str, state, xproj, h0, c0, w_hh, gamma, beta, w_hr, b_hh=None):
    """One layer direction through the op: (out (T,B,P), h_T, c_T or None); the statistics copied into
    ``state`` (an OnlineNormState, or None) as the forward leaves them."""
    mu, var, u, v = (state.mu, state.var, state.u, state.v) if state is not None else (None,) * 4
    h_all, c_all, new_mu, new_var, *_ = torch.ops.seqnorm.recurrence(
        xproj, h0, c0, w_hh, gamma, beta, w_hr, mu, var, u, v, spec_text, backend, b_hh)
    if state is not None:  # passed through unchanged by other norms
        with torch.no_grad():
            mu.copy_(new_mu)
            var.copy_(new_var)
    if c0 is None:
        return h_all[1:], h_all[-1], None
    c_last = c_all if backend == "torch" else c_all[-1]
    return h_all[1:], h_all[-1], c_last.to(xproj.dtype)
