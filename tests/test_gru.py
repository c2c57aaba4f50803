"""seqnorm.GRUCell: torch.nn.GRUCell without normalization; online and layer norm against float64 per-step loops
written here from the equations (docs/gru.md), with the references of tests/reference.py for the per-row
Online Normalization."""
import pytest
import torch
import torch.nn.functional as F

import seqnorm
from reference import _OnlineNormStep, affine_ecm, online_state

H, I, B = 4, 3, 5


def test_without_norm_it_is_torch_nn_gru_cell():
    torch.manual_seed(0)
    for bias in (True, False):
        ref = torch.nn.GRUCell(I, H, bias=bias, dtype=torch.float64)
        cell = seqnorm.GRUCell(I, H, bias=bias, norm=None, dtype=torch.float64)
        cell.load_state_dict(ref.state_dict())
        x, h = torch.randn(B, I, dtype=torch.float64, requires_grad=True), torch.randn(B, H, dtype=torch.float64)
        outs = [m(x, h) for m in (ref, cell)]
        torch.testing.assert_close(outs[1], outs[0])
        grads = [torch.autograd.grad(o.sin().sum(), [x, *m.parameters()]) for o, m in zip(outs, (ref, cell))]
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a)
        torch.testing.assert_close(cell(x[0], h[0]), ref(x[0], h[0]))  # unbatched
        torch.testing.assert_close(cell(x), ref(x))  # zero initial state


def _loop_step(p, x, h, norm, states):
    """One GRU step from the equations: r, z = sigmoid(N(a_rz)), n = tanh(N(W_in x + b_in + r (W_hn h + b_hn)))."""
    gi, gh = x @ p["weight_ih"].T + p["bias_ih"], h @ p["weight_hh"].T + p["bias_hh"]
    w, b = p["norm.weight"], p["norm.bias"]

    def normalize(a, k0, k1):
        if norm == "online":
            return affine_ecm(_OnlineNormStep.apply(a, states[k0]), w[k0 * H:k1 * H], b[k0 * H:k1 * H], "ls", H)
        g = a.view(len(a), -1, H)
        y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return y.view_as(a) * w[k0 * H:k1 * H] + b[k0 * H:k1 * H]

    r, z = torch.sigmoid(normalize(gi[:, :2 * H] + gh[:, :2 * H], 0, 2)).chunk(2, 1)
    n = torch.tanh(normalize(gi[:, 2 * H:] + r * gh[:, 2 * H:], 2, 3))
    return (1 - z) * n + z * h


@pytest.mark.parametrize("norm,scale", [("online", 1.0), ("online", 30.0), ("layer", 1.0)])
def test_normalized_gru_cell_equals_the_per_step_loop(norm, scale):
    """Three calls of four steps each, state carried; at scale 30 the v-decay floor binds (|y| > 5.66)."""
    torch.manual_seed(1)
    cell = seqnorm.GRUCell(I, H, norm=norm, dtype=torch.float64)
    with torch.no_grad():
        cell.norm.weight.uniform_(0.5, 1.5)
        cell.norm.bias.uniform_(-0.2, 0.2)
    p = {k: v.detach().clone().requires_grad_() for k, v in cell.named_parameters()}
    cfg = cell.config
    states = {0: online_state(2 * H, cfg.alpha_fwd, cfg.alpha_bkw, cfg.v_decay_min),
              2: online_state(H, cfg.alpha_fwd, cfg.alpha_bkw, cfg.v_decay_min)}
    for call in range(3):
        xs = (scale * torch.randn(4, B, I, dtype=torch.float64)).requires_grad_()
        weights = torch.randn(4, B, H, dtype=torch.float64)
        h_lib = h_ref = torch.zeros(B, H, dtype=torch.float64)
        out_lib, out_ref = [], []
        for x in xs:
            h_lib, h_ref = cell(x, h_lib), _loop_step(p, x, h_ref, norm, states)
            out_lib.append(h_lib)
            out_ref.append(h_ref)
        out_lib, out_ref = torch.stack(out_lib), torch.stack(out_ref)
        torch.testing.assert_close(out_lib, out_ref, rtol=1e-10, atol=1e-12)
        g_lib = torch.autograd.grad((out_lib * weights).sum(), [xs, *cell.parameters()])
        g_ref = torch.autograd.grad((out_ref * weights).sum(), [xs, *p.values()])
        for name, a, b in zip(["input", *p], g_lib, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
        if norm == "online":
            for buf, key in (("running_mean", "mu"), ("running_var", "var"), ("control_u", "u"), ("control_v", "v")):
                want = torch.cat([states[0][key], states[2][key]])
                torch.testing.assert_close(getattr(cell.norm, buf), want, rtol=1e-10, atol=1e-12, msg=buf)
    if norm == "online" and scale > 1:  # the floor did bind: some rows had |y| above 1 / sqrt(1 - alpha_bkw)
        ys = torch.cat([torch.cat(states[k]["y"]).flatten() for k in states])
        assert (ys.abs() > (1 - cfg.alpha_bkw) ** -0.5).float().mean() > 0.05


def test_gru_cell_errors_and_weights_only_loading(tmp_path):
    cell = seqnorm.GRUCell(I, H)
    with pytest.raises(ValueError, match=r"input must have shape \(batch, 3\)"):
        cell(torch.randn(B, I + 1))
    with pytest.raises(ValueError, match=r"hx must have shape \(5, 4\)"):
        cell(torch.randn(B, I), torch.randn(B, H + 1))
    with pytest.raises(TypeError, match="config= or OnlineNormConfig fields"):
        seqnorm.GRUCell(I, H, config=seqnorm.OnlineNormConfig(), alpha_fwd=0.9)
    cell(torch.randn(B, I)).sum().backward()
    torch.save(cell, tmp_path / "cell.pt")
    loaded = torch.load(tmp_path / "cell.pt", weights_only=True)
    assert isinstance(loaded, seqnorm.GRUCell)
    for (k, a), b in zip(cell.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="must be whole ECM groups"):
        cell.norm(torch.randn(B, 2), slice(0, 2))
    assert F.mse_loss(loaded.eval()(torch.randn(B, I)), torch.zeros(B, H)) >= 0  # eval: frozen statistics run
