"""The recurrence of one layer on fused step kernels: Triton (``step.py``) or C (``cpu_step.c``).

Same contract as ``seqnorm.sequence.RecurrenceFunction`` (and held to it by
the tests): per time step one matmul ``pre = xproj[t] + h[t-1] W_hh^T`` and
one kernel call for the normalization, ECM, affine, nonlinearities and cell
update; in the backward one kernel call and one matmul ``dh = dx[t] W_hh``
per step, steps T-1..0.  The Online Normalization state is read and written by
the kernels in device memory: no host synchronisation, no Python-side
rebinding of buffers, so on a GPU a forward+backward can be captured in a
CUDA graph.

``seqnorm.ops`` makes these two functions the forward and backward of the
custom op ``seqnorm::recurrence``.  The step launcher (``make_step(spec, batch, dtype)``: ``step.TritonStep`` or
``cpu_step.CPUStep``) has ``forward(pre, c_prev, c_next, h_next, act, y, s,
iz, gamma, beta, mu, var)`` and ``backward(dh, d_out, dc, act, c_prev, c_next,
y, s, iz, gamma, beta, da, dx, u, v)``.  Activations (xproj, h, the matmuls)
stay in the input dtype; everything saved for the backward, the memory cell,
the statistics and the control state are float32.

With a projection (LSTM ``proj_size`` P, ``w_hr`` (P, H)) the kernel's h output
is m = o * tanh(c), and h = m W_hr^T is one more matmul per step; in the
backward dm = dh W_hr goes to the kernel as its dh.
"""
import torch


def _steps(buffer, count):
    """Per-step views of a (T, ...) buffer; a one-element placeholder stands for an unused one, and a buffer of
    one step for a scratch every step reuses."""
    if buffer.dim() == 1:
        return (buffer,) * count
    return buffer.unbind(0) if buffer.shape[0] > 1 else (buffer[0],) * count


def fused_forward(spec, xproj, h0, c0, w_hh, gamma, beta, w_hr, mu, var, make_step):
    """The forward of all T steps; ``mu``, ``var`` (online) are updated in place by the kernels.

    Returns what the backward needs: (h_all (T+1,B,P), m_all, c_all, act, y_all, s_all, iz); the unused
    ones are one-element placeholders (m_all is h_all[1:] without a projection).
    """
    T, B, GH = xproj.shape
    H, dtype, device = spec.hidden_size, xproj.dtype, xproj.device
    f32 = dict(dtype=torch.float32, device=device)
    none = torch.empty(1, **f32)
    unused = lambda: torch.empty(1, **f32)  # noqa: E731  (a fresh placeholder each: returned by an op)
    lstm, normed, c = spec.cell == "lstm", spec.norm is not None, spec.config
    kernel = make_step(spec, B, dtype)
    w = w_hh.to(dtype)
    h_all = xproj.new_empty(T + 1, B, h0.shape[-1])
    h_all[0] = h0
    wr = None if w_hr is None else w_hr.to(dtype)
    m_all = h_all[1:] if wr is None else xproj.new_empty(T, B, H)  # what the kernel writes: m = o tanh(c)
    c_all = torch.empty(T + 1, B, H, **f32) if lstm else unused()
    if lstm:
        c_all[0] = c0
    kept = T if spec.saves else 1  # inference: every step writes the same scratch (nothing kept for a backward)
    act = torch.empty(kept, B, GH, **f32)
    y_all = torch.empty(kept, B, GH, **f32) if normed else unused()
    s_all = torch.empty(kept, B, GH, **f32) if normed else unused()
    iz = torch.empty(kept, B, spec.gates, **f32) if spec.norm == "online" and c.ecm == "ls" else unused()
    g, b = (gamma.float().contiguous(), beta.float().contiguous()) if gamma is not None else (none, none)
    mu, var = (mu, var) if spec.norm == "online" else (none, none)
    if getattr(kernel, "native", False):  # the C time loop (cpu_sequence.c): one call for all T steps
        kernel.forward_sequence(xproj.contiguous(), h_all, m_all, c_all, act, y_all, s_all, iz, g, b, mu, var,
                                w.contiguous(), None if wr is None else wr.contiguous())
        return h_all, m_all, c_all, act, y_all, s_all, iz
    steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
    h_s, m_s, c_s, act_s, y_s, s_s, iz_s = map(steps, (h_all, m_all, c_all, act, y_all, s_all, iz))
    pre, w_t = xproj.new_empty(B, GH), w.t()
    with torch.autocast(device.type, enabled=False):
        for t in range(T):
            torch.addmm(xproj[t], h_s[t], w_t, out=pre)
            kernel.forward(pre, c_s[t], c_s[t + 1], m_s[t], act_s[t], y_s[t], s_s[t], iz_s[t], g, b, mu, var)
            if wr is not None:
                torch.mm(m_s[t], wr.t(), out=h_s[t + 1])
    return h_all, m_all, c_all, act, y_all, s_all, iz


