"""Online Normalization (Chiley et al., NeurIPS 2019), docs/design.md §2, paper eqs. 8-12.

A streaming normalizer: rows of an (N, C, *L) input are samples, processed one
at a time in row order, and calls in call order.  The forward pass normalizes
each sample with running estimates of mean and variance taken *before* it
(eq. 8); the backward pass runs a control process (eqs. 11-12) that keeps the
gradient orthogonal to y and to the constant vector.

Two implementations of the per-row recurrences, which must agree:
``"loop"`` is a plain loop over rows written from the equations (the readable
reference); ``"scan"`` (the default) runs the same recurrences as scans over
rows (``seqnorm.scan``).

Non-finite samples: per feature, an update whose result is not finite leaves
that feature's state as it was (mu and var together in the forward, u and v
together in the backward), so a NaN or inf sample makes its own outputs and
gradients non-finite but never enters the running state.  The loop does this
row by row; a scan cannot skip a row, so when its final state is not finite
the call is redone by the loop (one finiteness check per call).  ``OnlineNormState`` holds the four float32 running
quantities, so one state can be shared by many calls, e.g. by every time
step of a recurrent layer.
"""
from dataclasses import dataclass

import torch
from torch import nn

from . import _checks, scan
from ._params import add_affine
from .ecm import ECM_CHOICES, apply_ecm

IMPLS = ("scan", "loop")


@dataclass
class OnlineNormState:
    """Running state of one normalizer, one value per feature, updated in place.

    mu, var: forward running mean and variance (eq. 8).
    u, v: backward control accumulators for the mean-zero condition (eps^(1),
    eq. 12) and orthogonality to y (eps^(y), eq. 11).
    """

    mu: torch.Tensor
    var: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @classmethod
    def initial(cls, num_features: int, device=None, dtype=torch.float32) -> "OnlineNormState":
        zeros = lambda: torch.zeros(num_features, device=device, dtype=dtype)  # noqa: E731
        return cls(zeros(), torch.ones(num_features, device=device, dtype=dtype), zeros(), zeros())

    def clone(self) -> "OnlineNormState":
        return OnlineNormState(self.mu.clone(), self.var.clone(), self.u.clone(), self.v.clone())


# --- reference: a loop over rows, written from the equations -----------------


def _keep_finite(new: tuple, old: tuple) -> tuple:
    """Per feature: the new values where all of them are finite, else the old ones."""
    ok = torch.isfinite(new[0])
    for t in new[1:]:
        ok &= torch.isfinite(t)
    return tuple(torch.where(ok, n, o) for n, o in zip(new, old))


def all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def forward_rows(x, mu, var, alpha, eps):
    """Eq. 8 over the rows of x (N, C, L) from the statistics (mu, var), in plain differentiable ops.

    Returns y (N, C, L), s (N, C) (the scale each row used) and the statistics after the last row.
    """
    ys, ss = [], []
    for row in x:
        s = torch.sqrt(var + eps)  # state before this sample
        ys.append((row - mu[:, None]) / s[:, None])  # eq. 8a
        ss.append(s)
        d = row.mean(-1) - mu
        new_var = alpha * var + (1 - alpha) * row.var(-1, unbiased=False) + alpha * (1 - alpha) * d**2  # eq. 8c
        new_mu = mu + (1 - alpha) * d  # eq. 8b
        mu, var = _keep_finite((new_mu, new_var), (mu, var))
    return torch.stack(ys), torch.stack(ss), mu, var


def _forward_loop(x, state, alpha, eps):
    """x: (N, C, L). Returns y (N, C, L) and s (N, C); ``state.mu/var`` updated."""
    y, s, mu, var = forward_rows(x, state.mu.to(x.dtype), state.var.to(x.dtype), alpha, eps)
    state.mu.copy_(mu)
    state.var.copy_(var)
    return y, s


def control_rows(g, y, s, u, v, alpha_bkw, v_decay_min):
    """The control process (eqs. 11-12) over rows 0..N-1 from (u, v), in plain differentiable ops.

    g, y: (N, C, L); s: (N, C).  Returns dL/dx (N, C, L) and (u, v) after the last row.
    """
    beta = 1 - alpha_bkw
    out = []
    for g_n, y_n, s_n in zip(g, y, s):
        gt = g_n - beta * v[:, None] * y_n  # eq. 11a
        decay = 1 - beta * (y_n * y_n).mean(-1)  # eq. 11b: v + mean(gt y) = decay v + mean(g y) ...
        if v_decay_min is not None:
            decay = decay.clamp_min(v_decay_min)  # ... with the reference's floor on the decay
        new_v = decay * v + (g_n * y_n).mean(-1)
        dx = gt / s_n[:, None] - beta * u[:, None]  # eq. 12a
        new_u = u + dx.mean(-1)  # eq. 12b
        u, v = _keep_finite((new_u, new_v), (u, v))
        out.append(dx)
    return torch.stack(out), u, v


