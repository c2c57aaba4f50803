"""Independent float64 references written from docs/design.md §2 and §3 for the tests.

Nothing here imports seqnorm: these loops are what the library is held to.
"""
import torch


def _update(new, old, skip_nonfinite):
    """With skip_nonfinite, a feature keeps its old values unless all its new ones are finite."""
    if not skip_nonfinite:
        return new
    ok = torch.isfinite(new[0]) & torch.isfinite(new[1])
    return tuple(torch.where(ok, n, o) for n, o in zip(new, old))


def on_forward(x, mu, var, alpha, eps, skip_nonfinite=False):
    """Per-row Online Normalization forward. x: (N, C, L). Returns y, s, mu, var."""
    ys, ss = [], []
    for row in x:
        s = torch.sqrt(var + eps)
        ys.append((row - mu[:, None]) / s[:, None])
        ss.append(s)
        m, sig2 = row.mean(-1), ((row - row.mean(-1, keepdim=True)) ** 2).mean(-1)
        new_var = alpha * var + (1 - alpha) * sig2 + alpha * (1 - alpha) * (m - mu) ** 2
        new_mu = alpha * mu + (1 - alpha) * m
        mu, var = _update((new_mu, new_var), (mu, var), skip_nonfinite)
    return torch.stack(ys), torch.stack(ss), mu, var


def on_backward(g, y, s, u, v, alpha_bkw, v_decay_min, skip_nonfinite=False):
    """Per-row control process (eqs. 11-12), rows in order. Returns dx, u, v.

    v_decay_min: floor on v's decay 1 - (1 - alpha_bkw) mean(y^2) (docs/design.md §2); None: no floor.
    """
    out = []
    for g_n, y_n, s_n in zip(g, y, s):
        gt = g_n - (1 - alpha_bkw) * v[:, None] * y_n
        decay = 1 - (1 - alpha_bkw) * (y_n**2).mean(-1)
        if v_decay_min is not None:
            decay = torch.maximum(decay, torch.full_like(decay, v_decay_min))
        new_v = decay * v + (g_n * y_n).mean(-1)
        dx = gt / s_n[:, None] - (1 - alpha_bkw) * u[:, None]
        new_u = u + dx.mean(-1)
        u, v = _update((new_u, new_v), (u, v), skip_nonfinite)
        out.append(dx)
    return torch.stack(out), u, v


def affine_ecm(y, weight, bias, ecm, group, ls_eps=1e-5, clamp_value=5.0):
    """a = weight*y + bias, then layer scaling over feature groups or clamping."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    a = y if weight is None else y * weight.view(view) + bias.view(view)
    if ecm == "ls":
        n, c = a.shape[:2]
        ga = a.reshape(n, c // group, -1)
        return (ga / torch.sqrt((ga**2).mean(-1, keepdim=True) + ls_eps)).reshape(a.shape)
    if ecm == "ac":
        return a.clamp(-clamp_value, clamp_value) * 1.0
    return a


class _OnlineNormStep(torch.autograd.Function):
    """One step's rows through on_forward / on_backward; ``st`` carries mu, var, u, v across steps and calls."""

    @staticmethod
    def forward(ctx, x, st):
        y, s, st["mu"], st["var"] = on_forward(x[..., None], st["mu"], st["var"], st["alpha_fwd"], 1e-5,
                                               st["skip_nonfinite"])
        ctx.save_for_backward(y, s)
        ctx.st = st
        st["y"].append(y)
        return y[..., 0]

    @staticmethod
    def backward(ctx, g):
        y, s = ctx.saved_tensors
        st = ctx.st
        dx, st["u"], st["v"] = on_backward(g[..., None], y, s, st["u"], st["v"], st["alpha_bkw"], st["v_decay_min"],
                                           st["skip_nonfinite"])
        return dx[..., 0], None


def online_state(features, alpha_fwd, alpha_bkw, v_decay_min, skip_nonfinite=False, dtype=torch.float64):
    """The state ``layer_loop`` carries; ``y`` collects every step's normalized rows."""
    zeros = lambda: torch.zeros(features, dtype=dtype)  # noqa: E731
    return {"mu": zeros(), "var": torch.ones(features, dtype=dtype), "u": zeros(), "v": zeros(), "y": [],
            "alpha_fwd": alpha_fwd, "alpha_bkw": alpha_bkw, "v_decay_min": v_decay_min,
            "skip_nonfinite": skip_nonfinite}


def layer_loop(params, cell, hidden_size, x, hx, st, lengths=None):
    """One online-normalized LSTM/RNN (tanh) layer, docs/design.md §3, one step at a time, differentiated by autograd:
    norm(W_ih x + b_ih + W_hh h + b_hh) with one state ``st`` for all steps, affine, layer scaling per gate, cell.
    ``params``: the layer's named parameters (weight_ih_l0, ..., weight_hr_l0 with a projection,
    norm_l0.weight, norm_l0.bias).  ``lengths`` (non-increasing, for packed input): at step t only the rows
    with lengths > t run (the normalizer sees just those); the others keep their h, c and output zeros."""
    p, H = params, hidden_size
    h, c = hx[0][0], hx[1][0] if cell == "lstm" else None
    outs = []
    for t, x_t in enumerate(x):
        n = len(x_t) if lengths is None else sum(1 for L in lengths if L > t)
        pre = x_t[:n] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h[:n] @ p["weight_hh_l0"].T + p["bias_hh_l0"]
        z = affine_ecm(_OnlineNormStep.apply(pre, st), p["norm_l0.weight"], p["norm_l0.bias"], "ls", H)
        if cell == "lstm":
            i, f, g, o = z.chunk(4, 1)
            c_new = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if "weight_hr_l0" in p:  # proj_size: h = W_hr (o * tanh c)
                h_new = h_new @ p["weight_hr_l0"].T
            c = torch.cat([c_new, c[n:]])
        else:
            h_new = torch.tanh(z)
        h = torch.cat([h_new, h[n:]])
        outs.append(torch.cat([h_new, h_new.new_zeros(len(h) - n, h.shape[1])]))
    return torch.stack(outs), (h[None], c[None]) if cell == "lstm" else (h[None],)
