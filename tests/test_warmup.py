"""seqnorm.warmup: the truncated backward and the gate-block measure for users' own loops, held to the gradient
structure they must have, to blocks cut by hand and to the LM pipeline's truncation on the same input."""
import contextlib
import io
import math
import re
from pathlib import Path

import pytest
import torch

import seqnorm
from lm.model import RNNLM, ModelConfig


@pytest.mark.parametrize("norm", ["online", "layer"])
@pytest.mark.parametrize("cls", [seqnorm.LSTM, seqnorm.RNN, seqnorm.GRU])
def test_the_forward_is_the_plain_call_and_the_backward_stops_at_chunk_boundaries(cls, norm):
    """The outputs and the statistics of the chunked call are the plain call's.  With layer norm (a per-sample
    exact gradient) d out[t] / d x[s] is zero for s in an earlier chunk and non-zero within t's chunk; Online
    Normalization's backward is a control process over every row (eqs. 11-12), so its gradient has no such
    per-step structure and only the forward is compared."""
    torch.manual_seed(0)
    T, k = 7, 3
    plain, cut = cls(4, 5, norm=norm), cls(4, 5, norm=norm)
    cut.load_state_dict(plain.state_dict())
    x = torch.randn(T, 2, 4, requires_grad=True)
    want, want_h = plain(x)
    got, got_h = seqnorm.truncated_forward(cut, x, k=k)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for a, b in zip(plain.buffers(), cut.buffers()):  # the statistics saw the same rows in the same order
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if norm == "online":
        return
    for t in range(T):  # d out[t] / d x[s]: zero from an earlier chunk, non-zero within the chunk
        (grad,) = torch.autograd.grad(got[t].sum(), x, retain_graph=True)
        reach = grad.abs().sum(dim=(1, 2))
        chunk = t // k * k
        assert (reach[:chunk] == 0).all() and (reach[chunk:t + 1] > 0).all(), (t, reach)


def test_the_schedule_rises_to_the_full_length_then_stops():
    ks = [seqnorm.truncation_schedule(s, warmup_steps=4, start=32, full=128) for s in range(6)]
    assert ks == [32, 56, 80, 104, None, None]
    assert seqnorm.truncation_schedule(3, warmup_steps=4, start=32) == 32
    assert seqnorm.truncation_schedule(4, warmup_steps=4, start=32) is None  # the warm-up is over
    assert seqnorm.truncation_schedule(0, warmup_steps=4, start=32, full=16) is None  # K >= full: no cut
    with pytest.raises(ValueError, match="k must be"):
        seqnorm.truncated_forward(seqnorm.RNN(2, 3), torch.randn(4, 1, 2), k=0)


