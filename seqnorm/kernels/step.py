"""Triton kernels: everything of one time step after the recurrent matmul, in one launch.

Forward, per row b of step t (rows in order 0..B-1, docs/design.md §2), for each gate
k of the G gates (LSTM: i, f, g, o; RNN: one) and the hidden units j of this
program, given the pre-activation x = xproj[t] + h[t-1] W_hh^T:

    online:  s = 1/sqrt(var + eps); y = (x - mu) s            (eq. 8a, state before the row)
             d = x - mu; var <- a var + a (1-a) d^2; mu <- mu + (1-a) d   (eqs. 8c, 8b)
    layer:   y = (x - mean_H x) s, s = 1/sqrt(var_H x + eps)   (per row and gate)
    affine:  a = gamma y + beta
    ECM:     ls: z = a * iz, iz = 1/sqrt(mean_H(a^2) + ls_eps) (eq. 9, per gate)
             ac: z = clamp(a, -c, c)
    cell:    LSTM c' = f c + i g, h' = o tanh(c'); RNN h' = tanh(z) or relu(z)

Backward, per row b (again rows 0..B-1, steps T-1..0), from dh = dL/dh[t] and
the carried dc: the cell backward gives dz; then

    ls:      da = (dz - z mean_H(z dz)) iz                      (eq. 10)
    ac:      da = dz where |a| < c, else 0
    affine:  dy = gamma da  (da is stored: the host sums da*y and da for the parameters)
    online:  gt = dy - (1-ab) v y; v <- max(1 - (1-ab) y^2, v_decay_min) v + dy y   (eq. 11; = v + gt y
             where the floor does not bind; NO_FLOOR for None)
             dx = gt s - (1-ab) u;  u <- u + dx                 (eq. 12)
    layer:   dx = (dy - mean_H dy - y mean_H(dy y)) s

An update whose result is not finite leaves that feature's state as it was (mu
and var together, u and v together): a NaN or inf sample never enters the state.

The statistics (mu, var) and control state (u, v) stay in float32 device memory:
loaded before the row loop, carried in registers across rows, written back
after it.  Online training needs the rows of a feature in order, so one program
takes all B rows of its features; where a row-wise sum over H is needed (ls,
layer) one program also takes all H features.  Everything else is split over
programs: rows for layer/none/eval, hidden blocks where no sum over H is needed.

Constants: NORM 0 none, 1 online, 2 layer; ECM 0 none, 1 ls, 2 ac.
"""
from dataclasses import dataclass

import triton
import triton.language as tl

from .constants import ECM_CODES, NORM_CODES, decay_floor

INTERPRETED = bool(triton.knobs.runtime.interpret)  # fixed when this module was imported
MAX_BLOCK_H = 128


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _finite(x):
    return tl.abs(x) <= 3.4028234663852886e38  # False for inf and nan


@triton.jit
def _gate_forward(x, mu, var, gamma_ptr, beta_ptr, y_ptr, s_ptr, iz_ptr, j, mask, H, alpha, eps, ls_eps, clamp_value,
                  NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr, TRAINING: tl.constexpr):
    """One gate of one row: pre-activation x -> z.  Stores y, s (and iz); returns z and the new mu, var."""
    z = x
    if NORM != 0:
        if NORM == 1:
            s = 1.0 / tl.sqrt(var + eps)  # eq. 8a: the state before this row
            d = x - mu
            y = d * s
            if TRAINING:
                new_var = alpha * var + alpha * (1.0 - alpha) * d * d  # eq. 8c
                new_mu = mu + (1.0 - alpha) * d  # eq. 8b
                ok = _finite(new_var) & _finite(new_mu)  # a non-finite sample never enters the state
                var = tl.where(ok, new_var, var)
                mu = tl.where(ok, new_mu, mu)
        else:
            xc = tl.where(mask, x - tl.sum(x, 0) / H, 0.0)
            s = tl.zeros_like(x) + 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / H + eps)
            y = xc * s
        tl.store(y_ptr + j, y, mask=mask)
        tl.store(s_ptr + j, s, mask=mask)
        z = y
        if AFFINE:
            z = y * tl.load(gamma_ptr + j, mask=mask, other=0.0) + tl.load(beta_ptr + j, mask=mask, other=0.0)
        if NORM == 1 and ECM == 1:  # eq. 9
            iz = 1.0 / tl.sqrt(tl.sum(z * z, 0) / H + ls_eps)
            tl.store(iz_ptr, iz)
            z = z * iz
        if NORM == 1 and ECM == 2:
            z = tl.minimum(tl.maximum(z, -clamp_value), clamp_value)
    return z, mu, var


