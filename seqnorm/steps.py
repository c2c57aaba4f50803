"""One time step of a layer's recurrence on the torch path, as two parts with a forward and a backward each.

A normalizer step maps a step's pre-activation to what the nonlinearities see (``OnlineStep``: docs/design.md §2,
eqs. 8-12, then the affine and the ECM per gate; ``LayerStep``; ``NoNormStep``), and a cell step maps that to
the new hidden state (``LSTMStep``, ``RNNStep``).  ``seqnorm.sequence`` runs them over T steps forward and back.

On CPU the cost is the number of small ops per time step, so every step writes into buffers allocated once for
all T (``out=``), and what depends only on saved forward values is computed for all T when the backward starts.
"""
import torch

from . import scan
from .online_norm import all_finite


def step_views(t: torch.Tensor) -> tuple:
    """Per-step views of a (T, ...) buffer, made once instead of once per index."""
    return t.unbind(0)


# --- normalizer steps: pre-activation -> z (what the nonlinearities see) -----


class Affine:
    """a = gamma * y + beta; keeps dL/da of every step for the parameter grads."""

    def __init__(self, gamma, beta, y_all):
        self.gamma, self.beta, self.y_all = gamma, beta, y_all
        self.da_all = torch.empty_like(y_all) if gamma is not None else None
        self.da_steps = step_views(self.da_all) if gamma is not None else None

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


class OnlineStep:
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
        self.y_steps = step_views(self.y_all)
        self.affine = Affine(gamma, beta, self.y_all)
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
            self.rstd_steps = step_views(self.rstd_all)
        else:
            self.frozen_rstd = torch.rsqrt(state.var.to(dtype) + c.eps)
        if c.ecm == "ls":
            self.inv_zeta = new(T, B, spec.gates)
            self.inv_zeta_steps = step_views(self.inv_zeta)
        if c.ecm == "ac":
            self.mask_all = torch.empty(T, B, C, dtype=torch.bool, device=device)
            self.mask_steps = step_views(self.mask_all)

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
            self.z_steps, self.zi_steps, self.iz_steps = step_views(z), step_views(z * iz), step_views(iz)
            self.dot = self.inv_zeta.new_empty(self.inv_zeta.shape[1:])
        if not self.training:
            return
        beta, dtype, device = 1 - c.alpha_bkw, self.y_all.dtype, self.y_all.device
        # eq. 11 as v[n+1] = coef[n] v[n] + g[n] y[n], coef = max(1 - beta y^2, v_decay_min): closed form via cumprod
        coef = torch.addcmul(torch.ones((), dtype=dtype, device=device), self.y_all, self.y_all, value=-beta)
        if c.v_decay_min is not None:
            coef.clamp_min_(c.v_decay_min)
        prod = torch.cumprod(coef, 1)
        self.safe, self.coef_steps = scan.cumprod_is_safe(coef), step_views(coef)
        self.prod_steps = step_views(prod)
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


class Unguarded:
    """Normalizers without running state: nothing to guard, never a second pass."""

    def state_finite(self) -> bool:
        return True

    def control_finite(self) -> bool:
        return True


class LayerStep(Unguarded):
    """Layer norm of each sample over each gate's H features, then affine."""

    def __init__(self, spec, state, gamma, beta, T, B, dtype, device, safe=False):
        self.H, self.eps = spec.hidden_size, spec.config.eps
        self.pre_all = torch.empty(T, B, spec.gates * self.H, dtype=dtype, device=device)
        self.pre_steps = step_views(self.pre_all)
        self.y_all = torch.empty_like(self.pre_all)
        self.y_steps = step_views(self.y_all)
        self.mean, self.rstd = [], []
        self.affine = Affine(gamma, beta, self.y_all)

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


class NoNormStep(Unguarded):
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


NORM_STEPS = {"online": OnlineStep, "layer": LayerStep, None: NoNormStep}


# --- cell steps: z -> new hidden state --------------------------------------


class LSTMStep:
    """c' = f c + i g, h' = o tanh(c') with i, f, o = sigmoid, g = tanh (gate order i, f, g, o)."""

    def __init__(self, H, T, B, dtype, device, c0):
        self.H = H
        self.act_all = torch.empty(T, B, 4 * H, dtype=dtype, device=device)
        self.c_all = torch.empty(T + 1, B, H, dtype=dtype, device=device)
        self.c_all[0] = c0
        self.tc_all = torch.empty(T, B, H, dtype=dtype, device=device)
        self.act_steps, self.c_steps, self.tc_steps = step_views(self.act_all), step_views(self.c_all), step_views(self.tc_all)

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
        self.k_ifg = step_views(torch.stack([g, self.c_all[:-1], i], 2).mul_(deriv[..., : 3 * H].view(T, B, 3, H)))
        self.k_o = step_views(tc * deriv[..., 3 * H :])
        self.k_c = step_views(o * (1 - tc * tc))  # dc += dh * o * (1 - tanh(c')^2)
        self.f = step_views(f)
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


class RNNStep:
    """h' = tanh(z) or relu(z)."""

    def __init__(self, H, T, B, dtype, device, nonlinearity):
        self.relu = nonlinearity == "relu"
        self.h_all = torch.empty(T, B, H, dtype=dtype, device=device)
        self.h_steps = step_views(self.h_all)

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
        self.deriv = step_views((h > 0).to(h.dtype) if self.relu else 1 - h * h)

    def backward(self, dh, t):
        return dh * self.deriv[t]

    def initial_cell_grad(self):
        return None
