"""Build, load and launch the C kernels on the CPU (float32): ``cpu_step.c`` (one fused time step) and
``cpu_sequence.c`` (the whole time loop of a layer direction, one call per pass).

The C files have no dependency beyond libm.  They are compiled with the system
C compiler (``$CC``, default ``cc``) at first use and cached: the library is
kept in ``$SEQNORM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/seqnorm``, else
``~/.cache/seqnorm``) under a name hashed from the sources, the flags and the
compiler's version, written by an atomic rename (two processes building at once
both succeed), so later processes load it without compiling.  Where that folder
cannot be written, the build goes to a temporary folder, removed once loaded.
The kernels are called through ctypes with the tensors' data pointers; every
pointer is checked first to be a CPU, contiguous tensor of the kernel's dtype
(a tensor of another kind raises instead of being read).  Sizes are not checked
here: these are internal entry points, and ``recurrence.py`` allocates every
buffer from the layer's own shapes.

The build owns only seqnorm's numerics.  There is no ``-ffast-math``: with GCC it
links ``crtfastmath.o``, which turns on flush-to-zero for the whole process as
the library loads (every other torch op of the user would then lose its
denormals), and it lets the compiler use CPU-specific reciprocal estimates.  The
flags taken instead (``CFLAGS``) only drop ``errno`` and trap semantics, and the
feature sums are vectorized by ``#pragma omp simd``.  The target ISA is fixed,
not ``-march=native``, so that an Intel and an AMD machine run the same
instructions and get the same bits: ``x86-64-v3`` (AVX2, FMA) where the CPU has
it, else ``x86-64-v2``, else the compiler's default (also when the compiler does
not know the level: GCC before 11, clang before 12); ``$SEQNORM_CPU_ISA``
overrides it (any ``-march`` value, ``native`` included, or ``default`` for no
``-march``), read once per process.  FP contraction is pinned
(``-ffp-contract=fast``, GCC's default, which clang's is not).  OpenMP (the
LSTM's gates on threads) only with GCC, whose libgomp is the one torch has
loaded; clang's ``-fopenmp`` would load a second runtime.  ``build_flags()``
says what was used.

The time loop needs a BLAS for its per-step products: MKL's ``sgemm_`` (and
its packed-GEMM entry points, where present) as exported by torch's own
``libtorch_cpu``, found at run time (``blas_symbols``), so there is no new
dependency.  Where torch has no such symbol (another platform or BLAS), the
loop runs in Python over the per-step kernels instead (``recurrence.py``);
``seqnorm.backend.cpu_loop()`` says which.
"""
import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .constants import ECM_CODES, NORM_CODES, decay_floor

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_step.c", HERE / "cpu_sequence.c")
CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared",
          f"-I{HERE}")
ISA_ENV = "SEQNORM_CPU_ISA"
CACHE_ENV = "SEQNORM_CACHE_DIR"
X86_LEVELS = (  # (-march level, the /proc/cpuinfo flags it needs), best first
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave", "abm"}),
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
)


class Params(ctypes.Structure):
    """Mirror of the C struct ``Params``."""

    _fields_ = [("B", ctypes.c_int64), ("H", ctypes.c_int64), ("norm", ctypes.c_int32), ("ecm", ctypes.c_int32),
                ("affine", ctypes.c_int32), ("training", ctypes.c_int32), ("relu", ctypes.c_int32),
                ("alpha", ctypes.c_float), ("eps", ctypes.c_float), ("ls_eps", ctypes.c_float),
                ("clamp_value", ctypes.c_float), ("beta_b", ctypes.c_float), ("v_decay_min", ctypes.c_float),
                ("d_gamma", ctypes.c_void_p), ("d_beta", ctypes.c_void_p)]  # set by the C time loop only


class Strides(ctypes.Structure):
    """Mirror of cpu_sequence.c's ``Strides``: elements per time step (0: an unused placeholder)."""

    _fields_ = [(name, ctypes.c_int64) for name in ("c", "y", "s", "iz", "da", "act")]


class BuildError(RuntimeError):
    pass


_per_step = {"forced": False}


@contextlib.contextmanager
def per_step_loop():
    """Inside: the time loop runs in Python over the per-step kernels even where the BLAS is found (the
    fallback, for tests and benchmarks)."""
    saved, _per_step["forced"] = _per_step["forced"], True
    try:
        yield
    finally:
        _per_step["forced"] = saved


