"""The native CPU time loop (kernels/cpu_sequence.c: one C call per layer direction and pass, the per-step
products through torch's own MKL sgemm) held to the per-step Python loop over the same kernels, and to the
plain-PyTorch path, which the float64 references of test_layers / test_kernels hold in turn."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqnorm
from seqnorm import backend as backends
from seqnorm.kernels import cpu_step

pytestmark = pytest.mark.skipif(not (cpu_step.available() and cpu_step.native_loop()),
                                reason="no C compiler, or torch exports no sgemm_ here (seqnorm.backend.cpu_loop())")


def layers(cls, norm, **kw):
    """The same layer three times: torch path, the C kernels with the native loop, and with the per-step loop."""
    torch.manual_seed(0)
    ref = cls(6, 8, norm=norm, backend="torch", config=seqnorm.OnlineNormConfig(alpha_fwd=0.9, alpha_bkw=0.8), **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    native, per_step = copy.deepcopy(ref), copy.deepcopy(ref)
    native.backend = per_step.backend = "cpu"
    return ref, native, per_step


def run(layer, x, lengths, loop):
    """Forward and backward through ``layer`` on x (T, B, 6), packed when ``lengths`` is given."""
    x = x.clone().requires_grad_()
    with (cpu_step.per_step_loop() if loop == "per-step" else torch.enable_grad()):
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h_n = layer(inp)
        if lengths is not None:
            out = pad_packed_sequence(out)[0]
        finals = h_n if isinstance(h_n, tuple) else (h_n,)
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + sum(f.sin().sum() for f in finals)
        layer.zero_grad()
        loss.backward()
    got = {"out": out.detach(), "dx": x.grad, **{f"final{k}": f.detach() for k, f in enumerate(finals)}}
    got.update({f"grad.{n}": p.grad for n, p in layer.named_parameters()})
    got.update({f"state.{n}": b.clone() for n, b in layer.named_buffers()})
    return got


CASES = [  # (cell, layer kwargs, T, B, packed lengths)
    ("lstm", dict(num_layers=2, bidirectional=True), 5, 3, None),
    ("lstm", dict(proj_size=4, bidirectional=True), 5, 3, [5, 2, 4]),
    ("lstm", dict(), 1, 1, None),
    ("rnn", dict(num_layers=2, bidirectional=True), 5, 3, [3, 5, 1]),
    ("rnn", dict(nonlinearity="relu"), 1, 1, None),
    ("rnn", dict(), 4, 1, None),
]


@pytest.mark.parametrize("norm", ["online", "layer", None])
@pytest.mark.parametrize("cell,kw,T,B,lengths", CASES)
def test_native_loop_equals_per_step_loop_and_torch_path(cell, kw, T, B, lengths, norm):
    ref, native, per_step = layers(seqnorm.LSTM if cell == "lstm" else seqnorm.RNN, norm, **kw)
    torch.manual_seed(1)
    for call in range(3):  # the Online Normalization state carries from call to call
        x = torch.randn(T, B, 6)
        want, fast, slow = run(ref, x, lengths, "torch"), run(native, x, lengths, "native"), run(per_step, x, lengths,
                                                                                                   "per-step")
        assert want.keys() == fast.keys() == slow.keys()
        for key in want:
            msg = lambda m: f"call {call}, {key}: {m}"  # noqa: E731
            # the same kernels and the same BLAS, but other GEMM calls (packed in C) and the affine's gradient sums in
            # another order: float32 rounding, amplified over the calls through the state, relative to the scale
            scale = max(1.0, slow[key].abs().max().item())
            torch.testing.assert_close(fast[key], slow[key], atol=1e-5 * scale, rtol=1e-5, msg=msg)
            torch.testing.assert_close(fast[key], want[key], atol=2e-5, rtol=1e-4, msg=msg)


def test_native_loop_makes_no_per_step_calls(monkeypatch):
    """The per-step launchers raise: the native path must never reach them (the per-step loop does)."""
    def per_step_call(*args):
        raise AssertionError("a per-step kernel call from Python")

    monkeypatch.setattr(cpu_step.CPUStep, "forward", per_step_call)
    monkeypatch.setattr(cpu_step.CPUStep, "backward", per_step_call)
    for layer in (seqnorm.LSTM(6, 8, norm="online", proj_size=4, bidirectional=True, backend="cpu"),
                  seqnorm.RNN(6, 8, norm="layer", num_layers=2, backend="cpu")):
        x = torch.randn(7, 3, 6, requires_grad=True)
        layer(x)[0].sum().backward()
        assert x.grad is not None
        with cpu_step.per_step_loop(), pytest.raises(AssertionError, match="per-step kernel call"):
            layer(x)[0].sum().backward()


def test_the_native_loop_is_bit_for_bit_deterministic():
    torch.manual_seed(0)
    x = torch.randn(20, 4, 6)
    results = []
    for _ in range(2):
        layer = layers(seqnorm.LSTM, "online", bidirectional=True)[1]
        results.append(run(layer, x, None, "native"))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_cpu_loop_says_which_loop_runs(monkeypatch):
    assert backends.cpu_loop() == "native"
    with cpu_step.per_step_loop():
        assert backends.cpu_loop() == "per-step"
    assert backends.cpu_loop() == "native"
    monkeypatch.setattr(cpu_step, "blas_symbols", lambda: None)  # as on a torch that exports no sgemm_
    assert backends.cpu_loop() == "per-step"
    monkeypatch.setattr(cpu_step, "available", lambda: False)  # as where the C kernels do not build
    assert backends.cpu_loop() == "unavailable"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("cell,norm,kw", [("lstm", "online", dict(proj_size=4)), ("lstm", "layer", {}),
                                          ("rnn", "online", dict(bidirectional=True)), ("rnn", None, {})])
def test_inference_keeps_one_step_of_scratch_and_the_same_numbers(cell, norm, kw, backend):
    """Eval mode under no_grad: the op keeps nothing for a backward (act, y, s of one step, reused), and the
    outputs equal eval mode with autograd."""
    if backend == "triton":
        pytest.importorskip("triton")
    from seqnorm import ops

    torch.manual_seed(0)
    layer = (seqnorm.LSTM if cell == "lstm" else seqnorm.RNN)(6, 8, norm=norm, backend=backend, **kw).eval()
    x = torch.randn(9, 3, 6)
    shapes = []
    real = torch.ops.seqnorm.recurrence

    def recording(*args):
        outputs = real(*args)
        shapes.append(tuple(outputs[5].shape))  # act
        return outputs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.seqnorm, "recurrence", recording)
        with torch.no_grad():
            fast = layer(x)
        slow = layer(x.requires_grad_())
    assert shapes[0][0] == 1 and shapes[-1][0] == 9, shapes
    for a, b in zip(torch.utils._pytree.tree_leaves(fast), torch.utils._pytree.tree_leaves(slow)):
        assert torch.equal(a, b.detach())


def test_the_kernels_build_without_openmp_and_give_the_same_numbers(tmp_path, monkeypatch):
    """A compiler without OpenMP (the pragmas ignored): the library still builds, and a step of the LSTM (gates
    on one thread) equals the OpenMP build's (gates on torch's threads)."""
    import ctypes
    import subprocess

    from seqnorm.norms import OnlineNormConfig
    from seqnorm.sequence import RecurrenceSpec

    target = tmp_path / "serial.so"
    subprocess.run([*cpu_step.build_flags(), *map(str, cpu_step.SOURCES), "-o", str(target), "-lm"], check=True)
    serial = ctypes.CDLL(str(target))
    spec = RecurrenceSpec("lstm", "online", 200, OnlineNormConfig())
    B, GH = 20, 800  # B x 4H above the threshold where the OpenMP build splits the gates over threads
    torch.manual_seed(0)
    pre, c_prev, mu0, var0 = torch.randn(B, GH), torch.randn(B, 200), torch.randn(GH), torch.rand(GH) + 0.5
    outputs = []
    for lib in (cpu_step.library(), serial):
        monkeypatch.setattr(cpu_step, "library", lambda lib=lib: lib)
        step = cpu_step.CPUStep(spec, B, torch.float32)
        step._forward = lib.lstm_forward_step
        bufs = [torch.empty(B, 200), torch.empty(B, 200), torch.empty(B, GH), torch.empty(B, GH),
                torch.empty(B, GH), torch.empty(B, 4)]
        mu, var = mu0.clone(), var0.clone()
        step.forward(pre, c_prev, *bufs, torch.ones(GH), torch.zeros(GH), mu, var)
        outputs.append([*bufs, mu, var])
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
