"""The whole recurrence of one layer as one autograd Function (torch path).

Input projections are computed outside for all steps in one matmul; this
Function runs the recurrence h[t] = cell(norm(xproj[t] + h[t-1] W_hh^T)) and
its hand-written backward in reverse time order.  It must equal per-step
autograd through ``seqnorm.cells`` exactly, including the Online Normalization
state: the forward processes the rows of step t (in row order) before those
of step t+1, and the backward runs the control process for step T-1 first,
rows 0..B-1 within each step, as per-step autograd calls would.

Each step is split in two parts with a forward and a backward each:
a normalizer step (``_OnlineStep``, ``_LayerStep``, ``_Identity``, which
include the affine and, for online, the ECM) and a cell step (``_LSTMStep``,
``_RNNStep``).  Quantities that depend only on saved forward values are
computed for all T at once when the backward starts.
"""
from dataclasses import dataclass

import torch

from . import scan
from .online_norm import OnlineNormState
from .norms import OnlineNormConfig


@dataclass(frozen=True)
class RecurrenceSpec:
    """What one layer computes; hashable, passed to the Function as a constant."""

    cell: str  # "lstm" | "rnn"
    norm: str | None  # "online" | "layer" | None
    hidden_size: int
    config: OnlineNormConfig
    nonlinearity: str = "tanh"
    training: bool = True

    @property
    def gates(self) -> int:
        return 4 if self.cell == "lstm" else 1


# --- normalizer steps: pre-activation -> z (what the nonlinearities see) -----


class _Identity:
    def __init__(self, spec, state, gamma, beta, T, B, dtype):
        pass

    def forward(self, pre, t):
        return pre

    def start_backward(self):
        pass

    def backward(self, dz, t):
        return dz

    def param_grads(self):
        return None, None


class _Affine:
    """a = gamma * y + beta; keeps dL/da of every step for the parameter grads."""

    def __init__(self, gamma, beta, y_all):
        self.gamma, self.beta, self.y_all = gamma, beta, y_all
        self.da_all = None

    def forward(self, y):
        return y if self.gamma is None else torch.addcmul(self.beta, y, self.gamma)

    def backward(self, da, t):
        if self.gamma is None:
            return da
        if self.da_all is None:
            self.da_all = da.new_empty(self.y_all.shape)
        self.da_all[t] = da
        return da * self.gamma

    def param_grads(self):
        if self.gamma is None:
            return None, None
        return (self.da_all * self.y_all).sum((0, 1)), self.da_all.sum((0, 1))


class _OnlineStep:
    """DESIGN §2 on the B rows of each step, then affine and ECM (per gate)."""

    def __init__(self, spec, state, gamma, beta, T, B, dtype):
        self.cfg, self.state, self.H, self.training = spec.config, state, spec.hidden_size, spec.training
        width = spec.gates * spec.hidden_size
        self.y_all = torch.empty(T, B, width, dtype=dtype, device=gamma.device if gamma is not None else state.mu.device)
        self.rstd_all = torch.empty_like(self.y_all) if self.training else None
        self.inv_zeta = torch.empty(T, B, spec.gates, 1, dtype=dtype, device=self.y_all.device)
        self.mask_all = None
        self.affine = _Affine(gamma, beta, self.y_all)
        self.mu, self.var = state.mu.to(dtype), state.var.to(dtype)
        if not self.training:
            self.frozen_rstd = torch.rsqrt(self.var + self.cfg.eps)

    def forward(self, pre, t):
        c = self.cfg
        y = self.y_all[t]
        if self.training:
            mu_all = scan.const_scan(self.mu, pre, c.alpha_fwd, 1 - c.alpha_fwd)  # eq. 8b
            d = pre - mu_all[:-1]
            var_all = scan.const_scan(self.var, d * d, c.alpha_fwd, c.alpha_fwd * (1 - c.alpha_fwd))  # eq. 8c
            rstd = torch.add(var_all[:-1], c.eps, out=self.rstd_all[t]).rsqrt_()
            torch.mul(d, rstd, out=y)  # eq. 8a
            self.mu, self.var = mu_all[-1], var_all[-1]
        else:
            torch.mul(pre - self.mu, self.frozen_rstd, out=y)
        a = self.affine.forward(y)
        if c.ecm == "ls":  # eq. 9, per gate
            grouped = a.view(a.shape[0], -1, self.H)
            inv = torch.linalg.vecdot(grouped, grouped).unsqueeze(-1).mul_(1.0 / self.H).add_(c.ls_eps).rsqrt_()
            self.inv_zeta[t] = inv
            return (grouped * inv).view_as(a)
        if c.ecm == "ac":
            if self.mask_all is None:
                self.mask_all = torch.empty(self.y_all.shape, dtype=torch.bool, device=a.device)
            torch.lt(a.abs(), c.clamp_value, out=self.mask_all[t])
            return a.clamp(-c.clamp_value, c.clamp_value)
        return a

    def finish_forward(self):
        if self.training:
            self.state.mu.copy_(self.mu)
            self.state.var.copy_(self.var)

    def start_backward(self):
        c = self.cfg
        if c.ecm == "ls":  # z and z * inv_zeta for eq. 10, all steps at once
            a = self.y_all if self.affine.gamma is None else torch.addcmul(self.affine.beta, self.y_all, self.affine.gamma)
            shape = a.shape[:2] + (-1, self.H)
            self.z_all = a.view(shape) * self.inv_zeta
            self.zi_all = self.z_all * self.inv_zeta
        if self.training:  # eq. 11 as v[n+1] = a[n] v[n] + b[n], a = 1 - beta y^2
            beta = 1 - c.alpha_bkw
            self.coef_all = torch.addcmul(torch.ones_like(self.y_all), self.y_all, self.y_all, value=-beta)
            self.safe = scan.cumprod_is_safe(self.coef_all).tolist()
            self.prod_all = torch.cumprod(self.coef_all, 1)
            self.u, self.v = self.state.u.to(self.y_all.dtype), self.state.v.to(self.y_all.dtype)

    def backward(self, dz, t):
        c = self.cfg
        if c.ecm == "ls":  # eq. 10: (dz - z * mean(z dz)) / zeta, per gate
            dzg = dz.view(self.z_all.shape[1:])
            m = torch.linalg.vecdot(self.z_all[t], dzg).unsqueeze(-1)
            da = (dzg * self.inv_zeta[t]).addcmul_(self.zi_all[t], m, value=-1.0 / self.H).view_as(dz)
        elif c.ecm == "ac":
            da = dz * self.mask_all[t]
        else:
            da = dz
        dy = self.affine.backward(da, t)
        if not self.training:
            return dy * self.frozen_rstd
        return self._control(dy, t)

    def _control(self, g, t):
        """Eqs. 11-12 over the rows of step t, in row order."""
        beta = 1 - self.cfg.alpha_bkw
        y = self.y_all[t]
        prod = self.prod_all[t] if self.safe[t] else None
        v_all = scan.var_scan(self.v, self.coef_all[t], g * y, prod)
        gt = torch.addcmul(g, v_all[:-1], y, value=-beta)  # eq. 11a
        w = gt.mul_(self.rstd_all[t])
        u_all = scan.const_scan(self.u, w, self.cfg.alpha_bkw)  # eq. 12b
        self.u, self.v = u_all[-1], v_all[-1]
        return w.sub_(u_all[:-1], alpha=beta)  # eq. 12a

    def finish_backward(self):
        if self.training:
            self.state.u.copy_(self.u)
            self.state.v.copy_(self.v)

    def param_grads(self):
        return self.affine.param_grads()


