"""``seqnorm-lm`` / ``python -m lm``: train, eval, compare, generate, data.

The parser needs no torch; each command imports what it runs, so ``--help``
and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .config import AS_WRITTEN, CELLS, NORMS, WARMUPS, TrainConfig
from .presets import PRESETS, get_preset

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
DATA_HELP = "corpus folder with train/valid/test .txt (default: $SEQNORM_DATA, else data/ptb)"
COMPARE_DESCRIPTION = """\
Train the grid {online, layer, none} x {lstm, rnn} x seeds with the paper's
presets, each run in OUT/<preset>-seed<S>/. Rerunning the same command
continues an interrupted grid; finished runs with the same settings are read
back, not trained again. Writes results.json, results.md (median/min/max
validation and test perplexity per configuration, the paper's per-batch
measure, epoch time, the paper's figure; a row per run with its validation
perplexity after each epoch) and, with matplotlib, valid_ppl.png
(validation perplexity per epoch, one line per run, diverged runs marked).
With --summarize nothing is trained: the table and plot cover the runs
already finished in OUT and name the ones that are not."""


def _add_run_flags(p, device: bool = True, progress: bool = True) -> None:
    """The flags every command that runs a model takes: --device, --threads (CPU threads for torch: on a machine
    shared with other work, --threads 1 is often faster than torch's default of one per core) and --no-progress."""
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto, CUDA when torch "
                       "sees one)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's own choice)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (none either when stderr is "
                       "not a terminal)")


def _add(p, *flags, name, help, show_none=False, **kw):
    """A train flag whose default comes from TrainConfig (or the preset); absent flags stay absent."""
    if DEFAULTS[name] is not None or show_none:
        help = f"{help} (default: {'none' if DEFAULTS[name] is None else DEFAULTS[name]})"
    p.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=help, **kw)


def _optional_float(s: str):
    return None if s.lower() == "none" else float(s)


