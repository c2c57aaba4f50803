"""Independent float64 references written from DESIGN §2 and §3 for the tests.

Nothing here imports seqnorm: these loops are what the library is held to.
"""
import torch


def on_forward(x, mu, var, alpha, eps):
    """Per-row Online Normalization forward. x: (N, C, L). Returns y, s, mu, var."""
    ys, ss = [], []
    for row in x:
        s = torch.sqrt(var + eps)
        ys.append((row - mu[:, None]) / s[:, None])
        ss.append(s)
        m, sig2 = row.mean(-1), ((row - row.mean(-1, keepdim=True)) ** 2).mean(-1)
        new_var = alpha * var + (1 - alpha) * sig2 + alpha * (1 - alpha) * (m - mu) ** 2
        mu = alpha * mu + (1 - alpha) * m
        var = new_var
    return torch.stack(ys), torch.stack(ss), mu, var


def on_backward(g, y, s, u, v, alpha_bkw, v_decay_min):
    """Per-row control process (eqs. 11-12), rows in order. Returns dx, u, v.

    v_decay_min: floor on v's decay 1 - (1 - alpha_bkw) mean(y^2) (DESIGN §2); None: no floor.
    """
    out = []
    for g_n, y_n, s_n in zip(g, y, s):
        gt = g_n - (1 - alpha_bkw) * v[:, None] * y_n
        decay = 1 - (1 - alpha_bkw) * (y_n**2).mean(-1)
        if v_decay_min is not None:
            decay = torch.maximum(decay, torch.full_like(decay, v_decay_min))
        v = decay * v + (g_n * y_n).mean(-1)
        dx = gt / s_n[:, None] - (1 - alpha_bkw) * u[:, None]
        u = u + dx.mean(-1)
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
