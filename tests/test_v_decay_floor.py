"""The v-decay floor of the control process (docs/design.md §2, eq. 11) in every implementation.

    v <- max(1 - (1 - alpha_bkw) * y**2, v_decay_min) * v + g * y      (None: no floor)

Each path is held to the float64 per-row loops of tests/reference.py (for the
layers, its per-step ``layer_loop``) on inputs where the floor binds in many rows:
|y| well above 1/sqrt(1 - alpha_bkw) = 5.66 for alpha_bkw = 1 - 2**-5.
"""

import pytest
import torch

import reference
import seqnorm
from layer_helpers import BACKEND_IDS, BACKENDS, forward_backward, on_backend, require
from seqnorm import OnlineNorm, OnlineNormConfig

F64 = torch.float64
ALPHA_FWD, ALPHA_BKW = 1 - 2**-13, 1 - 2**-5  # the paper's PTB LSTM setting
FLOORS = [1e-5, None]


def binding_fraction(y, alpha_bkw, v_decay_min=1e-5):
    """Share of (row, feature) decays that the floor changes."""
    return ((1 - (1 - alpha_bkw) * y**2) < v_decay_min).double().mean().item()


# --- OnlineNorm --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["scan", "loop"])
@pytest.mark.parametrize("v_decay_min", FLOORS)
@pytest.mark.parametrize("rows", [7, 1])
def test_online_norm_matches_loop_where_the_floor_binds(impl, v_decay_min, rows):
    torch.manual_seed(0)
    C = 6
    xs = [torch.randn(rows, C, dtype=F64) * 9 for _ in range(5)]  # var starts at 1: |y| ~ 9
    gs = [torch.randn(rows, C, dtype=F64) for _ in range(5)]
    m = OnlineNorm(C, ALPHA_FWD, ALPHA_BKW, affine=False, ecm="none", impl=impl, v_decay_min=v_decay_min, dtype=F64)
    ins = [x.clone().requires_grad_() for x in xs]
    outs = [m(x) for x in ins]
    torch.autograd.backward(outs, gs)  # backward of the last call first, as autograd orders it

    mu, var, u, v = torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64), torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    saved = []
    for x in xs:
        y, s, mu, var = reference.on_forward(x[..., None], mu, var, ALPHA_FWD, 1e-5)
        saved.append((y, s))
    assert binding_fraction(torch.cat([y for y, _ in saved]), ALPHA_BKW) > 0.3
    for k in reversed(range(len(xs))):
        y, s = saved[k]
        dx, u, v = reference.on_backward(gs[k][..., None], y, s, u, v, ALPHA_BKW, v_decay_min)
        torch.testing.assert_close(ins[k].grad, dx[..., 0], rtol=1e-9, atol=1e-9)
    for out, (y, _) in zip(outs, saved):
        torch.testing.assert_close(out, y[..., 0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.control_u, u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.control_v, v, rtol=1e-9, atol=1e-9)


def test_the_floor_keeps_v_bounded_on_a_heavy_tailed_stream():
    """Without the floor a row with |y| > 5.66 multiplies v by |decay| > 1: on a Cauchy stream v explodes."""
    C, final = 4, {}
    for v_decay_min in FLOORS:
        torch.manual_seed(3)
        m = OnlineNorm(C, ALPHA_FWD, ALPHA_BKW, affine=False, ecm="none", v_decay_min=v_decay_min, dtype=F64)
        peak = 0.0
        for _ in range(100):
            x = (torch.distributions.Cauchy(0.0, 4.0).sample((20, C)).double()).requires_grad_()
            m(x).backward(torch.randn(20, C, dtype=F64))
            peak = max(peak, m.control_v.abs().max().item())
        final[v_decay_min] = peak
    assert final[1e-5] < 1e5, final  # one Cauchy row can bring a large g*y, but nothing compounds
    assert not final[None] < 1e12, final  # inf or nan counts as unbounded too


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, "1e-5", True, False, float("nan")])
def test_bad_v_decay_min_is_a_clear_error(bad):
    for make in (lambda: OnlineNormConfig(v_decay_min=bad), lambda: OnlineNorm(4, v_decay_min=bad),
                 lambda: seqnorm.LSTM(3, 4, v_decay_min=bad), lambda: seqnorm.RNNCell(3, 4, v_decay_min=bad)):
        with pytest.raises(ValueError, match="v_decay_min"):
            make()


def test_config_fields_as_keywords_reach_the_normalizer():
    lstm, cell = seqnorm.LSTM(3, 4, v_decay_min=None), seqnorm.LSTMCell(3, 4, v_decay_min=0.01)
    assert lstm.norm_l0.v_decay_min is None and lstm.config.v_decay_min is None
    assert cell.norm.v_decay_min == 0.01
    assert seqnorm.RNN(3, 4).norm_l0.v_decay_min == 1e-5  # default, with the RNN's own alphas
    with pytest.raises(TypeError, match="not both"):
        seqnorm.LSTM(3, 4, config=OnlineNormConfig(), v_decay_min=None)


# --- layers: every backend against a float64 per-step loop ----------------------------------------


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("v_decay_min", FLOORS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_layer_matches_per_step_loop_where_the_floor_binds(cell, v_decay_min, backend, dtype):
    require(backend)
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 5, 6
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    ref = cls(I, H, alpha_fwd=ALPHA_FWD, alpha_bkw=ALPHA_BKW, v_decay_min=v_decay_min, dtype=F64)
    with torch.no_grad():
        ref.weight_ih_l0.mul_(8)  # pre-activations of a few units: |y| up to ~10 against var = 1
        ref.norm_l0.weight.add_(torch.randn_like(ref.norm_l0.weight) * 0.3)
        ref.norm_l0.bias.add_(torch.randn_like(ref.norm_l0.bias) * 0.3)
    layer = on_backend(ref, backend, dtype)
    x = torch.randn(T, B, I, dtype=F64)
    hx = tuple(torch.randn(1, B, H, dtype=F64) for _ in range(2 if cell == "lstm" else 1))
    weights = torch.randn(T, B, H, dtype=F64)
    st = reference.online_state(ref.gates * H, ALPHA_FWD, ALPHA_BKW, v_decay_min)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == F64 else dict(rtol=2e-4, atol=2e-4)
    for call in range(2):  # the state carries over
        want = forward_backward(ref, x, hx, weights, st)
        got = forward_backward(layer, x.to(dtype), tuple(h.to(dtype) for h in hx), weights.to(dtype))
        assert want.keys() == got.keys()
        for key in want:
            scale = want[key].abs().max().item() + 1  # float32 paths: relative to the tensor's size
            tol_key = tol if dtype == F64 else dict(rtol=tol["rtol"], atol=tol["atol"] * scale)
            torch.testing.assert_close(got[key].double(), want[key], **tol_key,
                                       msg=lambda m: f"call {call}, {key}: {m}")
    assert binding_fraction(torch.cat(st["y"]), ALPHA_BKW) > 0.1
