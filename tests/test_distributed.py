"""Data-parallel training with 2 gloo processes on CPU: seqnorm.distributed and `seqnorm-lm train` under torchrun."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers
from lm.checkpoint import load_checkpoint
from lm.cli import main
from lm_helpers import ptb_dir, write_corpus

SMALL = ["--emsize", "16", "--nhid", "16", "--batch-size", "4", "--bptt", "12", "--eval-batch-size", "3",
         "--eval-bptt", "8", "--lr", "1", "--seed", "3", "--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, tmp_path, *args):
    try:
        mp.spawn(fn, args=(2, free_port(), str(tmp_path), *args), nprocs=2, join=True)
    except mp.ProcessExitedException as e:
        written = [r for r in range(2) if (tmp_path / f"rank{r}.pt").exists()]
        raise AssertionError(f"{e}; ranks that had written their results: {written}") from e
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def torchrun(*args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lm",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("plain_ddp", [False, True], ids=["wrap_ddp", "plain_ddp"])
def test_reconcile_statistics_combines_the_ranks(tmp_path, plain_ddp):
    seen = spawn(dist_workers.reconcile, tmp_path, plain_ddp)
    r0, r1 = seen[0]["after_backward"]  # every rank gathered the same two states
    assert not torch.allclose(r0["control_u"], r1["control_u"])  # each rank ran its own control process
    f0, f1 = seen[1]["after_forward"]
    if plain_ddp:  # what goes wrong: the next forward overwrote rank 1's state with rank 0's
        assert all(torch.equal(f1[k], f0[k]) for k in ("control_u", "control_v"))
        assert not torch.equal(f1["control_u"], r1["control_u"])
        return
    assert torch.equal(f1["control_u"], r1["control_u"])  # with wrap_ddp rank 1 keeps its own
    assert not torch.allclose(f0["running_mean"], f1["running_mean"])
    mu = (f0["running_mean"].double() + f1["running_mean"]) / 2
    var = (f0["running_var"].double() + f1["running_var"]) / 2 + ((f0["running_mean"].double() - mu) ** 2
                                                                  + (f1["running_mean"].double() - mu) ** 2) / 2
    want = {"running_mean": mu, "running_var": var, "control_u": (f0["control_u"].double() + f1["control_u"]) / 2,
            "control_v": (f0["control_v"].double() + f1["control_v"]) / 2}
    for rank in range(2):
        got = seen[rank]["reconciled"][rank]
        for k, value in want.items():
            torch.testing.assert_close(got[k].double(), value, rtol=1e-6, atol=1e-7, msg=k)
    assert all(torch.equal(seen[0]["reconciled"][0][k], seen[0]["reconciled"][1][k]) for k in want)


def test_reconcile_is_a_no_op_without_a_process_group():
    from seqnorm.distributed import reconcile_statistics

    lstm = seqnorm_lstm()
    before = {k: v.clone() for k, v in lstm.state_dict().items()}
    reconcile_statistics(lstm)
    assert all(torch.equal(v, before[k]) for k, v in lstm.state_dict().items())


def seqnorm_lstm():
    import seqnorm

    lstm = seqnorm.LSTM(3, 4)
    lstm(torch.randn(5, 2, 3))[0].sum().backward()
    return lstm


def test_two_processes_without_norm_take_the_steps_of_one(tmp_path):
    data = write_corpus(tmp_path / "c")
    flags = ["train", "--data", str(data), "--norm", "none", "--epochs", "2", *SMALL]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    run = torchrun(*flags, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (load_checkpoint(tmp_path / d / "last.pt") for d in ("one", "two"))
    for a, b in zip(one["train"]["history"], two["train"]["history"]):
        assert a["step"] == b["step"]
        for key in ("train_loss", "valid_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name, w in one["model"].items():
        torch.testing.assert_close(two["model"][name], w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.trajectory
def test_online_run_on_ptb_writes_a_checkpoint_that_evaluates_in_one_process(tmp_path, capsys, record_property):
    out = tmp_path / "run"
    # As written, 24 steps at 10 rows per rank sit on the explosion at initialization and last-bit differences
    # between CPUs decided the outcome (12037 on an Intel Xeon). The default start (undo) acts only on an update
    # that multiplies its segment's perplexity by 100, which these lr-1 steps do not (17770 here), so this test of
    # the checkpoints takes the truncation warm-up, which removes the explosion itself (docs/robust_start.md).
    run = torchrun("train", "--preset", "paper-lstm-online", "--lr", "1", "--warmup", "truncate", "--data",
                   str(ptb_dir()), "--max-steps", "24", "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # printed once, by rank 0
    record_property("best_valid_ppl", f"{summary['best_valid_ppl']:.1f} < 5000")
    assert summary["status"] == "finished" and summary["best_valid_ppl"] < 5000  # a uniform guess is 10,000
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["train"]["world_size"] == 2 and len(ckpt["train"]["rank_states"]) == 2
    own = [s["rnn.norm_l0.running_mean"] for s in ckpt["train"]["rank_states"]]
    assert not torch.equal(own[0], own[1])  # each rank's own statistics, besides the reconciled ones
    torch.testing.assert_close(ckpt["model"]["rnn.norm_l0.running_mean"], (own[0] + own[1]) / 2)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--data", str(ptb_dir()), "--split", "test",
                 "--no-progress"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-5)  # the all-reduced corpus figure
    assert main(["train", "--resume", "--preset", "paper-lstm-online", "--lr", "1", "--warmup", "truncate", "--data",
                 str(ptb_dir()), "--max-steps", "30", "--out", str(out), "--no-progress"]) == 2
    assert "written by a run of 2 process(es)" in capsys.readouterr().err


def test_interrupted_two_process_run_resumes_exactly(tmp_path):
    data = write_corpus(tmp_path / "c")
    flags = ["train", "--data", str(data), "--norm", "online", "--epochs", "5", "--dropout", "0.2", *SMALL]
    assert torchrun(*flags, "--out", str(tmp_path / "full")).returncode == 0
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lm", *flags,
           "--out", str(cut)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (cut / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches torchrun and both workers
    proc.communicate(timeout=300)
    interrupted = load_checkpoint(cut / "last.pt")["train"]
    assert interrupted["epoch"] < 5
    resumed = torchrun(*flags, "--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (cut, tmp_path / "full"))
    for key in ("steps", "best_valid_ppl", "final_valid_ppl", "test_ppl"):
        assert a[key] == b[key], key


def test_bad_setups_are_clear_errors(tmp_path, monkeypatch):
    data = write_corpus(tmp_path / "c")
    run = torchrun("train", "--data", str(data), "--out", str(tmp_path / "o"), *SMALL, "--batch-size", "5",
                   "--max-steps", "2")
    assert run.returncode != 0
    assert "--batch-size 5 is the global batch and must be divisible by the number of processes (2)" in run.stderr
    from lm import parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="with 2 processes on this host needs 2 GPUs .* but 1 are visible"):
        parallel.setup(torch.device("cuda"))
