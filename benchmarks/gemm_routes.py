"""The GEMM routes a CPU offers the layers, on the layers' own shapes: MKL (``torch.mm``, and the ``sgemm_`` our
C time loop calls), oneDNN (``torch.ops.mkldnn._linear_pointwise`` with a prepacked weight) and, where the
``scipy-openblas32`` wheel is installed, OpenBLAS (which picks its kernels by CPU model, not vendor).

    python benchmarks/gemm_routes.py --threads 1

One thread by default; the routes alternate, ``--rounds`` times, and the best of each is printed in GFLOP/s,
with the CPU model and the instruction set torch reports.  The shapes: the per-step recurrent product (B x H by
H x 4H) and the input projection over a segment (T*B x H by H x 4H) at the PTB size (T 35, B 20, H 200) and at
(100, 64, 512), and the LM's tied decoder (T*B x 200 by 200 x 10,000).
"""
from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

SHAPES = {"recurrent, PTB": (20, 200, 800), "input projection, PTB": (700, 200, 800),
          "recurrent, (100, 64, 512)": (64, 512, 2048), "input projection, (100, 64, 512)": (6400, 512, 2048),
          "decoder, PTB": (700, 200, 10_000)}


def openblas():
    """OpenBLAS's cblas_sgemm from the scipy-openblas32 wheel, and its kernel's name; None without the wheel."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib = ctypes.CDLL(str(next(Path(scipy_openblas32.get_lib_dir()).glob("libscipy_openblas*.so*"))))
    lib.scipy_openblas_set_num_threads(torch.get_num_threads())
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib.scipy_cblas_sgemm, lib.scipy_openblas_get_corename().decode()


def routes(x: torch.Tensor, w: torch.Tensor, ob) -> dict:
    """name: a call computing x @ w.T into a fixed output."""
    out = torch.empty(x.shape[0], w.shape[0])
    packed = torch.ops.mkldnn._reorder_linear_weight(w, x.shape[0])
    calls = {"MKL": lambda: torch.mm(x, w.t(), out=out),
             "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")}
    if ob is not None:
        (m, k), n = x.shape, w.shape[0]
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (x, w, out)]
        calls["OpenBLAS"] = lambda: ob[0](101, 111, 112, m, n, k, ctypes.c_float(1.0), ptrs[0], k, ptrs[1], k,
                                          ctypes.c_float(0.0), ptrs[2], n)
    return calls


def seconds(call, budget: float) -> float:
    call()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        call()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.4, help="per route and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ob = openblas()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    print(f"{model}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s)"
          + (f", OpenBLAS kernel {ob[1]}" if ob else ", no scipy-openblas32"))
    names = ["MKL", "oneDNN"] + (["OpenBLAS"] if ob else [])
    print("| GEMM | M x K by K x N | " + " | ".join(f"{n}, GFLOP/s" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, (m, k, n) in SHAPES.items():
        calls = routes(torch.randn(m, k), torch.randn(n, k), ob)
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(args.rounds):  # the routes alternate, so a slow moment of the machine touches each
            for name, call in calls.items():
                best[name] = min(best[name], seconds(call, args.seconds))
        print(f"| {label} | {m} x {k} by {k} x {n} | "
              + " | ".join(f"{2 * m * k * n / best[name] / 1e9:.0f}" for name in names) + " |", flush=True)


if __name__ == "__main__":
    main()
