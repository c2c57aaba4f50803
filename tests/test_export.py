"""The layers under torch.export, torch.compile(fullgraph=True) and torch.jit.trace (the custom op
``seqnorm::recurrence``): the same outputs, gradients and Online Normalization state as eager."""
import copy
import importlib.util

import pytest
import torch

import seqnorm
from layer_helpers import require

STATE = ("running_mean", "running_var", "control_u", "control_v")


class Client(torch.nn.Module):
    """A user's model around a 2-layer seqnorm layer."""

    def __init__(self, cell, backend):
        super().__init__()
        cls = {"lstm": seqnorm.LSTM, "rnn": seqnorm.RNN, "gru": seqnorm.GRU}[cell]
        self.rnn = cls(4, 6, 2, backend=backend, alpha_fwd=0.9, alpha_bkw=0.8)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def run(fn, module, x, train):
    """Output, and in training the input and parameter gradients, then every layer's ON state."""
    xi = x.clone().requires_grad_(train)
    out = fn(xi)
    got = [out.detach()]
    if train:
        (out.sin().sum()).backward()
        got += [xi.grad] + [p.grad for p in module.parameters()]
    got += [getattr(getattr(module.rnn, f"norm_l{k}"), s).clone() for k in range(2) for s in STATE]
    return got


def assert_all_close(got, want):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"item {k}")


def pair(cell, backend, train):
    require(backend)
    torch.manual_seed(0)
    model = Client(cell, backend).train(train)
    model(torch.randn(3, 2, 4)).sum().backward()  # statistics away from their initial values
    model.zero_grad()
    return model, copy.deepcopy(model)


BACKENDS = ["torch", "cpu", "triton"]


# the GRU has the op on the fused backends (its torch path is per-step autograd, eager only: docs/gru.md)
CASES = [(cell, backend) for cell in ("lstm", "rnn") for backend in BACKENDS] + [("gru", "cpu"), ("gru", "triton")]


def every_case(test):
    """Each backend, LSTM and RNN (and the GRU's two backends), train and eval mode."""
    marks = (pytest.mark.parametrize("cell,backend", CASES),
             pytest.mark.parametrize("train", [True, False], ids=["train", "eval"]))
    for mark in marks:
        test = mark(test)
    return test


@every_case
def test_compile_fullgraph_equals_eager(cell, backend, train):
    eager, compiled = pair(cell, backend, train)
    x = torch.randn(5, 3, 4)
    torch._dynamo.reset()  # each case compiles a new model: no recompile limit across the cases
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    assert_all_close(run(fn, compiled, x, train), run(eager, eager, x, train))