def fused_backward(spec, saved, d_out, d_hn, d_cn, w_hh, gamma, beta, w_hr, u, v, make_step):
    """Steps T-1..0 from ``fused_forward``'s ``saved``; ``u``, ``v`` (online, training) updated in place.

    ``d_out`` (T,B,P), ``d_hn``, ``d_cn`` may be None.  Returns dL/d(xproj, h0, c0, w_hh, gamma, beta, w_hr)
    in the activation dtype (float32 for c0, gamma, beta), None where there is no such input.
    """
    h_all, m_all, c_all, act, y_all, s_all, iz = saved
    T, B, GH = act.shape
    H, P, dtype, device = spec.hidden_size, h_all.shape[-1], h_all.dtype, h_all.device
    none = torch.empty(1, dtype=torch.float32, device=device)
    lstm, affine = spec.cell == "lstm", spec.norm is not None and spec.config.affine
    kernel = make_step(spec, B, dtype)
    w = w_hh.to(dtype)
    wr = None if w_hr is None else w_hr.to(dtype)
    g, b = (gamma.float().contiguous(), beta.float().contiguous()) if gamma is not None else (none, none)
    dh = torch.zeros(B, P, dtype=dtype, device=device) if d_hn is None else d_hn.to(dtype).contiguous().clone()
    dc = none
    if lstm:
        dc = torch.zeros(B, H, dtype=torch.float32, device=device) if d_cn is None else d_cn.float().contiguous().clone()
    d_pre = torch.empty(T, B, GH, dtype=dtype, device=device)
    u, v = (u, v) if spec.norm == "online" and u is not None else (none, none)  # None: eval, no control
    d_out = None if d_out is None else d_out.to(dtype).contiguous()
    dh_all = None if wr is None else torch.empty(T, B, P, dtype=dtype, device=device)
    dm = None if wr is None else torch.empty(B, H, dtype=dtype, device=device)
    d_gamma = d_beta = None
    if getattr(kernel, "native", False):  # the C time loop (cpu_sequence.c): one call, the affine's sums inside
        sums = torch.zeros(2, GH, dtype=torch.float64, device=device) if affine else (None, None)
        kernel.backward_sequence(dh, d_out, dc, act, c_all, y_all, s_all, iz, g, b, none, d_pre, u, v, w.contiguous(),
                                 None if wr is None else wr.contiguous(), dh_all, dm, *sums)
        if affine:
            d_gamma, d_beta = sums[0].float(), sums[1].float()
    else:
        da = torch.empty(T, B, GH, dtype=torch.float32, device=device) if affine else none
        _backward_loop(kernel, d_out, dh, dc, saved, g, b, da, d_pre, u, v, w, wr, dh_all, dm)
        if affine:
            d_gamma, d_beta = (da * y_all).sum((0, 1)), da.sum((0, 1))
    with torch.autocast(device.type, enabled=False):
        d_w = torch.mm(d_pre.view(T * B, GH).t(), h_all[:-1].reshape(T * B, P))
        d_w_hr = None if wr is None else torch.mm(dh_all.view(T * B, P).t(), m_all.reshape(T * B, H))
    return d_pre, dh, dc if lstm else None, d_w, d_gamma, d_beta, d_w_hr


def _backward_loop(kernel, d_out, dh, dc, saved, g, b, da, d_pre, u, v, w, wr, dh_all, dm):
    """The time loop of ``fused_backward`` in Python: one kernel call and one matmul per step."""
    _, _, c_all, act, y_all, s_all, iz = saved
    T = act.shape[0]
    steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
    c_s, act_s, y_s, s_s, iz_s, da_s, dx_s = map(steps, (c_all, act, y_all, s_all, iz, da, d_pre))
    d_out_s = (None,) * T if d_out is None else steps(d_out)
    with torch.autocast(act.device.type, enabled=False):
        for t in range(T - 1, -1, -1):
            d_kernel, d_out_t = dh, d_out_s[t]
            if wr is not None:  # h = m W_hr^T: the kernel gets dm = (dh + d_out) W_hr as its dh
                if d_out_t is None:
                    dh_all[t].copy_(dh)
                else:
                    torch.add(dh, d_out_t, out=dh_all[t])
                d_kernel, d_out_t = torch.mm(dh_all[t], wr, out=dm), None
            kernel.backward(d_kernel, d_out_t, dc, act_s[t], c_s[t], c_s[t + 1], y_s[t], s_s[t], iz_s[t], g, b,
                            da_s[t], dx_s[t], u, v)
            torch.mm(dx_s[t], w, out=dh)


