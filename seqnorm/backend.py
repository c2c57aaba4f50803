"""Which implementation runs a layer's recurrence.

- ``"torch"``: ``seqnorm.sequence.RecurrenceFunction``, plain PyTorch ops, any device.
- ``"triton"``: ``seqnorm.kernels.recurrence.FusedRecurrenceFunction``, one fused
  kernel per time step; CUDA tensors, or CPU tensors under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before the kernels are imported).
- ``"auto"`` (default): the value of ``$SEQNORM_BACKEND`` if set, else
  ``"triton"`` for float32/bfloat16/float16 CUDA tensors when Triton is
  installed, else ``"torch"``.
"""
import importlib.util
import os

import torch

from . import _checks

BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ENV_VAR = "SEQNORM_BACKEND"


def check_backend(name: str, backend: str) -> str:
    return _checks.check_choice(name, backend, BACKENDS)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch' or 'triton' for ``dtype`` tensors on ``device``; raises if 'triton' cannot run them."""
    check_backend("backend", backend)
    if backend == "auto":
        backend = check_backend(f"${ENV_VAR}", os.environ.get(ENV_VAR, "auto"))
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype in TRITON_DTYPES and triton_installed() else "torch"
    if backend == "triton":
        _check_triton_runs_on(device, dtype)
    return backend


def _check_triton_runs_on(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {dtype}; "
                        "use backend='torch'")
    if not triton_installed():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    from .kernels import recurrence

    if device.type != "cuda" and not recurrence.INTERPRETED:
        raise RuntimeError(f"backend='triton' on {device.type} tensors runs only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before seqnorm.kernels is first imported, or use backend='torch'")