@triton.jit
def _gate_backward(dz, u, v, y_ptr, s_ptr, iz_ptr, gamma_ptr, beta_ptr, da_ptr, j, mask, H, beta_b, clamp_value,
                   v_decay_min,
                   NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr, TRAINING: tl.constexpr):
    """One gate of one row: dL/dz -> dL/dx.  Stores da (affine); returns dx and the new u, v."""
    dx = dz
    if NORM != 0:
        y = tl.load(y_ptr + j, mask=mask, other=0.0)
        s = tl.load(s_ptr + j, mask=mask, other=0.0)
        a = y
        if AFFINE:
            gamma = tl.load(gamma_ptr + j, mask=mask, other=0.0)
            a = y * gamma + tl.load(beta_ptr + j, mask=mask, other=0.0)
        da = dz
        if NORM == 1 and ECM == 1:  # eq. 10
            iz = tl.load(iz_ptr)
            z = a * iz
            da = (dz - z * (tl.sum(z * dz, 0) / H)) * iz
        if NORM == 1 and ECM == 2:
            da = tl.where(tl.abs(a) < clamp_value, dz, 0.0)
        dy = da
        if AFFINE:
            tl.store(da_ptr + j, da, mask=mask)
            dy = da * gamma
        if NORM == 1:
            if TRAINING:
                gt = dy - beta_b * v * y  # eq. 11a
                new_v = tl.maximum(1.0 - beta_b * y * y, v_decay_min) * v + dy * y  # eq. 11b with the floor
                dx = gt * s - beta_b * u  # eq. 12a
                new_u = u + dx  # eq. 12b
                ok = _finite(new_v) & _finite(new_u)
                v = tl.where(ok, new_v, v)
                u = tl.where(ok, new_u, u)
            else:
                dx = dy * s
        else:
            dx = (dy - tl.sum(dy, 0) / H - y * (tl.sum(dy * y, 0) / H)) * s
    return dx, u, v


