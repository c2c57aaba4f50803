"""Forward+backward and forward-only time of seqnorm layers against torch.nn and a naive implementation.

All candidates are measured in one process, on the same inputs, and reported as
ratios to torch.nn.LSTM / torch.nn.RNN (oneDNN on CPU, cuDNN on a GPU) and to
the naive per-step, per-row path (one OnlineNorm(impl="loop") per gate,
per-step autograd).  The seqnorm layers run their default backend (the C
kernels with the native time loop on CPU, Triton on CUDA); our plain-PyTorch
reference path ("torch path") and, on CPU, the C kernels with the time loop in
Python ("per-step loop", the fallback) are measured beside them, and on CUDA
the Triton path replayed from a CUDA graph ("graphed").  Forward-only is the
layer in eval mode under torch.no_grad() (inference), also as tokens/s.
Writes JSON.

    python benchmarks/bench_layers.py --configs ptb35 ptb128 large --out benchmarks/results/cpu.json
    python benchmarks/bench_layers.py --device cuda --configs ptb35 ptb128 large b1 --out benchmarks/results/cuda.json
"""
import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
from torch import nn

import seqnorm
from seqnorm.kernels import cpu_step

CONFIGS = {"ptb35": (35, 20, 200), "ptb128": (128, 20, 200), "large": (100, 64, 512), "b1": (35, 1, 200)}


class NaiveOnlineLSTM(nn.Module):
    """The straightforward port: per-gate normalizers, per-row loops, per-step autograd."""

    def __init__(self, input_size, hidden_size, config):
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size)
        self.norms = nn.ModuleList(
            seqnorm.OnlineNorm(hidden_size, config.alpha_fwd, config.alpha_bkw, config.eps, ecm=config.ecm, impl="loop")
            for _ in range(4)
        )

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.hidden_size)
        outs = []
        for x_t in x:
            gates = (self.ih(x_t) + self.hh(h)).chunk(4, 1)
            i, f, g, o = (norm(gate) for norm, gate in zip(self.norms, gates))
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs), (h, c)


class NaiveOnlineRNN(NaiveOnlineLSTM):
    def __init__(self, input_size, hidden_size, config):
        nn.Module.__init__(self)
        self.hidden_size = hidden_size
        self.ih, self.hh = nn.Linear(input_size, hidden_size), nn.Linear(hidden_size, hidden_size)
        self.norms = nn.ModuleList([seqnorm.OnlineNorm(hidden_size, config.alpha_fwd, config.alpha_bkw, config.eps,
                                                       ecm=config.ecm, impl="loop")])

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.hidden_size)
        outs = []
        for x_t in x:
            h = torch.tanh(self.norms[0](self.ih(x_t) + self.hh(h)))
            outs.append(h)
        return torch.stack(outs), h


def candidates(H, kind, cuda):
    """label -> (constructor, whether to replay it from a CUDA graph[, the context every step runs in])."""
    layer, name = (seqnorm.LSTM, "LSTM") if kind == "lstm" else (seqnorm.RNN, "RNN")
    cfg = seqnorm.OnlineNormConfig() if kind == "lstm" else seqnorm.layers.PAPER_RNN_CONFIG
    naive = NaiveOnlineLSTM if kind == "lstm" else NaiveOnlineRNN
    out = {
        f"torch.nn.{name}": (lambda: getattr(nn, name)(H, H), False),
        f"seqnorm.{name}(online)": (lambda: layer(H, H, norm="online"), False),
        f"seqnorm.{name}(layer)": (lambda: layer(H, H, norm="layer"), False),
        f"seqnorm.{name}(none)": (lambda: layer(H, H, norm=None), False),
        f"naive online {name}": (lambda: naive(H, H, cfg), False),
    }
    out[f"seqnorm.{name}(online) torch path"] = (lambda: layer(H, H, norm="online", backend="torch"), False)
    out[f"seqnorm.{name}(layer) torch path"] = (lambda: layer(H, H, norm="layer", backend="torch"), False)
    if not cuda and cpu_step.native_loop():
        for norm in ("online", None):
            label = f"seqnorm.{name}({norm or 'none'}) per-step loop"
            out[label] = (lambda norm=norm: layer(H, H, norm=norm), False, cpu_step.per_step_loop)
    if cuda:
        out[f"seqnorm.{name}(online) graphed"] = (lambda: layer(H, H, norm="online"), True)
        out[f"torch.nn.{name} graphed"] = (lambda: getattr(nn, name)(H, H), True)
    return out


