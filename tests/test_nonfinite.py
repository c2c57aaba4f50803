"""Non-finite samples never enter the Online Normalization state, in every implementation.

The rule: per feature, an update whose result is not finite leaves that
feature's state as it was (mu and var in the forward, u and v in the
backward).  The sample's own outputs and gradients may be non-finite.  Each
path is held to the float64 per-row loops of tests/reference.py run with
``skip_nonfinite=True``.
"""
import warnings

import pytest
import torch

import reference
import seqnorm
from layer_helpers import BACKEND_IDS, BACKENDS, forward_backward, on_backend, require
from seqnorm import OnlineNorm

F64 = torch.float64
ALPHA_FWD, ALPHA_BKW = 0.9, 0.8


def poisoned(shape, dtype=F64, seed=0):
    """Random input with a NaN and an inf in a few elements."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=dtype) * 2
    x.view(-1)[3] = float("nan")
    x.view(-1)[x.numel() // 2] = float("inf")
    x.view(-1)[-2] = -float("inf")
    return x


def assert_state_finite(module):
    for name, buf in module.named_buffers():
        assert torch.isfinite(buf).all(), name


def nan_and_inf_samples(C):
    xs = [poisoned((5, C), seed=0), torch.randn(5, C, dtype=F64), poisoned((4, C), seed=1)]
    gs = [torch.randn(x.shape, dtype=F64) for x in xs]
    gs[1][2, 3] = float("nan")  # a non-finite gradient on a clean forward: u, v skip that update
    return xs, gs


def overflowing_samples(C):
    """Finite samples whose update overflows only the second quantity of a pair: a value of 1e200 leaves the
    mean finite and makes the variance inf (d**2); a gradient of 1e200 on it makes v inf (g*y) and u finite.  In
    the last row of a call, so that no later row of the call carries the overflow into the other quantity."""
    torch.manual_seed(2)
    xs = [torch.randn(5, C, dtype=F64) for _ in range(3)]
    gs = [torch.randn(x.shape, dtype=F64) for x in xs]
    xs[1][-1, 4] = 1e200
    gs[1][-1, 4] = 1e200
    return xs, gs


# overflowing samples without layer scaling: their own LS output overflows too (the reference's gives 0, ours NaN,
# both within the rule), and the rule under test is the state's
@pytest.mark.parametrize("ecm, samples", [("none", nan_and_inf_samples), ("ls", nan_and_inf_samples),
                                          ("none", overflowing_samples)], ids=["none-nan", "ls-nan", "none-overflow"])
@pytest.mark.parametrize("impl", ["scan", "loop"])
def test_online_norm_skips_nonfinite_updates(impl, ecm, samples):
    C = 6
    xs, gs = samples(C)
    m = OnlineNorm(C, ALPHA_FWD, ALPHA_BKW, affine=False, ecm=ecm, impl=impl, dtype=F64)
    ins = [x.clone().requires_grad_() for x in xs]
    outs = [m(x) for x in ins]
    assert_state_finite(m)  # already after the forwards
    torch.autograd.backward(outs, gs)
    assert_state_finite(m)

    mu, var, u, v = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64), torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    saved = []
    for x in xs:
        y, s, mu, var = reference.on_forward(x[..., None], mu, var, ALPHA_FWD, 1e-5, skip_nonfinite=True)
        yl = y[..., 0].clone().requires_grad_()
        saved.append((yl, reference.affine_ecm(yl, None, None, ecm, C), y, s))
    for k in reversed(range(len(xs))):
        yl, z, y, s = saved[k]
        (gy,) = torch.autograd.grad(z, yl, gs[k])
        dx, u, v = reference.on_backward(gy[..., None], y, s, u, v, ALPHA_BKW, 1e-5, skip_nonfinite=True)
        torch.testing.assert_close(ins[k].grad, dx[..., 0], rtol=1e-9, atol=1e-9, equal_nan=True)
    for out, (_, z, _, _) in zip(outs, saved):
        torch.testing.assert_close(out, z, rtol=1e-10, atol=1e-10, equal_nan=True)
    for buf, want in zip((m.running_mean, m.running_var, m.control_u, m.control_v), (mu, var, u, v)):
        torch.testing.assert_close(buf, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_layer_skips_nonfinite_samples_then_trains_on(cell, backend, dtype):
    require(backend)
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 5, 6
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    ref = cls(I, H, alpha_fwd=ALPHA_FWD, alpha_bkw=ALPHA_BKW, dtype=F64)
    layer = on_backend(ref, backend, dtype)
    hx = tuple(torch.randn(1, B, H, dtype=F64) for _ in range(2 if cell == "lstm" else 1))
    weights = torch.randn(T, B, H, dtype=F64)
    bad = torch.randn(T, B, I, dtype=F64)
    bad[1, 1, 2] = float("nan")  # sample 1 from step 1 on, through the recurrence
    bad[2, 0, 0] = float("inf")  # sample 0 from step 2 on
    st = reference.online_state(ref.gates * H, ALPHA_FWD, ALPHA_BKW, 1e-5, skip_nonfinite=True)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in (bad, torch.randn(T, B, I, dtype=F64)):  # the poisoned call, then a clean one
            want = forward_backward(ref, x, hx, weights, st)
            got = forward_backward(layer, x.to(dtype), tuple(h.to(dtype) for h in hx), weights.to(dtype))
            for key in want:
                torch.testing.assert_close(got[key].double(), want[key], **tol, equal_nan=True, msg=key)
            for key in ("mu", "var", "u", "v"):
                assert torch.isfinite(got[key]).all(), key
    assert all(torch.isfinite(t).all() for t in got.values())  # the clean call after it: all finite again
    assert not torch.isfinite(torch.cat(st["y"][:T])).all()  # the first call did meet non-finite samples


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_train_mode_forward_under_no_grad_keeps_state_finite_and_warns_once(backend):
    lstm = seqnorm.LSTM(8, 5, num_layers=2, backend=backend)
    x = torch.randn(5, 3, 8)
    x[2, 1, 4] = float("nan")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="non-finite values"):
        lstm(x)
    assert_state_finite(lstm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module: no second warning
        with torch.no_grad():
            lstm(x)
        out, _ = lstm(torch.randn(5, 3, 8))
        out.sum().backward()
    assert torch.isfinite(out).all()
    assert_state_finite(lstm)
    for p in lstm.parameters():
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gru_skips_nonfinite_samples_as_its_torch_path_does(backend):
    """The GRU's fused kernels against its torch path (per-step autograd through OnlineNorm, whose skipping is
    held to the reference above): a poisoned call, then a clean one; the state stays finite throughout."""
    require(backend)
    torch.manual_seed(0)
    ref = seqnorm.GRU(5, 6, alpha_fwd=ALPHA_FWD, alpha_bkw=ALPHA_BKW, backend="torch")
    layer = on_backend(ref, backend, torch.float32)
    bad = torch.randn(4, 3, 5)
    bad[1, 1, 2] = float("nan")
    bad[2, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in (bad, torch.randn(4, 3, 5)):
            results = []
            for m in (ref, layer):
                xi = x.clone().requires_grad_()
                out, h = m(xi)
                out.nan_to_num(0.0, 0.0, 0.0).sum().backward()
                results.append([out.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()]
                               + [b.clone() for b in m.buffers()])
                m.zero_grad()
                assert_state_finite(m)
            for want, got in zip(*results):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
            assert torch.isfinite(results[1][0]).all() == (x is not bad)  # the poisoned samples' outputs are not
    assert all(torch.isfinite(t).all() for t in results[1])  # the clean call after it: all finite again
