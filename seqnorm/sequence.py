"""The whole recurrence of one layer as one autograd Function (torch path).

Input projections are computed outside for all steps in one matmul; this
Function runs the recurrence h[t] = cell(norm(xproj[t] + h[t-1] W_hh^T)) and
its hand-written backward in reverse time order.  It must equal per-step
autograd through ``seqnorm.cells`` exactly, including the Online Normalization
state: the forward processes the rows of step t (in row order) before those
of step t+1, and the backward runs the control process for step T-1 first,
rows 0..B-1 within each step, as per-step autograd calls would.

Each step is split in two parts with a forward and a backward each: a
normalizer step (``_OnlineStep``, ``_LayerStep``, ``_NoNorm``; affine and,
for online, the ECM included) and a cell step (``_LSTMStep``, ``_RNNStep``).
On CPU the cost is the number of small ops per time step, so the steps write
into preallocated buffers (``out=``), and everything that depends only on
saved forward values is computed for all T at once when the backward starts.

Non-finite samples (docs/design.md §2, as in ``online_norm``): an update of a
feature's state whose result is not finite is skipped.  The fast online step
scans a step's rows with small matmuls, where one NaN row spoils every row,
so when the state at the end of the forward (or backward) is not finite, the
pass is run again with ``safe=True``: the same equations one row at a time,
skipping such updates.
"""
from dataclasses import dataclass

import torch

from . import scan
from .cells import NONLINEARITIES
from .ecm import apply_ecm
from .norms import OnlineNormConfig
from .online_norm import all_finite, control_rows, forward_rows


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


def _steps(t: torch.Tensor) -> tuple:
    """Per-step views of a (T, ...) buffer, made once instead of once per index."""
    return t.unbind(0)


# --- normalizer steps: pre-activation -> z (what the nonlinearities see) -----


class _Affine:
    """a = gamma * y + beta; keeps dL/da of every step for the parameter grads."""

    def __init__(self, gamma, beta, y_all):
        self.gamma, self.beta, self.y_all = gamma, beta, y_all
        self.da_all = torch.empty_like(y_all) if gamma is not None else None
        self.da_steps = _steps(self.da_all) if gamma is not None else None

    def forward(self, y):
        return y if self.gamma is None else torch.addcmul(self.beta, y, self.gamma)

    def grad_out(self, t):
        """Where the ECM backward may write dL/da of step t (None: anywhere)."""
        return None if self.gamma is None else self.da_steps[t]

    def backward(self, da, t):
        if self.gamma is None:
            return da
        if da.data_ptr() != self.da_steps[t].data_ptr():
            self.da_steps[t].copy_(da)
        return da * self.gamma

    def param_grads(self):
        if self.gamma is None:
            return None, None
        return (self.da_all * self.y_all).sum((0, 1)), self.da_all.sum((0, 1))


