"""seqnorm.GRUCell: torch.nn.GRUCell without normalization; online and layer norm against float64 per-step loops
written here from the equations (docs/gru.md), with the references of tests/reference.py for the per-row
Online Normalization."""
import pytest
import torch
import torch.nn.functional as F

import seqnorm
from layer_helpers import require
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
    layer_normed = seqnorm.GRUCell(I, H, norm="layer")
    for features in (slice(0, 2), slice(2, 2 + H)):  # not whole gates, though the width matches
        with pytest.raises(ValueError, match=f"in groups of {H}"):
            layer_normed.norm(torch.randn(B, features.stop - features.start), features)
    assert F.mse_loss(loaded.eval()(torch.randn(B, I)), torch.zeros(B, H)) >= 0  # eval: frozen statistics run


def _grads_of(out, hn, inputs):
    return torch.autograd.grad(out.sin().sum() + hn.cos().sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("kw", [dict(num_layers=2), dict(bidirectional=True, batch_first=True),
                                dict(num_layers=2, bidirectional=True, bias=False)])
def test_gru_layer_without_norm_is_torch_nn_gru(kw):
    torch.manual_seed(2)
    ref = torch.nn.GRU(I, H, dtype=torch.float64, **kw)
    gru = seqnorm.GRU.from_torch(ref, norm=None)
    shape = (B, 6, I) if ref.batch_first else (6, B, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(ref.num_layers * (2 if ref.bidirectional else 1), B, H, dtype=torch.float64)
    outs = [m(x, h0) for m in (ref, gru)]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(b, a)
    grads = [_grads_of(*o, [x, *m.parameters()]) for o, m in zip(outs, (ref, gru))]
    for name, a, b in zip(["input", *dict(ref.named_parameters())], *grads):
        torch.testing.assert_close(b, a, msg=name)
    one = [m(x[0] if ref.batch_first else x[:, 0], h0[:, 0]) for m in (ref, gru)]  # unbatched
    for a, b in zip(*one):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("norm", [None, "online"])
def test_gru_fused_packed_bidirectional_batch_first_match_the_torch_path(norm, backend):
    """The fused backends (the op) against the torch path on a packed, bidirectional, two-layer, batch_first
    GRU, three calls (the statistics carry); without norm also against torch.nn.GRU."""
    from torch.nn.utils.rnn import pack_padded_sequence

    require(backend)
    torch.manual_seed(6)
    ref = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, batch_first=True)
    layers = [seqnorm.GRU.from_torch(ref, norm=norm, backend=b) for b in ("torch", backend)]
    layers[1].load_state_dict(layers[0].state_dict())
    for call in range(3):
        x = torch.randn(B, 6, I, requires_grad=True)
        pack = lambda: pack_padded_sequence(x, [2, 6, 1, 4, 4], batch_first=True, enforce_sorted=False)  # noqa: E731
        outs = [m(pack()) for m in ([ref] if norm is None else []) + layers]
        grads = [_grads_of(o[0].data, o[1], [x, *m.parameters()]) for o, m in zip(outs, ([ref] if norm is None
                                                                                         else []) + layers)]
        for o, g in zip(outs[:-1], grads[:-1]):
            torch.testing.assert_close(outs[-1][0].data, o[0].data, rtol=1e-4, atol=2e-5, msg=f"call {call}")
            torch.testing.assert_close(outs[-1][1], o[1], rtol=1e-4, atol=2e-5)
            for a, b in zip(grads[-1], g):  # float32 rounding, amplified through the state: relative to the scale
                scale = max(1.0, b.abs().max().item())
                torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5 * scale, msg=f"call {call}")
        for a, b in zip(layers[0].buffers(), layers[1].buffers()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_gru_layer_packed_without_norm_is_torch_nn_gru(enforce_sorted):
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(3)
    ref = torch.nn.GRU(I, H, bidirectional=True, dtype=torch.float64)
    gru = seqnorm.GRU.from_torch(ref, norm=None)
    lengths = [6, 4, 4, 2, 1] if enforce_sorted else [2, 6, 1, 4, 4]
    x = torch.randn(6, B, I, dtype=torch.float64, requires_grad=True)
    outs = [m(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)) for m in (ref, gru)]
    torch.testing.assert_close(outs[1][0].data, outs[0][0].data)
    torch.testing.assert_close(outs[1][1], outs[0][1])
    grads = [_grads_of(o[0].data, o[1], [x, *m.parameters()]) for o, m in zip(outs, (ref, gru))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


# the torch path in float64 (tight), the C kernels with their time loop in float32 (float32 rounding);
# scale 30: inputs large enough that the v-decay floor binds
BACKENDS = [("torch", torch.float64, dict(rtol=1e-10, atol=1e-12)),
            ("cpu", torch.float32, dict(rtol=2e-4, atol=2e-5)),
            ("triton", torch.float32, dict(rtol=2e-4, atol=2e-5))]  # Triton's interpreter without a GPU


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@pytest.mark.parametrize("norm,scale", [("online", 3.0), ("online", 30.0), ("layer", 3.0)])
def test_gru_layer_equals_the_per_step_loop(norm, scale, backend, dtype, tol):
    require(backend)
    torch.manual_seed(4)
    gru = seqnorm.GRU(I, H, norm=norm, dtype=dtype, backend=backend)
    names = {"weight_ih_l0": "weight_ih", "weight_hh_l0": "weight_hh", "bias_ih_l0": "bias_ih",
             "bias_hh_l0": "bias_hh", "norm_l0.weight": "norm.weight", "norm_l0.bias": "norm.bias"}
    with torch.no_grad():
        gru.norm_l0.weight.uniform_(0.5, 1.5)
    p = {names[k]: v.detach().double().requires_grad_() for k, v in gru.named_parameters()}
    cfg = gru.config
    states = {0: online_state(2 * H, cfg.alpha_fwd, cfg.alpha_bkw, cfg.v_decay_min),
              2: online_state(H, cfg.alpha_fwd, cfg.alpha_bkw, cfg.v_decay_min)}
    h_lib = h_ref = torch.zeros(1, B, H, dtype=torch.float64)
    for call in range(3):  # the hidden state and the statistics carry from call to call
        x = (scale * torch.randn(5, B, I, dtype=torch.float64)).requires_grad_()
        x_lib = x.detach().to(dtype).requires_grad_()
        out, h_lib = gru(x_lib, h_lib.detach().to(dtype))
        h, outs = h_ref[0].detach(), []
        for x_t in x:
            h = _loop_step(p, x_t, h, norm, states)
            outs.append(h)
        ref, h_ref = torch.stack(outs), h[None]
        torch.testing.assert_close(out.double(), ref, **tol)
        g_lib = _grads_of(out, h_lib, [x_lib, *gru.parameters()])
        g_ref = _grads_of(ref, h_ref, [x, *p.values()])
        for name, a, b in zip(["input", *p], g_lib, g_ref):
            torch.testing.assert_close(a.double(), b, **tol, msg=f"call {call}, {name}")
        if norm == "online":
            for buf, key in (("running_mean", "mu"), ("running_var", "var"), ("control_u", "u"), ("control_v", "v")):
                torch.testing.assert_close(getattr(gru.norm_l0, buf).double(),
                                           torch.cat([states[0][key], states[2][key]]), **tol, msg=buf)
    if norm == "online" and scale > 10:  # the floor did bind: some rows had |y| above 1 / sqrt(1 - alpha_bkw)
        ys = torch.cat([torch.cat(states[k]["y"]).flatten() for k in states])
        assert (ys.abs() > (1 - cfg.alpha_bkw) ** -0.5).float().mean() > 0.05


def test_the_cell_is_one_step_of_the_layer_and_the_layer_saves(tmp_path):
    torch.manual_seed(5)
    gru, cell = seqnorm.GRU(I, H), seqnorm.GRUCell(I, H)
    cell.load_state_dict({k.replace("_l0", "").replace("norm_l0", "norm"): v for k, v in gru.state_dict().items()})
    x, h = torch.randn(1, B, I), torch.randn(1, B, H)
    torch.testing.assert_close(gru(x, h)[0][0], cell(x[0], h[0]))
    for a, b in (("running_mean", "running_mean"), ("running_var", "running_var")):
        torch.testing.assert_close(getattr(gru.norm_l0, a), getattr(cell.norm, b))
    torch.save(gru, tmp_path / "gru.pt")
    loaded = torch.load(tmp_path / "gru.pt", weights_only=True)
    assert isinstance(loaded, seqnorm.GRU) and loaded.mode == "GRU"
    loaded.eval()
    torch.testing.assert_close(loaded(x, h)[0], gru.eval()(x, h)[0])
    with pytest.raises(ValueError, match="backend"):
        seqnorm.GRU(I, H, backend="fast")
    with pytest.raises(TypeError, match="needs a torch.nn.GRU"):
        seqnorm.GRU.from_torch(torch.nn.LSTM(I, H))


def test_gru_torch_path_double_backward():
    """The torch path (per-step autograd) has second derivatives, as the LSTM's; gradgradcheck in float64."""
    torch.manual_seed(7)
    gru = seqnorm.GRU(2, 3, norm="layer", backend="torch", dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: gru(x)[0], (x,))


@pytest.mark.parametrize("norm,ecm,training", [("online", "ac", True), (None, "ls", True), ("online", "ls", False),
                                               ("layer", "ls", True)])
def test_gru_triton_split_over_programs(norm, ecm, training, monkeypatch):
    """Small hidden blocks (max_block_h=2) or per-row programs give the numbers of the C kernels."""
    pytest.importorskip("triton")
    from seqnorm import ops
    from seqnorm.kernels import step
    from seqnorm.sequence import RecurrenceSpec

    spec = RecurrenceSpec("gru", norm, 5, seqnorm.OnlineNormConfig(alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm), "tanh",
                          training)
    geo = step.geometry(spec, 3, max_block_h=2)
    assert geo.grid[0] * geo.grid[1] > 1, geo
    monkeypatch.setitem(ops.STEP_FACTORIES, "triton",
                        lambda: lambda spec, batch, dtype: step.TritonStep(spec, batch, dtype, max_block_h=2))
    torch.manual_seed(1)
    args = [torch.randn(4, 3, 15), torch.randn(3, 5), None, 0.5 * torch.randn(15, 5), 1 + 0.3 * torch.randn(15),
            0.3 * torch.randn(15), None]
    b_hh, results = 0.3 * torch.randn(15), []
    for backend in ("cpu", "triton"):
        state = seqnorm.OnlineNormState.initial(15)
        state.mu.normal_(generator=torch.Generator().manual_seed(2))
        leaves = [None if a is None else a.clone().requires_grad_() for a in [*args, b_hh]]
        out, h, _ = ops.run(ops.encode_spec(spec), backend, state, *leaves)
        (out.sin().sum() + h.sum()).backward()
        results.append([out, h] + [a.grad for a in leaves if a is not None] + list(vars(state).values()))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
