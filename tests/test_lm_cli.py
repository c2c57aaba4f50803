"""The seqnorm-lm command line: a PTB smoke run (train, eval, generate), help, data, errors."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm.checkpoint import load_checkpoint
from lm.cli import build_parser, main
from lm.train import TrainConfig
from lm_helpers import ptb_dir, write_corpus


@pytest.mark.trajectory
def test_smoke_train_eval_generate_on_ptb(tmp_path, capsys, record_property):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(ptb_dir()), "--out", str(out), "--cell", "lstm", "--norm", "online",
               "--max-steps", "30", "--bptt", "35", "--bptt-mode", "fixed", "--lr", "0.5", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["steps"] == 30
    record_property("best_valid_ppl", f"{summary['best_valid_ppl']:.1f} in (1000, 5000)")
    # learned something (a uniform guess is 10,000), and no more than 30 small steps can (measured: 2314.9)
    assert 1000 < summary["best_valid_ppl"] < 5000
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(ptb_dir()), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)
    assert result["tokens"] == 10 * (82_430 // 10 - 1) and math.isfinite(result["perplexity_mean_batch_exp"])
    assert main(["generate", "--checkpoint", str(out / "best.pt"), "--words", "15", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert len(text.split()) + text.count("\n") >= 15


def test_help_documents_every_train_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.field_names():
        flag = "--no-tie" if name == "tied" else "--" + name.replace("_", "-")
        assert flag in text, flag
    for sub in ("eval", "compare", "generate", "data"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "usage: seqnorm-lm " + sub in capsys.readouterr().out


def test_preset_then_explicit_flags():
    from lm.cli import train_config
    args = build_parser().parse_args(["train", "--preset", "paper-rnn-online", "--lr", "0.3", "--epochs", "2"])
    cfg = train_config(args)
    assert (cfg.cell, cfg.norm, cfg.lr, cfg.epochs, cfg.alpha_fwd) == ("rnn", "online", 0.3, 2, 1 - 2**-14)


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "looked for" in capsys.readouterr().err
    write_corpus(tmp_path / "c")
    assert main(["train", "--data", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--emsize", "8",
                 "--no-progress"]) == 2
    assert "emsize == nhid" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(bad), "--data", str(tmp_path / "c")]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_data_command_with_present_files(tmp_path, capsys):
    import shutil
    for name in ("train.txt", "valid.txt", "test.txt"):
        shutil.copy(ptb_dir() / name, tmp_path / name)
    assert main(["data", "ptb", "--dir", str(tmp_path), "--url", "http://127.0.0.1:9/", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("present (SHA-256 verified)") == 3


def test_data_command_without_network_names_the_next_step_and_leaves_no_empty_folder(tmp_path, capsys):
    target = tmp_path / "data" / "ptb"
    assert main(["data", "ptb", "--dir", str(target), "--url", "http://127.0.0.1:9/", "--no-progress"]) == 2
    line = one_line_error(capsys, "data")
    assert f"copy train.txt, valid.txt, test.txt into {target}" in line and "$SEQNORM_DATA" in line, line
    assert not target.exists()  # copying the files in afterwards lands them there, not in ptb/ptb/


def test_module_and_console_script_entry_points():
    for cmd in ([sys.executable, "-m", "lm", "--help"], ["seqnorm-lm", "--help"]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "train" in run.stdout and "compare" in run.stdout


def test_sigint_saves_and_resume_matches_uninterrupted(tmp_path):
    """A real Ctrl-C: the run stops at a step boundary, saves last.pt, exits 130; --resume then ends exactly
    where an uninterrupted run ends."""
    import signal
    import time

    data = write_corpus(tmp_path / "c")
    flags = ["--data", str(data), "--emsize", "16", "--nhid", "16", "--batch-size", "4", "--bptt", "12",
             "--eval-batch-size", "3", "--eval-bptt", "8", "--epochs", "6", "--lr", "1", "--norm", "online",
             "--dropout", "0.2", "--no-progress"]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(["seqnorm-lm", "train", "--out", str(cut), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (cut / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert json.loads(out)["status"] == "interrupted" and "--resume" in err
    assert main(["train", "--out", str(cut), "--resume", *flags]) == 0
    assert main(["train", "--out", str(tmp_path / "full"), *flags]) == 0
    a = json.loads((cut / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert a["history"][-1]["epoch"] == 6
    for key in ("steps", "best_valid_ppl", "final_valid_ppl", "test_ppl"):
        assert a[key] == b[key], key


@pytest.mark.trajectory
def test_paper_lstm_online_preset_trains_and_diverges_without_the_floor(tmp_path, capsys, record_property):
    """The paper's setting (lr 6.5, no clipping, the default robust start) with the reference's v-decay floor
    trains; without the floor (--v-decay-min none) the setting as written diverges within 40 steps."""
    common = ["train", "--preset", "paper-lstm-online", "--data", str(ptb_dir()), "--max-steps", "40", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "floor")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["steps"] == 40
    start = math.log(10_000)  # the loss of a uniform guess, where an initialized model starts
    history = json.loads((tmp_path / "floor" / "summary.json").read_text())["history"]
    # the validation loss after 40 steps, not the mean training loss, which holds the chaotic first steps (it
    # came within 0.09 of a former bound of start - 0.5 on one CPU setting: scripts/perturbed_numerics.py)
    record_property("valid_loss", f"{history[-1]['valid_loss']:.3f} < {start - 1.5:.3f}")
    record_property("train_loss", f"{history[-1]['train_loss']:.3f} (not asserted)")
    assert history[-1]["valid_loss"] < start - 1.5
    assert math.isfinite(summary["test_ppl"])
    assert main([*common, "--out", str(tmp_path / "none"), "--v-decay-min", "none", "--as-written"]) == 2
    assert "diverged" in capsys.readouterr().err


def one_line_error(capsys, command: str) -> str:
    """What a failed command printed: exactly one line on stderr, prefixed, no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(f"seqnorm-lm {command}: device ")]
    assert len(lines) == 1 and lines[0].startswith(f"seqnorm-lm {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = write_corpus(root / "c")
    assert main(["train", "--data", str(data), "--out", str(root / "run"), "--emsize", "8", "--nhid", "8",
                 "--max-steps", "2", "--batch-size", "4", "--bptt", "8", "--no-progress"]) == 0
    return data, root / "run" / "best.pt"


def test_device_errors_on_every_subcommand(tiny_checkpoint, tmp_path, capsys):
    data, ckpt = tiny_checkpoint
    capsys.readouterr()
    runs = {"train": ["--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"],
            "eval": ["--checkpoint", str(ckpt), "--data", str(data)],
            "generate": ["--checkpoint", str(ckpt)],
            "compare": ["--data", str(data), "--out", str(tmp_path / "c"), "--no-progress"]}
    for command, flags in runs.items():
        assert main([command, *flags, "--device", "gpu"]) == 2
        assert "unknown device 'gpu'" in one_line_error(capsys, command)
    if not torch.cuda.is_available():
        for command in ("eval", "generate"):
            assert main([command, *runs[command], "--device", "cuda"]) == 2
            assert "CUDA is not available" in one_line_error(capsys, command)


def test_every_command_says_which_device_and_path_it_uses(tiny_checkpoint, capsys, monkeypatch):
    from seqnorm import backend

    data, ckpt = tiny_checkpoint
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--no-progress"]) == 0  # --device auto
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"seqnorm-lm eval: device {want}" in capsys.readouterr().err
    assert "the C kernels (" in backend.describe_path(torch.device("cpu")) or not backend.cpu_kernels_available()
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    assert "plain-PyTorch path: Triton is not installed" in backend.describe_path(torch.device("cuda"))
    monkeypatch.setattr(backend, "triton_installed", lambda: True)
    assert backend.describe_path(torch.device("cuda")) == "the Triton kernels"


def test_vocabulary_mismatch_reports_the_real_sizes(tiny_checkpoint, capsys):
    _, ckpt = tiny_checkpoint
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(ptb_dir())]) == 2
    line = one_line_error(capsys, "eval")
    assert "(word, 42 entries) than this data (word, 10000 entries)" in line  # 40 words, <eos>, <unk>; PTB 10,000


