"""The C kernels' build and boundary: they leave the process's floating-point mode alone, build for the ISA asked
for, say what the compiler said when a build fails, refuse a buffer they cannot read, and compute the IEEE result
where a fast-math build would not (a sigmoid of a very negative input is 0, not NaN)."""
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import seqnorm
from seqnorm.kernels import cpu_step

needs_cc = pytest.mark.skipif(not cpu_step.available(), reason="no C compiler")


def python(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter (the kernels not yet loaded) and return what it printed."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return result.stdout.strip()


DENORMAL_PROBE = """
    import torch, seqnorm
    probe = lambda: repr((torch.tensor([1e-40]) * 3).item())  # a denormal: 0.0 under flush-to-zero
    before = probe()
    layer = seqnorm.LSTM(4, 5, norm="online", backend="cpu")
    layer(torch.randn(3, 2, 4))[0].sum().backward()
    print(before, probe())
"""


@needs_cc
def test_the_c_backend_leaves_the_processs_denormals_alone():
    before, after = python(DENORMAL_PROBE).split()
    assert float(before) != 0.0  # the probe works: torch keeps denormals by default
    assert after == before


@needs_cc
def test_the_isa_is_the_one_asked_for():
    assert "-march=x86-64-v2" in python("from seqnorm.kernels import cpu_step; print(cpu_step.build_flags())",
                                        SEQNORM_CPU_ISA="x86-64-v2")
    assert "-march" not in python("from seqnorm.kernels import cpu_step; print(cpu_step.build_flags())",
                                  SEQNORM_CPU_ISA="default")
    assert "-ffast-math" not in cpu_step.build_flags()


@needs_cc
def test_a_build_for_another_isa_computes_the_same_layer(tmp_path):
    """Two builds (x86-64-v2: SSE, no FMA; and this machine's default) agree to float32 rounding."""
    code = """
        import torch, seqnorm
        torch.manual_seed(0)
        layer = seqnorm.LSTM(6, 16, norm="layer", backend="cpu")
        x = torch.randn(7, 3, 6, requires_grad=True)
        layer(x)[0].pow(2).sum().backward()
        torch.save(x.grad, "{path}")
    """
    grads = []
    for isa in ("x86-64-v2", ""):
        path = tmp_path / f"grad-{isa or 'default'}.pt"
        python(code.format(path=path), SEQNORM_CPU_ISA=isa)
        grads.append(torch.load(path))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_a_failed_build_carries_the_compilers_message(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cpu_step.c:1: error: something the compiler said' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    cpu_step.library.cache_clear()
    try:
        with pytest.raises(cpu_step.BuildError, match="something the compiler said"):
            cpu_step.library()
    finally:
        cpu_step.library.cache_clear()


@needs_cc
def test_a_failed_build_under_an_isa_asked_for_names_that_setting(tmp_path):
    code = "from seqnorm.kernels import cpu_step; print(cpu_step.build_error())"
    said = python(code, SEQNORM_CPU_ISA="no-such-level", SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    compiler_said, hint = said.split(": ", 1)[1].split("$SEQNORM_CPU_ISA=")  # past the flags: message, then hint
    assert "no-such-level" in compiler_said
    assert hint.startswith("'no-such-level' is passed as -march") and "$CC" not in said


def test_no_compiler_says_to_set_cc(tmp_path):
    code = "from seqnorm.kernels import cpu_step; print(cpu_step.build_error())"
    said = python(code, CC=str(tmp_path / "no-cc"), SEQNORM_CPU_ISA="x86-64-v2",
                  SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    assert "no C compiler" in said and "Set $CC to a C compiler" in said and "is passed as -march" not in said


@needs_cc
@pytest.mark.parametrize("bad", ["non-contiguous", "float64", "not a tensor"])
def test_a_buffer_the_kernels_cannot_read_raises_before_c_sees_it(bad):
    from seqnorm.norms import OnlineNormConfig
    from seqnorm.sequence import RecurrenceSpec

    B, H = 2, 3
    step = cpu_step.CPUStep(RecurrenceSpec("rnn", "online", H, OnlineNormConfig()), B, torch.float32)
    bufs = [torch.randn(B, H) for _ in range(7)] + [torch.ones(H), torch.zeros(H), torch.zeros(H), torch.ones(H)]
    bufs[4] = {"non-contiguous": torch.randn(H, B).t(), "float64": torch.randn(B, H, dtype=torch.float64),
               "not a tensor": [0.0] * (B * H)}[bad]
    with pytest.raises((ValueError, TypeError), match="contiguous|tensors"):
        step.forward(*bufs)


@needs_cc
@pytest.mark.parametrize("cls", [seqnorm.LSTM, seqnorm.GRU])
def test_gates_saturate_to_the_ieee_result_not_nan(cls):
    """Pre-activations far below -88.7 (expf overflows): the C sigmoid is 0 and tanh is -1, as torch's."""
    torch.manual_seed(0)
    ref = cls(3, 4, norm=None, backend="torch")
    fast = cls(3, 4, norm=None, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3) * 1e4
    want, got = ref(x)[0], fast(x)[0]
    assert got.isfinite().all()
    torch.testing.assert_close(got, want)


def _logging_cc(tmp_path, fail_on: str = "") -> Path:
    """A compiler that logs each call's arguments and runs the real one (failing, like an old GCC, on any
    argument containing ``fail_on``)."""
    log, real = tmp_path / "cc.log", shutil.which(os.environ.get("CC", "cc"))
    script = tmp_path / "logging-cc"
    check = f'case "$*" in *{fail_on}*) echo "error: unrecognized argument in option {fail_on}" >&2; exit 1;; esac\n'
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{check if fail_on else ""}exec {real} "$@"\n')
    script.chmod(0o755)
    return script


BUILD = "from seqnorm.kernels import cpu_step; cpu_step.library(); print(' '.join(cpu_step.build_flags()))"


@needs_cc
def test_a_second_process_loads_the_cached_build_without_compiling(tmp_path):
    cc = _logging_cc(tmp_path)
    env = dict(CC=str(cc), SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    first = python(BUILD, **env)
    compiles = lambda: [ln for ln in (tmp_path / "cc.log").read_text().splitlines() if "-shared" in ln]  # noqa: E731
    assert len(compiles()) >= 1 and len(list((tmp_path / "cache").glob("cpu_kernels-*.so"))) == 1
    n = len(compiles())
    assert python(BUILD, **env) == first  # the same flags, read back with the build
    assert len(compiles()) == n  # loaded, not compiled again
    assert not list((tmp_path / "cache").glob(".building-*"))  # nothing half-written left behind


@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_cached_build_is_built_again_not_loaded(tmp_path, damage):
    """A cached library cut short (a full disk, a crash, a partial copy) or replaced kills the process that loads
    it (SIGBUS) or is not the build: the next process compiles again and runs."""
    cc = _logging_cc(tmp_path)
    env = dict(CC=str(cc), SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    python(BUILD, **env)
    compiles = lambda: [ln for ln in (tmp_path / "cc.log").read_text().splitlines() if "-shared" in ln]  # noqa: E731
    n = len(compiles())
    (library,) = (tmp_path / "cache").glob("cpu_kernels-*.so")
    data = library.read_bytes()
    library.write_bytes(data[:len(data) // 2] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    code = "import torch, seqnorm; print(seqnorm.LSTM(4, 5, backend='cpu')(torch.randn(3, 2, 4))[0].shape)"
    assert python(code, **env) == "torch.Size([3, 2, 5])"
    assert len(compiles()) > n
    assert hashlib.sha256(library.read_bytes()).hexdigest() == library.with_suffix(".sha256").read_text()


@needs_cc
def test_a_compiler_that_does_not_know_the_level_builds_without_march(tmp_path):
    """GCC before 11 and clang before 12 refuse -march=x86-64-v3: an ISA chosen here is dropped and the build
    says so; an ISA asked for ($SEQNORM_CPU_ISA) is not, and its failure carries the compiler's message."""
    cc = _logging_cc(tmp_path, fail_on="-march=")
    env = dict(CC=str(cc), SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    flags = python(BUILD, **env)
    assert "-march" not in flags and "-O3" in flags
    code = "from seqnorm.kernels import cpu_step; print(cpu_step.build_error())"
    said = python(code, **env, SEQNORM_CPU_ISA="x86-64-v2")
    assert "unrecognized argument in option -march=" in said


def test_the_auto_backend_says_why_the_c_kernels_do_not_build(tmp_path):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'cpu_step.c:1: error: something the compiler said' >&2\nexit 1\n")
    compiler.chmod(0o755)
    code = """
        import warnings, torch, seqnorm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seqnorm.LSTM(4, 5)(torch.randn(2, 1, 4))
        print(seqnorm.backend.describe_path("cpu"))
        print(*[str(w.message) for w in caught])
    """
    said = python(code, CC=str(compiler), SEQNORM_CACHE_DIR=str(tmp_path / "cache"))
    assert said.count("something the compiler said") == 2, said
