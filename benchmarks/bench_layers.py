"""Forward+backward time of seqnorm layers against torch.nn and a naive implementation.

All candidates are measured in one process, on the same inputs, and reported as
ratios to torch.nn.LSTM / torch.nn.RNN and to the naive per-step, per-row path
(one OnlineNorm(impl="loop") per gate, per-step autograd).  Writes JSON.

    python benchmarks/bench_layers.py --configs ptb35 ptb128 large --out benchmarks/results/cpu.json
"""
import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

import seqnorm

CONFIGS = {"ptb35": (35, 20, 200), "ptb128": (128, 20, 200), "large": (100, 64, 512)}


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


def candidates(H, kind):
    if kind == "lstm":
        cfg = seqnorm.OnlineNormConfig()
        return {
            "torch.nn.LSTM": lambda: nn.LSTM(H, H),
            "seqnorm.LSTM(online)": lambda: seqnorm.LSTM(H, H, norm="online"),
            "seqnorm.LSTM(layer)": lambda: seqnorm.LSTM(H, H, norm="layer"),
            "seqnorm.LSTM(none)": lambda: seqnorm.LSTM(H, H, norm=None),
            "naive online LSTM": lambda: NaiveOnlineLSTM(H, H, cfg),
        }
    cfg = seqnorm.layers.PAPER_RNN_CONFIG
    return {
        "torch.nn.RNN": lambda: nn.RNN(H, H),
        "seqnorm.RNN(online)": lambda: seqnorm.RNN(H, H, norm="online"),
        "seqnorm.RNN(layer)": lambda: seqnorm.RNN(H, H, norm="layer"),
        "seqnorm.RNN(none)": lambda: seqnorm.RNN(H, H, norm=None),
        "naive online RNN": lambda: NaiveOnlineRNN(H, H, cfg),
    }


def time_fwd_bwd(model, x, min_reps, max_seconds, device):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)[0]
        out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < max_seconds and len(times) < 10 * min_reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 2:
            break
    return statistics.median(times), len(times)


def run(configs, kinds, min_reps, max_seconds, device):
    results = []
    for name in configs:
        T, B, H = CONFIGS[name]
        for kind in kinds:
            torch.manual_seed(0)
            x = torch.randn(T, B, H, device=device, requires_grad=True)
            row = {"config": name, "T": T, "B": B, "H": H, "cell": kind, "seconds": {}, "reps": {}}
            for label, make in candidates(H, kind).items():
                model = make().to(device)
                row["seconds"][label], row["reps"][label] = time_fwd_bwd(model, x, min_reps, max_seconds, device)
            base = "torch.nn.LSTM" if kind == "lstm" else "torch.nn.RNN"
            naive = f"naive online {kind.upper()}"
            online = f"seqnorm.{kind.upper()}(online)"
            row["ratio_vs_torch"] = {k: v / row["seconds"][base] for k, v in row["seconds"].items()}
            row["speedup_vs_naive"] = row["seconds"][naive] / row["seconds"][online]
            row["online_over_layer"] = row["seconds"][online] / row["seconds"][f"seqnorm.{kind.upper()}(layer)"]
            results.append(row)
            print_row(row, base)
    return results


def print_row(row, base):
    print(f"\n{row['config']} {row['cell']}  T={row['T']} B={row['B']} H={row['H']}  (forward+backward, median)")
    for label, sec in row["seconds"].items():
        print(f"  {label:24s} {sec * 1e3:10.2f} ms   {row['ratio_vs_torch'][label]:6.2f}x {base}   ({row['reps'][label]} reps)")
    print(f"  online vs naive: {row['speedup_vs_naive']:.1f}x faster; online / layer: {row['online_over_layer']:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["ptb35", "ptb128", "large"], choices=sorted(CONFIGS))
    parser.add_argument("--cells", nargs="+", default=["lstm", "rnn"], choices=["lstm", "rnn"])
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time budget per candidate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write results JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    print(meta)
    results = run(args.configs, args.cells, args.min_reps, args.max_seconds, device)
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