def test_non_utf8_corpus_names_the_file_and_offset(tmp_path, capsys):
    data = write_corpus(tmp_path / "c")
    text = (data / "valid.txt").read_bytes()
    (data / "valid.txt").write_bytes(text[:25] + b"\xff\xfe" + text[25:])
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    line = one_line_error(capsys, "train")
    assert f"{data / 'valid.txt'} is not UTF-8 text: byte offset 25" in line


def test_a_file_that_is_not_a_checkpoint_says_so(tiny_checkpoint, tmp_path, capsys):
    data, _ = tiny_checkpoint
    for content in (b"not a checkpoint", b"PK\x03\x04 truncated zip"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content)
        assert main(["eval", "--checkpoint", str(bad), "--data", str(data)]) == 2
        line = one_line_error(capsys, "eval")
        assert "not a file written by seqnorm-lm" in line
        assert "weights_only" not in line and "issue" not in line


def test_progress_bars_name_the_run_and_follow_max_steps(tmp_path, capsys, monkeypatch):
    from lm import compare

    data = write_corpus(tmp_path / "c")
    monkeypatch.setenv("SEQNORM_DATA", str(data))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal: the CLI shows bars there only
    compare.run_grid(tmp_path / "cmp", cells=("rnn",), norms=("none",), seeds=(0,), max_steps=4, epochs=1,
                     progress=True)
    err = capsys.readouterr().err
    assert "paper-rnn-none seed 0 epoch 1/1" in err and "0/4 [" in err  # the bar counts to --max-steps
    assert "paper-rnn-none seed 0 valid" in err and "paper-rnn-none seed 0 test" in err  # evaluation bars
    summary = json.loads((tmp_path / "cmp" / "paper-rnn-none-seed0" / "summary.json").read_text())
    assert summary["config"]["data"] == str(data)  # the folder actually used, though only $SEQNORM_DATA named it
    assert main(["eval", "--checkpoint", str(tmp_path / "cmp" / "paper-rnn-none-seed0" / "best.pt")]) == 0
    assert "valid" in capsys.readouterr().err