class _LayerStep:
    """Layer norm of each sample over each gate's H features, then affine."""

    def __init__(self, spec, state, gamma, beta, T, B, dtype):
        self.H, self.eps, G = spec.hidden_size, spec.config.eps, spec.gates
        device = gamma.device if gamma is not None else None
        self.pre_all = torch.empty(T, B * G, self.H, dtype=dtype, device=device)
        self.y_all = torch.empty(T, B, G * self.H, dtype=dtype, device=device)
        self.mean_all = torch.empty(T, B * G, 1, dtype=dtype, device=device)
        self.rstd_all = torch.empty_like(self.mean_all)
        self.affine = _Affine(gamma, beta, self.y_all)

    def forward(self, pre, t):
        grouped = pre.view(-1, self.H)
        self.pre_all[t] = grouped
        y, mean, rstd = torch.native_layer_norm(grouped, (self.H,), None, None, self.eps)
        self.y_all[t] = y.view_as(pre)
        self.mean_all[t], self.rstd_all[t] = mean, rstd
        return self.affine.forward(self.y_all[t])

    def finish_forward(self):
        pass

    def start_backward(self):
        pass

    def backward(self, dz, t):
        dy = self.affine.backward(dz, t).view(-1, self.H)
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(
            dy, self.pre_all[t], (self.H,), self.mean_all[t], self.rstd_all[t], None, None, (True, False, False)
        )
        return dx.view_as(dz)

    def finish_backward(self):
        pass

    def param_grads(self):
        return self.affine.param_grads()


class _NoNorm(_Identity):
    def finish_forward(self):
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

    def forward(self, z, t, h_out):
        H, act = self.H, self.act_all[t]
        torch.sigmoid(z, out=act)
        torch.tanh(z[:, 2 * H : 3 * H], out=act[:, 2 * H : 3 * H])
        i, f, g, o = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
        c = torch.mul(f, self.c_all[t], out=self.c_all[t + 1]).addcmul_(i, g)
        torch.mul(o, torch.tanh(c, out=self.tc_all[t]), out=h_out)

    def final_cell(self):
        return self.c_all[-1]

    def start_backward(self, dc_last):
        H, act, tc = self.H, self.act_all, self.tc_all
        deriv = act * (1 - act)
        deriv[..., 2 * H : 3 * H] = 1 - act[..., 2 * H : 3 * H] ** 2
        i, f, g, o = act[..., :H], act[..., H : 2 * H], act[..., 2 * H : 3 * H], act[..., 3 * H :]
        T, B = act.shape[:2]
        # dz_{i,f,g} = dc * [g, c_prev, i] * deriv, dz_o = dh * tanh(c') * deriv_o
        self.k_ifg = torch.stack([g, self.c_all[:-1], i], 2).mul_(deriv[..., : 3 * H].view(T, B, 3, H))
        self.k_o = tc * deriv[..., 3 * H :]
        self.k_c = o * (1 - tc * tc)  # dc += dh * o * (1 - tanh(c')^2)
        self.f = f
        self.dc = dc_last.clone()

    def backward(self, dh, t):
        dc = self.dc.addcmul_(dh, self.k_c[t])
        dz = dh.new_empty(dh.shape[0], 4 * self.H)
        torch.mul(dc.unsqueeze(1), self.k_ifg[t], out=dz[:, : 3 * self.H].view(-1, 3, self.H))
        torch.mul(dh, self.k_o[t], out=dz[:, 3 * self.H :])
        self.dc = dc * self.f[t]
        return dz

    def initial_cell_grad(self):
        return self.dc