def _backward_loop(g, y, s, state, alpha_bkw, v_decay_min):
    """Control process, rows in order 0..N-1; ``state.u/v`` updated."""
    dx, u, v = control_rows(g, y, s, state.u.to(g.dtype), state.v.to(g.dtype), alpha_bkw, v_decay_min)
    state.u.copy_(u)
    state.v.copy_(v)
    return dx


# --- fast path: the same recurrences as scans over rows ------------------------


def _forward_scan(x, state, alpha, eps):
    m = x.mean(-1)
    mu_all = scan.const_scan(state.mu.to(x.dtype), m, alpha, 1 - alpha)  # eq. 8b
    d = m - mu_all[:-1]
    var_in = alpha * (1 - alpha) * d**2
    if x.shape[-1] > 1:
        var_in = var_in + (1 - alpha) * x.var(-1, unbiased=False)
    var_all = scan.const_scan(state.var.to(x.dtype), var_in, alpha)  # eq. 8c
    if not all_finite(mu_all[-1], var_all[-1]):  # a non-finite sample: skip its update, row by row
        return _forward_loop(x, state, alpha, eps)
    s = torch.sqrt(var_all[:-1] + eps)
    y = (x - mu_all[:-1, :, None]) / s[..., None]  # eq. 8a
    state.mu.copy_(mu_all[-1])
    state.var.copy_(var_all[-1])
    return y, s


def _backward_scan(g, y, s, state, alpha_bkw, v_decay_min):
    beta = 1 - alpha_bkw
    # eq. 11: v[n+1] = v[n] + mean(gt*y) = max(1 - beta*mean(y^2), v_decay_min) v[n] + mean(g*y)
    a = 1 - beta * (y * y).mean(-1)
    if v_decay_min is not None:
        a = a.clamp_min(v_decay_min)  # then every a > 0 and the cumprod form applies unless it underflows
    prod = torch.cumprod(a, 0) if scan.cumprod_is_safe(a)[0] else None
    v_all = scan.var_scan(state.v.to(g.dtype), a, (g * y).mean(-1), prod)
    gt = g - beta * v_all[:-1, :, None] * y  # eq. 11a
    # eq. 12: u[n+1] = u[n] + mean(x') = alpha_bkw u[n] + mean(gt)/s
    u_all = scan.const_scan(state.u.to(g.dtype), gt.mean(-1) / s, alpha_bkw)
    if not all_finite(u_all[-1], v_all[-1]):
        return _backward_loop(g, y, s, state, alpha_bkw, v_decay_min)
    dx = gt / s[..., None] - beta * u_all[:-1, :, None]  # eq. 12a
    state.u.copy_(u_all[-1])
    state.v.copy_(v_all[-1])
    return dx


_FORWARD = {"scan": _forward_scan, "loop": _forward_loop}
_BACKWARD = {"scan": _backward_scan, "loop": _backward_loop}


def compute_dtype(x_dtype: torch.dtype, state: OnlineNormState) -> torch.dtype:
    """Statistics never run below float32, whatever the activation dtype."""
    return torch.promote_types(torch.promote_types(x_dtype, state.mu.dtype), torch.float32)