def add_train_parser(sub):
    p = sub.add_parser("train", help="train a language model", description="Train a language model with truncated "
                       "BPTT and SGD. Flags given explicitly override the preset's values. Under torchrun "
                       "(--nproc_per_node N, one or more hosts) it trains data-parallel: gloo on CPU, nccl on "
                       "CUDA, --batch-size split over the processes, statistics reconciled for validation and "
                       "checkpoints, files written by rank 0.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="one of the paper's six configurations, or a GRU "
                   "preset (gru-online, gru-layer, gru-none; not in the paper)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly, with its own settings "
                   "except the flags given anew (an error when --out holds no checkpoint)")
    _add_run_flags(p, device=False)  # --device is a TrainConfig field: below
    p.add_argument("--force", action="store_true", help="replace a run already in --out (default: refuse; --resume "
                   "continues it)")
    p.add_argument("--tensorboard", metavar="DIR", help="also write the epoch records as TensorBoard scalars into "
                   "DIR (needs the tensorboard package)")
    p.add_argument("--log-interval", type=int, default=None, metavar="N",
                   help="print a line every N steps: step, loss, perplexity, lr, tokens/s (default: one line per epoch)")
    p.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="write every N-th step to OUT/steps.jsonl: step, segment length, loss before the update, "
                        "gradient norm, lr, what the robust start did, gate-block norms (default: none)")
    _add(p, "--data", name="data", help=DATA_HELP)
    _add(p, "--out", name="out", help="output folder for last.pt, best.pt, metrics.jsonl, summary.json")
    _add(p, "--cell", name="cell", choices=CELLS, help="recurrent cell; *-cudnn are torch.nn's layers (norm none)")
    _add(p, "--norm", name="norm", choices=NORMS, help="normalization of the gate pre-activations")
    _add(p, "--nonlinearity", name="nonlinearity", choices=("tanh", "relu"), help="RNN nonlinearity")
    _add(p, "--emsize", name="emsize", type=int, help="embedding size")
    _add(p, "--nhid", name="nhid", type=int, help="hidden units per layer")
    _add(p, "--nlayers", name="nlayers", type=int, help="recurrent layers")
    _add(p, "--dropout", name="dropout", type=float, help="dropout on embeddings, between layers and on outputs")
    p.add_argument("--no-tie", dest="tied", action="store_false", default=argparse.SUPPRESS,
                   help="do not tie the decoder to the embedding (default: tied; tying needs emsize == nhid)")
    _add(p, "--alpha-fwd", name="alpha_fwd", type=float, help="ON forward decay (None: 1-2^-13 LSTM, 1-2^-14 RNN)")
    _add(p, "--alpha-bkw", name="alpha_bkw", type=float, help="ON backward decay (None: 1-2^-5 LSTM, 1-2^-7 RNN)")
    _add(p, "--ecm", name="ecm", choices=("ls", "ac", "none"), help="ON error compensation")
    _add(p, "--v-decay-min", name="v_decay_min", type=_optional_float,
         help="ON floor on v's per-row decay, as in the reference's recurrent experiments; none: the paper's "
              "printed equations")
    _add(p, "--epochs", name="epochs", type=int, help="epochs")
    _add(p, "--max-steps", name="max_steps", type=int, help="stop after this many optimizer steps in total",
         show_none=True)
    _add(p, "--lr", name="lr", type=float, help="SGD learning rate")
    _add(p, "--lr-decay", name="lr_decay", type=float, help="lr factor applied after every epoch")
    _add(p, "--weight-decay", name="weight_decay", type=float, help="SGD weight decay")
    _add(p, "--clip", name="clip", type=_optional_float, help="gradient norm clipping, or none", show_none=True)
    p.add_argument("--as-written", action="store_true", help="no robust start (--warmup none): the settings "
                   "exactly as given, e.g. the paper's presets as printed; a long first segment can then blow up a "
                   "normalized run at initialization")
    _add(p, "--warmup", name="warmup", choices=WARMUPS, help="robust start (docs/robust_start.md): check each update "
         "of the first --warmup-steps steps and retake a damaging one with a truncated backward (undo); or truncate "
         "every backward of the warm-up (truncate); or none")
    _add(p, "--warmup-steps", name="warmup_steps", type=int, help="length of the warm-up in optimizer steps")
    _add(p, "--warmup-from", name="warmup_from", type=int,
         help="the truncation of a retaken step, and the first of the warm-up's truncations, rising linearly to "
              "--bptt")
    _add(p, "--undo-factor", name="undo_factor", type=float,
         help="undo: a warm-up update that multiplied its own segment's perplexity by more than this is undone and "
              "retaken truncated (a retake that does damage too is halved until it does not, up to "
              "--warmup-halvings times, else the step is skipped); after the first undone update the rest of the "
              "warm-up truncates every backward as truncate does")
    _add(p, "--max-gate-update", name="max_gate_update", type=_optional_float, show_none=True,
         help="undo: a warm-up update that moved a normalized gate's block of weights by more than this many times "
              "its norm is undone the same way (the damage layer norm's loss does not show); none turns it off")
    _add(p, "--ceiling", name="ceiling", type=_optional_float, show_none=True,
         help="undo: when a warm-up step's loss exceeds log(V) + this, the previous update is halved (up to "
              "--warmup-halvings times) until the step's loss is back under it; none turns it off")
    _add(p, "--warmup-halvings", name="warmup_halvings", type=int,
         help="undo: how many times an update may be halved: the previous one by the ceiling, and a retaken "
              "update that does damage too (0: such a step is skipped)")
    _add(p, "--bound", name="bound", type=_optional_float, show_none=True,
         help="undo: a warm-up step never trains at a loss of log(V) + this or more: when the ceiling's halvings "
              "leave it there, the step starts from the weights of an earlier step (the last few, then the run's "
              "first) that are under it; none turns it off")
    _add(p, "--batch-size", name="batch_size", type=int,
         help="training batch size: the global batch, split over the processes under torchrun")
    _add(p, "--bptt", name="bptt", type=int, help="segment length (the maximum in random mode)")
    _add(p, "--bptt-mode", name="bptt_mode", choices=("fixed", "random"),
         help="fixed length, or uniform in 2..bptt per segment")
    _add(p, "--eval-batch-size", name="eval_batch_size", type=int, help="evaluation batch size")
    _add(p, "--eval-bptt", name="eval_bptt", type=int, help="evaluation segment length")
    _add(p, "--seed", name="seed", type=int, help="random seed")
    _add(p, "--device", name="device", help="cpu, cuda, cuda:N or auto")
    _add(p, "--tokenizer", name="tokenizer", choices=("word", "sentencepiece"), help="word or subword ids")
    _add(p, "--vocab-size", name="vocab_size", type=int,
         help="vocabulary size (required for sentencepiece; caps the word vocabulary)")
    p.set_defaults(func=cmd_train)


def train_config(args, saved: dict | None = None) -> TrainConfig:
    """The run's settings: the preset's, then (resuming) the run's own ``saved`` ones, then the flags given."""
    values = dict(get_preset(args.preset).train_fields()) if args.preset else {}
    values.update({k: v for k, v in (saved or {}).items() if k in DEFAULTS})
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    if getattr(args, "as_written", False):
        clash = [f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k in AS_WRITTEN and v != AS_WRITTEN[k]]
        if clash:
            raise ValueError(f"--as-written turns the robust start off; it cannot go with {', '.join(clash)}")
        values.update(AS_WRITTEN)
    values.update(given)
    return TrainConfig(**values)