def native_loop() -> bool:
    """Whether a layer's time loop runs in C (``cpu_sequence.c``): torch exports a BLAS and no override."""
    return not _per_step["forced"] and blas_symbols() is not None


@functools.cache
def blas_symbols() -> tuple | None:
    """Addresses of (sgemm_, cblas_sgemm_pack_get_size, cblas_sgemm_pack, cblas_sgemm_compute) in torch's
    libtorch_cpu (the packed three None where absent), or None when it has no sgemm_."""
    lib_dir = Path(torch.__file__).with_name("lib")
    for path in sorted(lib_dir.glob("libtorch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))  # already loaded by torch: the same handle
        except OSError:
            continue
        address = lambda name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value  # noqa: E731
        try:
            sgemm = address("sgemm_")
        except AttributeError:
            return None
        try:
            packed = tuple(address(n) for n in ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute"))
        except AttributeError:
            packed = (None, None, None)
        return (sgemm, *packed)
    return None


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels (built or loaded from the cache once per process); BuildError carries the compiler's
    own message."""
    try:
        lib = ctypes.CDLL(str(_cached_build()))
    except OSError as err:
        raise BuildError(f"backend='cpu' could not build or load its C kernels ({' '.join(build_flags())}): {err}. "
                         f"{_remedy(err)}") from err
    for name in ("lstm_forward_step", "rnn_forward_step", "gru_forward_step", "lstm_backward_step",
                 "rnn_backward_step", "gru_backward_step"):
        getattr(lib, name).restype = None
    lib.set_sgemm.restype = None
    symbols = blas_symbols()
    if symbols is not None:
        lib.set_sgemm(*(ctypes.c_void_p(a) for a in symbols))
    return lib


def _remedy(err: OSError) -> str:
    """What to change after a failed build: the ISA where the user asked for one, else the compiler."""
    isa = target_isa()
    if _asked_isa() and isa and not isinstance(err.__cause__, FileNotFoundError):
        return (f"${ISA_ENV}={isa!r} is passed as -march: set it to a value this compiler knows, or to 'default' "
                f"(no -march), or unset it (the best level this CPU has); or use backend='torch'")
    return "Set $CC to a C compiler, or use backend='torch'"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$SEQNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqnorm``, else
    ``~/.cache/seqnorm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqnorm"


def _cached_build() -> Path:
    """The library file: from the cache when one with the same sources, flags and compiler is there and its
    bytes are those built (a damaged file, loaded, can kill the process), else built into it (atomic rename;
    beside it the flags used and the file's SHA-256); where the cache cannot be written, built in a temporary
    folder removed at exit."""
    wanted = _wanted_flags()
    key = hashlib.sha256(repr((wanted, _compiler_version(wanted[0]))).encode())
    for source in sorted((*SOURCES, *HERE.glob("*.h"))):
        key.update(source.read_bytes())
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:20]}.so"
    used, digest = target.with_suffix(".flags"), target.with_suffix(".sha256")
    if _intact(target, digest) and used.is_file():
        _built[tuple(wanted)] = used.read_text().split("\n")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=".building-", suffix=".so")
        os.close(fd)
    except OSError:  # the cache cannot be written here: a build of this process's own
        folder = tempfile.mkdtemp(prefix="seqnorm-cpu-step-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _compile(os.path.join(folder, "cpu_step.so"))
        return Path(folder) / "cpu_step.so"
    partial = Path(name)
    try:
        _compile(name)
        for path, text in ((used, "\n".join(_built[tuple(wanted)])), (digest, _sha256(partial))):
            partial.with_suffix(path.suffix).write_text(text)
            os.replace(partial.with_suffix(path.suffix), path)
        os.replace(partial, target)  # atomic: another process sees the whole file or none
    finally:
        for leftover in (partial, partial.with_suffix(used.suffix), partial.with_suffix(digest.suffix)):
            leftover.unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library_file: Path, digest: Path) -> bool:
    """Whether a cached build is there with the bytes it was built with (a truncated or overwritten file is
    built again rather than loaded)."""
    try:
        return _sha256(library_file) == digest.read_text().strip()
    except OSError:
        return False


@functools.cache
def _compiler_version(cc: str) -> str:
    """The compiler's ``--version`` text (part of the cache key; empty when it does not answer)."""
    try:
        run = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return run.stdout


def _asked_isa() -> str:
    """``$SEQNORM_CPU_ISA`` as the user set it ('' when unset)."""
    return os.environ.get(ISA_ENV, "").strip()


@functools.cache
def target_isa() -> str | None:
    """The ``-march`` value of the build: ``$SEQNORM_CPU_ISA`` (``default``: none), else the best x86-64 level
    this CPU has (None off x86-64 or where /proc/cpuinfo is not readable: the compiler's default)."""
    wanted = _asked_isa()
    if wanted:
        return None if wanted == "default" else wanted
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next(set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return next((level for level, needs in X86_LEVELS if needs <= flags), None)


_built: dict = {}  # {the flags a build tries first: those it used}, for the builds this process made or loaded


def build_flags() -> list[str]:
    """The compiler and flags the kernels are built with: those of the build made, once there is one (without
    ``-march`` where the compiler did not know the level chosen), else those a build would try first."""
    wanted = _wanted_flags()
    return list(_built.get(tuple(wanted), wanted))


def _wanted_flags() -> list[str]:
    isa = target_isa()
    return [os.environ.get("CC", "cc"), *CFLAGS, *([f"-march={isa}"] if isa else [])]


def _compile(target: str) -> None:
    """Try the flags, OpenMP first where the compiler is GCC (its libgomp is the one torch has loaded), and,
    where the ISA level was chosen here rather than asked for, without ``-march`` when the compiler does not
    know it.  OSError (BuildError's cause) with the compiler's message when every try fails."""
    flags = _wanted_flags()
    tries = [flags]
    if target_isa() and not _asked_isa():
        tries.append([f for f in flags if not f.startswith("-march=")])
    openmp = "clang" not in _compiler_version(flags[0]).lower()
    errors = []
    for base in tries:
        for extra in (["-fopenmp"], []) if openmp else ([],):
            command = [*base, *map(str, SOURCES), "-o", target, "-lm", *extra]
            try:
                run = subprocess.run(command, capture_output=True, text=True)
            except FileNotFoundError as err:
                raise OSError(f"no C compiler {command[0]!r} found") from err
            if run.returncode == 0:
                _built[tuple(flags)] = [*base, *extra]
                return
            errors.append(f"{command[0]} exited with status {run.returncode}:\n{run.stderr.strip()}")
    raise OSError(errors[-1] if len(tries) == 1 else "\n".join(dict.fromkeys(errors)))


@functools.cache
def build_error() -> str | None:
    """Why the kernels do not build here (the compiler's message), or None when they do; asked once per process."""
    try:
        library()
    except BuildError as err:
        return str(err)
    return None


def available() -> bool:
    """Whether the kernels build here (a failed build is not retried on each call)."""
    return build_error() is None


def _ptr(tensor, dtype=torch.float32):
    """The data pointer of a CPU, contiguous tensor of ``dtype``; anything else raises before C reads it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"seqnorm's C kernels take tensors, got {type(tensor).__name__}")
    if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"seqnorm's C kernels need contiguous {dtype} tensors on the CPU, got a "
                         f"{'' if tensor.is_contiguous() else 'non-contiguous '}{tensor.dtype} tensor of shape "
                         f"{tuple(tensor.shape)} on {tensor.device}")
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
        self.lstm = spec.cell == "lstm"
        self.native = native_loop()  # the whole time loop in one C call (sequence_*)

    def forward(self, *tensors):
        """(pre, c_prev, c_next, h_next, act, y, s, iz, gamma, beta, mu, var)"""
        self._forward(self.params, *map(_ptr, tensors))

    def backward(self, dh, d_out, *tensors):
        """(dh, d_out or None, dc, act, c_prev, c_next, y, s, iz, gamma, beta, da, dx, u, v)"""
        self._backward(self.params, *map(_ptr, (dh, self.zero_rows if d_out is None else d_out, *tensors)))

    def forward_sequence(self, xproj, h_all, m_all, c_all, act, y, s, iz, gamma, beta, mu, var, w_hh, w_hr):
        """All T steps of ``recurrence.fused_forward`` in one call; every tensor contiguous float32."""
        T, P = xproj.shape[0], h_all.shape[-1]
        pre = torch.empty_like(xproj[0])
        strides = Strides(_stride(c_all), _stride(y), _stride(s), _stride(iz), 0, _stride(act))
        status = library().sequence_forward(
            self.params, self.lstm, ctypes.c_int64(T), ctypes.c_int64(P), ctypes.byref(strides),
            *map(_ptr, (xproj, h_all, m_all, c_all, act, y, s, iz, gamma, beta, mu, var, w_hh)), _ptr_or_null(w_hr),
            _ptr(pre))
        _check_status(status)

    def backward_sequence(self, dh, d_out, dc, act, c_all, y, s, iz, gamma, beta, da, d_pre, u, v, w_hh, w_hr,
                          dh_all, dm, d_gamma=None, d_beta=None):
        """All T steps of ``recurrence.fused_backward`` (t = T-1..0) in one call; ``dh``, ``dc`` updated to
        dL/d(h0, c0) in place.  With ``d_gamma``, ``d_beta`` (float64, 4H zeros) the affine's gradients are summed
        into them and ``da`` is not written (a placeholder)."""
        T, P = act.shape[0], dh.shape[-1]
        da_stride = 0 if d_gamma is not None else _stride(da)  # summed in the loop: da not written
        strides = Strides(_stride(c_all), _stride(y), _stride(s), _stride(iz), da_stride, _stride(act))
        status = library().sequence_backward(
            self.params, self.lstm, ctypes.c_int64(T), ctypes.c_int64(P), ctypes.byref(strides), _ptr(dh),
            _ptr_or_null(d_out), *map(_ptr, (dc, act, c_all, y, s, iz, gamma, beta, da, d_pre, u, v, w_hh)),
            _ptr_or_null(w_hr), _ptr_or_null(dh_all), _ptr_or_null(dm), _ptr(self.zero_rows),
            _ptr_or_null(d_gamma, torch.float64), _ptr_or_null(d_beta, torch.float64))
        _check_status(status)


    def gru_forward(self, *tensors):
        """One GRU step: (xp, gh, h_prev, h_next, act, y, s, iz, gamma, beta, mu, var, ghn)."""
        library().gru_forward_step(self.params, *map(_ptr, tensors))

    def gru_backward(self, dh, d_out, *tensors):
        """One GRU step back: (dh, d_out or None, dh_direct, act, h_prev, ghn, y, s, iz, gamma, beta, da, dx, dgh,
        u, v)."""
        library().gru_backward_step(self.params, *map(_ptr, (dh, self.zero_rows if d_out is None else d_out,
                                                              *tensors)))

    def gru_forward_sequence(self, xproj, h_all, act, y, s, iz, gamma, beta, mu, var, w_hh, b_hh, ghn_all):
        """All T GRU steps in one call (``recurrence.gru_forward``)."""
        gh = torch.empty_like(xproj[0])
        strides = Strides(0, _stride(y), _stride(s), _stride(iz), 0, _stride(act))
        status = library().gru_sequence_forward(
            self.params, ctypes.c_int64(xproj.shape[0]), ctypes.byref(strides),
            *map(_ptr, (xproj, h_all, act, y, s, iz, gamma, beta, mu, var, w_hh)), _ptr_or_null(b_hh),
            _ptr(ghn_all), _ptr(gh))
        _check_status(status)

    def gru_backward_sequence(self, dh, d_out, h_all, act, ghn_all, y, s, iz, gamma, beta, da, d_pre, d_gh, u, v,
                              w_hh, dh_direct, d_gamma=None, d_beta=None):
        """All T GRU steps back in one call (``recurrence.gru_backward``); ``dh`` becomes dL/dh0."""
        da_stride = 0 if d_gamma is not None else _stride(da)
        strides = Strides(0, _stride(y), _stride(s), _stride(iz), da_stride, _stride(act))
        status = library().gru_sequence_backward(
            self.params, ctypes.c_int64(act.shape[0]), ctypes.byref(strides), _ptr(dh), _ptr_or_null(d_out),
            *map(_ptr, (h_all, act, ghn_all, y, s, iz, gamma, beta, da, d_pre, d_gh, u, v, w_hh, self.zero_rows,
                        dh_direct)), _ptr_or_null(d_gamma, torch.float64), _ptr_or_null(d_beta, torch.float64))
        _check_status(status)


def _stride(buffer) -> int:
    """Elements per time step of a (T, ...) buffer; 0 for a one-element placeholder or a one-step scratch."""
    return buffer[0].numel() if buffer.dim() > 1 and buffer.shape[0] > 1 else 0


def _ptr_or_null(tensor, dtype=torch.float32):
    return ctypes.c_void_p(None) if tensor is None else _ptr(tensor, dtype)


def _check_status(status: int) -> None:
    if status != 0:
        raise RuntimeError("seqnorm's native CPU recurrence was called without a BLAS (sgemm_ not set)")


def check_float32(dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        raise TypeError(f"backend='cpu' supports float32 input, got {dtype}; use backend='torch'")