class _OnlineStep:
    """docs/design.md §2 on the B rows of each step, then affine and ECM (per gate).

    The row recurrences of one step are small matmuls with the constant
    matrices of ``scan.const_matrix``: [mu; x] -> mu before each row and after
    the last.  ``pre_buffer`` is row 1.. of that [mu; x] block, so the recurrent
    matmul writes the pre-activation straight into place.
    """

    def __init__(self, spec, state, gamma, beta, T, B, dtype, device, safe=False):
        c = self.cfg = spec.config
        self.state, self.H, self.training, self.G, self.safe_rows = state, spec.hidden_size, spec.training, spec.gates, safe
        C = spec.gates * spec.hidden_size
        new = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        self.y_all = new(T, B, C)
        self.y_steps = _steps(self.y_all)
        self.affine = _Affine(gamma, beta, self.y_all)
        self.x_block, self.v_block = new(B + 1, C), new(B + 1, C)  # [mu; x] and [var; d^2]
        self.x_block[0], self.v_block[0] = state.mu, state.var
        self.mu_all, self.var_all, self.d = new(B + 1, C), new(B + 1, C), new(B, C)
        # views used every step, made once: rows 1.. of the blocks, before-row and final states
        self.x_rows, self.d2_rows = self.x_block[1:], self.v_block[1:]
        self.mu_before, self.var_before = self.mu_all[:-1], self.var_all[:-1]
        self.mu_first, self.mu_last = self.x_block[0], self.mu_all[-1]
        self.var_first, self.var_last = self.v_block[0], self.var_all[-1]
        if self.training:
            self.m_mu = scan.const_matrix(c.alpha_fwd, 1 - c.alpha_fwd, B, dtype, device)  # eq. 8b
            self.m_var = scan.const_matrix(c.alpha_fwd, c.alpha_fwd * (1 - c.alpha_fwd), B, dtype, device)  # eq. 8c
            self.rstd_all = new(T, B, C)
            self.rstd_steps = _steps(self.rstd_all)
        else:
            self.frozen_rstd = torch.rsqrt(state.var.to(dtype) + c.eps)
        if c.ecm == "ls":
            self.inv_zeta = new(T, B, spec.gates)
            self.inv_zeta_steps = _steps(self.inv_zeta)
        if c.ecm == "ac":
            self.mask_all = torch.empty(T, B, C, dtype=torch.bool, device=device)
            self.mask_steps = _steps(self.mask_all)

    def pre_buffer(self, t):
        return self.x_rows

    def forward(self, t):
        c, pre, y = self.cfg, self.x_rows, self.y_steps[t]
        if self.training and self.safe_rows:
            self._forward_rows(t)
        elif self.training:
            torch.mm(self.m_mu, self.x_block, out=self.mu_all)  # mean before each row (eq. 8b)
            d = torch.sub(pre, self.mu_before, out=self.d)
            torch.mul(d, d, out=self.d2_rows)
            torch.mm(self.m_var, self.v_block, out=self.var_all)  # variance before each row (eq. 8c)
            rstd = torch.add(self.var_before, c.eps, out=self.rstd_steps[t]).rsqrt_()
            torch.mul(d, rstd, out=y)  # eq. 8a
            self.mu_first.copy_(self.mu_last)
            self.var_first.copy_(self.var_last)
        else:
            torch.mul(pre - self.mu_first, self.frozen_rstd, out=y)
        a = self.affine.forward(y)
        if c.ecm == "ls":  # eq. 9, per gate
            grouped = a.view(a.shape[0], self.G, self.H)
            inv = torch.linalg.vecdot(grouped, grouped, out=self.inv_zeta_steps[t])
            inv.mul_(1.0 / self.H).add_(c.ls_eps).rsqrt_()
            return (grouped * inv.unsqueeze(-1)).view_as(a)
        if c.ecm == "ac":
            torch.lt(a.abs(), c.clamp_value, out=self.mask_steps[t])
            return a.clamp(-c.clamp_value, c.clamp_value)
        return a

    def _forward_rows(self, t):
        """Eq. 8 one row at a time; an update whose result is not finite is skipped (per feature)."""
        a, eps, mu, var = self.cfg.alpha_fwd, self.cfg.eps, self.mu_first, self.var_first
        rstd, y = self.rstd_steps[t], self.y_steps[t]
        for b, x in enumerate(self.x_rows):
            torch.add(var, eps, out=rstd[b]).rsqrt_()
            d = x - mu
            torch.mul(d, rstd[b], out=y[b])
            new_mu, new_var = mu + (1 - a) * d, a * var + a * (1 - a) * d * d
            ok = torch.isfinite(new_mu) & torch.isfinite(new_var)
            mu.copy_(torch.where(ok, new_mu, mu))
            var.copy_(torch.where(ok, new_var, var))

    def state_finite(self) -> bool:
        return not self.training or all_finite(self.x_block[0], self.v_block[0])

    def finish_forward(self):
        if self.training:
            self.state.mu.copy_(self.x_block[0])
            self.state.var.copy_(self.v_block[0])

    def start_backward(self, B, safe=False):
        c, self.safe_control = self.cfg, safe
        if c.ecm == "ls":  # z and z / zeta for eq. 10, all steps at once
            a = self.affine.forward(self.y_all).view(self.y_all.shape[:2] + (self.G, self.H))
            iz = self.inv_zeta.unsqueeze(-1)
            z = a * iz
            self.z_steps, self.zi_steps, self.iz_steps = _steps(z), _steps(z * iz), _steps(iz)
            self.dot = self.inv_zeta.new_empty(self.inv_zeta.shape[1:])
        if not self.training:
            return
        beta, dtype, device = 1 - c.alpha_bkw, self.y_all.dtype, self.y_all.device
        # eq. 11 as v[n+1] = coef[n] v[n] + g[n] y[n], coef = max(1 - beta y^2, v_decay_min): closed form via cumprod
        coef = torch.addcmul(torch.ones((), dtype=dtype, device=device), self.y_all, self.y_all, value=-beta)
        if c.v_decay_min is not None:
            coef.clamp_min_(c.v_decay_min)
        prod = torch.cumprod(coef, 1)
        self.safe, self.coef_steps = scan.cumprod_is_safe(coef), _steps(coef)
        self.prod_steps = _steps(prod)
        self.m_u = scan.const_matrix(c.alpha_bkw, 1.0, B, dtype, device)  # eq. 12b
        C = self.y_all.shape[-1]
        self.u_block, self.v_block_b = self.y_all.new_empty(B + 1, C), self.y_all.new_empty(B + 1, C)
        self.u_block[0], self.v_block_b[0] = self.state.u, self.state.v
        self.u_all, self.tmp = self.y_all.new_empty(B + 1, C), self.y_all.new_empty(B, C)
        self.w_rows, self.u_before, self.u_first, self.u_last = self.u_block[1:], self.u_all[:-1], self.u_block[0], self.u_all[-1]
        self.v_before = self.v_block_b[:-1]
        self.v_first, self.v_last = self.v_block_b[0], self.v_block_b[-1]

    def backward(self, dz, t, out):
        c = self.cfg
        if c.ecm == "ls":  # eq. 10: (dz - z * mean(z dz)) / zeta, per gate
            dzg = dz.view(self.z_steps[t].shape)
            m = torch.linalg.vecdot(self.z_steps[t], dzg, out=self.dot).unsqueeze(-1)
            da_out = self.affine.grad_out(t)
            da = torch.mul(dzg, self.iz_steps[t], out=None if da_out is None else da_out.view_as(dzg))
            da = da.addcmul_(self.zi_steps[t], m, value=-1.0 / self.H).view_as(dz)
        elif c.ecm == "ac":
            da = dz * self.mask_steps[t]
        else:
            da = dz
        dy = self.affine.backward(da, t)
        if not self.training:
            return torch.mul(dy, self.frozen_rstd, out=out)
        return self._control(dy, t, out)

    def _control(self, g, t, out):
        """Eqs. 11-12 over the rows of step t, in row order; writes dL/dx to ``out``."""
        if self.safe_control:
            return self._control_rows(g, t, out)
        beta, y = 1 - self.cfg.alpha_bkw, self.y_steps[t]
        prod = self.prod_steps[t] if self.safe[t] else None
        scan.var_scan(self.v_first, self.coef_steps[t], torch.mul(g, y, out=self.tmp), prod, out=self.v_block_b)
        w = torch.addcmul(g, self.v_before, y, value=-beta, out=self.w_rows)  # eq. 11a
        w.mul_(self.rstd_steps[t])
        torch.mm(self.m_u, self.u_block, out=self.u_all)  # u before each row (eq. 12b)
        torch.sub(w, self.u_before, alpha=beta, out=out)  # eq. 12a
        self.u_first.copy_(self.u_last)
        self.v_first.copy_(self.v_last)
        return out

    def _control_rows(self, g, t, out):
        """Eqs. 11-12 one row at a time; an update whose result is not finite is skipped (per feature)."""
        c, y, rstd, u, v = self.cfg, self.y_steps[t], self.rstd_steps[t], self.u_first, self.v_first
        beta = 1 - c.alpha_bkw
        for b in range(g.shape[0]):
            decay = 1 - beta * y[b] * y[b]
            if c.v_decay_min is not None:
                decay = decay.clamp_min(c.v_decay_min)
            torch.mul(g[b] - beta * v * y[b], rstd[b], out=out[b]).sub_(u, alpha=beta)  # eqs. 11a, 12a
            new_v, new_u = decay * v + g[b] * y[b], u + out[b]  # eqs. 11b, 12b
            ok = torch.isfinite(new_u) & torch.isfinite(new_v)
            u.copy_(torch.where(ok, new_u, u))
            v.copy_(torch.where(ok, new_v, v))
        return out

    def control_finite(self) -> bool:
        return not self.training or all_finite(self.u_block[0], self.v_block_b[0])

    def finish_backward(self):
        if self.training:
            self.state.u.copy_(self.u_block[0])
            self.state.v.copy_(self.v_block_b[0])

    def param_grads(self):
        return self.affine.param_grads()


