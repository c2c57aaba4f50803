"""The fused backends (seqnorm/kernels: Triton and its C twin) held to the torch path.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py); shapes stay small so it stays fast.  The C kernels are
built with the system compiler.  The CUDA tests at the end run only where a
GPU is present.
"""
import copy

import pytest
import torch

import seqnorm
from seqnorm import backend as backends, ops
from seqnorm.norms import OnlineNormConfig
from seqnorm.sequence import RecurrenceFunction, RecurrenceSpec

pytest.importorskip("triton")
from seqnorm.kernels import cpu_step, step  # noqa: E402  (after the importorskip)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NORMS = [("online", "ls"), ("online", "ac"), ("online", "none"), ("layer", "ls"), (None, "ls")]
CELLS = [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
FUSED = ["triton"] if CUDA else ["triton", "cpu"]  # the C kernels run on CPU tensors only


def make_pair(cell, nonlinearity, norm, ecm, input_size, hidden, num_layers=1, backend="triton", **kw):
    """The same layer twice: backend 'torch' and ``backend``, affine moved away from identity."""
    torch.manual_seed(0)
    config = OnlineNormConfig(alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm, **kw)
    extra = {} if cell == "lstm" else {"nonlinearity": nonlinearity}
    cls = seqnorm.LSTM if cell == "lstm" else seqnorm.RNN
    ref = cls(input_size, hidden, num_layers=num_layers, norm=norm, config=config, backend="torch", device=DEVICE,
              **extra)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    fused = copy.deepcopy(ref)
    fused.backend = backend
    return ref, fused


def run(layer, x, hx, weights):
    """Forward and backward of a loss touching output, h_n (and c_n); returns everything to compare."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    out, h_n = layer(x, None if hx is None else (hx if layer.cell == "lstm" else hx[0]))
    finals = h_n if layer.cell == "lstm" else (h_n,)
    state_after_forward = {k: v.clone() for k, v in layer.named_buffers()}
    loss = (out * weights).sum() + sum((f * (k + 1.5)).sin().sum() for k, f in enumerate(finals))
    layer.zero_grad()
    loss.backward()
    got = {"out": out, **{f"final{k}": f for k, f in enumerate(finals)}, "dx": x.grad}
    got.update({f"d{k}": h.grad for k, h in enumerate(hx or ())})
    got.update({f"grad.{n}": p.grad for n, p in layer.named_parameters()})
    got.update({f"fwd.{n}": b for n, b in state_after_forward.items()})
    got.update({f"bwd.{n}": b.clone() for n, b in layer.named_buffers()})
    return got


def assert_same(ref, fused, x, hx, calls=2, atol=2e-5, rtol=1e-4):
    weights = torch.randn(x.shape[:-1] + (ref.hidden_size,), device=x.device)
    for call in range(calls):  # the state carries from call to call
        want, got = run(ref, x, hx, weights), run(fused, x, hx, weights)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=lambda m: f"call {call}, {key}: {m}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cell,nonlinearity", CELLS)
@pytest.mark.parametrize("norm,ecm", NORMS)
@pytest.mark.parametrize("T,B,H", [(1, 1, 3), (5, 3, 3)])
def test_fused_equals_torch_path(backend, cell, nonlinearity, norm, ecm, T, B, H):
    ref, fused = make_pair(cell, nonlinearity, norm, ecm, 4, H, backend=backend)
    x = torch.randn(T, B, 4, device=DEVICE) * 2
    hx = tuple(torch.randn(1, B, H, device=DEVICE) for _ in range(2 if cell == "lstm" else 1))
    assert_same(ref, fused, x, hx)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cell,nonlinearity", [("lstm", "tanh"), ("rnn", "tanh")])
@pytest.mark.parametrize("norm,ecm", [("online", "ls"), ("online", "ac"), ("layer", "ls")])
def test_fused_equals_torch_path_h200(backend, cell, nonlinearity, norm, ecm):
    ref, fused = make_pair(cell, nonlinearity, norm, ecm, 7, 200, backend=backend)
    # |dx| reaches ~30 here; float32 sums over 200 features differ by a few 1e-5 between paths
    # (each path is as close as the other to a float64 run), so atol is 1e-4 (3e-6 of the largest value)
    assert_same(ref, fused, torch.randn(3, 2, 7, device=DEVICE), None, atol=1e-4)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_multi_layer_batch_first_no_affine(backend, affine):
    ref, fused = make_pair("lstm", "tanh", "online", "ls", 4, 5, num_layers=2, backend=backend, affine=affine)
    for layer in (ref, fused):
        layer.batch_first = True
    hx = tuple(torch.randn(2, 3, 5, device=DEVICE) for _ in range(2))
    assert_same(ref, fused, torch.randn(3, 4, 4, device=DEVICE), hx)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("cell,nonlinearity", [("lstm", "tanh"), ("rnn", "relu")])
@pytest.mark.parametrize("norm,ecm", [("online", "ls"), ("online", "ac"), ("layer", "ls")])
def test_fused_eval_mode_freezes_state(backend, cell, nonlinearity, norm, ecm):
    ref, fused = make_pair(cell, nonlinearity, norm, ecm, 4, 5, backend=backend)
    x = torch.randn(4, 3, 4, device=DEVICE)
    for layer in (ref, fused):
        layer(x)[0].sum().backward()  # move the statistics away from their initial values
        layer.eval()
    before = {n: b.clone() for n, b in fused.named_buffers()}
    assert_same(ref, fused, x, None)
    for n, b in fused.named_buffers():
        torch.testing.assert_close(b, before[n], atol=0, rtol=0)


def _spec(cell, norm, ecm, H, training=True):
    return RecurrenceSpec(cell, norm, H, OnlineNormConfig(alpha_fwd=0.9, alpha_bkw=0.8, ecm=ecm), "tanh", training)


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("norm,ecm,training", [("online", "ac", True), ("online", "none", True), (None, "ls", True),
                                               ("online", "ls", False), ("layer", "ls", True)])
def test_triton_split_over_programs(cell, norm, ecm, training, monkeypatch):
    """Small hidden blocks (max_block_h=2) and per-row programs give the same result as one program."""
    T, B, H = 3, 3, 5
    spec = _spec(cell, norm, ecm, H, training)
    geo = step.geometry(spec, B, max_block_h=2)
    assert geo.grid[0] * geo.grid[1] > 1, geo
    G = spec.gates
    torch.manual_seed(1)
    args = [torch.randn(T, B, G * H, device=DEVICE), torch.randn(B, H, device=DEVICE),
            torch.randn(B, H, device=DEVICE) if cell == "lstm" else None, torch.randn(G * H, H, device=DEVICE) * 0.5,
            1 + 0.3 * torch.randn(G * H, device=DEVICE), 0.3 * torch.randn(G * H, device=DEVICE), None]
    results = []
    small_blocks = lambda spec, batch, dtype: step.TritonStep(spec, batch, dtype, max_block_h=2)  # noqa: E731
    monkeypatch.setitem(ops.STEP_FACTORIES, "triton", lambda: small_blocks)
    for fn in (RecurrenceFunction.apply, lambda spec, *a: ops.run(ops.encode_spec(spec), "triton", *a)):
        state = seqnorm.OnlineNormState.initial(G * H, device=DEVICE)
        state.mu.normal_(generator=torch.Generator(DEVICE).manual_seed(2))
        leaves = [None if a is None else a.clone().requires_grad_() for a in args]
        out, h, c = fn(spec, state, *leaves)
        (out.sin().sum() + h.sum() + (0 if c is None else c.cos().sum())).backward()
        results.append([out, h, c] + [None if a is None else a.grad for a in leaves] + list(vars(state).values()))
    for want, got in zip(*results):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_close_to_float32(dtype):
    ref, fused = make_pair("lstm", "tanh", "online", "ls", 4, 6)
    fused = fused.to(dtype)
    assert fused.norm_l0.running_mean.dtype == torch.float32  # statistics stay float32
    x = torch.randn(5, 3, 4, device=DEVICE)
    out_ref, _ = ref(x)
    out, (h, c) = fused(x.to(dtype))
    assert out.dtype == h.dtype == c.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out.float(), out_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(fused.norm_l0.running_var, ref.norm_l0.running_var, atol=tol, rtol=tol)


# --- choosing the backend ----------------------------------------------------


def test_auto_backend(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert backends.resolve("auto", torch.device("cpu"), torch.float64) == "torch"
    assert backends.resolve("auto", torch.device("cuda"), torch.float16) == "triton"
    assert backends.resolve("auto", torch.device("cuda"), torch.float64) == "torch"
    monkeypatch.setattr(backends, "cpu_kernels_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="C compiler"):
        assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "torch"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "triton"
    assert backends.resolve("torch", torch.device("cpu"), torch.float32) == "torch"  # the argument wins
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SEQNORM_BACKEND"):
        backends.resolve("auto", torch.device("cpu"), torch.float32)


def test_env_var_reaches_the_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "run", lambda *a: calls.append(a[1]) or (a[3][..., :5], a[4], a[5]))
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    seqnorm.LSTM(4, 5)(torch.randn(2, 1, 4))
    assert calls == ["triton"]


def test_bad_backend_arguments(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        seqnorm.LSTM(4, 5, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        seqnorm.LSTM(4, 5, backend="triton", dtype=torch.float64)(torch.randn(2, 1, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        seqnorm.LSTM(4, 5, backend="cpu", dtype=torch.float64)(torch.randn(2, 1, 4, dtype=torch.float64))
    monkeypatch.setattr(step, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        seqnorm.RNN(4, 5, backend="triton")(torch.randn(2, 1, 4))
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'seqnorm\[triton\]'"):
        seqnorm.RNN(4, 5, backend="triton")(torch.randn(2, 1, 4))


def test_autocast_on_cpu_keeps_the_c_kernels_off_bfloat16(monkeypatch):
    """Under autocast the projections are bfloat16: auto falls back to torch, a forced 'cpu' refuses."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = seqnorm.LSTM(4, 5)(x)
        assert out.dtype == torch.bfloat16 and out.isfinite().all()
        with pytest.raises(TypeError, match="float32"):
            seqnorm.LSTM(4, 5, backend="cpu")(x)


def test_cpu_backend_names_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    cpu_step.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="no-such-compiler"):
            seqnorm.LSTM(4, 5, backend="cpu")(torch.randn(2, 1, 4))
    finally:
        cpu_step.library.cache_clear()


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_torch_compile_runs_the_layer(backend):
    """torch.compile (with graph breaks allowed) of a model holding a layer equals eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), seqnorm.LSTM(4, 5, backend=backend, device=DEVICE)).to(DEVICE)
    twin = copy.deepcopy(model)
    compiled = torch.compile(lambda x: model(x)[0].tanh().sum(), backend="aot_eager")
    x = torch.randn(4, 2, 3, device=DEVICE)
    compiled(x).backward()
    twin(x)[0].tanh().sum().backward()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


# --- CUDA only: compiled kernels ----------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA or step.INTERPRETED, reason="needs a GPU (compiled Triton kernels)")


@cuda_only
@pytest.mark.parametrize("cell,nonlinearity", CELLS)
@pytest.mark.parametrize("norm,ecm", NORMS)
@pytest.mark.parametrize("T,B,H", [(1, 1, 3), (7, 20, 200), (4, 64, 512)])
def test_cuda_triton_equals_torch_path(cell, nonlinearity, norm, ecm, T, B, H):
    ref, fused = make_pair(cell, nonlinearity, norm, ecm, 16, H)
    assert_same(ref, fused, torch.randn(T, B, 16, device="cuda"), None, atol=1e-4, rtol=1e-3)


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 6e-2), (torch.float16, 2e-2)])
def test_cuda_half_precision_gradients(dtype, tol):
    ref, fused = make_pair("lstm", "tanh", "online", "ls", 16, 200)
    fused = fused.to(dtype)
    x = torch.randn(10, 20, 16, device="cuda")
    weights = torch.randn(10, 20, 200, device="cuda")
    want, got = run(ref, x, None, weights), run(fused, x.to(dtype), None, weights.to(dtype))
    for key in want:
        scale = want[key].abs().max().clamp(min=1)
        torch.testing.assert_close(got[key].float() / scale, want[key] / scale, atol=tol, rtol=tol, msg=key)


@cuda_only
def test_cuda_no_host_sync_and_graph_replay_equals_eager():
    torch.manual_seed(0)
    layer = seqnorm.LSTM(16, 200, backend="triton", device="cuda")
    x = torch.randn(35, 20, 16, device="cuda")
    weights = torch.randn(35, 20, 200, device="cuda")

    def step():
        out, _ = layer(x)
        (out * weights).sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    layer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        out_static = step()
    start = {n: b.clone() for n, b in layer.named_buffers()}
    graph.replay()
    got = [out_static.clone()] + [p.grad.clone() for p in layer.parameters()] + [b.clone() for b in layer.buffers()]
    for n, b in layer.named_buffers():
        b.copy_(start[n])
    layer.zero_grad(set_to_none=True)
    want = [step()] + [p.grad for p in layer.parameters()] + list(layer.buffers())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