def test_a_users_loop_with_the_helper_equals_the_lms_truncated_backward():
    """The toy loop of docs/own_models.md, built from an RNNLM's own pieces: the same gradients as the LM's
    ``truncate=`` path on the same ids."""
    torch.manual_seed(0)
    lm = RNNLM(ModelConfig(vocab_size=30, emsize=8, nhid=8, cell="lstm", norm="online"))
    twin = RNNLM(ModelConfig(vocab_size=30, emsize=8, nhid=8, cell="lstm", norm="online"))
    twin.load_state_dict(lm.state_dict())
    ids, targets = torch.randint(30, (11, 3)), torch.randint(30, (11, 3))
    logits, _ = lm(ids, truncate=4)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1)).backward()
    out, _ = seqnorm.truncated_forward(twin.rnn, twin.encoder(ids), k=4)
    torch.nn.functional.cross_entropy(twin.decoder(out).reshape(-1, 30), targets.reshape(-1)).backward()
    for (name, a), b in zip(lm.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


def test_gate_blocks_are_each_gates_rows_of_the_four_weights_in_every_layer_and_direction():
    """Against blocks cut by hand: a 2-layer bidirectional GRU (gates r, z, n), an RNN (one block), and the
    relative update of one shifted block; unnormalized layers (seqnorm's norm=None, torch.nn) have none."""
    torch.manual_seed(0)
    gru = seqnorm.GRU(3, 4, num_layers=2, bidirectional=True, norm="layer")
    norms = seqnorm.gate_norms(gru)
    assert list(norms) == [f"l{k}{s}.{g}" for k in (0, 1) for s in ("", "_reverse") for g in "rzn"]
    for k in (0, 1):
        for s in ("", "_reverse"):
            w = {n: getattr(gru, f"{n}_l{k}{s}").detach() for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            for j, g in enumerate("rzn"):
                rows = slice(4 * j, 4 * j + 4)
                block = torch.cat([w["weight_ih"][rows], w["weight_hh"][rows], w["bias_ih"][rows, None],
                                   w["bias_hh"][rows, None]], 1)
                assert norms[f"l{k}{s}.{g}"] == pytest.approx(torch.linalg.vector_norm(block).item(), rel=1e-6)
    before = {n: p.detach().clone() for n, p in gru.named_parameters()}
    with torch.no_grad():
        gru.bias_hh_l1_reverse[8:12] += 1.0  # n's rows of one bias: only that block moves
    n_block = torch.cat([before[f"{n}_l1_reverse"][8:12].reshape(4, -1)
                         for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")], 1)
    assert seqnorm.largest_gate_update(gru, before) == pytest.approx(2.0 / torch.linalg.vector_norm(n_block).item(),
                                                                     rel=1e-5)
    with torch.no_grad():
        gru.weight_hh_l0[0, 0] = float("nan")  # a non-finite block is the largest update
    assert seqnorm.largest_gate_update(gru, before) == math.inf
    assert list(seqnorm.gate_norms(seqnorm.RNN(3, 4, norm="online"))) == ["l0.a"]
    for layer in (seqnorm.LSTM(3, 4, norm=None), torch.nn.LSTM(3, 4)):
        assert seqnorm.gate_norms(layer) == {}
        assert seqnorm.largest_gate_update(layer, dict(layer.named_parameters())) == 0.0


def test_the_robust_start_pages_example_runs():
    """docs/robust_start.md's loop for your own training, as printed: it trains (the loss falls from log 50 = 3.9)
    and prints what it says."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "robust_start.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "robust_start.md", "exec"), {})
    loss, blocks = re.fullmatch(r"loss (\S+), gate blocks (\S+)\n", printed.getvalue()).groups()
    assert float(loss) < math.log(50) - 0.2 and 0 < float(blocks) < 100


def test_the_own_models_pages_example_learns_its_task():
    """docs/own_models.md's example, as printed: four lines of the form the page shows, the last at an accuracy
    far above chance (0.5; the page prints 1.000)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "own_models.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", page, re.S) if "for step in range" in c]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "own_models.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    accuracies = [float(re.fullmatch(r"step \d+: loss \S+, accuracy over the last 100 steps (\S+)", x).group(1))
                  for x in lines]
    assert len(accuracies) == 4 and accuracies[-1] > 0.95

@pytest.mark.parametrize("layer", [seqnorm.LSTM(3, 4, bidirectional=True, norm="layer"),
                                   torch.nn.LSTM(3, 4, bidirectional=True)])
def test_truncated_forward_refuses_what_it_cannot_cut_exactly(layer):
    """A bidirectional layer's reverse direction starts at the end of the whole sequence: chunks would change the
    output (by 0.3 measured), so that is an error; so is a PackedSequence.  Uncut (k=None, or k at least the
    length) it is the plain call."""
    x = torch.randn(6, 2, 3)
    with pytest.raises(ValueError, match="bidirectional"):
        seqnorm.truncated_forward(layer, x, k=2)
    torch.testing.assert_close(seqnorm.truncated_forward(layer.eval(), x, k=6)[0], layer(x)[0])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [6, 4])
    with pytest.raises(TypeError, match="PackedSequence"):
        seqnorm.truncated_forward(layer, packed, k=2)