def gru_forward(spec, xproj, h0, w_hh, b_hh, gamma, beta, mu, var, make_step):
    """The GRU's forward of all T steps (docs/gru.md); ``mu``, ``var`` (online) updated in place.

    ``xproj`` = W_ih x + b_ih (T,B,3H); per step gh = h W_hh^T + b_hh (b_hn stays inside r's product).
    Returns (h_all (T+1,B,H), ghn_all (T,B,H): each step's W_hn h + b_hn, act (r, z, n), y_all, s_all, iz).
    """
    T, B, GH = xproj.shape
    H, device = spec.hidden_size, xproj.device
    f32 = dict(dtype=torch.float32, device=device)
    unused = lambda: torch.empty(1, **f32)  # noqa: E731
    normed, c = spec.norm is not None, spec.config
    kernel = make_step(spec, B, xproj.dtype)
    h_all = xproj.new_empty(T + 1, B, H)
    h_all[0] = h0
    ghn_all, act = torch.empty(T, B, H, **f32), torch.empty(T, B, GH, **f32)
    y_all = torch.empty(T, B, GH, **f32) if normed else unused()
    s_all = torch.empty(T, B, GH, **f32) if normed else unused()
    iz = torch.empty(T, B, 3, **f32) if spec.norm == "online" and c.ecm == "ls" else unused()
    none = unused()
    g, b = (gamma.float().contiguous(), beta.float().contiguous()) if gamma is not None else (none, none)
    mu, var = (mu, var) if spec.norm == "online" else (none, none)
    w = w_hh.to(xproj.dtype).contiguous()
    bias = None if b_hh is None else b_hh.to(xproj.dtype).contiguous()
    if getattr(kernel, "native", False):
        kernel.gru_forward_sequence(xproj.contiguous(), h_all, act, y_all, s_all, iz, g, b, mu, var, w, bias, ghn_all)
    else:
        steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
        act_s, y_s, s_s, iz_s = map(steps, (act, y_all, s_all, iz))
        gh = xproj.new_empty(B, GH)
        for t in range(T):
            if bias is None:
                torch.mm(h_all[t], w.t(), out=gh)
            else:
                torch.addmm(bias, h_all[t], w.t(), out=gh)
            kernel.gru_forward(xproj[t], gh, h_all[t], h_all[t + 1], act_s[t], y_s[t], s_s[t], iz_s[t], g, b, mu, var,
                               ghn_all[t])
    return h_all, ghn_all, act, y_all, s_all, iz


def gru_backward(spec, saved, d_out, w_hh, gamma, beta, u, v, make_step):
    """Steps T-1..0 of the GRU from ``gru_forward``'s ``saved``; ``u``, ``v`` (online, training) updated in place.

    Returns dL/d(xproj, h0, w_hh, gamma, beta, b_hh) (None for gamma, beta without the affine).
    """
    h_all, ghn_all, act, y_all, s_all, iz = saved
    T, B, GH = act.shape  # (the kernels read h_all in its own dtype)
    H, device = spec.hidden_size, act.device
    none = torch.empty(1, dtype=torch.float32, device=device)
    affine = spec.norm is not None and spec.config.affine
    kernel = make_step(spec, B, torch.float32)
    w = w_hh.float().contiguous()
    g, b = (gamma.float().contiguous(), beta.float().contiguous()) if gamma is not None else (none, none)
    u, v = (u, v) if spec.norm == "online" and u is not None else (none, none)
    dh = torch.zeros(B, H, dtype=torch.float32, device=device)
    d_pre, d_gh = torch.empty(T, B, GH, device=device), torch.empty(T, B, GH, device=device)
    dh_direct = torch.empty(B, H, device=device)
    d_out = None if d_out is None else d_out.float().contiguous()
    d_gamma = d_beta = None
    if getattr(kernel, "native", False):
        sums = torch.zeros(2, GH, dtype=torch.float64, device=device) if affine else (None, None)
        kernel.gru_backward_sequence(dh, d_out, h_all, act, ghn_all, y_all, s_all, iz, g, b, none, d_pre, d_gh, u, v,
                                     w, dh_direct, *sums)
        if affine:
            d_gamma, d_beta = sums[0].float(), sums[1].float()
    else:
        da = torch.empty(T, B, GH, device=device) if affine else none
        steps = lambda buf: _steps(buf, T + 1)  # noqa: E731
        act_s, y_s, s_s, iz_s, da_s = map(steps, (act, y_all, s_all, iz, da))
        for t in range(T - 1, -1, -1):
            kernel.gru_backward(dh, None if d_out is None else d_out[t], dh_direct, act_s[t], h_all[t], ghn_all[t],
                                y_s[t], s_s[t], iz_s[t], g, b, da_s[t], d_pre[t], d_gh[t], u, v)
            torch.addmm(dh_direct, d_gh[t], w, out=dh)
        if affine:
            d_gamma, d_beta = (da * y_all).sum((0, 1)), da.sum((0, 1))
    d_w = torch.mm(d_gh.view(T * B, GH).t(), h_all[:-1].reshape(T * B, H).float())
    return d_pre, dh, d_w, d_gamma, d_beta, d_gh.sum((0, 1))