def cmd_train(args) -> int:
    import gc

    import torch.distributed as dist

    from .train import Trainer

    try:
        trainer = Trainer(train_config(args, _resumed_config(args)), resume=args.resume, progress=not args.no_progress,
                          log_every=args.log_every, log_interval=args.log_interval, force=args.force,
                          tensorboard=args.tensorboard)
        summary, main = trainer.run(), trainer.ranks.main
        del trainer  # its DDP wrapper holds the process group: released here, not at interpreter exit
        gc.collect()
        if dist.is_initialized():
            dist.barrier()  # every rank done with every collective before any tears down
    finally:
        if dist.is_initialized():  # under torchrun
            dist.destroy_process_group()
    summary = {k: v for k, v in summary.items() if k not in ("history", "config")}
    if main:
        print(json.dumps(summary, indent=2))
        if summary["status"] == "interrupted":
            print("interrupted; continue with the same command and --resume", file=sys.stderr)
    return 130 if summary["status"] == "interrupted" else 0


def _resumed_config(args) -> dict | None:
    """``--resume``: the settings the run in ``--out`` was saved with (what it keeps unless a flag is given); an
    error when the folder holds no checkpoint, so a mistyped ``--out`` never starts a new run."""
    if not args.resume:
        return None
    from .checkpoint import load_checkpoint
    from .resume import RESUME_IGNORED

    out = Path(getattr(args, "out", DEFAULTS["out"]))
    if not (out / "last.pt").exists():
        raise ValueError(f"--resume: {out} holds no checkpoint (last.pt) to continue; check --out, or leave "
                         f"--resume out to start a new run there")
    saved = load_checkpoint(out / "last.pt").get("train_config", {})
    return {k: v for k, v in saved.items() if k not in RESUME_IGNORED}  # where it ran is this command's to say


