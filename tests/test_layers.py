"""seqnorm.LSTM / seqnorm.RNN: the fused sequence Function against per-step cell autograd,
torch.nn compatibility, state handling and input checks."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import reference
import seqnorm
from layer_helpers import BACKEND_IDS, BACKENDS, on_backend, require
from seqnorm import LSTMCell, RNNCell

F64 = torch.float64


def make_layer(cell, norm, ecm="ls", num_layers=1, **kw):
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    layer = cls(4, 6, num_layers=num_layers, norm=norm, ecm=ecm, alpha_fwd=0.9, alpha_bkw=0.8, dtype=F64, **kw)
    with torch.no_grad():  # move the affine away from identity so its gradients matter
        for name, p in layer.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def cells_like(layer):
    """Per-step cells holding copies of each layer's parameters and normalizer state."""
    cells = []
    for k in range(layer.num_layers):
        inp = layer.input_size if k == 0 else layer.hidden_size
        if layer.cell == "lstm":
            cell = LSTMCell(inp, layer.hidden_size, layer.bias, layer.norm_type, layer.config, dtype=F64)
        else:
            cell = RNNCell(inp, layer.hidden_size, layer.bias, layer.nonlinearity, layer.norm_type, layer.config, dtype=F64)
        sd = {}
        for name, value in layer.state_dict().items():
            if name.startswith(f"norm_l{k}."):
                sd["norm." + name.split(".", 1)[1]] = value.clone()
            elif name.endswith(f"_l{k}"):
                sd[name[: -len(f"_l{k}")]] = value.clone()
        cell.load_state_dict(sd)
        cell.train(layer.training)
        cells.append(cell)
    return cells


def run_cells(cells, x, h0, c0):
    """Time-major loop over steps and layers with plain autograd."""
    hs = list(h0.unbind(0))
    cs = list(c0.unbind(0)) if c0 is not None else None
    outs = []
    for t in range(x.shape[0]):
        inp = x[t]
        for k, cell in enumerate(cells):
            if cs is not None:
                hs[k], cs[k] = cell(inp, (hs[k], cs[k]))
            else:
                hs[k] = cell(inp, hs[k])
            inp = hs[k]
        outs.append(inp)
    return torch.stack(outs), torch.stack(hs), None if cs is None else torch.stack(cs)