class _Unguarded:
    """Normalizers without running state: nothing to guard, never a second pass."""

    def state_finite(self) -> bool:
        return True

    def control_finite(self) -> bool:
        return True


class _LayerStep(_Unguarded):
    """Layer norm of each sample over each gate's H features, then affine."""

    def __init__(self, spec, state, gamma, beta, T, B, dtype, device, safe=False):
        self.H, self.eps = spec.hidden_size, spec.config.eps
        self.pre_all = torch.empty(T, B, spec.gates * self.H, dtype=dtype, device=device)
        self.pre_steps = _steps(self.pre_all)
        self.y_all = torch.empty_like(self.pre_all)
        self.y_steps = _steps(self.y_all)
        self.mean, self.rstd = [], []
        self.affine = _Affine(gamma, beta, self.y_all)

    def pre_buffer(self, t):
        return self.pre_steps[t]

    def forward(self, t):
        y, mean, rstd = torch.native_layer_norm(self.pre_steps[t].view(-1, self.H), (self.H,), None, None, self.eps)
        self.y_steps[t].copy_(y.view_as(self.y_steps[t]))
        self.mean.append(mean)
        self.rstd.append(rstd)
        return self.affine.forward(self.y_steps[t])

    def finish_forward(self):
        pass

    def start_backward(self, B, safe=False):
        pass

    def backward(self, dz, t, out):
        dy = self.affine.backward(dz, t).view(-1, self.H)
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(
            dy, self.pre_steps[t].view(-1, self.H), (self.H,), self.mean[t], self.rstd[t], None, None, (True, False, False)
        )
        return out.copy_(dx.view_as(dz))

    def finish_backward(self):
        pass

    def param_grads(self):
        return self.affine.param_grads()


