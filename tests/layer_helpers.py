"""Shared by the layer tests that hold every backend to the float64 loops of tests/reference.py."""
import copy

import pytest
import torch

import reference

# (backend, dtype): the torch path in float64 (held to 1e-9) and float32, and the fused C and Triton kernels
BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("cpu", torch.float32), ("triton", torch.float32)]
BACKEND_IDS = lambda v: str(v).replace("torch.", "")  # noqa: E731


def require(backend: str) -> None:
    """Skip what cannot run here: Triton when it is not installed; the fused kernels on CPU tensors under CUDA."""
    if backend == "triton":
        pytest.importorskip("triton")
    if backend != "torch" and torch.cuda.is_available():
        pytest.skip("this test runs the fused backends on CPU tensors")


def on_backend(ref, backend: str, dtype):
    """A copy of the float64 reference layer ``ref`` in ``dtype``, run by ``backend``."""
    layer = copy.deepcopy(ref).to(dtype)
    layer.backend = backend
    return layer


def forward_backward(layer, x, hx, weights, st=None):
    """Output, finals, every gradient and the ON state after the backward of a loss touching all outputs.

    With ``st`` the layer's parameters run through ``reference.layer_loop`` (carrying ``st``) instead.
    """
    x = x.clone().requires_grad_()
    hx = tuple(h.clone().requires_grad_() for h in hx)
    if st is None:
        out, finals = layer(x, hx if layer.cell == "lstm" else hx[0])
        finals = finals if layer.cell == "lstm" else (finals,)
    else:
        out, finals = reference.layer_loop(dict(layer.named_parameters()), layer.cell, layer.hidden_size, x, hx, st)
    loss = (out * weights).sum() + sum((f * (k + 1.5)).sin().sum() for k, f in enumerate(finals))
    layer.zero_grad()
    loss.backward()
    got = {"out": out, "dx": x.grad, **{f"final{k}": f for k, f in enumerate(finals)},
           **{f"dh{k}": h.grad for k, h in enumerate(hx)}, **{f"grad.{n}": q.grad for n, q in layer.named_parameters()}}
    if st is None:
        norm = layer.norm_l0
        got.update(mu=norm.running_mean, var=norm.running_var, u=norm.control_u, v=norm.control_v)
    else:
        got.update(mu=st["mu"], var=st["var"], u=st["u"], v=st["v"])
    return {k: t.detach().clone() for k, t in got.items()}
