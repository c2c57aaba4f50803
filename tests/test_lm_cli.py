"""The seqnorm-lm command line: a PTB smoke run (train, eval, generate), help, data, errors."""
import json
import math
import subprocess
import sys

import pytest
import torch

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
    record_property("best_valid_ppl", f"{summary['best_valid_ppl']:.1f} in (100, 10000)")
    assert 100 < summary["best_valid_ppl"] < 10_000  # learned something; a uniform guess is 10,000
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
    """The paper's setting (lr 6.5, no clipping, the default robust start) with the reference's v-decay floor;
    --v-decay-min none diverges: the robust start does not replace the floor."""
    common = ["train", "--preset", "paper-lstm-online", "--data", str(ptb_dir()), "--max-steps", "40", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "floor")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["steps"] == 40
    start = math.log(10_000)  # the loss of a uniform guess, where an initialized model starts
    history = json.loads((tmp_path / "floor" / "summary.json").read_text())["history"]
    record_property("valid_loss", f"{history[-1]['valid_loss']:.3f} < {start - 1.5:.3f}")
    record_property("train_loss", f"{history[-1]['train_loss']:.3f} < {start - 0.5:.3f}")
    assert history[-1]["train_loss"] < start - 0.5 and history[-1]["valid_loss"] < start - 1.5
    assert math.isfinite(summary["test_ppl"])
    assert main([*common, "--out", str(tmp_path / "none"), "--v-decay-min", "none"]) == 2
    assert "diverged" in capsys.readouterr().err


def one_line_error(capsys, command: str) -> str:
    """What a failed command printed: exactly one line on stderr, prefixed, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
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
    """seqnorm.GRU in the pipeline: 40 steps at a fixed BPTT of 35, loss finite and falling."""
    assert main(["train", "--cell", "gru", "--norm", "online", "--lr", "1", "--bptt", "35", "--bptt-mode", "fixed",
                 "--data", str(ptb_dir()), "--max-steps", "40", "--out", str(tmp_path / "gru"), "--no-progress"]) == 0
    (record,) = json.loads((tmp_path / "gru" / "summary.json").read_text())["history"]
    start = math.log(10_000)
    record_property("valid_loss", f"{record['valid_loss']:.3f} < {start - 1.0:.3f}")
    record_property("train_loss", f"{record['train_loss']:.3f} < {start:.3f}")
    assert record["train_loss"] < start and record["valid_loss"] < start - 1.0
    import seqnorm
    from lm import load_model

    assert isinstance(load_model(tmp_path / "gru" / "best.pt")[0].rnn, seqnorm.GRU)