def fwd_bwd_step(model, x, graphed, context=contextlib.nullcontext):
    """One forward+backward as a callable; with ``graphed`` captured once and replayed."""

    def step():
        with context():
            model.zero_grad(set_to_none=True)
            model(x)[0].float().sum().backward()

    if not graphed:
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(x)[0].float().sum().backward()
    return graph.replay


def forward_step(model, x, context):
    """One inference forward (eval mode, no autograd) as a callable."""

    def step():
        with context(), torch.no_grad():
            model(x)

    return step


def time_fwd_bwd(step, min_reps, max_seconds, device):
    def timed():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < max_seconds and len(times) < 10 * min_reps):
        t0 = time.perf_counter()
        timed()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 2:
            break
    return statistics.median(times), len(times)


def run(configs, kinds, min_reps, max_seconds, device, dtype, only=None):
    results = []
    for name in configs:
        T, B, H = CONFIGS[name]
        for kind in kinds:
            torch.manual_seed(0)
            x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
            row = {"config": name, "T": T, "B": B, "H": H, "cell": kind, "dtype": str(dtype), "seconds": {}, "reps": {},
                   "forward_seconds": {}, "errors": {}}
            for label, (make, graphed, *context) in candidates(H, kind, device.type == "cuda").items():
                if only and label not in only and label.replace(kind.upper(), "X") not in only:
                    continue
                context = context[0] if context else contextlib.nullcontext
                try:
                    model = make().to(device, dtype)
                    step = fwd_bwd_step(model, x, graphed, context)
                    row["seconds"][label], row["reps"][label] = time_fwd_bwd(step, min_reps, max_seconds, device)
                    if not graphed:
                        row["forward_seconds"][label] = time_fwd_bwd(forward_step(model.eval(), x, context),
                                                                     min_reps, max_seconds, device)[0]
                except RuntimeError as err:  # e.g. a capture that fails: record it, measure the rest
                    row["errors"][label] = f"{type(err).__name__}: {err}"
            add_ratios(row, kind.upper())
            results.append(row)
            print_row(row)
    return results


def add_ratios(row, name):
    sec = row["seconds"]
    online = f"seqnorm.{name}(online)"
    ratio = lambda a, b: sec[a] / sec[b] if a in sec and b in sec else None  # noqa: E731
    row["ratio_vs_torch"] = {k: ratio(k, f"torch.nn.{name}") for k in sec}
    fwd, base = row["forward_seconds"], f"torch.nn.{name}"
    row["forward_ratio_vs_torch"] = {k: fwd[k] / fwd[base] if base in fwd else None for k in fwd}
    row["forward_tokens_per_s"] = {k: row["T"] * row["B"] / t for k, t in fwd.items()}
    row["online_over_none"] = ratio(online, f"seqnorm.{name}(none)")
    row["speedup_vs_per_step_loop"] = ratio(f"{online} per-step loop", online)
    row["speedup_vs_naive"] = ratio(f"naive online {name}", online)
    row["online_over_layer"] = ratio(online, f"seqnorm.{name}(layer)")
    row["speedup_vs_torch_path"] = ratio(f"{online} torch path", online)
    row["graphed_online_vs_graphed_torch"] = ratio(f"{online} graphed", f"torch.nn.{name} graphed")


