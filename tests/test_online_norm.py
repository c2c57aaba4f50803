"""OnlineNorm against the independent float64 per-row loop (tests/reference.py)."""
import pytest
import torch

import reference
from seqnorm import OnlineNorm, OnlineNormState, online_norm
from seqnorm.ecm import clamp, layer_scale

F64 = torch.float64


def reference_calls(xs, grads, module_kwargs):
    """Run the reference over consecutive calls; return outputs, input grads, final state."""
    C = xs[0].shape[1]
    alpha_f, alpha_b = module_kwargs["alpha_fwd"], module_kwargs["alpha_bkw"]
    group = module_kwargs.get("ls_group_size") or C
    weight = torch.linspace(0.5, 1.5, C, dtype=F64) if module_kwargs["affine"] else None
    bias = torch.linspace(-0.3, 0.3, C, dtype=F64) if module_kwargs["affine"] else None
    mu, var, u, v = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64), torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    outs, saved = [], []
    for x in xs:
        x3 = x.reshape(x.shape[0], C, -1)
        y, s, mu, var = reference.on_forward(x3, mu, var, alpha_f, 1e-5)
        yl = y.reshape(x.shape).requires_grad_()
        z = reference.affine_ecm(yl, weight, bias, module_kwargs["ecm"], group)
        outs.append(z.detach())
        saved.append((yl, z, y, s))
    dxs = [None] * len(xs)
    for k in reversed(range(len(xs))):  # autograd order: last call's backward first
        yl, z, y, s = saved[k]
        (gy,) = torch.autograd.grad(z, yl, grads[k])
        dx, u, v = reference.on_backward(gy.reshape(y.shape), y, s, u, v, alpha_b, module_kwargs["v_decay_min"])
        dxs[k] = dx.reshape(xs[k].shape)
    return outs, dxs, (mu, var, u, v), (weight, bias)