def add_eval_parser(sub):
    p = sub.add_parser("eval", help="perplexity of a checkpoint on a split (JSON)")
    p.add_argument("--checkpoint", required=True, help="a .pt written by train (best.pt or last.pt)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"), help="(default: valid)")
    p.add_argument("--batch-size", type=int, default=10, help="evaluation batch size (default: 10)")
    p.add_argument("--bptt", type=int, default=32, help="segment length (default: 32)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .batching import longest_segment
    from .checkpoint import check_vocab, load_model
    from .data import load_corpus
    from .evaluate import evaluate
    from .machine import check_scores_fit

    model, vocab, ckpt = load_model(args.checkpoint, args.device)
    if vocab.kind == "word":  # rebuild from this data's train split: another corpus gives another vocabulary
        corpus = load_corpus(args.data, "word", len(vocab))
        check_vocab(ckpt, corpus.vocab, args.checkpoint)
    else:
        corpus = load_corpus(args.data, vocab=vocab)
    steps = longest_segment(len(corpus.split(args.split)), args.batch_size, args.bptt)
    check_scores_fit("an evaluation step", steps, args.batch_size, len(vocab), next(model.parameters()).device,
                     "--batch-size or --bptt")
    result = evaluate(model, corpus.split(args.split), args.batch_size, args.bptt, progress=not args.no_progress,
                      desc=args.split)
    print(json.dumps({"split": args.split, "checkpoint": str(args.checkpoint), **result}))
    return 0


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a .pt written by train")
    p.add_argument("--words", type=int, default=50, help="tokens to sample (default: 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--prompt", default="", help="text to start from; every word must be in the vocabulary")
    _add_run_flags(p, progress=False)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .checkpoint import load_model
    from .generate import generate

    model, vocab, _ = load_model(args.checkpoint, args.device)
    text = generate(model, vocab, args.words, args.temperature, args.seed, args.prompt)
    print(f"{args.prompt.strip()} {text}" if args.prompt.strip() else text)  # the prompt, then what was sampled
    return 0


def add_compare_parser(sub):
    p = sub.add_parser("compare", help="grid of norms x cells x seeds with the paper's presets; table and plot",
                       description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--cells", nargs="+", default=["lstm", "rnn"], choices=("lstm", "rnn", "gru"),
                   help="(default: lstm rnn; gru: the GRU presets, which the paper does not have)")
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS, help="(default: online layer none)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="(default: 0)")
    p.add_argument("--epochs", type=int, help="override the presets' epochs")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (default: none, the presets' "
                   "epochs)")
    p.add_argument("--clip", type=float, help="gradient norm clipping for every run (default: none, as in the "
                   "presets)")
    p.add_argument("--as-written", action="store_true", help="no robust start in any run: the presets exactly as "
                   "the paper printed them (default: the robust start, docs/robust_start.md)")
    _add_run_flags(p)
    p.add_argument("--summarize", action="store_true", help="train nothing: the table and plot of the runs already "
                   "finished (or diverged) in OUT, naming the missing ones (an interim table of a long grid)")
    p.set_defaults(func=cmd_compare)


def compare_overrides(args) -> dict:
    """The TrainConfig fields that compare's flags set for every run."""
    overrides = dict(AS_WRITTEN) if args.as_written else {}
    if args.clip is not None:
        overrides["clip"] = args.clip
    return overrides


def cmd_compare(args) -> int:
    from . import compare as compare_mod

    results = compare_mod.run_grid(args.out, args.data, args.cells, args.norms, args.seeds, args.epochs,
                                   args.max_steps, args.device, progress=not args.no_progress,
                                   overrides=compare_overrides(args), train_missing=not args.summarize)
    if results["status"] == "interrupted":
        print("interrupted; run the same command again to continue the grid", file=sys.stderr)
        return 130
    print(compare_mod.markdown_table(results["table"], results["missing"]))
    _say_written(args.out, results["plot"])
    return 0


def _say_written(out: str, plot: bool) -> None:
    print(f"wrote {out}/results.json and results.md", file=sys.stderr)
    print(f"wrote {out}/valid_ppl.png" if plot else
          "no plot: matplotlib is not installed (pip install 'seqnorm[plot]')", file=sys.stderr)


def add_summarize_parser(sub):
    p = sub.add_parser("summarize", help="table and plot of any run folders, grouped by configuration",
                       description="Read the summary.json of each run folder (train's --out, or compare's "
                       "OUT/<preset>-seed<S>) and write results.json, results.md (median, min-max of best "
                       "validation and test perplexity per configuration, one row per run) and valid_ppl.png "
                       "into --out. Runs that differ only in seed, folder, data path or device form one group.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", required=True, help="where to write the table and plot")
    p.set_defaults(func=cmd_summarize)


def cmd_summarize(args) -> int:
    from . import compare as compare_mod

    results = compare_mod.summarize_folders(args.runs, args.out)
    print(compare_mod.markdown_table(results["table"], results["missing"]))
    _say_written(args.out, results["plot"])
    return 0


def add_data_parser(sub):
    p = sub.add_parser("data", help="download and verify a dataset")
    p.add_argument("dataset", choices=("ptb",), help="the dataset")
    p.add_argument("--dir", help="where to put it (default: $SEQNORM_DATA, else data/ptb)")
    p.add_argument("--url", default=None, help="base URL serving ptb.{train,valid,test}.txt (default: the public copy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
    from .data import resolve_data_dir
    from .download import PTB_FILES, DownloadError, download_ptb

    directory = resolve_data_dir(args.dir)
    kwargs = {"base_url": args.url} if args.url else {}
    try:
        status = download_ptb(directory, progress=not args.no_progress, **kwargs)
    except DownloadError as err:
        raise DownloadError(f"{err}. Without network: copy {', '.join(PTB_FILES)} into {directory} (they are "
                            f"checked by SHA-256), or set $SEQNORM_DATA to a folder holding them; or give --url a "
                            f"mirror") from err
    for name, what in status.items():
        print(f"{directory / name}: {what} (SHA-256 verified)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqnorm-lm", description="Word-level language modeling with normalized "
                                     "RNN/LSTM cells (seqnorm) on Penn Treebank or any plain-text corpus.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train_parser, add_eval_parser, add_compare_parser, add_summarize_parser, add_generate_parser,
                add_data_parser):
        add(sub)
    return parser


def _layers_note(args, path: str) -> str:
    """What runs the recurrent layers: seqnorm's path, or torch.nn's layer for a train run of a torch.nn cell."""
    if args.command == "train":
        cell = getattr(args, "cell", None) or (get_preset(args.preset).cell if args.preset else DEFAULTS["cell"])
        if cell.endswith("-cudnn"):
            return f"the recurrent layer is torch.nn's ({cell}: torch.nn.{cell.split('-')[0].upper()})"
    return f"seqnorm layers run {path}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # --help and argument errors end here, before torch is imported
    from .download import DownloadError
    from seqnorm.backend import describe_path

    from .machine import resolve_device

    if not sys.stderr.isatty():  # a log file, a pipe: no progress bars in it, the epoch lines only
        args.no_progress = True
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be positive, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if args.command != "data" and args.command != "summarize":
            named = getattr(args, "device", None)  # train: absent unless given (the preset's or TrainConfig's auto)
            device = resolve_device(named or "auto")  # every subcommand: a clear error before any work
            if named is not None:
                args.device = str(device)  # "auto" resolved once, for the subcommand's own use
            print(f"seqnorm-lm {args.command}: device {device}; {_layers_note(args, describe_path(device))}",
                  file=sys.stderr)
        return args.func(args)
    except (ValueError, OSError, DownloadError, FloatingPointError) as e:  # CheckpointError is a ValueError
        print(f"seqnorm-lm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
