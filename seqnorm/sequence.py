"""The whole recurrence of one layer as one autograd Function (torch path).

Input projections are computed outside for all steps in one matmul; this
Function runs the recurrence h[t] = cell(norm(xproj[t] + h[t-1] W_hh^T)) and
its hand-written backward in reverse time order.  It must equal per-step
autograd through ``seqnorm.cells`` exactly, including the Online Normalization
state: the forward processes the rows of step t (in row order) before those
of step t+1, and the backward runs the control process for step T-1 first,
rows 0..B-1 within each step, as per-step autograd calls would.

Each step is a normalizer step and a cell step (``seqnorm.steps``), each with
its forward and backward.

Non-finite samples (docs/design.md §2, as in ``online_norm``): an update of a
feature's state whose result is not finite is skipped.  The fast online step
scans a step's rows with small matmuls, where one NaN row spoils every row,
so when the state at the end of the forward (or backward) is not finite, the
pass is run again with ``safe=True``: the same equations one row at a time,
skipping such updates.
"""
from dataclasses import dataclass

import torch

from .cells import NONLINEARITIES
from .ecm import apply_ecm
from .norms import OnlineNormConfig
from .online_norm import control_rows, forward_rows
from .steps import NORM_STEPS, LSTMStep, RNNStep, step_views


@dataclass(frozen=True)
class RecurrenceSpec:
    """What one layer computes; hashable, passed to the Function as a constant."""

    cell: str  # "lstm" | "rnn"
    norm: str | None  # "online" | "layer" | None
    hidden_size: int
    config: OnlineNormConfig
    nonlinearity: str = "tanh"
    training: bool = True
    saves: bool = True  # False: inference (eval, no autograd): the fused forward keeps nothing for a backward

    @property
    def gates(self) -> int:
        return {"lstm": 4, "gru": 3}.get(self.cell, 1)


def _forward_pass(spec, state, xp, h0, c0, w, g, b, w_hr, safe):
    """All T steps; returns the normalizer and cell steps (holding what the backward needs), h (T+1, B, P) and,
    with a projection (LSTM proj_size P), m = o * tanh(c) (T, B, H) with h = m W_hr^T; else m is None."""
    T, B, _ = xp.shape
    dtype, device = xp.dtype, xp.device
    norm = NORM_STEPS[spec.norm](spec, state, g, b, T, B, dtype, device, safe)
    if spec.cell == "lstm":
        cell = LSTMStep(spec.hidden_size, T, B, dtype, device, c0.to(dtype))
    else:
        cell = RNNStep(spec.hidden_size, T, B, dtype, device, spec.nonlinearity)
    h_all = torch.empty(T + 1, B, h0.shape[-1], dtype=dtype, device=device)
    h_all[0] = h0
    m_all = None if w_hr is None else torch.empty(T, B, spec.hidden_size, dtype=dtype, device=device)
    h_steps, xp_steps, w_t = step_views(h_all), step_views(xp), w.t()
    for t in range(T):
        torch.addmm(xp_steps[t], h_steps[t], w_t, out=norm.pre_buffer(t))
        if w_hr is None:
            cell.forward(norm.forward(t), t, h_steps[t + 1])
        else:
            cell.forward(norm.forward(t), t, m_all[t])
            torch.mm(m_all[t], w_hr.t(), out=h_steps[t + 1])
    return norm, cell, h_all, m_all


def _backward_pass(norm, cell, w, w_hr, d_out_steps, d_hn, d_cn, T, B, H, P, dtype, device, safe):
    """Steps T-1..0; returns dL/dpre (T, B, G*H), dL/dh0 and, with a projection, dL/dh of every step (T, B, P)."""
    dh = torch.zeros(B, P, dtype=dtype, device=device) if d_hn is None else d_hn.to(dtype).clone()
    dc = torch.zeros(B, H, dtype=dtype, device=device) if d_cn is None else d_cn.to(dtype)
    norm.start_backward(B, safe)
    cell.start_backward(dc)
    d_pre = torch.empty(T, B, w.shape[0], dtype=dtype, device=device)
    d_pre_steps = step_views(d_pre)
    dh_all = None if w_hr is None else torch.empty(T, B, P, dtype=dtype, device=device)
    for t in range(T - 1, -1, -1):
        if d_out_steps is not None:
            dh.add_(d_out_steps[t])
        dm = dh
        if w_hr is not None:  # h = m W_hr^T
            dh_all[t].copy_(dh)
            dm = dh @ w_hr
        norm.backward(cell.backward(dm, t), t, d_pre_steps[t])
        torch.mm(d_pre_steps[t], w, out=dh)
    return d_pre, dh, dh_all


