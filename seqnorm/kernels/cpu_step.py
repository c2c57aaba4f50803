"""Build, load and launch ``cpu_step.c``: the fused per-step kernels on the CPU (float32).

The C file has no dependency beyond libm.  It is compiled with the system C
compiler (``$CC``, default ``cc``) at first use into a per-process temporary
folder, removed once the library is loaded (a fraction of a second;
``-march=native`` is right because it runs where it is built) and called through ctypes with the tensors' data pointers.
"""
import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .constants import ECM_CODES, NORM_CODES, decay_floor

SOURCE = Path(__file__).with_name("cpu_step.c")
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared")


class Params(ctypes.Structure):
    """Mirror of the C struct ``Params``."""

    _fields_ = [("B", ctypes.c_int64), ("H", ctypes.c_int64), ("norm", ctypes.c_int32), ("ecm", ctypes.c_int32),
                ("affine", ctypes.c_int32), ("training", ctypes.c_int32), ("relu", ctypes.c_int32),
                ("alpha", ctypes.c_float), ("eps", ctypes.c_float), ("ls_eps", ctypes.c_float),
                ("clamp_value", ctypes.c_float), ("beta_b", ctypes.c_float), ("v_decay_min", ctypes.c_float)]


class BuildError(RuntimeError):
    pass


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels (built once per process); BuildError says why when there is no compiler."""
    compiler = os.environ.get("CC", "cc")
    folder = tempfile.mkdtemp(prefix="seqnorm-cpu-step-")
    target = os.path.join(folder, "cpu_step.so")
    try:
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", target, "-lm"], check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(target)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        raise BuildError(f"backend='cpu' needs a C compiler ({compiler!r}, set $CC) to build {SOURCE.name}: {detail}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a loaded library stays mapped; nothing is left in /tmp
    for name in ("lstm_forward_step", "rnn_forward_step", "lstm_backward_step", "rnn_backward_step"):
        getattr(lib, name).restype = None
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernels build here; asked once per process (a failed build is not retried on each call)."""
    try:
        library()
    except BuildError:
        return False
    return True


def _ptr(tensor):
    return ctypes.c_void_p(tensor.data_ptr())


class CPUStep:
    """Launches the C step kernels; same call interface as ``step.TritonStep``."""

    def __init__(self, spec, batch: int, dtype: torch.dtype):
        check_float32(dtype)  # the C code reads every buffer as float32
        c, lib = spec.config, library()
        self.params = ctypes.byref(Params(
            batch, spec.hidden_size, NORM_CODES[spec.norm], ECM_CODES[c.ecm],
            spec.norm is not None and c.affine, spec.training, spec.nonlinearity == "relu", c.alpha_fwd, c.eps,
            c.ls_eps, c.clamp_value, 1.0 - c.alpha_bkw, decay_floor(c)))
        self._forward = lib.lstm_forward_step if spec.cell == "lstm" else lib.rnn_forward_step
        self._backward = lib.lstm_backward_step if spec.cell == "lstm" else lib.rnn_backward_step
        self.zero_rows = torch.zeros(batch, spec.hidden_size)  # stands for a missing d_out

    def forward(self, *tensors):
        """(pre, c_prev, c_next, h_next, act, y, s, iz, gamma, beta, mu, var)"""
        self._forward(self.params, *map(_ptr, tensors))

    def backward(self, dh, d_out, *tensors):
        """(dh, d_out or None, dc, act, c_prev, c_next, y, s, iz, gamma, beta, da, dx, u, v)"""
        self._backward(self.params, *map(_ptr, (dh, self.zero_rows if d_out is None else d_out, *tensors)))


def check_float32(dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise TypeError(f"backend='cpu' supports float32 input, got {dtype}; use backend='torch'")
