"""seqnorm.warmup: the truncated backward for users' own loops, held to the gradient structure it must have and to
the LM pipeline's truncation on the same input."""
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
