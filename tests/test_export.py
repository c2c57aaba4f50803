"""The layers under torch.export, torch.compile(fullgraph=True) and torch.jit.trace (the custom op
``seqnorm::recurrence``): the same outputs, gradients and Online Normalization state as eager."""
import copy

import pytest
import torch

import seqnorm
from layer_helpers import require

STATE = ("running_mean", "running_var", "control_u", "control_v")


class Client(torch.nn.Module):
    """A user's model around a 2-layer seqnorm layer."""

    def __init__(self, cell, backend):
        super().__init__()
        cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
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
    torch.manual_seed(0)
    model = Client(cell, backend).train(train)
    model(torch.randn(3, 2, 4)).sum().backward()  # statistics away from their initial values
    model.zero_grad()
    return model, copy.deepcopy(model)


BACKENDS = ["torch", "cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_equals_eager(cell, backend, train):
    require(backend)
    eager, compiled = pair(cell, backend, train)
    x = torch.randn(5, 3, 4)
    torch._dynamo.reset()  # each case compiles a new model: no recompile limit across the cases
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    assert_all_close(run(fn, compiled, x, train), run(eager, eager, x, train))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_export_equals_eager(cell, backend, train):
    require(backend)
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
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_jit_trace_equals_eager(cell, backend, train):
    require(backend)
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
            state.mu, state.var, state.u, state.v, spec, "cpu")
    torch.library.opcheck(torch.ops.seqnorm.recurrence, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