def test_help_shows_defaults_and_no_markup(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text
    assert "(default: none, as in the presets)" in text and "(default: none, the presets' epochs)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "gradient norm clipping, or none (default: none)" in flat
    assert "optimizer steps in total (default: none)" in flat


def test_generate_echoes_the_prompt(tiny_checkpoint, capsys):
    _, ckpt = tiny_checkpoint
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--words", "5", "--prompt", "w3 w4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w3 w4 ") and len(out.split()) + out.count("\n") >= 7  # <eos> prints as a line break


@pytest.mark.trajectory
def test_gru_online_trains_40_steps_on_ptb(tmp_path, capsys, record_property):
    """seqnorm.GRU in the pipeline: 40 steps at a fixed BPTT of 35, loss finite and falling.  Unclipped, the valid
    loss after 40 steps ranged 7.19-8.17 over the settings of scripts/perturbed_numerics.py (AMD EPYC), against a
    bound of log(V) - 1 = 8.21: a chaotic edge.  Clipped at 0.25 (as pytorch/examples' word LM is) it ranged
    7.68-7.96, and the bound is log(V) - 0.5 = 8.71."""
    assert main(["train", "--cell", "gru", "--norm", "online", "--lr", "1", "--clip", "0.25", "--bptt", "35",
                 "--bptt-mode", "fixed", "--data", str(ptb_dir()), "--max-steps", "40", "--out", str(tmp_path / "gru"),
                 "--no-progress"]) == 0
    (record,) = json.loads((tmp_path / "gru" / "summary.json").read_text())["history"]
    bound = math.log(10_000) - 0.5
    record_property("valid_loss", f"{record['valid_loss']:.3f} < {bound:.3f}")
    record_property("train_loss", f"{record['train_loss']:.3f} (not asserted: a mean over the first steps)")
    assert record["valid_loss"] < bound
    import seqnorm
    from lm import load_model

    assert isinstance(load_model(tmp_path / "gru" / "best.pt")[0].rnn, seqnorm.GRU)


def _tiny(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--emsize", "8", "--nhid", "8", "--batch-size", "4",
            "--bptt", "8", "--no-progress", *extra]


def test_the_device_line_names_torch_nn_for_its_cells(tmp_path, capsys):
    data = write_corpus(tmp_path / "c")
    assert main(_tiny(data, tmp_path / "n", "--max-steps", "1", "--cell", "lstm-cudnn", "--norm", "none")) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert "the recurrent layer is torch.nn's (lstm-cudnn: torch.nn.LSTM)" in first and "seqnorm layers" not in first
    assert main(_tiny(data, tmp_path / "o", "--max-steps", "1")) == 0
    assert "seqnorm layers run" in capsys.readouterr().err.splitlines()[0]


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """stderr redirected (here: captured) gets the epoch lines but no bars, --no-progress or not."""
    data = write_corpus(tmp_path / "c")
    command = [arg for arg in _tiny(data, tmp_path / "a", "--max-steps", "3") if arg != "--no-progress"]
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "tok/s]" not in err and "epoch 1/" in err, err


def test_a_run_prints_a_line_per_epoch_and_one_per_log_interval(tmp_path, capsys):
    data = write_corpus(tmp_path / "c")
    assert main(_tiny(data, tmp_path / "a", "--max-steps", "3")) == 0
    err = capsys.readouterr().err
    epoch_lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 1 and "valid ppl" in epoch_lines[0] and "undone 0" in epoch_lines[0], err
    assert main(_tiny(data, tmp_path / "b", "--max-steps", "3", "--log-interval", "1")) == 0
    steps = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epoch 1 | step ")]
    assert [ln.split(" | ")[1] for ln in steps] == ["step 1", "step 2", "step 3"]


def test_train_refuses_a_folder_holding_a_run_unless_resume_or_force(tmp_path, capsys):
    data, out = write_corpus(tmp_path / "c"), tmp_path / "run"
    assert main(_tiny(data, out, "--max-steps", "2")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(_tiny(data, out, "--max-steps", "2", "--seed", "5")) == 2
    line = one_line_error(capsys, "train")
    assert "already holds a run" in line and "--resume" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(_tiny(data, out, "--max-steps", "2", "--seed", "5", "--force")) == 0
    assert f"--force: replacing the run in {out}" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 5


def test_an_out_that_is_a_file_or_below_one_is_one_line(tmp_path, capsys):
    data, a_file = write_corpus(tmp_path / "c"), tmp_path / "a_file"
    a_file.write_text("mine\n")
    assert main(_tiny(data, a_file, "--max-steps", "1")) == 2
    assert f"--out {a_file} is a file, not a folder" in one_line_error(capsys, "train")
    assert main(_tiny(data, a_file / "run", "--max-steps", "1")) == 2
    assert "Not a directory" in one_line_error(capsys, "train")
    assert main(["data", "ptb", "--dir", str(a_file)]) == 2
    assert str(a_file) in one_line_error(capsys, "data")
    assert a_file.read_text() == "mine\n"


def test_a_bptt_longer_than_the_batch_columns_is_refused_before_any_work(tmp_path, capsys):
    data = write_corpus(tmp_path / "c")  # 3000 training words: 750 rows at batch size 4
    text = Path(data, "train.txt").read_text()
    rows = (len(text.split()) + len(text.splitlines())) // 4  # words and one <eos> a line, in 4 columns
    assert main(_tiny(data, tmp_path / "r", "--max-steps", "1", "--bptt", str(rows))) == 2
    line = one_line_error(capsys, "train")
    assert f"bptt {rows} is longer" in line and f"at most {rows - 1} steps" in line, line
    assert not (tmp_path / "r").exists()
    assert main(_tiny(data, tmp_path / "r", "--max-steps", "1", "--bptt", str(rows - 1), "--bptt-mode", "fixed")) == 0


def test_resume_says_what_it_applies_and_refuses_another_model(tmp_path, capsys):
    data, out = write_corpus(tmp_path / "c"), tmp_path / "run"
    assert main(_tiny(data, out, "--max-steps", "2", "--lr", "1")) == 0
    capsys.readouterr()
    assert main(_tiny(data, out, "--max-steps", "4", "--lr", "0.5", "--resume")) == 0
    err = capsys.readouterr().err
    assert "applying max_steps 2 -> 4, lr 1.0 -> 0.5 from here on" in err, err
    lr = load_checkpoint(out / "last.pt")["train"]["optimizer"]["param_groups"][0]["lr"]
    assert lr == 0.5
    assert main(_tiny(data, out, "--max-steps", "5", "--resume")) == 0  # no --lr: the run keeps its own 0.5
    assert "applying max_steps 4 -> 5 from here on" in capsys.readouterr().err
    assert load_checkpoint(out / "last.pt")["train_config"]["lr"] == 0.5
    assert main(_tiny(data, tmp_path / "typo", "--max-steps", "5", "--resume")) == 2  # no run there: not a new one
    assert "holds no checkpoint (last.pt) to continue" in one_line_error(capsys, "train")
    assert not (tmp_path / "typo").exists()
    bigger = ["train", "--data", str(data), "--out", str(out), "--emsize", "16", "--nhid", "16", "--batch-size", "4",
              "--bptt", "8", "--no-progress", "--max-steps", "6", "--resume"]
    assert main(bigger) == 2
    assert "nhid=8 in the checkpoint vs 16 requested" in one_line_error(capsys, "train")
    assert main(_tiny(data, out, "--max-steps", "6", "--seed", "9", "--resume")) == 2
    assert "--seed 9 (the run has 0)" in one_line_error(capsys, "train")


def test_resume_applies_a_new_rate_decay_and_weight_decay_from_the_epochs_done(tmp_path, capsys):
    """A finished 2-epoch run (lr 1, decay 0.5) extended to 3 epochs with lr 4, decay 0.25, weight decay 0.01:
    epoch 3 trains at 4 * 0.25^2 (the base rate decayed by the 2 epochs done) with weight decay 0.01, and the
    schedule steps on by 0.25; then to 4 epochs with a new decay alone, 0.5: epoch 4 at 4 * 0.5^3."""
    data, out = write_corpus(tmp_path / "c", n_train=400), tmp_path / "run"
    assert main(_tiny(data, out, "--epochs", "2", "--lr", "1", "--lr-decay", "0.5")) == 0
    assert main(_tiny(data, out, "--epochs", "3", "--lr", "4", "--lr-decay", "0.25", "--weight-decay", "0.01",
                      "--resume")) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in history] == [1.0, 0.5, 4 * 0.25 ** 2]
    (group,) = load_checkpoint(out / "last.pt")["train"]["optimizer"]["param_groups"]
    assert group["weight_decay"] == 0.01 and group["lr"] == pytest.approx(4 * 0.25 ** 3)
    assert main(_tiny(data, out, "--epochs", "4", "--lr-decay", "0.5", "--resume")) == 0  # the decay alone
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["lr"] == 4 * 0.5 ** 3  # the run's base rate 4, decayed by the new 0.5 over 3 epochs


def test_resume_refuses_what_would_make_another_run(tmp_path, capsys):
    """Another batch size, vocabulary cap or corpus is another run: an error naming it, the run untouched."""
    data, out = write_corpus(tmp_path / "c"), tmp_path / "run"
    assert main(_tiny(data, out, "--max-steps", "2")) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    other = tmp_path / "other"  # the same training text (so the same vocabulary), another test split
    shutil.copytree(data, other)
    (other / "test.txt").write_text("".join(reversed((data / "test.txt").read_text().splitlines(True))))
    for extra, said in ((["--batch-size", "8"], "--batch-size 8 (the run has 4)"),
                        (["--vocab-size", "100"], "--vocab-size 100 (the run has None)"),  # a cap that binds nothing
                        (["--data", str(other)], "was trained on another corpus")):
        assert main([*_tiny(data, out, "--max-steps", "3", "--resume"), *extra]) == 2, extra
        assert said in one_line_error(capsys, "train")
    assert (out / "last.pt").read_bytes() == before


def test_summarize_tabulates_any_run_folders(tmp_path, capsys, monkeypatch):
    data = write_corpus(tmp_path / "c")
    for name, extra in (("x", ["--lr", "1"]), ("y", ["--lr", "2"])):
        assert main(_tiny(data, tmp_path / name, "--max-steps", "2", *extra)) == 0
    assert main(["summarize", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(tmp_path / "t")]) == 0
    table = (tmp_path / "t" / "results.md").read_text()
    assert "lstm-online (lr=1.0)" in table and "lstm-online (lr=2.0)" in table
    assert str(tmp_path / "x") in table and str(tmp_path / "y") in table
    assert f"wrote {tmp_path / 't'}/valid_ppl.png" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without matplotlib: import fails
    assert main(["summarize", str(tmp_path / "x"), "--out", str(tmp_path / "u")]) == 0
    assert "no plot: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "u" / "valid_ppl.png").exists()
    assert main(["summarize", str(tmp_path / "x"), str(tmp_path / "x") + "/", "--out", str(tmp_path / "v")]) == 2
    assert f"{tmp_path / 'x'} given more than once in the folders" in one_line_error(capsys, "summarize")


def test_summarize_names_preset_runs_by_their_preset():
    """Runs of presets are named by the preset, whatever else the grid's runs differ in (the alphas that only the
    online presets set are no label); a setting that differs within a preset's runs is named."""
    from dataclasses import asdict
    from lm.compare import _group_names
    from lm.presets import PRESETS

    config = lambda name, **kw: json.loads(json.dumps(asdict(TrainConfig(**PRESETS[name].train_fields(), **kw))))  # noqa: E731
    on, none = config("paper-lstm-online", max_steps=2), config("paper-lstm-none", max_steps=2)
    assert sorted(_group_names([on, none]).values()) == ["paper-lstm-none", "paper-lstm-online"]
    longer = config("paper-lstm-none", max_steps=9)
    assert sorted(_group_names([none, longer]).values()) == ["paper-lstm-none (max_steps=2)",
                                                            "paper-lstm-none (max_steps=9)"]
    assert sorted(_group_names([config("paper-lstm-none"), longer]).values()) == [
        "paper-lstm-none", "paper-lstm-none (max_steps=9)"]  # the default needs no label


def test_threads_sets_torchs_threads(tiny_checkpoint, capsys):
    data, ckpt = tiny_checkpoint
    saved = torch.get_num_threads()
    try:
        assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--threads", "1", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
        for bad in ("0", "-2"):
            assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--threads", bad]) == 2
            assert f"--threads must be positive, got {bad}" in one_line_error(capsys, "eval")
    finally:
        torch.set_num_threads(saved)


def test_tensorboard_gets_the_epoch_scalars_or_a_clear_error(tmp_path, capsys, monkeypatch):
    import lm.train as train_module

    data = write_corpus(tmp_path / "c")
    written = []

    class FakeWriter:  # TensorBoard's SummaryWriter interface, without the package
        def __init__(self, folder):
            written.append(("open", folder))

        def add_scalar(self, name, value, step):
            written.append((name, step))

        def flush(self):
            pass

    monkeypatch.setattr(train_module, "_summary_writer", FakeWriter)
    assert main(_tiny(data, tmp_path / "a", "--max-steps", "3", "--tensorboard", str(tmp_path / "tb"))) == 0
    assert written[0] == ("open", str(tmp_path / "tb")) and ("valid_ppl", 3) in written
    monkeypatch.undo()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        capsys.readouterr()
        assert main(_tiny(data, tmp_path / "b", "--max-steps", "3", "--tensorboard", str(tmp_path / "tb2"))) == 2
        assert "pip install tensorboard" in one_line_error(capsys, "train")


def test_a_step_too_large_for_the_memory_left_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    """The decoder's scores and their log-softmax (2 x steps x rows x vocabulary floats) must fit in the memory the
    machine has left: a run that cannot fit ends in a one-line error, not in the kernel's out-of-memory kill."""
    from lm import machine
    from lm.checkpoint import load_model
    from lm.data import load_corpus

    data, ckpt = tiny_checkpoint
    words = len(load_model(ckpt)[1])
    monkeypatch.setattr(machine, "available_memory", lambda device: 4 * 2 * 8 * 4 * words - 1)  # bptt 8, batch 4
    assert main(_tiny(data, tmp_path / "run", "--max-steps", "1")) == 2
    line = one_line_error(capsys, "train")
    assert f"a training step's scores (2 x 8 steps x 4 rows x {words} words, float32)" in line
    assert "lower --batch-size or --bptt" in line and not (tmp_path / "run" / "last.pt").exists()
    corpus = load_corpus(data, "word", words)
    rows = max(corpus.valid.numel(), corpus.test.numel()) // 2  # the evaluation after each epoch, checked up front
    monkeypatch.setattr(machine, "available_memory", lambda device: 4 * 2 * (rows - 1) * 2 * words - 1)
    assert main(_tiny(data, tmp_path / "run", "--max-steps", "1", "--eval-batch-size", "2", "--eval-bptt", "1000")) == 2
    line = one_line_error(capsys, "train")
    assert f"an evaluation step's scores (2 x {rows - 1} steps x 2 rows x {words} words" in line
    assert "lower --eval-batch-size or --eval-bptt" in line

    steps = load_corpus(data, "word", words).valid.numel() // 2 - 1  # --bptt beyond the split: its rows bound a step
    need = 4 * 2 * steps * 2 * words
    evaluate = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--batch-size", "2", "--bptt", "100000",
                "--no-progress"]
    monkeypatch.setattr(machine, "available_memory", lambda device: need - 1)
    assert main(evaluate) == 2
    assert f"(2 x {steps} steps x 2 rows x {words} words, float32) need at least" in one_line_error(capsys, "eval")
    monkeypatch.setattr(machine, "available_memory", lambda device: need)
    assert main(evaluate) == 0


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads Linux's /proc/meminfo")
def test_available_memory_is_within_this_machines_memory():
    from lm.machine import available_memory

    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = sum(int(info[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    assert 0 < available_memory(torch.device("cpu")) <= total


def test_as_written_refuses_a_robust_start_asked_for_beside_it(tmp_path, capsys):
    data = write_corpus(tmp_path / "c")
    assert main(_tiny(data, tmp_path / "run", "--max-steps", "1", "--as-written", "--warmup", "undo")) == 2
    assert "--as-written turns the robust start off; it cannot go with --warmup undo" in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_compare_passes_clip_to_every_run():
    from lm.cli import compare_overrides

    assert compare_overrides(build_parser().parse_args(["compare", "--clip", "0.5"])) == {"clip": 0.5}
    assert compare_overrides(build_parser().parse_args(["compare", "--clip", "0.5", "--as-written"])) == {
        "clip": 0.5, "warmup": "none"}
    assert compare_overrides(build_parser().parse_args(["compare"])) == {}


def test_an_interrupted_compare_says_how_to_continue_and_exits_130(capsys, monkeypatch):
    from lm import compare

    monkeypatch.setattr(compare, "run_grid", lambda *a, **k: {"status": "interrupted", "runs": []})
    assert main(["compare", "--cells", "rnn", "--norms", "none", "--device", "cpu"]) == 130
    assert "interrupted; run the same command again to continue the grid" in capsys.readouterr().err