def assert_layer_matches_cells(layer, cells, calls, batch_first=False):
    params_l = dict(layer.named_parameters())
    for x, h0, c0 in calls:
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, h0, c0)]
        leaves_c = [t.clone().requires_grad_() if t is not None else None for t in (x, h0, c0)]
        hx = None if h0 is None else ((leaves[1], leaves[2]) if layer.cell == "lstm" else leaves[1])
        out, hn = layer(leaves[0], hx)
        h_n, c_n = hn if layer.cell == "lstm" else (hn, None)
        xc = leaves_c[0].transpose(0, 1) if batch_first else leaves_c[0]
        zeros = torch.zeros(layer.num_layers, xc.shape[1], layer.hidden_size, dtype=F64)
        out_c, h_c, c_c = run_cells(cells, xc, zeros if h0 is None else leaves_c[1],
                                    None if layer.cell == "rnn" else (zeros if h0 is None else leaves_c[2]))
        out_c = out_c.transpose(0, 1) if batch_first else out_c
        torch.testing.assert_close(out, out_c, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h_n, h_c, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(out)
        loss = (out * g).sum() + (h_n**2).sum()
        loss_c = (out_c * g).sum() + (h_c**2).sum()
        if c_n is not None:
            torch.testing.assert_close(c_n, c_c, rtol=1e-10, atol=1e-10)
            loss, loss_c = loss + (c_n * 0.5).sum(), loss_c + (c_c * 0.5).sum()
        loss.backward()
        loss_c.backward()
        for a, b in zip(leaves, leaves_c):
            if a is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
    for k, cell in enumerate(cells):
        for name, p in cell.named_parameters():
            lname = f"norm_l{k}.{name.split('.', 1)[1]}" if name.startswith("norm.") else f"{name}_l{k}"
            torch.testing.assert_close(params_l[lname].grad, p.grad, rtol=1e-9, atol=1e-10, msg=lname)
        bufs_l = dict(layer.named_buffers())
        for name, b in cell.named_buffers():
            torch.testing.assert_close(bufs_l[f"norm_l{k}.{name.split('.', 1)[1]}"], b, rtol=1e-12, atol=1e-12, msg=name)


CASES = [("lstm", "online", "ls"), ("lstm", "online", "ac"), ("lstm", "online", "none"), ("lstm", "layer", "ls"),
         ("lstm", None, "ls"), ("rnn", "online", "ls"), ("rnn", "online", "ac"), ("rnn", "online", "none"),
         ("rnn", "layer", "ls"), ("rnn", None, "ls")]


@pytest.mark.parametrize("cell, norm, ecm", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_sequence_function_equals_per_step_cells(cell, norm, ecm, training):
    """Outputs, final states, every gradient and the ON state, over two calls (state carries)."""
    torch.manual_seed(0)
    layer = make_layer(cell, norm, ecm).train(training)
    cells = cells_like(layer)
    calls = [(torch.randn(5, 3, 4, dtype=F64) * 2, None, None),
             (torch.randn(7, 3, 4, dtype=F64), torch.randn(1, 3, 6, dtype=F64), torch.randn(1, 3, 6, dtype=F64))]
    assert_layer_matches_cells(layer, cells, calls)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_multilayer_batch_first_initial_state_dropout_in_eval(cell):
    torch.manual_seed(1)
    layer = make_layer(cell, "online", num_layers=3, batch_first=True, dropout=0.4)
    layer.train()
    layer(torch.randn(2, 4, 4, dtype=F64))  # warm the statistics in training mode
    layer.eval()
    cells = cells_like(layer)
    calls = [(torch.randn(2, 6, 4, dtype=F64), torch.randn(3, 2, 6, dtype=F64), torch.randn(3, 2, 6, dtype=F64))]
    assert_layer_matches_cells(layer, cells, calls, batch_first=True)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_multilayer_training_with_state_carry(cell):
    torch.manual_seed(2)
    layer = make_layer(cell, "online", num_layers=2)
    cells = cells_like(layer)
    calls = [(torch.randn(4, 2, 4, dtype=F64), None, None), (torch.randn(3, 2, 4, dtype=F64), None, None)]
    assert_layer_matches_cells(layer, cells, calls)


def test_dropout_in_training_changes_outputs_between_layers_only():
    torch.manual_seed(3)
    layer = seqnorm.LSTM(4, 6, num_layers=2, dropout=0.5, norm=None)
    x = torch.randn(5, 2, 4)
    (a, (h_a, _)), (b, (h_b, _)) = layer(x), layer(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(h_a[0], h_b[0])  # as torch.nn: the first layer's input is never dropped
    layer.dropout = 0.0
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    torch.testing.assert_close(layer(x)[1][0][0], h_a[0])


@pytest.mark.parametrize("num_layers, batch_first, bias", [(1, False, True), (2, True, True), (2, False, False)])
def test_torch_lstm_checkpoint_loads_and_matches_with_norm_none(num_layers, batch_first, bias):
    torch.manual_seed(4)
    ref = torch.nn.LSTM(5, 7, num_layers=num_layers, batch_first=batch_first, bias=bias)
    ours = seqnorm.LSTM(5, 7, num_layers=num_layers, batch_first=batch_first, bias=bias, norm=None)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 4, 5) if not batch_first else torch.randn(4, 3, 5)
    h0, c0 = torch.randn(num_layers, 4, 7), torch.randn(num_layers, 4, 7)  # batch is 4 either way
    for args in ((x,), (x, (h0, c0))):
        out_r, (h_r, c_r) = ref(*args)
        out_o, (h_o, c_o) = ours(*args)
        torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_o, h_r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c_o, c_r, rtol=1e-5, atol=1e-6)
    online = seqnorm.LSTM(5, 7, num_layers=num_layers, batch_first=batch_first, bias=bias)
    missing = online.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("norm_l") for k in missing)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_torch_rnn_checkpoint_loads_and_matches_with_norm_none(nonlinearity):
    torch.manual_seed(5)
    ref = torch.nn.RNN(5, 7, num_layers=2, nonlinearity=nonlinearity)
    ours = seqnorm.RNN(5, 7, num_layers=2, nonlinearity=nonlinearity, norm=None)
    ours.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(6, 3, 5), torch.randn(2, 3, 7)
    out_r, h_r = ref(x, h0)
    out_o, h_o = ours(x, h0)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_o, h_r, rtol=1e-5, atol=1e-6)