def torch_forward(spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr):
    """All T steps (state.mu, state.var updated in place); returns what ``torch_backward`` needs."""
    dtype = torch.promote_types(xproj.dtype, torch.float32)
    xp, w = xproj.to(dtype), w_hh.to(dtype)
    g, b = (None, None) if gamma is None else (gamma.to(dtype), beta.to(dtype))
    wr = None if w_hr is None else w_hr.to(dtype)
    norm, cell, h_all, m_all = _forward_pass(spec, state, xp, h0, c0, w, g, b, wr, safe=False)
    if not norm.state_finite():  # a non-finite sample: again, row by row, skipping its updates
        norm, cell, h_all, m_all = _forward_pass(spec, state, xp, h0, c0, w, g, b, wr, safe=True)
    norm.finish_forward()
    return norm, cell, h_all, m_all, w, wr


def torch_backward(spec, forward, d_out, d_hn, d_cn):
    """Steps T-1..0 (state.u, state.v updated in place); dL/d(xproj, h0, c0, w_hh, gamma, beta, w_hr) in the
    compute dtype, None where there is no such input."""
    norm, cell, h_all, m_all, w, w_hr = forward
    T, B, P, H = h_all.shape[0] - 1, h_all.shape[1], h_all.shape[2], spec.hidden_size
    args = (norm, cell, w, w_hr, None if d_out is None else step_views(d_out.to(h_all.dtype)), d_hn, d_cn, T, B, H, P,
            h_all.dtype, h_all.device)
    d_pre, dh, dh_all = _backward_pass(*args, safe=False)
    if not norm.control_finite():
        d_pre, dh, dh_all = _backward_pass(*args, safe=True)
    norm.finish_backward()
    d_w = torch.mm(d_pre.view(T * B, -1).t(), h_all[:-1].reshape(T * B, P))
    d_w_hr = None if w_hr is None else torch.mm(dh_all.view(T * B, P).t(), m_all.view(T * B, H))
    d_gamma, d_beta = norm.param_grads()
    return d_pre, dh, cell.initial_cell_grad(), d_w, d_gamma, d_beta, d_w_hr


class RecurrenceFunction(torch.autograd.Function):
    """(spec, state, xproj (T,B,G*H), h0 (B,P), c0 (B,H) or None, w_hh (G*H,P), gamma, beta, w_hr (P,H) or None)
    -> out (T,B,P), h_T, c_T.  P = H without a projection (w_hr None).  The eager torch path: what the
    backward needs stays in the step objects; traced, ``seqnorm.ops`` runs the same two functions.
    With ``create_graph=True`` the backward is ``_graphed_backward`` (double backward)."""

    @staticmethod
    def forward(ctx, spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr):
        online = spec.norm == "online" and spec.training
        ctx.before = (state.mu.clone(), state.var.clone()) if online else None  # for a double backward
        ctx.spec, ctx.forward = spec, torch_forward(spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr)
        ctx.dtypes = [None if t is None else t.dtype for t in (xproj, h0, c0, w_hh, gamma, beta, w_hr)]
        ctx.state = state
        ctx.save_for_backward(xproj, h0, c0, w_hh, gamma, beta, w_hr)
        h_all, cell = ctx.forward[2], ctx.forward[1]
        c_last = cell.final_cell()
        return h_all[1:].to(xproj.dtype), h_all[-1].to(xproj.dtype), None if c_last is None else c_last.to(xproj.dtype)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        if getattr(ctx, "graphed", False):  # a higher-order pass reaching this forward's output
            return (None, None, *_exact_backward(ctx, d_out, d_hn, d_cn))
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            ctx.graphed = True
            return (None, None, *_graphed_backward(ctx, d_out, d_hn, d_cn))
        grads = torch_backward(ctx.spec, ctx.forward, d_out, d_hn, d_cn)
        return (None, None, *(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)))


def _normalized_step(spec, y, cell, gamma, beta, w_hr, frozen=None):
    """From the normalizer's input side to the new (h, c): y is the Online Normalization output (online,
    training), else the pre-activation (normalized here: ``frozen`` = (mu, rstd) in eval, layer norm).
    Affine, ECM (online), gates, cell, projection."""
    c, H, G = spec.config, spec.hidden_size, spec.gates
    z = y
    if frozen is not None:
        z = (z - frozen[0]) * frozen[1]  # eq. 8a with the running statistics
    if spec.norm == "layer":
        z = torch.nn.functional.layer_norm(z.view(-1, G, H), (H,), eps=c.eps).view_as(z)
    if spec.norm is not None and gamma is not None:
        z = z * gamma + beta
    if spec.norm == "online":
        z = apply_ecm(z, c.ecm, H, c.ls_eps, c.clamp_value)  # eq. 9 per gate, or clamping
    if spec.cell == "rnn":
        return NONLINEARITIES[spec.nonlinearity](z), None
    i, f, g, o = z.chunk(4, -1)
    cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(cell)
    return (h if w_hr is None else h @ w_hr.t()), cell