@pytest.mark.parametrize("v_decay_min", [1e-5, None])
@pytest.mark.parametrize("ecm", ["ls", "ac", "none"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", ["scan", "loop"])
@pytest.mark.parametrize("shape", [(5, 6), (1, 6), (4, 6, 2), (4, 6, 3)])
def test_matches_reference_over_consecutive_calls(ecm, affine, impl, shape, v_decay_min):
    torch.manual_seed(0)
    kwargs = dict(alpha_fwd=0.8, alpha_bkw=0.7, ecm=ecm, affine=affine, ls_group_size=3, impl=impl,
                  v_decay_min=v_decay_min)
    xs = [torch.randn(shape, dtype=F64) * 2 + 1 for _ in range(4)]
    grads = [torch.randn(shape, dtype=F64) for _ in range(4)]
    outs, dxs, state, (weight, bias) = reference_calls(xs, grads, kwargs)

    m = OnlineNorm(6, dtype=F64, **kwargs)
    if affine:
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    ins = [x.clone().requires_grad_() for x in xs]
    zs = [m(x) for x in ins]
    torch.autograd.backward(zs, grads)
    for z, ref in zip(zs, outs):
        torch.testing.assert_close(z, ref, rtol=1e-10, atol=1e-10)
    for x, ref in zip(ins, dxs):
        torch.testing.assert_close(x.grad, ref, rtol=1e-9, atol=1e-10)
    for buf, ref in zip((m.running_mean, m.running_var, m.control_u, m.control_v), state):
        torch.testing.assert_close(buf, ref, rtol=1e-10, atol=1e-10)


def test_float32_module_keeps_float32_state_and_matches_reference():
    torch.manual_seed(1)
    m = OnlineNorm(8, alpha_fwd=0.9, alpha_bkw=0.9, ecm="none", affine=False)
    x = (torch.randn(16, 8) * 3 + 2).requires_grad_()
    g = torch.randn(16, 8)
    m(x).backward(g)
    y, s, mu, var = reference.on_forward(x.detach().double()[..., None], torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64), 0.9, 1e-5)
    dx, u, v = reference.on_backward(g.double()[..., None], y, s, torch.zeros(8, dtype=F64), torch.zeros(8, dtype=F64), 0.9,
                                     1e-5)
    assert m.running_mean.dtype == torch.float32
    torch.testing.assert_close(x.grad.double(), dx[..., 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.control_v.double(), v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("L", [1, 3])
def test_scan_equals_loop_including_the_unsafe_cumprod_case(L):
    """Large outputs make 1 - (1 - alpha_bkw) y^2 negative: the scan must switch method."""
    torch.manual_seed(2)
    x = torch.randn(40, 5, L, dtype=F64) * 50 + 20  # far from the initial state: |y| >> 1
    g = torch.randn_like(x)
    results = []
    for impl in ("scan", "loop"):
        st = OnlineNormState.initial(5, dtype=F64)
        xi = x.clone().requires_grad_()
        online_norm(xi, st, 0.9, 0.5, impl=impl).backward(g)
        results.append((xi.grad, st))
    assert (1 - 0.5 * (online_norm(x, OnlineNormState.initial(5, dtype=F64), 0.9, 0.5) ** 2).mean(-1)).min() < 0
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(vars(results[0][1]).values(), vars(results[1][1]).values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck_affine_and_ecm_parts():
    torch.manual_seed(3)
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer_scale(t, 3, 1e-5), (x,))
    xc = (torch.rand(4, 6, dtype=F64) * 8 - 4).requires_grad_()  # some entries beyond +-2
    assert torch.autograd.gradcheck(lambda t: clamp(t, 2.0), (xc,))
    at_the_bound = torch.tensor([-2.5, -2.0, -1.9, 1.9, 2.0, 2.5], dtype=F64, requires_grad=True)
    clamp(at_the_bound, 2.0).sum().backward()  # the gradient passes only where |a| < c (docs/design.md)
    assert at_the_bound.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    for ecm in ("ls", "ac", "none"):
        m = OnlineNorm(6, dtype=F64, ecm=ecm, ls_group_size=2, clamp_value=1.0).eval()
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        w, b = m.weight, m.bias

        assert torch.autograd.gradcheck(lambda inp: m(inp), (x,))
        # parameter gradients of the affine part against finite differences
        assert torch.autograd.gradcheck(
            lambda weight, bias: layer_scale((x.detach() - m.running_mean) / torch.sqrt(m.running_var + 1e-5) * weight + bias, 2, 1e-5)
            if ecm == "ls" else (x.detach() - m.running_mean) / torch.sqrt(m.running_var + 1e-5) * weight + bias,
            (w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()),
        )


def test_parameter_grads_match_closed_form():
    """dL/dweight = sum(dL/da * y), dL/dbias = sum(dL/da) for ecm='none'."""
    torch.manual_seed(4)
    m = OnlineNorm(5, dtype=F64, ecm="none")
    x = torch.randn(7, 5, dtype=F64)
    g = torch.randn(7, 5, dtype=F64)
    y, _, _, _ = reference.on_forward(x[..., None], torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64), m.alpha_fwd, 1e-5)
    m(x).backward(g)
    torch.testing.assert_close(m.weight.grad, (g * y[..., 0]).sum(0))
    torch.testing.assert_close(m.bias.grad, g.sum(0))


def test_stationary_stream_is_normalized_and_control_errors_stay_bounded():
    """Paper §4 properties: with alphas near 1 and a stationary input the outputs
    approach zero mean / unit variance; the control errors settle instead of growing
    (u at its fixed point E[g] / (sigma (1 - alpha_bkw)), v near 0 for g independent
    of y) while the gradients become orthogonal to 1 and to y (eq. 5)."""
    torch.manual_seed(5)
    C, alpha_bkw, g_mean = 4, 0.99, 0.5
    m = OnlineNorm(C, alpha_fwd=0.999, alpha_bkw=alpha_bkw, affine=False, ecm="none")
    mean, std = torch.tensor([3.0, -2.0, 0.5, 10.0]), torch.tensor([2.0, 0.5, 1.0, 4.0])
    ys, dxs, u_hist, v_hist = [], [], [], []
    for step in range(400):
        x = (torch.randn(32, C) * std + mean).requires_grad_()
        y = m(x)
        y.backward(torch.randn(32, C) + g_mean)  # a gradient with a mean component to be removed
        u_hist.append(m.control_u.clone())
        v_hist.append(m.control_v.clone())
        if step >= 200:
            ys.append(y.detach())
            dxs.append(x.grad)
    y, dx = torch.cat(ys), torch.cat(dxs)
    u_hist, v_hist = torch.stack(u_hist), torch.stack(v_hist)
    assert y.mean(0).abs().max() < 0.1
    assert (y.var(0) - 1).abs().max() < 0.1
    u_fixed = g_mean / (std * (1 - alpha_bkw))
    torch.testing.assert_close(u_hist[200:].mean(0), u_fixed, rtol=0.1, atol=0)
    assert (u_hist[200:].abs().amax(0) < 1.6 * u_fixed).all()
    torch.testing.assert_close(u_hist[300:].mean(0), u_hist[200:300].mean(0), rtol=0.15, atol=0)  # not drifting
    v_std = (((1 + g_mean**2) / (2 * (1 - alpha_bkw))) ** 0.5)  # damped walk; undamped would reach ~126
    assert v_hist[200:].abs().max() < 5 * v_std and torch.isfinite(v_hist).all()
    # after compensation, gradients carry no mean and no y component on average
    assert (dx.mean(0) * std).abs().max() < 0.05
    assert (dx * y * std).mean(0).abs().max() < 0.05


def test_eval_mode_freezes_statistics():
    torch.manual_seed(6)
    m = OnlineNorm(3, alpha_fwd=0.5)
    m(torch.randn(10, 3) * 4 + 1)
    m.running_var[1] = 3e-5  # where eps (1e-5) is a quarter of the variance
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    x = torch.randn(6, 3, requires_grad=True)
    out = m(x)
    out.sum().backward()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    expected = (x.detach() - m.running_mean) / torch.sqrt(m.running_var + 1e-5)
    torch.testing.assert_close(out, layer_scale(expected * m.weight + m.bias, 3, 1e-5))


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_state_dict_round_trip_and_half_precision_keeps_float32_statistics(low):
    torch.manual_seed(7)
    m = OnlineNorm(4)
    m(torch.randn(8, 4) * 3).sum().backward()
    m2 = OnlineNorm(4)
    m2.load_state_dict(m.state_dict())
    for name in ("running_mean", "running_var", "control_u", "control_v"):
        assert torch.equal(getattr(m, name), getattr(m2, name))
    m2.to(low)
    assert m2.running_var.dtype == torch.float32 and m2.weight.dtype == low
    assert m2(torch.randn(3, 4, dtype=low)).dtype == low


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha_fwd=1.0), "alpha_fwd"),
        (dict(alpha_bkw=0.0), "alpha_bkw"),
        (dict(alpha_fwd=-0.5), "alpha_fwd"),
        (dict(alpha_fwd="0.5"), "alpha_fwd"),
        (dict(ecm="batch"), "ecm"),
        (dict(eps=0.0), "eps"),
        (dict(ls_group_size=5), "ls_group_size"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineNorm(6, **kwargs)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(6), ValueError, "shape"),
        (torch.randn(4, 5), ValueError, "features"),
        (torch.zeros(0, 6), ValueError, "empty"),
        (torch.zeros(3, 6, 0), ValueError, "empty"),
        (torch.ones(4, 6, dtype=torch.long), TypeError, "floating"),
        (torch.randn(4, 6, device="meta"), ValueError, "meta"),
        ([[1.0] * 6], TypeError, "Tensor"),
    ],
)
def test_bad_input_raises_and_leaves_state_unchanged(x, error, match):
    m = OnlineNorm(6)
    m(torch.randn(4, 6) * 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reset_state_puts_back_the_initial_state():
    torch.manual_seed(9)
    m = OnlineNorm(4)
    m((torch.randn(8, 4) * 3 + 2).requires_grad_()).backward(torch.randn(8, 4))
    assert not torch.equal(m.running_var, torch.ones(4)) and m.control_v.abs().sum() > 0
    m.reset_state()
    for buf, want in zip((m.running_mean, m.running_var, m.control_u, m.control_v), (0.0, 1.0, 0.0, 0.0)):
        assert torch.equal(buf, torch.full((4,), want))


def test_features_must_be_whole_ecm_groups():
    m = OnlineNorm(6, ls_group_size=3)
    for features in (slice(1, 3), slice(0, 2), slice(3, 5)):
        with pytest.raises(ValueError, match="whole ECM groups of 3"):
            m(torch.randn(4, features.stop - features.start), features)
    assert m(torch.randn(4, 3), slice(3, 6)).shape == (4, 3)


def test_a_low_precision_state_still_accumulates_in_float32():
    """The functional form takes the user's own state: given a bfloat16 one, the running statistics are still
    computed in float32 (rounded once, on the way back into the state), not rounded to bfloat16 at every row."""
    torch.manual_seed(8)
    x = torch.randn(64, 5, dtype=torch.bfloat16) * 2 + 3
    state = OnlineNormState.initial(5, dtype=torch.bfloat16)
    online_norm(x, state, alpha_fwd=0.99, impl="loop", training=True)
    _, _, mu, var = reference.on_forward(x.double()[..., None], torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64),
                                         0.99, 1e-5)
    torch.testing.assert_close(state.mu.double(), mu, rtol=2**-8, atol=0)
    torch.testing.assert_close(state.var.double(), var, rtol=2**-8, atol=0)