class _NoNorm(_Unguarded):
    def __init__(self, spec, state, gamma, beta, T, B, dtype, device, safe=False):
        self.pre = torch.empty(B, spec.gates * spec.hidden_size, dtype=dtype, device=device)

    def pre_buffer(self, t):
        return self.pre

    def forward(self, t):
        return self.pre

    def backward(self, dz, t, out):
        return out.copy_(dz)

    def param_grads(self):
        return None, None

    def finish_forward(self):
        pass

    def start_backward(self, B, safe=False):
        pass

    def finish_backward(self):
        pass


NORM_STEPS = {"online": _OnlineStep, "layer": _LayerStep, None: _NoNorm}


# --- cell steps: z -> new hidden state --------------------------------------


class _LSTMStep:
    """c' = f c + i g, h' = o tanh(c') with i, f, o = sigmoid, g = tanh (gate order i, f, g, o)."""

    def __init__(self, H, T, B, dtype, device, c0):
        self.H = H
        self.act_all = torch.empty(T, B, 4 * H, dtype=dtype, device=device)
        self.c_all = torch.empty(T + 1, B, H, dtype=dtype, device=device)
        self.c_all[0] = c0
        self.tc_all = torch.empty(T, B, H, dtype=dtype, device=device)
        self.act_steps, self.c_steps, self.tc_steps = _steps(self.act_all), _steps(self.c_all), _steps(self.tc_all)

    def forward(self, z, t, h_out):
        H, act = self.H, self.act_steps[t]
        torch.sigmoid(z, out=act)
        torch.tanh(z[:, 2 * H : 3 * H], out=act[:, 2 * H : 3 * H])
        i, f, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
        c = torch.mul(f, self.c_steps[t], out=self.c_steps[t + 1]).addcmul_(i, g)
        torch.mul(o, torch.tanh(c, out=self.tc_steps[t]), out=h_out)

    def final_cell(self):
        return self.c_all[-1]

    def start_backward(self, dc_last):
        H, act, tc = self.H, self.act_all, self.tc_all
        deriv = act * (1 - act)
        deriv[..., 2 * H : 3 * H] = 1 - act[..., 2 * H : 3 * H] ** 2
        i, f, g, o = act[..., :H], act[..., H : 2 * H], act[..., 2 * H : 3 * H], act[..., 3 * H :]
        T, B = act.shape[:2]
        # dz_{i,f,g} = dc * [g, c_prev, i] * deriv, dz_o = dh * tanh(c') * deriv_o
        self.k_ifg = _steps(torch.stack([g, self.c_all[:-1], i], 2).mul_(deriv[..., : 3 * H].view(T, B, 3, H)))
        self.k_o = _steps(tc * deriv[..., 3 * H :])
        self.k_c = _steps(o * (1 - tc * tc))  # dc += dh * o * (1 - tanh(c')^2)
        self.f = _steps(f)
        self.dc, self.dc_next = dc_last.clone(), torch.empty_like(dc_last)
        self.dz = torch.empty(B, 4 * H, dtype=act.dtype, device=act.device)

    def backward(self, dh, t):
        H, dz = self.H, self.dz
        dc = self.dc.addcmul_(dh, self.k_c[t])
        torch.mul(dc.unsqueeze(1), self.k_ifg[t], out=dz[:, : 3 * H].view(-1, 3, H))
        torch.mul(dh, self.k_o[t], out=dz[:, 3 * H :])
        torch.mul(dc, self.f[t], out=self.dc_next)
        self.dc, self.dc_next = self.dc_next, self.dc
        return dz

    def initial_cell_grad(self):
        return self.dc


