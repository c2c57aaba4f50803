"""The recurrence of one layer on the fused Triton step kernels (``step.py``).

Same contract as ``seqnorm.sequence.RecurrenceFunction`` (and held to it by
the tests): per time step one matmul ``pre = xproj[t] + h[t-1] W_hh^T`` and
one kernel launch for the normalization, ECM, affine, nonlinearities and cell
update; in the backward one kernel launch and one matmul ``dh = dx[t] W_hh``
per step, steps T-1..0.  The Online Normalization state is read and written by
the kernels in device memory: no host synchronisation, no Python-side
rebinding of buffers, so a forward+backward can be captured in a CUDA graph.

Activations (xproj, h, the matmuls) stay in the input dtype (float32,
bfloat16, float16); everything saved for the backward, the memory cell, the
statistics and the control state are float32.
"""
from dataclasses import dataclass

import torch
import triton

from . import step

INTERPRETED = bool(triton.knobs.runtime.interpret)
MAX_BLOCK_H = 128


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


def _steps(buffer, count):
    """Per-step views of a (T, ...) buffer; a one-element placeholder stands for an unused one."""
    return buffer.unbind(0) if buffer.dim() > 1 else (buffer,) * count


def _constants(spec, geo):
    c = spec.config
    return dict(NORM=step.NORM_CODES[spec.norm], ECM=step.ECM_CODES[c.ecm], AFFINE=spec.norm is not None and c.affine,
                TRAINING=spec.training, BLOCK_H=geo.block_h, num_warps=geo.num_warps,
                **({} if spec.cell == "lstm" else {"RELU": spec.nonlinearity == "relu"}))


class FusedRecurrenceFunction(torch.autograd.Function):
    """(spec, state, xproj (T,B,G*H), h0, c0 or None, w_hh, gamma, beta, max_block_h) -> out, h_T, c_T."""

    @staticmethod
    def forward(ctx, spec, state, xproj, h0, c0, w_hh, gamma, beta, max_block_h):
        T, B, GH = xproj.shape
        H, dtype, device = spec.hidden_size, xproj.dtype, xproj.device
        f32 = dict(dtype=torch.float32, device=device)
        none = torch.empty(1, **f32)
        lstm, normed, c = spec.cell == "lstm", spec.norm is not None, spec.config
        geo = geometry(spec, B, max_block_h)
        w = w_hh.to(dtype)
        h_all = xproj.new_empty(T + 1, B, H)
        h_all[0] = h0
        c_all = torch.empty(T + 1, B, H, **f32) if lstm else none
        if lstm:
            c_all[0] = c0
        act = torch.empty(T, B, GH, **f32)
        y_all = torch.empty(T, B, GH, **f32) if normed else none
        s_all = torch.empty(T, B, GH, **f32) if normed else none
        iz = torch.empty(T, B, spec.gates, **f32) if spec.norm == "online" and c.ecm == "ls" else none
        g, b = (gamma.float().contiguous(), beta.float().contiguous()) if gamma is not None else (none, none)
        mu, var = (state.mu, state.var) if spec.norm == "online" else (none, none)
        kernel = (step.lstm_forward_step if lstm else step.rnn_forward_step)[geo.grid]
        steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
        h_s, c_s, act_s, y_s, s_s, iz_s = map(steps, (h_all, c_all, act, y_all, s_all, iz))
        pre, w_t = xproj.new_empty(B, GH), w.t()
        with torch.autocast(device.type, enabled=False):
            for t in range(T):
                torch.addmm(xproj[t], h_s[t], w_t, out=pre)
                kernel(pre, c_s[t], c_s[t + 1], h_s[t + 1], act_s[t], y_s[t], s_s[t], iz_s[t], g, b, mu, var, B, H,
                       geo.rows_per_program, c.alpha_fwd, c.eps, c.ls_eps, c.clamp_value, **_constants(spec, geo))
        ctx.spec, ctx.geo, ctx.state, ctx.w, ctx.gamma, ctx.beta = spec, geo, state, w, g, b
        ctx.saved = (h_all, c_all, act, y_all, s_all, iz)
        ctx.dtypes = (xproj.dtype, h0.dtype, None if c0 is None else c0.dtype, w_hh.dtype,
                      None if gamma is None else gamma.dtype)
        return h_all[1:], h_all[-1], c_all[-1].to(dtype) if lstm else None

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        spec, geo, w, g, b = ctx.spec, ctx.geo, ctx.w, ctx.gamma, ctx.beta
        h_all, c_all, act, y_all, s_all, iz = ctx.saved
        T, B, GH = act.shape
        H, dtype, device, c = spec.hidden_size, h_all.dtype, h_all.device, spec.config
        none = torch.empty(1, dtype=torch.float32, device=device)
        lstm, affine = spec.cell == "lstm", spec.norm is not None and c.affine
        dh = torch.zeros(B, H, dtype=dtype, device=device) if d_hn is None else d_hn.to(dtype).contiguous().clone()
        dc = none
        if lstm:
            dc = torch.zeros(B, H, dtype=torch.float32, device=device) if d_cn is None else d_cn.float().contiguous().clone()
        d_pre = torch.empty(T, B, GH, dtype=dtype, device=device)
        da = torch.empty(T, B, GH, dtype=torch.float32, device=device) if affine else none
        u, v = (ctx.state.u, ctx.state.v) if spec.norm == "online" else (none, none)
        steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
        c_s, act_s, y_s, s_s, iz_s, da_s, dx_s = map(steps, (c_all, act, y_all, s_all, iz, da, d_pre))
        d_out_s = steps(none) if d_out is None else steps(d_out.to(dtype).contiguous())
        kernel = (step.lstm_backward_step if lstm else step.rnn_backward_step)[geo.grid]
        with torch.autocast(device.type, enabled=False):
            for t in range(T - 1, -1, -1):
                kernel(dh, d_out_s[t], dc, act_s[t], c_s[t], c_s[t + 1], y_s[t], s_s[t], iz_s[t], g, b, da_s[t],
                       dx_s[t], u, v, B, H, geo.rows_per_program, 1.0 - c.alpha_bkw, c.clamp_value,
                       HAS_DOUT=d_out is not None, **_constants(spec, geo))
                torch.mm(dx_s[t], w, out=dh)
            d_w = torch.mm(d_pre.view(T * B, GH).t(), h_all[:-1].reshape(T * B, H))
        d_gamma = d_beta = None
        if affine:
            d_gamma, d_beta = (da * y_all).sum((0, 1)), da.sum((0, 1))
        x_dt, h_dt, c_dt, w_dt, g_dt = ctx.dtypes
        return (
            None, None, d_pre.to(x_dt), dh.to(h_dt), dc.to(c_dt) if lstm else None, d_w.to(w_dt),
            None if d_gamma is None else d_gamma.to(g_dt), None if d_beta is None else d_beta.to(g_dt), None,
        )