class _OnlineNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state, alpha_fwd, alpha_bkw, eps, impl, v_decay_min):
        x3 = x.reshape(x.shape[0], x.shape[1], -1).to(compute_dtype(x.dtype, state))
        y, s = _FORWARD[impl](x3, state, alpha_fwd, eps)
        ctx.save_for_backward(y, s)
        ctx.state, ctx.alpha_bkw, ctx.impl, ctx.v_decay_min = state, alpha_bkw, impl, v_decay_min
        return y.view(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, s = ctx.saved_tensors
        g = grad.reshape(y.shape).to(y.dtype)
        dx = _BACKWARD[ctx.impl](g, y, s, ctx.state, ctx.alpha_bkw, ctx.v_decay_min)
        return dx.view(grad.shape).to(grad.dtype), None, None, None, None, None, None


def online_norm(
    x: torch.Tensor,
    state: OnlineNormState,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    training: bool = True,
    impl: str = "scan",
    v_decay_min: float | None = 1e-5,
) -> torch.Tensor:
    """Normalize x of shape (N, C, *L) with a shared ``state`` (no affine, no ECM).

    Training: the streaming forward updates ``state.mu/var`` in place, and the
    backward (when autograd runs it) updates ``state.u/v``.  Eval: frozen stats.
    v_decay_min: floor on v's per-row decay (the reference's recurrent experiments); None: as printed.
    """
    if training:
        return _OnlineNormFunction.apply(x, state, alpha_fwd, alpha_bkw, eps, impl, v_decay_min)
    view = (1, -1) + (1,) * (x.dim() - 2)
    dtype = compute_dtype(x.dtype, state)
    y = (x.to(dtype) - state.mu.to(dtype).view(view)) * torch.rsqrt(state.var.to(dtype).view(view) + eps)
    return y.to(x.dtype)


class OnlineNorm(nn.Module):
    """Online Normalization of (N, C) or (N, C, *L) input, then affine, then ECM.

    ecm: ``"ls"`` layer scaling over groups of ``ls_group_size`` features
    (default: all C), ``"ac"`` activation clamping at ``clamp_value``, ``"none"``.
    v_decay_min: floor on v's per-row decay in eq. 11, as in the reference's
    recurrent experiments (docs/design.md §2); None gives the paper's printed equations.
    State buffers (saved in the state_dict; float32, or float64 for a float64
    module, never lower): running_mean, running_var, control_u, control_v.
    """

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str = "ls",
        clamp_value: float = 5.0,
        ls_eps: float = 1e-5,
        ls_group_size: int | None = None,
        impl: str = "scan",
        v_decay_min: float | None = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        group = num_features if ls_group_size is None else ls_group_size
        if not isinstance(group, int) or group < 1 or num_features % group:
            raise ValueError(f"ls_group_size must be a positive divisor of num_features={num_features}, got {ls_group_size!r}")
        self.num_features = num_features
        self.alpha_fwd = _checks.check_alpha("alpha_fwd", alpha_fwd)
        self.alpha_bkw = _checks.check_alpha("alpha_bkw", alpha_bkw)
        self.eps = _checks.check_positive("eps", eps)
        self.ls_eps = _checks.check_positive("ls_eps", ls_eps)
        self.clamp_value = _checks.check_positive("clamp_value", clamp_value)
        self.ecm = _checks.check_choice("ecm", ecm, ECM_CHOICES)
        self.impl = _checks.check_choice("impl", impl, IMPLS)
        self.v_decay_min = _checks.check_v_decay_min(v_decay_min)
        self.ls_group_size = group
        self.affine = affine
        add_affine(self, num_features, affine, device, dtype)
        state_dtype = torch.promote_types(dtype or torch.float32, torch.float32)
        init = OnlineNormState.initial(num_features, device=device, dtype=state_dtype)
        self.register_buffer("running_mean", init.mu)
        self.register_buffer("running_var", init.var)
        self.register_buffer("control_u", init.u)
        self.register_buffer("control_v", init.v)

    @property
    def state(self) -> OnlineNormState:
        """A view of the buffers: updating it updates the module."""
        return OnlineNormState(self.running_mean, self.running_var, self.control_u, self.control_v)

    def reset_state(self) -> None:
        init = OnlineNormState.initial(self.num_features, self.running_mean.device, self.running_mean.dtype)
        for buf, value in zip((self.running_mean, self.running_var, self.control_u, self.control_v), vars(init).values()):
            buf.copy_(value)

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16() must not lower the statistics below float32.
        super()._apply(fn, recurse)
        for name in ("running_mean", "running_var", "control_u", "control_v"):
            buf = getattr(self, name)
            if buf.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buf.float())
        return self

    def check_input(self, x: torch.Tensor, num_features: int | None = None) -> None:
        _checks.check_floating("input", x)
        want = self.num_features if num_features is None else num_features
        if x.dim() < 2:
            raise ValueError(f"input must have shape (N, C) or (N, C, *L), got shape {tuple(x.shape)}")
        if x.shape[1] != want:
            raise ValueError(f"input has {x.shape[1]} features (dim 1) but num_features={want}")
        if x.shape[0] == 0 or x.numel() == 0:
            raise ValueError(f"input is empty: shape {tuple(x.shape)}")
        _checks.check_device("input", x, self.running_mean.device)

    def forward(self, x: torch.Tensor, features: slice | None = None) -> torch.Tensor:
        """``features``: normalize x as these features of the module (its state, affine and ECM groups), for a
        cell whose gates are normalized in turn (the GRU's n gate needs r first); the others stay untouched.
        Each feature's samples come in row order either way, so the state is what one call would leave."""
        features = slice(0, self.num_features) if features is None else features
        start, stop, _ = features.indices(self.num_features)
        if start % self.ls_group_size or stop % self.ls_group_size:
            raise ValueError(f"features {start}:{stop} must be whole ECM groups of {self.ls_group_size}")
        self.check_input(x, stop - start)
        state = OnlineNormState(*(t[start:stop] for t in vars(self.state).values()))  # views: updated in place
        y = online_norm(x, state, self.alpha_fwd, self.alpha_bkw, self.eps, self.training, self.impl,
                        self.v_decay_min)
        if self.affine:
            view = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight[start:stop].view(view) + self.bias[start:stop].view(view)
        return apply_ecm(y, self.ecm, self.ls_group_size, self.ls_eps, self.clamp_value)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
            f"affine={self.affine}, ecm={self.ecm!r}, ls_group_size={self.ls_group_size}, "
            f"v_decay_min={self.v_decay_min}"
        )