class _RNNStep:
    """h' = tanh(z) or relu(z)."""

    def __init__(self, H, T, B, dtype, device, nonlinearity):
        self.relu = nonlinearity == "relu"
        self.h_all = torch.empty(T, B, H, dtype=dtype, device=device)
        self.h_steps = _steps(self.h_all)

    def forward(self, z, t, h_out):
        if self.relu:
            torch.clamp(z, min=0, out=h_out)
        else:
            torch.tanh(z, out=h_out)
        self.h_steps[t].copy_(h_out)

    def final_cell(self):
        return None

    def start_backward(self, dc_last):
        h = self.h_all
        self.deriv = _steps((h > 0).to(h.dtype) if self.relu else 1 - h * h)

    def backward(self, dh, t):
        return dh * self.deriv[t]

    def initial_cell_grad(self):
        return None


def _forward_pass(spec, state, xp, h0, c0, w, g, b, w_hr, safe):
    """All T steps; returns the normalizer and cell steps (holding what the backward needs), h (T+1, B, P) and,
    with a projection (LSTM proj_size P), m = o * tanh(c) (T, B, H) with h = m W_hr^T; else m is None."""
    T, B, _ = xp.shape
    dtype, device = xp.dtype, xp.device
    norm = NORM_STEPS[spec.norm](spec, state, g, b, T, B, dtype, device, safe)
    if spec.cell == "lstm":
        cell = _LSTMStep(spec.hidden_size, T, B, dtype, device, c0.to(dtype))
    else:
        cell = _RNNStep(spec.hidden_size, T, B, dtype, device, spec.nonlinearity)
    h_all = torch.empty(T + 1, B, h0.shape[-1], dtype=dtype, device=device)
    h_all[0] = h0
    m_all = None if w_hr is None else torch.empty(T, B, spec.hidden_size, dtype=dtype, device=device)
    h_steps, xp_steps, w_t = _steps(h_all), _steps(xp), w.t()
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
    d_pre_steps = _steps(d_pre)
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
    args = (norm, cell, w, w_hr, None if d_out is None else _steps(d_out.to(h_all.dtype)), d_hn, d_cn, T, B, H, P,
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