@triton.jit
def _incoming_dh(dh_ptr, d_out_ptr, row, j, mask, HAS_DOUT: tl.constexpr):
    """dL/dh of a row: the carried dh plus the step's own output gradient, in float32."""
    dh = tl.load(dh_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
    if HAS_DOUT:
        dh += tl.load(d_out_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
    return dh


@triton.jit
def _load_state(ptr, off, j, mask, other, ACTIVE: tl.constexpr, BLOCK_H: tl.constexpr):
    value = tl.zeros([BLOCK_H], dtype=tl.float32) + other
    if ACTIVE:
        value = tl.load(ptr + off + j, mask=mask, other=other)
    return value


@triton.jit
def _store_state(ptr, off, j, mask, value, ACTIVE: tl.constexpr):
    if ACTIVE:
        tl.store(ptr + off + j, value, mask=mask)


@triton.jit
def _load_gates(ptr, H, j, mask, other, ACTIVE: tl.constexpr, BLOCK_H: tl.constexpr):
    """The state of gates i, f, g, o (features k*H + j) as four vectors."""
    return (_load_state(ptr, 0 * H, j, mask, other, ACTIVE, BLOCK_H),
            _load_state(ptr, 1 * H, j, mask, other, ACTIVE, BLOCK_H),
            _load_state(ptr, 2 * H, j, mask, other, ACTIVE, BLOCK_H),
            _load_state(ptr, 3 * H, j, mask, other, ACTIVE, BLOCK_H))


@triton.jit
def _store_gates(ptr, H, j, mask, value_i, value_f, value_g, value_o, ACTIVE: tl.constexpr):
    _store_state(ptr, 0 * H, j, mask, value_i, ACTIVE)
    _store_state(ptr, 1 * H, j, mask, value_f, ACTIVE)
    _store_state(ptr, 2 * H, j, mask, value_g, ACTIVE)
    _store_state(ptr, 3 * H, j, mask, value_o, ACTIVE)


@triton.jit
def lstm_forward_step(pre_ptr, c_prev_ptr, c_next_ptr, h_next_ptr, act_ptr, y_ptr, s_ptr, iz_ptr, gamma_ptr, beta_ptr,
                      mu_ptr, var_ptr, B, H, rows_per_program, alpha, eps, ls_eps, clamp_value,
                      NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr, TRAINING: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    """Gates i, f, g, o of rows [pid0 * rows_per_program, ...) and hidden block pid1 of one step."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    ON: tl.constexpr = NORM == 1
    GH = 4 * H
    mu_i, mu_f, mu_g, mu_o = _load_gates(mu_ptr, H, j, mask, 0.0, ON, BLOCK_H)
    var_i, var_f, var_g, var_o = _load_gates(var_ptr, H, j, mask, 1.0, ON, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row = b * GH
        xi = tl.load(pre_ptr + row + 0 * H + j, mask=mask, other=0.0).to(tl.float32)
        xf = tl.load(pre_ptr + row + 1 * H + j, mask=mask, other=0.0).to(tl.float32)
        xg = tl.load(pre_ptr + row + 2 * H + j, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(pre_ptr + row + 3 * H + j, mask=mask, other=0.0).to(tl.float32)
        zi, mu_i, var_i = _gate_forward(xi, mu_i, var_i, gamma_ptr + 0 * H, beta_ptr + 0 * H, y_ptr + row + 0 * H,
                                        s_ptr + row + 0 * H, iz_ptr + b * 4 + 0, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        zf, mu_f, var_f = _gate_forward(xf, mu_f, var_f, gamma_ptr + 1 * H, beta_ptr + 1 * H, y_ptr + row + 1 * H,
                                        s_ptr + row + 1 * H, iz_ptr + b * 4 + 1, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        zg, mu_g, var_g = _gate_forward(xg, mu_g, var_g, gamma_ptr + 2 * H, beta_ptr + 2 * H, y_ptr + row + 2 * H,
                                        s_ptr + row + 2 * H, iz_ptr + b * 4 + 2, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        zo, mu_o, var_o = _gate_forward(xo, mu_o, var_o, gamma_ptr + 3 * H, beta_ptr + 3 * H, y_ptr + row + 3 * H,
                                        s_ptr + row + 3 * H, iz_ptr + b * 4 + 3, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        i, f, g, o = _sigmoid(zi), _sigmoid(zf), _tanh(zg), _sigmoid(zo)
        c = f * tl.load(c_prev_ptr + b * H + j, mask=mask, other=0.0) + i * g
        tl.store(act_ptr + row + 0 * H + j, i, mask=mask)
        tl.store(act_ptr + row + 1 * H + j, f, mask=mask)
        tl.store(act_ptr + row + 2 * H + j, g, mask=mask)
        tl.store(act_ptr + row + 3 * H + j, o, mask=mask)
        tl.store(c_next_ptr + b * H + j, c, mask=mask)
        tl.store(h_next_ptr + b * H + j, (o * _tanh(c)).to(h_next_ptr.dtype.element_ty), mask=mask)
    UPDATE: tl.constexpr = ON and TRAINING
    _store_gates(mu_ptr, H, j, mask, mu_i, mu_f, mu_g, mu_o, UPDATE)
    _store_gates(var_ptr, H, j, mask, var_i, var_f, var_g, var_o, UPDATE)


@triton.jit
def lstm_backward_step(dh_ptr, d_out_ptr, dc_ptr, act_ptr, c_prev_ptr, c_next_ptr, y_ptr, s_ptr, iz_ptr, gamma_ptr,
                       beta_ptr, da_ptr, dx_ptr, u_ptr, v_ptr, B, H, rows_per_program, beta_b, clamp_value,
                       v_decay_min, NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr,
                       TRAINING: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_H: tl.constexpr):
    """Backward of lstm_forward_step; dc (B, H) is read and overwritten with dL/dc[t-1]."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    CONTROL: tl.constexpr = NORM == 1 and TRAINING
    GH = 4 * H
    u_i, u_f, u_g, u_o = _load_gates(u_ptr, H, j, mask, 0.0, CONTROL, BLOCK_H)
    v_i, v_f, v_g, v_o = _load_gates(v_ptr, H, j, mask, 0.0, CONTROL, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row, hrow = b * GH, b * H
        dh = _incoming_dh(dh_ptr, d_out_ptr, hrow, j, mask, HAS_DOUT)
        i = tl.load(act_ptr + row + 0 * H + j, mask=mask, other=0.0)
        f = tl.load(act_ptr + row + 1 * H + j, mask=mask, other=0.0)
        g = tl.load(act_ptr + row + 2 * H + j, mask=mask, other=0.0)
        o = tl.load(act_ptr + row + 3 * H + j, mask=mask, other=0.0)
        tc = _tanh(tl.load(c_next_ptr + hrow + j, mask=mask, other=0.0))
        dc = tl.load(dc_ptr + hrow + j, mask=mask, other=0.0) + dh * o * (1.0 - tc * tc)
        dzi = dc * g * i * (1.0 - i)
        dzf = dc * tl.load(c_prev_ptr + hrow + j, mask=mask, other=0.0) * f * (1.0 - f)
        dzg = dc * i * (1.0 - g * g)
        dzo = dh * tc * o * (1.0 - o)
        tl.store(dc_ptr + hrow + j, dc * f, mask=mask)
        dxi, u_i, v_i = _gate_backward(dzi, u_i, v_i, y_ptr + row + 0 * H, s_ptr + row + 0 * H, iz_ptr + b * 4 + 0,
                                       gamma_ptr + 0 * H, beta_ptr + 0 * H, da_ptr + row + 0 * H, j, mask, H, beta_b,
                                       clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        dxf, u_f, v_f = _gate_backward(dzf, u_f, v_f, y_ptr + row + 1 * H, s_ptr + row + 1 * H, iz_ptr + b * 4 + 1,
                                       gamma_ptr + 1 * H, beta_ptr + 1 * H, da_ptr + row + 1 * H, j, mask, H, beta_b,
                                       clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        dxg, u_g, v_g = _gate_backward(dzg, u_g, v_g, y_ptr + row + 2 * H, s_ptr + row + 2 * H, iz_ptr + b * 4 + 2,
                                       gamma_ptr + 2 * H, beta_ptr + 2 * H, da_ptr + row + 2 * H, j, mask, H, beta_b,
                                       clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        dxo, u_o, v_o = _gate_backward(dzo, u_o, v_o, y_ptr + row + 3 * H, s_ptr + row + 3 * H, iz_ptr + b * 4 + 3,
                                       gamma_ptr + 3 * H, beta_ptr + 3 * H, da_ptr + row + 3 * H, j, mask, H, beta_b,
                                       clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        out_ty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + row + 0 * H + j, dxi.to(out_ty), mask=mask)
        tl.store(dx_ptr + row + 1 * H + j, dxf.to(out_ty), mask=mask)
        tl.store(dx_ptr + row + 2 * H + j, dxg.to(out_ty), mask=mask)
        tl.store(dx_ptr + row + 3 * H + j, dxo.to(out_ty), mask=mask)
    _store_gates(u_ptr, H, j, mask, u_i, u_f, u_g, u_o, CONTROL)
    _store_gates(v_ptr, H, j, mask, v_i, v_f, v_g, v_o, CONTROL)


@triton.jit
def rnn_forward_step(pre_ptr, c_prev_ptr, c_next_ptr, h_next_ptr, act_ptr, y_ptr, s_ptr, iz_ptr, gamma_ptr, beta_ptr,
                     mu_ptr, var_ptr, B, H, rows_per_program, alpha, eps, ls_eps, clamp_value,
                     NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr, TRAINING: tl.constexpr,
                     BLOCK_H: tl.constexpr, RELU: tl.constexpr):
    """h' = tanh(z) or relu(z) for rows [pid0 * rows_per_program, ...) and hidden block pid1; c_* unused."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    ON: tl.constexpr = NORM == 1
    mu = _load_state(mu_ptr, 0, j, mask, 0.0, ON, BLOCK_H)
    var = _load_state(var_ptr, 0, j, mask, 1.0, ON, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row = b * H
        x = tl.load(pre_ptr + row + j, mask=mask, other=0.0).to(tl.float32)
        z, mu, var = _gate_forward(x, mu, var, gamma_ptr, beta_ptr, y_ptr + row, s_ptr + row, iz_ptr + b, j, mask, H,
                                   alpha, eps, ls_eps, clamp_value, NORM, ECM, AFFINE, TRAINING)
        if RELU:
            h = tl.maximum(z, 0.0)
        else:
            h = _tanh(z)
        tl.store(act_ptr + row + j, h, mask=mask)
        tl.store(h_next_ptr + row + j, h.to(h_next_ptr.dtype.element_ty), mask=mask)
    UPDATE: tl.constexpr = ON and TRAINING
    _store_state(mu_ptr, 0, j, mask, mu, UPDATE)
    _store_state(var_ptr, 0, j, mask, var, UPDATE)


@triton.jit
def rnn_backward_step(dh_ptr, d_out_ptr, dc_ptr, act_ptr, c_prev_ptr, c_next_ptr, y_ptr, s_ptr, iz_ptr, gamma_ptr,
                      beta_ptr, da_ptr, dx_ptr, u_ptr, v_ptr, B, H, rows_per_program, beta_b, clamp_value,
                      v_decay_min, NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr,
                      TRAINING: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_H: tl.constexpr, RELU: tl.constexpr):
    """Backward of rnn_forward_step; dc_*, c_* unused."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    CONTROL: tl.constexpr = NORM == 1 and TRAINING
    u = _load_state(u_ptr, 0, j, mask, 0.0, CONTROL, BLOCK_H)
    v = _load_state(v_ptr, 0, j, mask, 0.0, CONTROL, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row = b * H
        dh = _incoming_dh(dh_ptr, d_out_ptr, row, j, mask, HAS_DOUT)
        h = tl.load(act_ptr + row + j, mask=mask, other=0.0)
        if RELU:
            dz = tl.where(h > 0, dh, 0.0)
        else:
            dz = dh * (1.0 - h * h)
        dx, u, v = _gate_backward(dz, u, v, y_ptr + row, s_ptr + row, iz_ptr + b, gamma_ptr, beta_ptr, da_ptr + row, j,
                                  mask, H, beta_b, clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        tl.store(dx_ptr + row + j, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    _store_state(u_ptr, 0, j, mask, u, CONTROL)
    _store_state(v_ptr, 0, j, mask, v, CONTROL)


@triton.jit
def _load_gru(ptr, H, j, mask, other, ACTIVE: tl.constexpr, BLOCK_H: tl.constexpr):
    """The state of gates r, z, n (features k*H + j) as three vectors."""
    return (_load_state(ptr, 0 * H, j, mask, other, ACTIVE, BLOCK_H),
            _load_state(ptr, 1 * H, j, mask, other, ACTIVE, BLOCK_H),
            _load_state(ptr, 2 * H, j, mask, other, ACTIVE, BLOCK_H))


@triton.jit
def _store_gru(ptr, H, j, mask, value_r, value_z, value_n, ACTIVE: tl.constexpr):
    _store_state(ptr, 0 * H, j, mask, value_r, ACTIVE)
    _store_state(ptr, 1 * H, j, mask, value_z, ACTIVE)
    _store_state(ptr, 2 * H, j, mask, value_n, ACTIVE)


@triton.jit
def gru_forward_step(xp_ptr, gh_ptr, h_prev_ptr, h_next_ptr, act_ptr, y_ptr, s_ptr, iz_ptr, gamma_ptr, beta_ptr,
                     mu_ptr, var_ptr, ghn_ptr, B, H, rows_per_program, alpha, eps, ls_eps, clamp_value,
                     NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr, TRAINING: tl.constexpr,
                     BLOCK_H: tl.constexpr):
    """GRU (docs/gru.md): r, z = sigmoid(N(xp + gh)), n = tanh(N(xp_n + r gh_n)), h' = (1 - z) n + z h, with
    gh = h W_hh^T + b_hh; act gets r, z, n and ghn gets gh_n (for the backward)."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    ON: tl.constexpr = NORM == 1
    GH = 3 * H
    mu_r, mu_z, mu_n = _load_gru(mu_ptr, H, j, mask, 0.0, ON, BLOCK_H)
    var_r, var_z, var_n = _load_gru(var_ptr, H, j, mask, 1.0, ON, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row, hrow = b * GH, b * H
        xr = (tl.load(xp_ptr + row + 0 * H + j, mask=mask, other=0.0).to(tl.float32)
              + tl.load(gh_ptr + row + 0 * H + j, mask=mask, other=0.0).to(tl.float32))
        xz = (tl.load(xp_ptr + row + 1 * H + j, mask=mask, other=0.0).to(tl.float32)
              + tl.load(gh_ptr + row + 1 * H + j, mask=mask, other=0.0).to(tl.float32))
        zr, mu_r, var_r = _gate_forward(xr, mu_r, var_r, gamma_ptr + 0 * H, beta_ptr + 0 * H, y_ptr + row + 0 * H,
                                        s_ptr + row + 0 * H, iz_ptr + b * 3 + 0, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        zz, mu_z, var_z = _gate_forward(xz, mu_z, var_z, gamma_ptr + 1 * H, beta_ptr + 1 * H, y_ptr + row + 1 * H,
                                        s_ptr + row + 1 * H, iz_ptr + b * 3 + 1, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        r, z = _sigmoid(zr), _sigmoid(zz)
        ghn = tl.load(gh_ptr + row + 2 * H + j, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xp_ptr + row + 2 * H + j, mask=mask, other=0.0).to(tl.float32) + r * ghn
        zn, mu_n, var_n = _gate_forward(xn, mu_n, var_n, gamma_ptr + 2 * H, beta_ptr + 2 * H, y_ptr + row + 2 * H,
                                        s_ptr + row + 2 * H, iz_ptr + b * 3 + 2, j, mask, H, alpha, eps, ls_eps,
                                        clamp_value, NORM, ECM, AFFINE, TRAINING)
        n = _tanh(zn)
        h = tl.load(h_prev_ptr + hrow + j, mask=mask, other=0.0).to(tl.float32)
        tl.store(act_ptr + row + 0 * H + j, r, mask=mask)
        tl.store(act_ptr + row + 1 * H + j, z, mask=mask)
        tl.store(act_ptr + row + 2 * H + j, n, mask=mask)
        tl.store(ghn_ptr + hrow + j, ghn, mask=mask)
        tl.store(h_next_ptr + hrow + j, ((1.0 - z) * n + z * h).to(h_next_ptr.dtype.element_ty), mask=mask)
    UPDATE: tl.constexpr = ON and TRAINING
    _store_gru(mu_ptr, H, j, mask, mu_r, mu_z, mu_n, UPDATE)
    _store_gru(var_ptr, H, j, mask, var_r, var_z, var_n, UPDATE)


@triton.jit
def gru_backward_step(dh_ptr, d_out_ptr, dh_direct_ptr, act_ptr, h_prev_ptr, ghn_ptr, y_ptr, s_ptr, iz_ptr,
                      gamma_ptr, beta_ptr, da_ptr, dx_ptr, dgh_ptr, u_ptr, v_ptr, B, H, rows_per_program, beta_b,
                      clamp_value, v_decay_min, NORM: tl.constexpr, ECM: tl.constexpr, AFFINE: tl.constexpr,
                      TRAINING: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_H: tl.constexpr):
    """Backward of gru_forward_step: dx = dL/dxp, dgh = dL/dgh (n's part da_n * r), dh_direct = dL/dh through z h."""
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = j < H
    CONTROL: tl.constexpr = NORM == 1 and TRAINING
    GH = 3 * H
    u_r, u_z, u_n = _load_gru(u_ptr, H, j, mask, 0.0, CONTROL, BLOCK_H)
    v_r, v_z, v_n = _load_gru(v_ptr, H, j, mask, 0.0, CONTROL, BLOCK_H)
    row_start = tl.program_id(0) * rows_per_program
    for b in range(row_start, tl.minimum(row_start + rows_per_program, B)):
        row, hrow = b * GH, b * H
        dh = _incoming_dh(dh_ptr, d_out_ptr, hrow, j, mask, HAS_DOUT)
        r = tl.load(act_ptr + row + 0 * H + j, mask=mask, other=0.0)
        z = tl.load(act_ptr + row + 1 * H + j, mask=mask, other=0.0)
        n = tl.load(act_ptr + row + 2 * H + j, mask=mask, other=0.0)
        h = tl.load(h_prev_ptr + hrow + j, mask=mask, other=0.0).to(tl.float32)
        ghn = tl.load(ghn_ptr + hrow + j, mask=mask, other=0.0)
        tl.store(dh_direct_ptr + hrow + j, dh * z, mask=mask)
        dan, u_n, v_n = _gate_backward(dh * (1.0 - z) * (1.0 - n * n), u_n, v_n, y_ptr + row + 2 * H,
                                       s_ptr + row + 2 * H, iz_ptr + b * 3 + 2, gamma_ptr + 2 * H, beta_ptr + 2 * H,
                                       da_ptr + row + 2 * H, j, mask, H, beta_b, clamp_value, v_decay_min, NORM, ECM,
                                       AFFINE, TRAINING)
        dar, u_r, v_r = _gate_backward(dan * ghn * r * (1.0 - r), u_r, v_r, y_ptr + row + 0 * H, s_ptr + row + 0 * H,
                                       iz_ptr + b * 3 + 0, gamma_ptr + 0 * H, beta_ptr + 0 * H, da_ptr + row + 0 * H,
                                       j, mask, H, beta_b, clamp_value, v_decay_min, NORM, ECM, AFFINE, TRAINING)
        daz, u_z, v_z = _gate_backward(dh * (h - n) * z * (1.0 - z), u_z, v_z, y_ptr + row + 1 * H,
                                       s_ptr + row + 1 * H, iz_ptr + b * 3 + 1, gamma_ptr + 1 * H, beta_ptr + 1 * H,
                                       da_ptr + row + 1 * H, j, mask, H, beta_b, clamp_value, v_decay_min, NORM, ECM,
                                       AFFINE, TRAINING)
        tl.store(dx_ptr + row + 0 * H + j, dar, mask=mask)
        tl.store(dx_ptr + row + 1 * H + j, daz, mask=mask)
        tl.store(dx_ptr + row + 2 * H + j, dan, mask=mask)
        tl.store(dgh_ptr + row + 0 * H + j, dar, mask=mask)
        tl.store(dgh_ptr + row + 1 * H + j, daz, mask=mask)
        tl.store(dgh_ptr + row + 2 * H + j, dan * r, mask=mask)
    _store_gru(u_ptr, H, j, mask, u_r, u_z, u_n, CONTROL)
    _store_gru(v_ptr, H, j, mask, v_r, v_z, v_n, CONTROL)


# --- launching ----------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How one step is split over programs: rows_per_program rows, block_h hidden units each."""

    rows_per_program: int
    block_h: int
    grid: tuple
    num_warps: int


def geometry(spec, batch: int, max_block_h: int = MAX_BLOCK_H) -> Geometry:
    """Online training needs all rows of a feature in one program; ls and layer need all H of a row."""
    H = spec.hidden_size
    full_row = spec.norm == "layer" or (spec.norm == "online" and spec.config.ecm == "ls")
    block_h = triton.next_power_of_2(H) if full_row else min(triton.next_power_of_2(H), max_block_h)
    rows = batch if spec.norm == "online" and spec.training else 1
    num_warps = max(1, min(8, block_h // 64))
    return Geometry(rows, block_h, (triton.cdiv(batch, rows), triton.cdiv(H, block_h)), num_warps)


class TritonStep:
    """Launches the step kernels for ``spec`` and a batch of ``batch`` rows, one launch per call.

    ``dtype`` (of the activations) needs nothing here: the kernels take it from the pointers.
    """

    def __init__(self, spec, batch: int, dtype=None, max_block_h: int = MAX_BLOCK_H):
        c = spec.config
        self.geo = geo = geometry(spec, batch, max_block_h)
        lstm = spec.cell == "lstm"
        self._forward = (lstm_forward_step if lstm else rnn_forward_step)[geo.grid]
        self._backward = (lstm_backward_step if lstm else rnn_backward_step)[geo.grid]
        self._gru_forward, self._gru_backward = gru_forward_step[geo.grid], gru_backward_step[geo.grid]
        self.sizes = (batch, spec.hidden_size, geo.rows_per_program)
        self.forward_scalars = (c.alpha_fwd, c.eps, c.ls_eps, c.clamp_value)
        self.backward_scalars = (1.0 - c.alpha_bkw, c.clamp_value, decay_floor(c))
        self.constants = dict(NORM=NORM_CODES[spec.norm], ECM=ECM_CODES[c.ecm],
                              AFFINE=spec.norm is not None and c.affine, TRAINING=spec.training,
                              BLOCK_H=geo.block_h, num_warps=geo.num_warps)
        if spec.cell == "rnn":
            self.constants["RELU"] = spec.nonlinearity == "relu"

    def forward(self, *tensors):
        """(pre, c_prev, c_next, h_next, act, y, s, iz, gamma, beta, mu, var)"""
        self._forward(*tensors, *self.sizes, *self.forward_scalars, **self.constants)

    def backward(self, dh, d_out, *tensors):
        """(dh, d_out or None, dc, act, c_prev, c_next, y, s, iz, gamma, beta, da, dx, u, v)"""
        self._backward(dh, dh if d_out is None else d_out, *tensors, *self.sizes, *self.backward_scalars,
                       HAS_DOUT=d_out is not None, **self.constants)

    def gru_forward(self, *tensors):
        """(xp, gh, h_prev, h_next, act, y, s, iz, gamma, beta, mu, var, ghn)"""
        self._gru_forward(*tensors, *self.sizes, *self.forward_scalars, **self.constants)

    def gru_backward(self, dh, d_out, *tensors):
        """(dh, d_out or None, dh_direct, act, h_prev, ghn, y, s, iz, gamma, beta, da, dx, dgh, u, v)"""
        self._gru_backward(dh, dh if d_out is None else d_out, *tensors, *self.sizes, *self.backward_scalars,
                           HAS_DOUT=d_out is not None, **self.constants)