def _plain_steps(ctx, inputs):
    """The training forward again in plain ops (exact graph, from the statistics it started from):
    per step (h_prev, c_prev, c_in, y, s, params, h, c), where c_in and params are this step's own aliases of
    c_prev and (gamma, beta, w_hr), so that a per-step autograd.grad reaches only this step's use of them."""
    spec, c = ctx.spec, ctx.spec.config
    xproj, h0, c0, w_hh, gamma, beta, w_hr = inputs
    online, frozen = spec.norm == "online" and spec.training, None
    if online:
        mu, var = ctx.before
    elif spec.norm == "online":  # eval: frozen statistics
        frozen = (ctx.state.mu.to(xproj.dtype, copy=True), torch.rsqrt(ctx.state.var.to(xproj.dtype) + c.eps))
    steps, h, cell = [], h0, c0
    for x_t in xproj.unbind(0):
        y, s = x_t + h @ w_hh.t(), None
        if online:
            y, s, mu, var = forward_rows(y.unsqueeze(-1), mu.to(y.dtype), var.to(y.dtype), c.alpha_fwd, c.eps)
            y = y.squeeze(-1)
        params = [None if q is None else q.view_as(q) for q in (gamma, beta, w_hr)]
        c_in = None if cell is None else cell.view_as(cell)
        h_new, c_new = _normalized_step(spec, y, c_in, *params, frozen=frozen)
        steps.append((h, cell, c_in, y, s, params, h_new, c_new))
        h, cell = h_new, c_new
    return steps


def _exact_backward(ctx, d_out, d_hn, d_cn):
    """The exact vector-Jacobian product of this layer's forward (a higher-order pass); moves no state."""
    inputs = ctx.saved_tensors
    with torch.enable_grad():
        steps = _plain_steps(ctx, inputs)
        out = torch.stack([st[6] for st in steps])
        pairs = [(o, g) for o, g in ((out, d_out), (steps[-1][6], d_hn), (steps[-1][7], d_cn))
                 if o is not None and g is not None]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         create_graph=torch.is_grad_enabled(), allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


def _graphed_backward(ctx, d_out, d_hn, d_cn):
    """The first-order backward (create_graph=True) as plain ops that autograd can differentiate again.

    The forward is recomputed with its exact graph (``_plain_steps``); then steps T-1..0: autograd through
    the step's own affine, ECM and cell gives dL/dy, and Online Normalization's control process (eqs. 11-12,
    u and v carried as graph tensors) turns it into dL/dpre, as the hand-written backward does; the buffers
    u, v end where that backward would leave them."""
    spec, c = ctx.spec, ctx.spec.config
    inputs = ctx.saved_tensors
    xproj, h0, c0, w_hh, gamma, beta, w_hr = inputs
    lstm, online = spec.cell == "lstm", spec.norm == "online" and spec.training
    steps = _plain_steps(ctx, inputs)
    u, v = (ctx.state.u.to(xproj.dtype, copy=True), ctx.state.v.to(xproj.dtype, copy=True)) if online else (None, None)
    dh = torch.zeros_like(h0) if d_hn is None else d_hn
    dc = (torch.zeros_like(c0) if d_cn is None else d_cn) if lstm else None
    d_pre, d_w, d_params = [], torch.zeros_like(w_hh), [None, None, None]
    for t in range(len(steps) - 1, -1, -1):
        h_prev, _, c_in, y, s, params, h_t, c_t = steps[t]
        if d_out is not None:
            dh = dh + d_out[t]
        outs, grads = ([h_t, c_t], [dh, dc]) if lstm else ([h_t], [dh])
        used = [q for q in params if q is not None and q.requires_grad]
        c_wanted = lstm and c_in.requires_grad  # not at step 0 when c0 needs no gradient
        found = list(torch.autograd.grad(outs, [y] + ([c_in] if c_wanted else []) + used, grads, create_graph=True,
                                         allow_unused=True))
        dy = found.pop(0)
        if lstm:
            dc = found.pop(0) if c_wanted else None
        for k, q in enumerate(params):
            if q is not None and q.requires_grad:
                g = found.pop(0)
                if g is not None:
                    d_params[k] = g if d_params[k] is None else d_params[k] + g
        if online:
            dp, u, v = control_rows(dy.unsqueeze(-1), y.unsqueeze(-1), s, u, v, c.alpha_bkw, c.v_decay_min)
            dp = dp.squeeze(-1)
        else:
            dp = dy
        d_pre.append(dp)
        d_w = d_w + dp.t() @ h_prev
        dh = dp @ w_hh
    if online:
        with torch.no_grad():
            ctx.state.u.copy_(u)
            ctx.state.v.copy_(v)
    return torch.stack(d_pre[::-1]), dh, dc, d_w, *d_params


def plain_recurrence(spec, state, xproj, h0, c0, w_hh, gamma, beta, w_hr):
    """Inference (frozen statistics) in plain differentiable ops, one step after another: what an ONNX export
    records (every step unrolled, no custom op).  Same (out, h_T, c_T) as the eval forward above."""
    h, cell, outs, frozen = h0, c0, [], None
    if spec.norm == "online":
        frozen = (state.mu.to(xproj.dtype), torch.rsqrt(state.var.to(xproj.dtype) + spec.config.eps))
    for x_t in xproj.unbind(0):
        h, cell = _normalized_step(spec, x_t + h @ w_hh.t(), cell, gamma, beta, w_hr, frozen)
        outs.append(h)
    return torch.stack(outs), h, cell