@every_case
def test_export_equals_eager(cell, backend, train):
    eager, model = pair(cell, backend, train)
    x = torch.randn(5, 3, 4)
    program = torch.export.export(model, (x,))
    assert "seqnorm.recurrence" in str(program.graph)
    exported = program.module()
    want = eager(x)
    torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-6)
    for k in range(2):  # in training the exported program updates its own copies of the statistics
        for s in ("running_mean", "running_var"):
            buf = dict(exported.named_buffers())[f"rnn.norm_l{k}.{s}"]
            torch.testing.assert_close(buf, getattr(getattr(eager.rnn, f"norm_l{k}"), s), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks on the input, as in torch.nn
@every_case
def test_jit_trace_equals_eager(cell, backend, train):
    eager, model = pair(cell, backend, train)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(5, 3, 4)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    traced.load_state_dict(before)  # tracing ran the forward once
    assert_all_close(run(traced, traced, x, train), run(eager, eager, x, train))


def test_op_passes_opcheck():
    """torch.library.opcheck: schema, fake tensor and autograd registration of seqnorm::recurrence."""
    from seqnorm import ops
    from seqnorm.sequence import RecurrenceSpec

    torch.manual_seed(0)
    spec = ops.encode_spec(RecurrenceSpec("lstm", "online", 3, seqnorm.OnlineNormConfig(alpha_fwd=0.9), "tanh", True))
    state = seqnorm.OnlineNormState.initial(12)
    args = (torch.randn(4, 2, 12, requires_grad=True), torch.randn(2, 3, requires_grad=True), torch.randn(2, 3),
            torch.randn(12, 3, requires_grad=True), torch.ones(12, requires_grad=True), torch.zeros(12), None,
            state.mu, state.var, state.u, state.v, spec, "cpu", None)
    torch.library.opcheck(torch.ops.seqnorm.recurrence, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    gru = ops.encode_spec(RecurrenceSpec("gru", "online", 3, seqnorm.OnlineNormConfig(alpha_fwd=0.9), "tanh", True))
    state = seqnorm.OnlineNormState.initial(9)
    args = (torch.randn(4, 2, 9, requires_grad=True), torch.randn(2, 3, requires_grad=True), None,
            torch.randn(9, 3, requires_grad=True), torch.ones(9, requires_grad=True), torch.zeros(9), None,
            state.mu, state.var, state.u, state.v, gru, "cpu", torch.randn(9, requires_grad=True))
    torch.library.opcheck(torch.ops.seqnorm.recurrence, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("cell,norm,ecm,kw", [("lstm", "online", "ls", {}), ("lstm", "online", "ac", {}),
                                              ("lstm", "online", "none", {"affine": False}),
                                              ("lstm", "layer", "ls", {"proj_size": 3}), ("lstm", None, "ls", {}),
                                              ("rnn", "online", "ls", {"nonlinearity": "relu"}), ("rnn", "layer", "ls", {})])
def test_onnx_inference_path_equals_eager_eval(cell, norm, ecm, kw, monkeypatch):
    """What an ONNX export records (sequence.plain_recurrence, plain ops) against the eager eval forward."""
    from seqnorm import layers

    torch.manual_seed(0)
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    layer = cls(4, 6, 2, bidirectional=True, norm=norm, ecm=ecm, alpha_fwd=0.9, **kw)
    layer(torch.randn(7, 3, 4) * 2 + 1)[0].sum().backward()  # statistics away from 0 / 1
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("norm_"):
                p.add_(torch.randn_like(p) * 0.3)
    layer.eval()
    x = torch.randn(5, 3, 4)
    want = layer(x)
    monkeypatch.setattr(layers, "_tracing", lambda: True)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    layer.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        layer(x)


class WordModel(torch.nn.Module):
    """pytorch/examples' word_language_model RNNModel, reduced: encoder, seqnorm.LSTM, tied decoder."""

    def __init__(self, ntoken=30, nhid=8):
        super().__init__()
        self.encoder = torch.nn.Embedding(ntoken, nhid)
        self.rnn = seqnorm.LSTM(nhid, nhid, 2)
        self.decoder = torch.nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight

    def forward(self, ids, hidden):
        out, hidden = self.rnn(self.encoder(ids), hidden)
        return self.decoder(out), hidden


@pytest.mark.filterwarnings("ignore")  # the exporter's own notices
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = WordModel()
    ids = torch.randint(0, 30, (6, 2))
    model(ids, None)[0].sum().backward()  # trained statistics
    model.eval()
    hidden = (torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))
    torch.onnx.export(model, (ids, hidden), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    test_ids = torch.randint(0, 30, (6, 2))
    h0 = (torch.randn(2, 2, 8), torch.randn(2, 2, 8))
    got = session.run(None, dict(zip(names, [test_ids.numpy(), h0[0].numpy(), h0[1].numpy()])))
    with torch.no_grad():
        logits, (h, c) = model(test_ids, h0)
    for g, w in zip(got, (logits, h, c)):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_word_language_model_pipeline(tmp_path):
    """pytorch/examples' word_language_model flow with only the layer's construction changed: train with
    repackaged hidden states and clipping, save the whole model, reload with weights_only and the client's own
    allowlist, flatten_parameters, evaluate, export to ONNX."""
    torch.manual_seed(0)
    model, data = WordModel(), torch.randint(0, 30, (41, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    hidden, losses = None, []
    for i in range(0, 40, 8):
        hidden = None if hidden is None else tuple(h.detach() for h in hidden)
        logits, hidden = model(data[i:i + 8], hidden)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 30), data[i + 1:i + 9].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    torch.save(model, tmp_path / "model.pt")
    with torch.serialization.safe_globals([WordModel, torch.nn.Embedding, torch.nn.Linear]):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    loaded.rnn.flatten_parameters()
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[:8], None)[0], model(data[:8], None)[0])
    if importlib.util.find_spec("onnxscript"):
        hidden = (torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
        torch.onnx.export(loaded, (data[:8], hidden), tmp_path / "model.onnx")
        assert (tmp_path / "model.onnx").stat().st_size > 0


def test_compile_fullgraph_with_inductor_equals_eager():
    """The default compiler (inductor) around the default CPU backend: one case, as users run it."""
    eager, compiled = pair("lstm", "cpu", True)
    x = torch.randn(5, 3, 4)
    torch._dynamo.reset()
    fn = torch.compile(compiled, fullgraph=True)
    assert_all_close(run(fn, compiled, x, True), run(eager, eager, x, True))