def test_unbatched_input_equals_batch_of_one():
    torch.manual_seed(6)
    layer = seqnorm.LSTM(4, 6, num_layers=2, norm="layer")
    x, h0, c0 = torch.randn(5, 4), torch.randn(2, 6), torch.randn(2, 6)
    out, (h, c) = layer(x, (h0, c0))
    out_b, (h_b, c_b) = layer(x[:, None], (h0[:, None], c0[:, None]))
    torch.testing.assert_close(out, out_b[:, 0])
    torch.testing.assert_close(h, h_b[:, 0])
    assert out.shape == (5, 6) and h.shape == (2, 6)


@pytest.mark.parametrize("cls", [seqnorm.LSTM, seqnorm.RNN])
def test_eval_mode_freezes_statistics(cls):
    torch.manual_seed(7)
    layer = cls(4, 6)
    layer(torch.randn(5, 3, 4))[0].sum().backward()
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(5, 3, 4))[0].sum().backward()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_restores_online_state_exactly():
    torch.manual_seed(8)
    a = seqnorm.LSTM(4, 6, num_layers=2)
    for _ in range(3):
        a(torch.randn(5, 3, 4) * 2)[0].pow(2).sum().backward()
    b = seqnorm.LSTM(4, 6, num_layers=2)
    b.load_state_dict(a.state_dict())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.norm_l0.control_v, torch.zeros(24))  # the control state was written
    x = torch.randn(4, 3, 4)
    out_a, out_b = a(x)[0], b(x)[0]
    assert torch.equal(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    assert torch.equal(a.norm_l1.control_u, b.norm_l1.control_u)


def test_cpu_autocast_keeps_float32_statistics_and_finite_outputs():
    torch.manual_seed(9)
    layer = seqnorm.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = layer(x)
    out.float().sum().backward()
    assert layer.norm_l0.running_var.dtype == torch.float32
    assert torch.isfinite(out.float()).all() and torch.isfinite(layer.weight_hh_l0.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 input (an earlier layer's output) is taken too
        out_bf16, _ = layer(x.bfloat16())
    torch.testing.assert_close(out_bf16.float(), out.float(), atol=0.1, rtol=0)


def test_memory_cell_normalization_flag_on_cells():
    torch.manual_seed(10)
    plain, normed = LSTMCell(3, 4), LSTMCell(3, 4, norm_cell=True)
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(5, 3)
    h1, c1 = plain(x)
    h2, c2 = normed(x)
    torch.testing.assert_close(c1, c2)  # the carried memory cell is never normalized
    assert not torch.allclose(h1, h2)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_layer_norm_cells_equal_the_equations(cell):
    """norm="layer", written out: each gate's pre-activation W_ih x + b_ih + W_hh h + b_hh normalized over its
    own H features (the config's eps), then the per-feature affine; the LSTM's memory cell is not normalized
    (the reference implementation's cell: one LayerNorm(H) per gate chunk)."""
    torch.manual_seed(11)
    H, eps = 5, 0.3
    kw = dict(norm="layer", eps=eps, dtype=F64)
    m = LSTMCell(3, H, **kw) if cell == "lstm" else RNNCell(3, H, **kw)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    x, h, c = (torch.randn(4, n, dtype=F64) for n in (3, H, H))
    pre = x @ m.weight_ih.T + m.bias_ih + h @ m.weight_hh.T + m.bias_hh
    normed = torch.cat([(p - p.mean(1, keepdim=True)) / (p.var(1, unbiased=False, keepdim=True) + eps).sqrt()
                        for p in pre.split(H, 1)], 1) * m.norm.weight + m.norm.bias
    if cell == "rnn":
        torch.testing.assert_close(m(x, h), torch.tanh(normed), rtol=1e-12, atol=1e-12)
        return
    i, f, g, o = normed.split(H, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    got_h, got_c = m(x, (h, c))
    torch.testing.assert_close(got_c, c_new, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h, torch.sigmoid(o) * torch.tanh(c_new), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make, call, error, match",
    [
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 2, 4)), ValueError, "input"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 5)), ValueError, "input_size"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 4), (torch.randn(1, 2, 6), torch.randn(1, 3, 6))), ValueError, "h_0"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 7))), ValueError, "c_0"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 4), torch.randn(1, 3, 6)), TypeError, "hx"),
        (lambda: seqnorm.RNN(4, 6, num_layers=2), lambda m: m(torch.randn(5, 3, 4), torch.randn(1, 3, 6)), ValueError, "h_0"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.ones(5, 3, 4, dtype=torch.long)), TypeError, "floating"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.zeros(0, 3, 4)), ValueError, "empty"),
        (lambda: seqnorm.LSTM(4, 6), lambda m: m(torch.randn(5, 3, 4, device="meta")), ValueError, "meta"),
        (lambda: seqnorm.RNN(4, 6), lambda m: m(torch.randn(5, 3, 4), torch.randn(1, 3, 6, device="meta")), ValueError, "meta"),
        (lambda: LSTMCell(4, 6), lambda m: m(torch.randn(3, 5)), ValueError, "input"),
        (lambda: LSTMCell(4, 6), lambda m: m(torch.randn(3, 4), (torch.randn(3, 6), torch.randn(2, 6))), ValueError, "hx"),
        (lambda: RNNCell(4, 6), lambda m: m(torch.ones(3, 4, dtype=torch.int32)), TypeError, "floating"),
    ],
)
def test_bad_input_raises_clear_error_and_leaves_state_unchanged(make, call, error, match):
    torch.manual_seed(11)
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        call(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(norm="batch"), ValueError, "norm"),
        (dict(ecm="clip"), ValueError, "ecm"),
        (dict(alpha_fwd=1.5), ValueError, "alpha_fwd"),
        (dict(alpha_bkw=0), ValueError, "alpha_bkw"),
        (dict(dropout=2.0), ValueError, "dropout"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(v_decay_min=1.0), ValueError, "v_decay_min"),
        (dict(norm="layer", v_decay_min=1.0), ValueError, "v_decay_min"),  # checked in the config, used or not
        (dict(unknown=1), TypeError, "unknown"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        seqnorm.LSTM(4, 6, **kwargs)
    with pytest.raises(ValueError, match="nonlinearity"):
        seqnorm.RNN(4, 6, nonlinearity="gelu")


def test_norm_none_string_is_accepted():
    assert seqnorm.LSTM(4, 6, norm="none").norm_type is None


def test_dtype_mismatch_and_empty_cell_input_are_clear_errors():
    lstm = seqnorm.LSTM(3, 4)
    with pytest.raises(TypeError, match=r"input dtype \(torch.float64\) does not match the parameters' dtype "
                                        r"\(torch.float32\)"):
        lstm(torch.randn(2, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"h_0 dtype \(torch.float64\)"):
        lstm(torch.randn(2, 2, 3), (torch.zeros(1, 2, 4, dtype=torch.float64), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match=r"input is empty: shape \(0, 3\)"):
        seqnorm.LSTMCell(3, 4)(torch.randn(0, 3))


def test_torch_nn_constructor_order_attributes_and_no_ops():
    lstm = seqnorm.LSTM(4, 8, 2, True, True, 0.0, False, 0)  # nn.LSTM's positional order
    rnn = seqnorm.RNN(4, 8, 1, "relu", True, False, 0.0, False)
    ref_lstm, ref_rnn = torch.nn.LSTM(4, 8, 2, True, True), torch.nn.RNN(4, 8, 1, "relu")
    assert lstm.batch_first and (lstm.bidirectional, lstm.proj_size, lstm.mode) == (False, 0, "LSTM")
    assert rnn.mode == ref_rnn.mode == "RNN_RELU"
    for ours, ref in ((lstm, ref_lstm), (rnn, ref_rnn)):
        assert [[w.shape for w in layer] for layer in ours.all_weights] == \
               [[w.shape for w in layer] for layer in ref.all_weights]
        ours.flatten_parameters()  # documented no-op, as client code calls it
    with pytest.raises(ValueError, match="proj_size"):
        seqnorm.LSTM(4, 8, proj_size=8)


@pytest.mark.parametrize("cls,ref_cls,kw", [(seqnorm.LSTM, torch.nn.LSTM, {}),
                                            (seqnorm.RNN, torch.nn.RNN, {"nonlinearity": "relu"})])
def test_from_torch_reproduces_the_torch_module(cls, ref_cls, kw):
    torch.manual_seed(0)
    ref = ref_cls(5, 7, num_layers=2, batch_first=True, **kw)
    ours = cls.from_torch(ref, norm=None)
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    assert cls.from_torch(ref).norm_type == "online"  # the normalizers start fresh
    with pytest.raises(TypeError, match="needs a torch.nn"):
        cls.from_torch(torch.nn.GRU(5, 7))
    assert cls.from_torch(ref_cls(5, 7, bidirectional=True)).bidirectional


class _Client(torch.nn.Module):
    """A user's model holding a seqnorm layer, saved whole (as pytorch/examples' word_language_model does)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Embedding(11, 6)
        self.rnn = seqnorm.LSTM(6, 6, 2)
        self.decoder = torch.nn.Linear(6, 11)

    def forward(self, ids):
        return self.decoder(self.rnn(self.encoder(ids))[0])


def test_whole_module_loads_with_weights_only_without_listing_seqnorm(tmp_path):
    model = _Client()
    model(torch.randint(0, 11, (5, 3))).sum().backward()  # statistics move away from their initial values
    torch.save(model, tmp_path / "model.pt")
    with torch.serialization.safe_globals([_Client, torch.nn.Embedding, torch.nn.Linear]):  # only the caller's own
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(seqnorm.SAFE_GLOBALS) >= {seqnorm.LSTM, seqnorm.OnlineNorm, seqnorm.OnlineNormConfig}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.randint(0, 11, (4, 2))
    torch.testing.assert_close(loaded.eval()(ids), model.eval()(ids))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cls,ref_cls", [(seqnorm.LSTM, torch.nn.LSTM), (seqnorm.RNN, torch.nn.RNN)])
def test_bidirectional_without_norm_equals_torch_nn(cls, ref_cls, batch_first):
    torch.manual_seed(0)
    ref = ref_cls(5, 7, num_layers=2, bidirectional=True, batch_first=batch_first)
    ours = cls.from_torch(ref, norm=None)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(3, 4, 5)
    lstm = cls is seqnorm.LSTM
    hx = tuple(torch.randn(4, 3 if batch_first else 4, 7) for _ in range(2 if lstm else 1))
    results = []
    for layer in (ours, ref):
        xi, hi = x.clone().requires_grad_(), tuple(h.clone().requires_grad_() for h in hx)
        out, fin = layer(xi, hi if lstm else hi[0])
        fin = fin if lstm else (fin,)
        (out.sin().sum() + sum((f * (k + 2)).cos().sum() for k, f in enumerate(fin))).backward()
        results.append([out, *fin, xi.grad, *(h.grad for h in hi), *(q.grad for q in layer.parameters())])
    for got, want in zip(*results):  # float32 against oneDNN's kernel: summation order differs
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def assert_grads_and_states(layer, ref, states, tol):
    """Parameter gradients against the reference layer's, each direction's ON state against its loop's."""
    for (name, q), (_, q_ref) in zip(layer.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(q.grad.double(), q_ref.grad, **tol, msg=name)
    for d, sfx in enumerate(("", "_reverse")):
        norm = getattr(layer, f"norm_l0{sfx}")
        for buf, key in zip((norm.running_mean, norm.running_var, norm.control_u, norm.control_v),
                            ("mu", "var", "u", "v")):
            assert buf.isfinite().all()
            torch.testing.assert_close(buf.double(), states[d][key], **tol, msg=f"{sfx} {key}")


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_bidirectional_online_equals_per_step_loops(cell, backend, dtype):
    """Each direction its own normalizer; the reverse one sees its samples in its order, steps T-1 ... 0."""
    require(backend)
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 5, 6
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    ref = cls(I, H, bidirectional=True, alpha_fwd=0.9, alpha_bkw=0.8, dtype=torch.float64)
    layer = on_backend(ref, backend, dtype)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = tuple(torch.randn(2, B, H, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1))
    w = torch.randn(T, B, 2 * H, dtype=torch.float64)
    params = dict(ref.named_parameters())
    states = [reference.online_state(ref.gates * H, 0.9, 0.8, 1e-5) for _ in range(2)]
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for call in range(2):  # the states carry over
        xs = [x.clone().requires_grad_(), x.to(dtype).clone().requires_grad_()]
        outs = []
        for d, sfx in enumerate(("", "_reverse")):
            p = {k.replace("_reverse", ""): v for k, v in params.items() if ("_reverse" in k) == (d == 1)}
            seq = xs[0] if d == 0 else xs[0].flip(0)
            out, _ = reference.layer_loop(p, cell, H, seq, tuple(h[d:d + 1] for h in hx), states[d])
            outs.append(out if d == 0 else out.flip(0))
        want = torch.cat(outs, -1)
        got, _ = layer(xs[1], tuple(h.to(dtype) for h in hx) if cell == "lstm" else hx[0].to(dtype))
        ref.zero_grad()
        layer.zero_grad()
        (want * w).sum().backward()
        (got * w.to(dtype)).sum().backward()
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(xs[1].grad.double(), xs[0].grad, **tol)
        assert_grads_and_states(layer, ref, states, tol)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_proj_size_without_norm_equals_torch_nn(backend, batch_first):
    require(backend)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 7, num_layers=2, proj_size=3, bidirectional=True, batch_first=batch_first)
    ours = seqnorm.LSTM.from_torch(ref, norm=None, backend=backend)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws] for ws in ref.all_weights]
    x = torch.randn(3, 4, 5)
    hx = (torch.randn(4, 3 if batch_first else 4, 3), torch.randn(4, 3 if batch_first else 4, 7))
    results = []
    for layer in (ours, ref):
        xi, hi = x.clone().requires_grad_(), tuple(h.clone().requires_grad_() for h in hx)
        out, (h_n, c_n) = layer(xi, hi)
        assert out.shape[-1] == 6 and h_n.shape[-1] == 3 and c_n.shape[-1] == 7
        (out.sin().sum() + (2 * h_n).cos().sum() + (3 * c_n).cos().sum()).backward()
        results.append([out, h_n, c_n, xi.grad, *(h.grad for h in hi), *(q.grad for q in layer.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
def test_proj_size_online_equals_per_step_loop(backend, dtype):
    require(backend)
    torch.manual_seed(0)
    T, B, I, H, P = 4, 3, 5, 6, 4
    ref = seqnorm.LSTM(I, H, proj_size=P, alpha_fwd=0.9, alpha_bkw=0.8, dtype=torch.float64)
    layer = on_backend(ref, backend, dtype)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = (torch.randn(1, B, P, dtype=torch.float64), torch.randn(1, B, H, dtype=torch.float64))
    w = torch.randn(T, B, P, dtype=torch.float64)
    st = reference.online_state(4 * H, 0.9, 0.8, 1e-5)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for call in range(2):
        xs = [x.clone().requires_grad_(), x.to(dtype).clone().requires_grad_()]
        want, (h_want, c_want) = reference.layer_loop(dict(ref.named_parameters()), "lstm", H, xs[0], hx, st)
        got, (h_got, c_got) = layer(xs[1], tuple(h.to(dtype) for h in hx))
        ref.zero_grad()
        layer.zero_grad()
        ((want * w).sum() + h_want.sin().sum() + c_want.cos().sum()).backward()
        ((got * w.to(dtype)).sum() + h_got.sin().sum() + c_got.cos().sum()).backward()
        for a, b in ((got, want), (h_got, h_want), (c_got, c_want), (xs[1].grad, xs[0].grad)):
            torch.testing.assert_close(a.double(), b, **tol)
        for (name, q), (_, q_ref) in zip(layer.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(q.grad.double(), q_ref.grad, **tol, msg=name)
        norm = layer.norm_l0
        for buf, key in zip((norm.running_mean, norm.running_var, norm.control_u, norm.control_v), ("mu", "var", "u", "v")):
            torch.testing.assert_close(buf.double(), st[key], **tol, msg=key)


def _packed_run(layer, x, lengths, hx, enforce_sorted):
    """Output (padded back, caller's order), finals, and the gradients of input, hx and parameters."""
    xi, hi = x.clone().requires_grad_(), tuple(h.clone().requires_grad_() for h in hx)
    packed = pack_padded_sequence(xi, lengths, enforce_sorted=enforce_sorted)
    out, fin = layer(packed, hi if layer.mode == "LSTM" else hi[0])
    assert isinstance(out, PackedSequence) and torch.equal(out.batch_sizes, packed.batch_sizes)
    fin = fin if layer.mode == "LSTM" else (fin,)
    padded, _ = pad_packed_sequence(out)
    (padded.sin().sum() + sum((f * (k + 2)).cos().sum() for k, f in enumerate(fin))).backward()
    return [padded, *fin, xi.grad, *(h.grad for h in hi), *(q.grad for q in layer.parameters())]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("kind", ["lstm", "lstm-proj", "rnn"])
@pytest.mark.parametrize("lengths,enforce_sorted", [([3, 6, 1, 4], False), ([6, 4, 4, 1], True), ([5, 5, 5, 5], True)],
                         ids=["unsorted", "sorted", "equal"])
def test_packed_without_norm_equals_torch_nn(kind, backend, lengths, enforce_sorted):
    require(backend)
    torch.manual_seed(0)
    ref = (torch.nn.RNN(5, 7, num_layers=2, bidirectional=True) if kind == "rnn"
           else torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3 if kind == "lstm-proj" else 0))
    ours = (seqnorm.RNN if kind == "rnn" else seqnorm.LSTM).from_torch(ref, norm=None, backend=backend)
    B, T = len(lengths), max(lengths)
    x = torch.randn(T, B, 5)
    hx = (torch.randn(4, B, ref.proj_size or 7), torch.randn(4, B, 7))[:1 if kind == "rnn" else 2]
    got, want = _packed_run(ours, x, lengths, hx, enforce_sorted), _packed_run(ref, x, lengths, hx, enforce_sorted)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _reverse_within(x, lengths):
    """Each column b of (T, B, F) reversed in its first lengths[b] steps."""
    out = x.clone()
    for b, L in enumerate(lengths):
        out[:L, b] = x[:L, b].flip(0)
    return out


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_packed_bidirectional_online_equals_per_step_loops_over_the_active_rows(cell, backend, dtype):
    """At step t the normalizer's samples are the active sequences in the packed (sorted) row order; the
    reverse direction reads each sequence from its own end; padding never touches the statistics."""
    require(backend)
    torch.manual_seed(0)
    I, H, lengths = 5, 6, [2, 5, 1, 5, 3]
    B, T = len(lengths), max(lengths)
    order = pack_padded_sequence(torch.zeros(T, B, 1), lengths, enforce_sorted=False).sorted_indices.tolist()
    sorted_lengths = [lengths[b] for b in order]
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    ref = cls(I, H, bidirectional=True, alpha_fwd=0.9, alpha_bkw=0.8, dtype=torch.float64)
    layer = on_backend(ref, backend, dtype)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for b, L in enumerate(lengths):
        x[L:, b] = float("nan")  # padding: if it reached the statistics they would be NaN
    hx = tuple(torch.randn(2, B, H, dtype=torch.float64) for _ in range(2 if cell == "lstm" else 1))
    w = torch.randn(T, B, 2 * H, dtype=torch.float64)
    params = dict(ref.named_parameters())
    states = [reference.online_state(ref.gates * H, 0.9, 0.8, 1e-5) for _ in range(2)]
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    mask = (torch.arange(T)[:, None] < torch.tensor(lengths)).unsqueeze(-1)
    for call in range(2):  # the states carry over
        xs = [x.clone().requires_grad_(), x.to(dtype).clone().requires_grad_()]
        outs, finals = [], []
        xsorted = xs[0][:, order]
        for d, sfx in enumerate(("", "_reverse")):
            p = {k.replace("_reverse", ""): v for k, v in params.items() if ("_reverse" in k) == (d == 1)}
            seq = xsorted if d == 0 else _reverse_within(xsorted, sorted_lengths)
            h_d = tuple(h[d:d + 1, order] for h in hx)
            out, fin = reference.layer_loop(p, cell, H, seq, h_d, states[d], lengths=sorted_lengths)
            outs.append(out if d == 0 else _reverse_within(out, sorted_lengths))
            finals.append(fin)
        unsort = [order.index(b) for b in range(B)]
        want = torch.cat(outs, -1)[:, unsort]
        want_finals = [torch.cat([f[k] for f in finals])[:, unsort] for k in range(len(hx))]
        packed = pack_padded_sequence(xs[1], lengths, enforce_sorted=False)
        got, got_finals = layer(packed, tuple(h.to(dtype) for h in hx) if cell == "lstm" else hx[0].to(dtype))
        got, _ = pad_packed_sequence(got, total_length=T)
        got_finals = got_finals if cell == "lstm" else (got_finals,)
        ref.zero_grad()
        layer.zero_grad()
        ((want * w).where(mask, 0).sum() + sum(f.sin().sum() for f in want_finals)).backward()
        ((got * w.to(dtype)).where(mask, 0).sum() + sum(f.sin().sum() for f in got_finals)).backward()
        torch.testing.assert_close(got.double(), want.where(mask, 0), **tol)
        for g, f in zip(got_finals, want_finals):
            torch.testing.assert_close(g.double(), f, **tol)
        torch.testing.assert_close(xs[1].grad.double().where(mask, 0), xs[0].grad.where(mask, 0), **tol)
        assert not xs[1].grad.where(mask, 0).isnan().any()
        assert_grads_and_states(layer, ref, states, tol)


def test_packed_input_errors_name_what_is_wrong():
    lstm = seqnorm.LSTM(5, 7)
    packed = pack_padded_sequence(torch.randn(4, 3, 6), [4, 2, 1])
    with pytest.raises(ValueError, match=r"PackedSequence.data must have shape \(rows, input_size=5\)"):
        lstm(packed)
    packed = pack_padded_sequence(torch.randn(4, 3, 5), [4, 2, 1])
    with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 3, 7\)"):
        lstm(packed, (torch.zeros(1, 4, 7), torch.zeros(1, 4, 7)))
    with pytest.raises(ValueError, match="non-increasing"):
        lstm(PackedSequence(torch.randn(7, 5), torch.tensor([2, 3, 2])))
    with pytest.raises(ValueError, match=r"positive and non-increasing, got \[3, 0\]"):
        lstm(PackedSequence(torch.randn(3, 5), torch.tensor([3, 0])))
    with pytest.raises(ValueError, match="integer tensor on the CPU"):
        lstm(PackedSequence(torch.randn(5, 5), torch.tensor([3.0, 2.0])))
    with pytest.raises(ValueError, match="PackedSequence.data has 6 rows but batch_sizes sum to 5"):
        lstm(PackedSequence(torch.randn(6, 5), torch.tensor([3, 2])))
    with pytest.raises(TypeError, match=r"PackedSequence.data dtype \(torch.float64\) does not match"):
        lstm(pack_padded_sequence(torch.randn(4, 3, 5, dtype=torch.float64), [4, 2, 1]))


@pytest.mark.parametrize("norm", [None, "layer", "online", "online-eval"])
@pytest.mark.parametrize("cell,kw", [("lstm", {}), ("lstm", {"proj_size": 2}), ("rnn", {})])
def test_double_backward_on_the_torch_path(cell, norm, kw):
    """gradgradcheck in float64 (finite differences of the first-order gradients) through two layers; the
    first-order gradients with create_graph equal the hand-written backward's, and so does the ON state."""
    torch.manual_seed(0)
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    layer = cls(3, 4, 2, norm=norm.split("-")[0] if norm else None, backend="torch", dtype=F64, alpha_fwd=0.9,
                alpha_bkw=0.8, **kw)
    layer(torch.randn(4, 2, 3, dtype=F64))[0].sum().backward()  # statistics away from their initial values
    layer.train(norm != "online-eval")
    start = copy.deepcopy(layer.state_dict())
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, *params):
        layer.load_state_dict(start)  # every call from the same statistics
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))[0]

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    w = torch.randn(3, 2, layer.output_size, dtype=F64)
    plain = torch.autograd.grad((fn(x, *params) * w).sum(), (x, *params))
    plain_state = copy.deepcopy(layer.state_dict())
    graphed = torch.autograd.grad((fn(x, *params) * w).sum(), (x, *params), create_graph=True)
    for a, b in zip(graphed, plain):  # the graphed backward is the hand-written one
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for key, value in layer.state_dict().items():  # and moves the statistics as it does
        torch.testing.assert_close(value, plain_state[key], rtol=1e-9, atol=1e-11, msg=key)
        assert not value.requires_grad
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_elsewhere_is_a_clear_error(backend):
    require(backend)
    layer = seqnorm.LSTM(3, 4, backend=backend)
    x = torch.randn(3, 2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='torch'"):
        torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)


def test_the_messages_name_what_is_wrong():
    """A misspelt norm lists the spellings that work ("none" among them); a bad size names the size, not
    proj_size; describe_path takes a device string as docs/api.md shows."""
    with pytest.raises(ValueError, match=r"norm must be 'online', 'layer', or None \(or 'none'\), got 'None'"):
        seqnorm.LSTM(4, 8, norm="None")
    assert seqnorm.LSTM(4, 8, norm="none").norm_type is None
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        seqnorm.RNN(4, 0)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got -3"):
        seqnorm.LSTM(4, -3)
    assert seqnorm.backend.describe_path("cpu") == seqnorm.backend.describe_path(torch.device("cpu"))