def print_row(row):
    base = f"torch.nn.{row['cell'].upper()}"
    print(f"\n{row['config']} {row['cell']}  T={row['T']} B={row['B']} H={row['H']} {row['dtype']}  "
          "(forward+backward, median)")
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    print(f"  {'':36s} {'fwd+bwd':>10s}      {'ratio':>6s}            {'forward (eval)':>14s}  {'ratio':>6s}  tokens/s")
    for label, sec in row["seconds"].items():
        fwd = row["forward_seconds"].get(label)
        fwd_text = "" if fwd is None else (f"{fwd * 1e3:10.3f} ms  {fmt(row['forward_ratio_vs_torch'][label], '6.2f')}x"
                                           f"  {row['forward_tokens_per_s'][label]:9.0f}")
        print(f"  {label:36s} {sec * 1e3:10.3f} ms   {fmt(row['ratio_vs_torch'][label], '6.2f')}x {base}   {fwd_text}"
              f"   ({row['reps'][label]} reps)")
    for label, err in row["errors"].items():
        print(f"  {label:36s} failed: {err}")
    print(f"  online vs naive: {fmt(row['speedup_vs_naive'], '.1f')}x faster; "
          f"online / layer: {fmt(row['online_over_layer'], '.2f')}; online / none: {fmt(row['online_over_none'], '.2f')}; "
          f"native vs per-step loop: {fmt(row['speedup_vs_per_step_loop'], '.2f')}x faster; "
          f"online vs online torch path: {fmt(row['speedup_vs_torch_path'], '.1f')}x faster")
    if row["graphed_online_vs_graphed_torch"] is not None:
        print(f"  graphed online / graphed {base}: {fmt(row['graphed_online_vs_graphed_torch'], '.2f')}")


def markdown(results) -> str:
    """One table, a row per config and cell: fwd+bwd ms and ratio to torch.nn for each candidate that ran, then
    forward-only (eval) ms and ratio."""
    lines = ["| config (T, B, H) | cell | torch.nn | online | layer | none | online, per-step loop | "
             "online, torch path | online / none | forward (eval): torch.nn | online | none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        name = row["cell"].upper()
        sec, fwd, ratio = row["seconds"], row["forward_seconds"], row["ratio_vs_torch"]
        cell = lambda label: (f"{sec[label] * 1e3:.2f} ({ratio[label]:.2f}x)"  # noqa: E731
                              if label in sec else "—")
        fcell = lambda label: (f"{fwd[label] * 1e3:.2f} ({row['forward_ratio_vs_torch'][label]:.2f}x)"  # noqa: E731
                               if label in fwd else "—")
        on, base = f"seqnorm.{name}(online)", f"torch.nn.{name}"
        lines.append(f"| {row['config']} ({row['T']}, {row['B']}, {row['H']}) | {row['cell']} | "
                     f"{sec[base] * 1e3:.2f} | {cell(on)} | {cell(f'seqnorm.{name}(layer)')} | "
                     f"{cell(f'seqnorm.{name}(none)')} | {cell(f'{on} per-step loop')} | {cell(f'{on} torch path')} | "
                     f"{row['online_over_none']:.2f} | {fwd[base] * 1e3:.2f} | {fcell(on)} | "
                     f"{fcell(f'seqnorm.{name}(none)')} |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ptb35", "ptb128", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--cells", nargs="+", default=["lstm", "rnn"], choices=["lstm", "rnn"])
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time budget per candidate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write results JSON here")
    parser.add_argument("--markdown", default=None, help="write the docs table (markdown) here")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="time only these candidates, X for the cell: e.g. torch.nn.X 'seqnorm.X(online)'")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "cpu_loop": seqnorm.backend.cpu_loop() if device.type == "cpu" else None,
            "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    print(meta)
    results = run(args.configs, args.cells, args.min_reps, args.max_seconds, device, getattr(torch, args.dtype),
                  args.only)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results))
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
