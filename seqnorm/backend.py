"""Which implementation runs a layer's recurrence.

- ``"torch"``: ``seqnorm.sequence.RecurrenceFunction``, plain PyTorch ops, any device and dtype.
- ``"triton"``: the custom op ``seqnorm::recurrence`` (``seqnorm.ops``) on the Triton
  step kernels (one launch per time step); CUDA tensors, or CPU tensors under
  Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported).
- ``"cpu"``: the same op on the C twin of those kernels (``kernels/cpu_step.c``,
  built with the system C compiler at first use); float32 CPU tensors.  The
  time loop of a layer direction runs in C too (``kernels/cpu_sequence.c``,
  one call per pass) with the BLAS that torch itself exports; where there is
  none, in Python over the per-step kernels.  ``cpu_loop()`` says which.
- ``"auto"`` (default): the value of ``$SEQNORM_BACKEND`` if set, else
  ``"triton"`` for float32/bfloat16/float16 CUDA tensors when Triton is
  installed, ``"cpu"`` for float32 CPU tensors when a C compiler is there, and
  ``"torch"`` otherwise (with a warning when a fused backend was expected but
  is missing).
"""
import importlib.util
import os
import warnings

import torch

from . import _checks

BACKENDS = ("auto", "torch", "triton", "cpu")
ENV_VAR = "SEQNORM_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(name: str, backend: str) -> str:
    return _checks.check_choice(name, backend, BACKENDS)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def cpu_kernels_available() -> bool:
    from .kernels import cpu_step

    return cpu_step.available()


def _build_error() -> str:
    from .kernels import cpu_step

    return cpu_step.build_error() or "the C kernels are not available (set $CC to a C compiler)"


def cpu_loop() -> str:
    """How ``backend="cpu"`` runs a layer's time loop here: "native" (one C call per layer direction and pass,
    the per-step products through MKL's sgemm from torch's libtorch_cpu; the BLAS uses torch's intra-op threads),
    "per-step" (a Python loop over the step kernels and torch matmuls: no BLAS symbol found), or "unavailable"
    (the C kernels do not build here: ``backend="cpu"`` raises, ``"auto"`` runs the torch path)."""
    from .kernels import cpu_step

    if not cpu_step.available():
        return "unavailable"
    return "native" if cpu_step.native_loop() else "per-step"


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'torch', 'triton' or 'cpu' for ``dtype`` tensors on ``device``; raises if a forced one cannot run them."""
    check_backend("backend", backend)
    if backend == "auto":
        backend = check_backend(f"${ENV_VAR}", os.environ.get(ENV_VAR, "auto"))
    if backend == "auto":
        return _automatic(device, dtype)
    if backend == "triton":
        _check_triton_runs_on(device, dtype)
    if backend == "cpu":
        _check_cpu_runs_on(device, dtype)
    return backend


def _automatic(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda" and dtype in TRITON_DTYPES:
        if triton_installed():
            return "triton"
        _warn_once("triton is not installed: seqnorm layers on CUDA run the slower torch path "
                   "(pip install 'seqnorm[triton]')")
    if device.type == "cpu" and dtype == torch.float32:
        if cpu_kernels_available():
            return "cpu"
        _warn_once(f"seqnorm layers on CPU run the slower torch path: {_build_error()}")
    return "torch"


def describe_path(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """In words, the path ``backend="auto"`` takes for ``dtype`` tensors on ``device`` (a ``torch.device`` or a
    string such as "cpu"; for a program's log)."""
    device = torch.device(device)
    backend = os.environ.get(ENV_VAR, "auto")
    if backend == "auto":
        if device.type == "cuda" and dtype in TRITON_DTYPES:
            return "the Triton kernels" if triton_installed() else (
                "the plain-PyTorch path: Triton is not installed (pip install 'seqnorm[triton]' for the fused kernels)")
        if device.type == "cpu" and dtype == torch.float32:
            if not cpu_kernels_available():
                return f"the plain-PyTorch path: {_build_error()}"
            from .kernels import cpu_step

            isa = cpu_step.target_isa() or "the compiler's default ISA"
            return f"the C kernels ({isa}, time loop {'in C' if cpu_loop() == 'native' else 'in Python'})"
        return "the plain-PyTorch path"
    return f"backend {backend!r} (${ENV_VAR})"


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _check_triton_runs_on(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16 inputs, got {dtype}; "
                        "use backend='torch'")
    if not triton_installed():
        raise RuntimeError("backend='triton' needs the triton package: pip install 'seqnorm[triton]' (or triton)")
    from .kernels import step

    if device.type != "cuda" and not step.INTERPRETED:
        raise RuntimeError(f"backend='triton' on {device.type} tensors runs only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before seqnorm.kernels is first imported, or use backend='torch'")


def _check_cpu_runs_on(device: torch.device, dtype: torch.dtype) -> None:
    from .kernels import cpu_step

    if device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, got {device.type} tensors; use 'triton' or 'torch'")
    cpu_step.check_float32(dtype)
    cpu_step.library()  # raises BuildError (a RuntimeError) naming the compiler when it cannot build