class _RNNStep:
    """h' = tanh(z) or relu(z)."""

    def __init__(self, H, T, B, dtype, device, nonlinearity):
        self.relu = nonlinearity == "relu"
        self.h_all = torch.empty(T, B, H, dtype=dtype, device=device)

    def forward(self, z, t, h_out):
        if self.relu:
            torch.clamp(z, min=0, out=h_out)
        else:
            torch.tanh(z, out=h_out)
        self.h_all[t] = h_out

    def final_cell(self):
        return None

    def start_backward(self, dc_last):
        h = self.h_all
        self.deriv = (h > 0).to(h.dtype) if self.relu else 1 - h * h

    def backward(self, dh, t):
        return dh * self.deriv[t]

    def initial_cell_grad(self):
        return None


class RecurrenceFunction(torch.autograd.Function):
    """(spec, state, xproj (T,B,G*H), h0 (B,H), c0 (B,H) or None, w_hh, gamma, beta) -> out, h_T, c_T."""

    @staticmethod
    def forward(ctx, spec, state, xproj, h0, c0, w_hh, gamma, beta):
        T, B, _ = xproj.shape
        dtype = torch.promote_types(xproj.dtype, torch.float32)
        xp, w = xproj.to(dtype), w_hh.to(dtype)
        g, b = (None, None) if gamma is None else (gamma.to(dtype), beta.to(dtype))
        norm = NORM_STEPS[spec.norm](spec, state, g, b, T, B, dtype)
        if spec.cell == "lstm":
            cell = _LSTMStep(spec.hidden_size, T, B, dtype, xp.device, c0.to(dtype))
        else:
            cell = _RNNStep(spec.hidden_size, T, B, dtype, xp.device, spec.nonlinearity)
        h_all = torch.empty(T + 1, B, spec.hidden_size, dtype=dtype, device=xp.device)
        h_all[0] = h0
        w_t = w.t()
        for t in range(T):
            cell.forward(norm.forward(torch.addmm(xp[t], h_all[t], w_t), t), t, h_all[t + 1])
        norm.finish_forward()
        ctx.spec, ctx.norm, ctx.cell, ctx.w = spec, norm, cell, w
        ctx.dtypes = (xproj.dtype, h0.dtype, None if c0 is None else c0.dtype, w_hh.dtype, None if gamma is None else gamma.dtype)
        ctx.save_for_backward(h_all)
        out = h_all[1:].to(xproj.dtype)
        c_last = cell.final_cell()
        return out, h_all[-1].to(xproj.dtype), None if c_last is None else c_last.to(xproj.dtype)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        (h_all,) = ctx.saved_tensors
        norm, cell, w = ctx.norm, ctx.cell, ctx.w
        T, B, H = h_all.shape[0] - 1, h_all.shape[1], h_all.shape[2]
        dtype = h_all.dtype
        d_out = torch.zeros(T, B, H, dtype=dtype, device=h_all.device) if d_out is None else d_out.to(dtype)
        dh = torch.zeros(B, H, dtype=dtype, device=h_all.device) if d_hn is None else d_hn.to(dtype).clone()
        dc = torch.zeros_like(dh) if d_cn is None else d_cn.to(dtype)
        norm.start_backward()
        cell.start_backward(dc)
        d_pre = torch.empty(T, B, w.shape[0], dtype=dtype, device=h_all.device)
        for t in range(T - 1, -1, -1):
            dh.add_(d_out[t])
            d_pre[t] = norm.backward(cell.backward(dh, t), t)
            dh = torch.mm(d_pre[t], w)
        norm.finish_backward()
        d_w = torch.mm(d_pre.view(T * B, -1).t(), h_all[:-1].reshape(T * B, H))
        d_gamma, d_beta = norm.param_grads()
        x_dt, h_dt, c_dt, w_dt, g_dt = ctx.dtypes
        dc0 = cell.initial_cell_grad()
        return (
            None, None, d_pre.to(x_dt), dh.to(h_dt), None if dc0 is None else dc0.to(c_dt), d_w.to(w_dt),
            None if d_gamma is None else d_gamma.to(g_dt), None if d_beta is None else d_beta.to(g_dt),
        )
