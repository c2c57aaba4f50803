"""Run by .ci/run in the plain install (no extras, so no Triton): the default CPU path must work."""
import importlib.util

import torch

import seqnorm

assert importlib.util.find_spec("triton") is None, "this check is meant for an install without Triton"
for layer in (seqnorm.LSTM(4, 8, norm="online"), seqnorm.RNN(4, 8, norm="online")):
    out, _ = layer(torch.randn(3, 2, 4))
    out.sum().backward()
    assert torch.isfinite(layer.weight_hh_l0.grad).all()
try:
    seqnorm.LSTM(4, 8, backend="triton")(torch.randn(3, 2, 4))
except RuntimeError as e:
    assert "seqnorm[triton]" in str(e), e
else:
    raise AssertionError("backend='triton' without Triton should be a clear error")
print("plain install: online LSTM and RNN forward+backward on the default CPU backend work without Triton")
