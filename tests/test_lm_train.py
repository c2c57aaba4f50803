"""lm model, training, evaluation, checkpoints, resume, generation and compare, on small generated corpora."""
import json
import math
from dataclasses import asdict, replace

import pytest
import torch
from torch import nn

from lm import compare, load_model
from lm.checkpoint import CheckpointError, load_checkpoint
from lm.data import load_corpus
from lm.config import AS_WRITTEN
from lm.evaluate import evaluate
from lm.generate import generate
from lm.machine import threads_of
from lm.model import ModelConfig, RNNLM
from lm.presets import PRESETS, get_preset
from lm.train import TrainConfig, Trainer, train
from lm_helpers import REPO, write_corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def small_config(corpus_dir, out, **kw):
    base = dict(data=str(corpus_dir), out=str(out), emsize=16, nhid=16, epochs=2, lr=1.0, batch_size=4, bptt=12,
                bptt_mode="random", eval_batch_size=3, eval_bptt=8, seed=3)
    return TrainConfig(**{**base, **kw})


def test_tied_weights_are_one_parameter():
    model = RNNLM(ModelConfig(vocab_size=30, emsize=8, nhid=8))
    assert model.decoder.weight is model.encoder.weight
    assert sum(p is model.encoder.weight for p in model.parameters()) == 1
    logits, _ = model(torch.randint(0, 30, (5, 2)))
    logits.sum().backward()
    with torch.no_grad():
        model.encoder.weight[3].add_(1.0)
    assert torch.equal(model.decoder.weight[3], model.encoder.weight[3])
    untied = RNNLM(ModelConfig(vocab_size=30, emsize=8, nhid=12, tied=False))
    assert untied.decoder.weight is not untied.encoder.weight
    with pytest.raises(ValueError, match="emsize == nhid"):
        ModelConfig(vocab_size=30, emsize=8, nhid=12)
    with pytest.raises(ValueError, match="norm='none'"):
        ModelConfig(vocab_size=30, cell="lstm-cudnn", norm="online")


@pytest.mark.parametrize("cell,norm", [("lstm", "online"), ("rnn", "layer"), ("lstm-cudnn", "none"),
                                       ("rnn-cudnn", "none")])
def test_model_shapes_and_hidden(cell, norm):
    model = RNNLM(ModelConfig(vocab_size=25, cell=cell, norm=norm, emsize=6, nhid=6, nlayers=2))
    hidden = model.init_hidden(3)
    logits, hidden2 = model(torch.randint(0, 25, (7, 3)), hidden)
    assert logits.shape == (7, 3, 25)
    assert type(hidden2) is type(hidden) and (hidden2[0] if isinstance(hidden2, tuple) else hidden2).shape == (2, 3, 6)


def test_hidden_state_carry_makes_segmenting_invisible():
    """In eval mode (frozen statistics) segments of any length with the carried state give the same perplexity."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(vocab_size=20, emsize=8, nhid=8))
    ids = torch.randint(0, 20, (300,))
    whole = evaluate(model, ids, batch_size=3, bptt=1000)
    for bptt in (1, 7, 32):
        assert evaluate(model, ids, batch_size=3, bptt=bptt)["perplexity"] == pytest.approx(whole["perplexity"],
                                                                                             rel=1e-5)
    assert whole["tokens"] == 3 * (300 // 3 - 1)


class _BigramTable(nn.Module):
    """A model whose next-token distribution depends only on the current token: a known table."""

    def __init__(self, probs):
        super().__init__()
        self.logp = nn.Parameter(torch.tensor(probs).log())

    def init_hidden(self, batch_size):
        return None

    def forward(self, ids, hidden=None):
        return self.logp[ids], hidden


def test_perplexity_against_hand_computation():
    probs = [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
    ids = torch.tensor([0, 1, 1, 2, 0, 0, 2, 2, 1])  # batch 1: every consecutive pair is a prediction
    pairs = list(zip(ids[:-1].tolist(), ids[1:].tolist()))
    nll = [-math.log(probs[a][b]) for a, b in pairs]
    expected = math.exp(sum(nll) / len(nll))
    result = evaluate(_BigramTable(probs), ids, batch_size=1, bptt=3)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result["tokens"] == 8
    segments = [nll[0:3], nll[3:6], nll[6:8]]
    paper = sum(math.exp(sum(s) / len(s)) for s in segments) / 3
    assert result["perplexity_mean_batch_exp"] == pytest.approx(paper, rel=1e-6)


@pytest.mark.trajectory
def test_training_learns_and_logs(corpus_dir, tmp_path, record_property):
    cfg = small_config(corpus_dir, tmp_path / "run", norm="online")
    summary = train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(r["event"] == "epoch" for r in lines)
    for key in ("train_loss", "valid_ppl", "valid_ppl_mean_batch_exp", "lr", "time_s", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in lines), key
    record_property("best_valid_ppl", f"{summary['best_valid_ppl']:.2f} < 20")
    assert summary["best_valid_ppl"] < 40 * 0.5  # 41 ids: a uniform guess is ~41; the corpus is predictable
    for r in lines:  # the logged training loss is a per-token mean like the validation loss, of the same size
        assert 0.5 < r["train_loss"] / r["valid_loss"] < 2, r
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "summary.json"}


@pytest.mark.parametrize("norm,dropout", [("online", 0.3), ("layer", 0.0)])
def test_resume_after_interruption_equals_uninterrupted(corpus_dir, tmp_path, norm, dropout):
    cfg = small_config(corpus_dir, tmp_path / "full", norm=norm, dropout=dropout, epochs=2, max_steps=None)
    full = train(cfg, progress=False)
    cut = replace(cfg, out=str(tmp_path / "cut"))
    steps_per_epoch = full["steps"] // 2
    stopped = train(cut, progress=False, should_stop=lambda step: step == steps_per_epoch + 3)  # mid epoch 2
    assert stopped["status"] == "interrupted"
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert ckpt["train"]["epoch"] == 1 and ckpt["train"]["pos"] > 0
    resumed = train(cut, resume=True, progress=False)
    for key in ("steps", "best_valid_ppl", "final_valid_ppl", "test_ppl"):
        assert resumed[key] == full[key], key
    assert [r["valid_ppl"] for r in resumed["history"]] == [r["valid_ppl"] for r in full["history"]]
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # ON statistics and control state included


def test_max_steps_and_lr_decay(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run", norm="layer", epochs=3, lr_decay=0.5, bptt_mode="fixed")
    summary = train(cfg, progress=False)
    assert [r["lr"] for r in summary["history"]] == [1.0, 0.5, 0.25]
    short = train(replace(cfg, out=str(tmp_path / "short"), max_steps=5), progress=False)
    assert short["steps"] == 5 and short["history"][-1]["event"] == "end"


def test_checkpoint_errors(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run", norm="none", max_steps=3)
    train(cfg, progress=False)
    last = tmp_path / "run" / "last.pt"
    with pytest.raises(CheckpointError, match="another model.*nhid=16 in the checkpoint vs 24"):
        Trainer(replace(cfg, nhid=24, emsize=24), resume=True)
    other = write_corpus(tmp_path / "other", vocab=25, seed=5)
    with pytest.raises(CheckpointError, match="another vocabulary"):
        Trainer(replace(cfg, data=str(other)), resume=True)
    data = last.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a seqnorm-lm checkpoint"):
        load_model(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=f"is a folder, not a checkpoint file; pass {run / 'best.pt'} or "):
        load_model(run)


def test_a_checkpoint_that_is_almost_ours_is_refused_by_name(corpus_dir, tmp_path):
    """Each part load_checkpoint checks, broken alone in a real checkpoint: the error says which."""
    cfg = small_config(corpus_dir, tmp_path / "run", norm="none", max_steps=2)
    train(cfg, progress=False)
    good = torch.load(tmp_path / "run" / "last.pt", weights_only=True)

    def refused(payload, match):
        path = tmp_path / "variant.pt"
        torch.save(payload, path)
        with pytest.raises(CheckpointError, match=match):
            load_model(path)

    refused({**good, "format": "seqnorm-lm/0"}, "not a seqnorm-lm checkpoint")
    refused([good], "not a seqnorm-lm checkpoint")
    refused({k: v for k, v in good.items() if k != "vocab"}, r"lacks \['vocab'\]")
    wrong_shape = {**good["model"], "encoder.weight": torch.zeros(3, 3)}
    refused({**good, "model": wrong_shape}, "does not hold a valid model.*encoder.weight")
    with pytest.raises(CheckpointError, match="another model: cell='lstm' in the checkpoint vs 'gru'"):
        Trainer(replace(cfg, cell="gru"), resume=True)


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path):
    from lm.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "unpicklable": lambda: None})
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.trajectory
def test_divergence_is_a_clear_error(corpus_dir, tmp_path, record_property):
    with pytest.raises(FloatingPointError, match="diverged") as info:  # as written: the start would skip the steps
        train(small_config(corpus_dir, tmp_path / "run", norm="none", lr=1e30, max_steps=20, **AS_WRITTEN),
              progress=False)
    record_property("diverged at step", f"{info.value.step} in 1..20")
    assert f"at step {info.value.step} " in str(info.value) and 1 <= info.value.step <= 20


@pytest.mark.trajectory
def test_a_diverged_run_never_writes_a_nonfinite_checkpoint(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run", max_steps=3)
    train(cfg, progress=False)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("last.pt", "best.pt")}

    def poison(step):  # a non-finite statistic after the last step: validation and the save must not take it
        if step == 6:
            model.rnn.norm_l0.running_var[0] = float("nan")
        return False

    trainer = Trainer(replace(cfg, max_steps=6), resume=True, progress=False)
    model = trainer.model
    with pytest.raises(FloatingPointError, match=r"non-finite values in rnn.norm_l0.running_var at step 6 .*"
                                                 r"last.pt was not overwritten") as info:
        trainer.run(should_stop=poison)
    assert info.value.step == 6
    for name, data in before.items():
        assert (tmp_path / "run" / name).read_bytes() == data, name
    with pytest.raises(FloatingPointError, match=r"loss is nan at step \d+ .*no checkpoint was written"):
        train(small_config(corpus_dir, tmp_path / "fresh", lr=1e30, norm="none", max_steps=20, **AS_WRITTEN),
              progress=False)
    assert not (tmp_path / "fresh" / "last.pt").exists()


@pytest.mark.trajectory
def test_compare_records_and_marks_a_diverged_run(corpus_dir, tmp_path, monkeypatch, capsys, record_property):
    monkeypatch.setitem(PRESETS, "paper-rnn-layer", replace(PRESETS["paper-rnn-layer"], lr=1e30))
    results = compare.run_grid(tmp_path / "cmp", data=str(corpus_dir), cells=("rnn",), norms=("layer",), seeds=(0,),
                               max_steps=20, progress=False, epochs=1, overrides=AS_WRITTEN)
    (run,) = results["runs"]
    record_property("status", f"{run['status']} (diverged)")
    assert run["status"] == "diverged" and f"at step {run['step']} " in run["error"]
    assert f"paper-rnn-layer seed 0: diverged at step {run['step']}" in capsys.readouterr().err
    assert results["table"]["paper-rnn-layer"]["diverged"] == 1
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| paper-rnn-layer | 0 (+1 diverged) |" in md
    assert f"| paper-rnn-layer seed 0 | diverged at step {run['step']} |" in md
    assert (tmp_path / "cmp" / "valid_ppl.png").exists()
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("a recorded divergence was trained again"))
    again = compare.run_grid(tmp_path / "cmp", data=str(corpus_dir), cells=("rnn",), norms=("layer",), seeds=(0,),
                             max_steps=20, progress=False, epochs=1, overrides=AS_WRITTEN)
    assert again["runs"] == results["runs"]


def test_load_model_and_generate(corpus_dir, tmp_path):
    train(small_config(corpus_dir, tmp_path / "run", max_steps=4), progress=False)
    model, vocab, ckpt = load_model(tmp_path / "run" / "best.pt")
    assert not model.training and ckpt["model_config"]["nhid"] == 16
    text = generate(model, vocab, words=12, temperature=0.8, seed=1, prompt="w1 w2")
    assert text == generate(model, vocab, words=12, temperature=0.8, seed=1, prompt="w1 w2")
    assert len(text.split()) + text.count("\n") == 12
    with pytest.raises(ValueError, match="unknown word"):
        generate(model, vocab, prompt="w1 nonsense")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, vocab, temperature=0)


def test_generate_samples_each_word_from_the_whole_text_so_far(corpus_dir, tmp_path):
    """Reference: each next word drawn (same seeded generator) from softmax(logits / T) of the last position of
    the whole text so far, run from the start in eval mode (no carried state); at T = 1e-6 that is the argmax.
    The model is given in training mode with dropout 0.5 and comes back in it."""
    prompt = "w1 w2 <eos>"
    train(small_config(corpus_dir, tmp_path / "run", max_steps=40, dropout=0.5), progress=False)
    model, vocab, _ = load_model(tmp_path / "run" / "best.pt")

    def reference(temperature, seed, words):
        ids, generator = vocab.encode_prompt(prompt), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(words):
                logits, _ = model(torch.tensor(ids).view(-1, 1))
                probs = torch.softmax(logits[-1, 0] / temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generator)))
        return vocab.decode(ids[3:])

    expected = {t: reference(t, 5, 30) for t in (1e-6, 0.7)}
    model.train()
    for t in (1e-6, 0.7):
        assert generate(model, vocab, words=30, temperature=t, seed=5, prompt=prompt) == expected[t], t
    assert model.training
    assert len({generate(model, vocab, words=8, seed=s, prompt=prompt) for s in range(4)}) > 1


def test_sentencepiece_training_end_to_end(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "sp", tokenizer="sentencepiece", vocab_size=30, max_steps=4)
    summary = train(cfg, progress=False)
    assert math.isfinite(summary["test_ppl"])
    model, vocab, _ = load_model(tmp_path / "sp" / "best.pt")
    assert vocab.kind == "sentencepiece" and len(vocab) == model.cfg.vocab_size
    assert isinstance(generate(model, vocab, words=5), str)
    resumed = train(replace(cfg, max_steps=6), resume=True, progress=False)  # the saved tokenizer is reused
    assert resumed["steps"] == 6


def test_presets_follow_the_paper():
    norms = ("online", "layer", "none")
    assert set(PRESETS) == {f"paper-{c}-{n}" for c in ("lstm", "rnn") for n in norms} | {f"gru-{n}" for n in norms}
    assert all(PRESETS[f"gru-{n}"].paper_valid_ppl is None for n in norms)  # the paper has no GRU
    on = TrainConfig(**get_preset("paper-lstm-online").train_fields())
    assert (on.lr, on.epochs, on.bptt, on.bptt_mode, on.batch_size, on.weight_decay, on.clip) == \
           (6.5, 25, 128, "random", 20, 1e-6, None)
    assert (on.alpha_fwd, on.alpha_bkw) == (1 - 2**-13, 1 - 2**-5)
    rnn = TrainConfig(**get_preset("paper-rnn-online").train_fields())
    assert (rnn.cell, rnn.lr, rnn.epochs, rnn.alpha_fwd, rnn.alpha_bkw) == ("rnn", 1.7, 40, 1 - 2**-14, 1 - 2**-7)
    model = RNNLM(rnn.model_config(50))
    assert (model.rnn.config.alpha_fwd, model.rnn.config.alpha_bkw) == (1 - 2**-14, 1 - 2**-7)
    assert get_preset("paper-lstm-none").cell == "lstm-cudnn"
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("paper-gru")


def _decay(text: str) -> float | None:
    """A decay as the docs print it, "1 - 2^-13" or "1-2^-13"; None for an empty cell."""
    return 1 - 2.0 ** -int(text.split("2^-")[1]) if text else None


def _design_table() -> dict:
    """docs/design.md's PTB table (the spec of record): {(cell, norm): (lr, alpha_fwd, alpha_bkw, epochs, figures)}."""
    rows = {}
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[0].startswith(("LSTM", "RNN")):
            continue
        median, low, high = (float(x) for x in cells[6].replace("(", " ").replace("–", " ").strip(")").split())
        rows[(cells[0].split()[0].lower(), cells[1].split()[0])] = (float(cells[2]), _decay(cells[3]), _decay(cells[4]),
                                                                    int(cells[5]), (median, low, high))
    return rows


def test_every_paper_preset_is_the_design_tables_row():
    rows = _design_table()
    assert len(rows) == 6
    for (cell, norm), (lr, alpha_fwd, alpha_bkw, epochs, figures) in rows.items():
        preset = get_preset(f"paper-{cell}-{norm}")
        cfg = TrainConfig(**preset.train_fields())
        assert (cfg.lr, cfg.alpha_fwd if norm == "online" else None, cfg.alpha_bkw if norm == "online" else None,
                cfg.epochs, preset.paper_valid_ppl) == (lr, alpha_fwd, alpha_bkw, epochs, figures), (cell, norm)
        assert cfg.cell.split("-")[0] == cell and cfg.norm == norm
        # the settings the table's paragraph gives for all of them
        assert (cfg.nlayers, cfg.nhid, cfg.emsize, cfg.tied, cfg.batch_size, cfg.bptt, cfg.bptt_mode) == \
               (1, 200, 200, True, 20, 128, "random"), (cell, norm)
        assert (cfg.weight_decay, cfg.clip, cfg.dropout, cfg.eval_batch_size, cfg.eval_bptt) == \
               (1e-6, None, 0.0, 10, 32), (cell, norm)


def test_the_preset_table_users_read_is_the_presets():
    """docs/lm.md's table lists every preset with its cell, lr, epochs, decays and the paper's median."""
    listed = {}
    for line in (REPO / "docs" / "lm.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            listed[cells[0].strip("`")] = cells[1:]
    assert set(listed) == set(PRESETS)
    for name, (cell, lr, epochs, alphas, paper) in listed.items():
        preset = PRESETS[name]
        decays = tuple(_decay(a) for a in alphas.split(" / ")) if alphas else (None, None)
        figure = float(paper) if paper[:1].isdigit() else None
        assert (cell.split()[0], float(lr), int(epochs), decays) == \
               (preset.cell, preset.lr, preset.epochs, (preset.alpha_fwd, preset.alpha_bkw)), name
        assert figure == (preset.paper_valid_ppl[0] if preset.paper_valid_ppl else None), name


def test_compare_grid_writes_table_and_resumes(corpus_dir, tmp_path, monkeypatch):
    results = compare.run_grid(tmp_path / "cmp", data=str(corpus_dir), cells=("lstm",), norms=("online", "none"),
                               seeds=(0, 1), max_steps=3, progress=False, epochs=1)
    table = results["table"]
    assert set(table) == {"paper-lstm-online", "paper-lstm-none"}
    for name, row in table.items():
        runs = [r for r in results["runs"] if r["preset"] == name]
        finished = sorted(r["best_valid_ppl"] for r in runs if r["status"] == "finished")
        if finished:
            assert row["valid"]["min"] == finished[0] and row["valid"]["max"] == finished[-1]
        assert row["valid"] is None or row["valid"]["n"] + row["diverged"] == 2
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "paper-lstm-online" in md and "113.4" in md and "per-batch" in md
    done = [r for r in results["runs"] if r["status"] == "finished"]
    assert done
    for r in done:  # the per-run table: the history's figures
        (h,) = [h for h in r["history"] if h["event"] == "epoch"]
        assert f"| {r['preset']} seed {r['seed']} | {h['valid_ppl']:.1f} | {r['best_valid_ppl']:.1f} | " \
               f"{r['test_ppl']:.1f} | {h['retries']} |" in md
    for name, row in table.items():
        runs = [r for r in results["runs"] if r["preset"] == name and r["status"] == "finished"]
        if runs:  # the paper's per-batch figure is never below the corpus figure (Jensen)
            assert row["valid_mean_batch_exp"]["median"] >= row["valid"]["median"] * (1 - 1e-9)
            epochs = [h["time_s"] for r in runs for h in r["history"] if h["event"] == "epoch"]
            assert row["epoch_seconds"]["n"] == len(epochs) and row["epoch_seconds"]["max"] == max(epochs)
            assert row["retaken"] == sum(h["retries"] for r in runs for h in r["history"] if h["event"] == "epoch")
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["table"] == json.loads(json.dumps(table))
    assert (tmp_path / "cmp" / "valid_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is in [dev]
    calls = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: calls.append(1))
    again = compare.run_grid(tmp_path / "cmp", data=str(corpus_dir), cells=("lstm",), norms=("none",), seeds=(0,),
                             max_steps=3, progress=False, epochs=1)
    assert calls == []  # finished runs are neither trained nor evaluated again
    assert again["runs"][0]["test_ppl"] == next(r for r in results["runs"] if r["preset"] == "paper-lstm-none"
                                                and r["seed"] == 0)["test_ppl"]


def test_v_decay_min_is_stored_and_older_checkpoints_get_the_default(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run", max_steps=3)
    train(cfg, progress=False)
    last = tmp_path / "run" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["model_config"]["v_decay_min"] == 1e-5
    del ckpt["model_config"]["v_decay_min"]  # as written before the field existed
    torch.save(ckpt, last)
    model, _, _ = load_model(last)
    assert model.rnn.norm_l0.v_decay_min == 1e-5
    assert train(replace(cfg, max_steps=5), resume=True, progress=False)["steps"] == 5
    with pytest.raises(CheckpointError, match="v_decay_min=1e-05 in the checkpoint vs None"):
        Trainer(replace(cfg, v_decay_min=None), resume=True)
    unfloored = small_config(corpus_dir, tmp_path / "none", max_steps=2, v_decay_min=None)
    train(unfloored, progress=False)
    assert load_model(tmp_path / "none" / "best.pt")[0].rnn.norm_l0.v_decay_min is None


def test_compare_never_relabels_a_run_with_other_settings(corpus_dir, tmp_path):
    """An as-written run is not reused (or resumed) for the robust start, nor the reverse; a larger budget
    continues the run."""
    from lm.config import AS_WRITTEN

    grid = dict(data=str(corpus_dir), cells=("rnn",), norms=("none",), seeds=(0,), progress=False, epochs=1)
    first = compare.run_grid(tmp_path / "cmp", **grid, overrides=AS_WRITTEN)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(warmup 'none' there, "
                                         r"'undo' here\); use another --out"):
        compare.run_grid(tmp_path / "cmp", **grid)
    longer = compare.run_grid(tmp_path / "cmp", **{**grid, "epochs": 2}, overrides=AS_WRITTEN)
    (a,), (b,) = first["runs"], longer["runs"]
    assert b["epochs_completed"] == 2 and b["history"][0] == a["history"][0]  # continued, not retrained


def test_compare_never_continues_an_unfinished_run_with_other_settings(corpus_dir, tmp_path):
    """A run cut short (last.pt, no summary.json) is checked against the grid's settings before it resumes."""
    from lm.config import AS_WRITTEN

    grid = dict(data=str(corpus_dir), cells=("rnn",), norms=("none",), seeds=(0,), progress=False, epochs=1)
    compare.run_grid(tmp_path / "cmp", **grid, max_steps=2, overrides=AS_WRITTEN)
    run = tmp_path / "cmp" / "paper-rnn-none-seed0"
    (run / "summary.json").unlink()  # as after a hard kill mid-epoch
    with pytest.raises(ValueError, match=r"last.pt holds a run with other settings \(warmup 'none' there, "
                                         r"'undo' here\)"):
        compare.run_grid(tmp_path / "cmp", **grid, max_steps=2)


def test_a_run_is_the_same_run_on_another_device():
    cfg = TrainConfig(data="d", out="o", device="cpu")
    saved = {**json.loads(json.dumps(asdict(cfg))), "device": "cuda"}
    assert compare._differences(saved, cfg) == {}
    assert compare._differences({**saved, "lr": 99.0}, cfg) == {"lr": (99.0, cfg.lr)}


def test_compare_reads_back_a_run_saved_before_a_setting_existed(corpus_dir, tmp_path, monkeypatch):
    """A saved config without a setting (the committed runs predate ``ceiling`` and ``warmup_halvings``) is the
    run of the code that made it and is read back; a setting it names with another value is still an error."""
    grid = dict(data=str(corpus_dir), cells=("rnn",), norms=("none",), seeds=(0,), progress=False, epochs=1,
                max_steps=2)
    done = compare.run_grid(tmp_path / "cmp", **grid)
    summary_path = tmp_path / "cmp" / "paper-rnn-none-seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    for name in ("ceiling", "warmup_halvings"):
        del summary["config"][name]
    summary_path.write_text(json.dumps(summary))
    calls = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: calls.append(1))
    again = compare.run_grid(tmp_path / "cmp", **grid, train_missing=False)
    assert calls == [] and again["runs"] == [{**done["runs"][0], "config": summary["config"]}]
    summary["config"]["undo_factor"] = 1e30
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"other settings \(undo_factor 1e\+30 there, 100.0 here\)"):
        compare.run_grid(tmp_path / "cmp", **grid, train_missing=False)


def test_compare_summarize_trains_nothing_and_names_the_missing_runs(corpus_dir, tmp_path, monkeypatch):
    """--summarize: the table of what is finished (a run of a smaller budget or still running is missing), no
    training; a grid with nothing finished is an error."""
    grid = dict(data=str(corpus_dir), cells=("rnn",), norms=("none",), progress=False, epochs=1, max_steps=2)
    done = compare.run_grid(tmp_path / "cmp", **grid, seeds=(0,))
    compare.run_grid(tmp_path / "cmp", **{**grid, "max_steps": 1}, seeds=(1,))
    calls = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: calls.append(1))
    results = compare.run_grid(tmp_path / "cmp", **grid, seeds=(0, 1, 2), train_missing=False)
    assert calls == [] and results["missing"] == ["paper-rnn-none seed 1", "paper-rnn-none seed 2"]
    assert results["runs"] == done["runs"] and results["table"]["paper-rnn-none"]["valid"]["n"] == 1
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| paper-rnn-none | 1 |" in md
    assert "not finished yet: paper-rnn-none seed 1, paper-rnn-none seed 2." in md
    runs_table = md[md.index("| run |"):].split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in runs_table}) == 1, runs_table  # every row as wide as the head
    with pytest.raises(ValueError, match="0 given more than once in --seeds"):
        compare.run_grid(tmp_path / "cmp", **grid, seeds=(0, 1, 0))
    assert calls == []
    with pytest.raises(ValueError, match="holds no finished or diverged run of this grid"):
        compare.run_grid(tmp_path / "cmp", **grid, seeds=(2,), train_missing=False)


def test_compare_reads_a_run_back_wherever_its_corpus_lies(corpus_dir, tmp_path, monkeypatch):
    """A run recorded with the corpus in one folder is the same run with the same files in another (the
    committed results, read on another machine); other files are another corpus, an error.  Old records
    without the recorded SHA-256 are checked against their folder when this machine has it."""
    import hashlib
    import shutil

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(corpus_dir, here)
    grid = dict(cells=("rnn",), norms=("none",), seeds=(0,), progress=False, epochs=1, max_steps=2)
    (run,) = compare.run_grid(tmp_path / "cmp", data=str(here), **grid)["runs"]
    digests = b"".join(hashlib.sha256((corpus_dir / f"{s}.txt").read_bytes()).digest()
                       for s in ("train", "valid", "test"))
    assert run["corpus_sha256"] == hashlib.sha256(digests).hexdigest()
    assert load_checkpoint(tmp_path / "cmp" / "paper-rnn-none-seed0" / "last.pt")["corpus_sha256"] == \
           run["corpus_sha256"]
    shutil.move(here, there)  # the folder the run names is gone; the same files are elsewhere
    calls = []
    monkeypatch.setattr(Trainer, "__init__", lambda self, *a, **k: calls.append(1))
    again = compare.run_grid(tmp_path / "cmp", data=str(there), **grid, train_missing=False)
    assert calls == [] and again["runs"][0]["test_ppl"] == run["test_ppl"]
    other = tmp_path / "other"
    shutil.copytree(there, other)
    (other / "valid.txt").write_text((other / "valid.txt").read_text() + "w1 w2\n")
    with pytest.raises(ValueError, match=rf"data '{here}' there, '{other}' here \(a corpus is the run's when "
                                         r"its files' SHA-256 match\)"):
        compare.run_grid(tmp_path / "cmp", data=str(other), **grid, train_missing=False)
    summary = tmp_path / "cmp" / "paper-rnn-none-seed0" / "summary.json"
    old = json.loads(summary.read_text())
    del old["corpus_sha256"]  # as recorded before the field existed
    summary.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="other settings"):  # nothing to check the files against
        compare.run_grid(tmp_path / "cmp", data=str(there), **grid, train_missing=False)
    shutil.copytree(there, here)
    assert compare.run_grid(tmp_path / "cmp", data=str(there), **grid, train_missing=False)["runs"][0]["seed"] == 0


def test_compare_takes_the_gru_presets(corpus_dir, tmp_path):
    """--cells gru: the GRU presets (gru-online, gru-none: seqnorm.GRU and torch.nn.GRU), no paper figure, a plot
    of their own."""
    results = compare.run_grid(tmp_path / "cmp", data=str(corpus_dir), cells=("gru", "lstm"), norms=("online", "none"),
                               seeds=(0,), max_steps=2, progress=False, epochs=1)
    assert set(results["table"]) == {"gru-online", "gru-none", "paper-lstm-online", "paper-lstm-none"}
    assert results["table"]["gru-online"]["paper_valid"] is None
    assert [r["config"]["cell"] for r in results["runs"][:2]] == ["gru", "gru-cudnn"]
    assert [r["config"]["lr"] for r in results["runs"][:2]] == [3.25, 1.75]  # docs/gru.md: chosen on 3 seeds
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| gru-online | 1 |" in md and "113.4" in md
    assert (tmp_path / "cmp" / "valid_ppl.png").exists()


def _fake_run(cell, norm, seed, valid, per_batch, seconds=(10.0, 20.0), machine="CPU X", lr=1.0):
    history = [{"event": "epoch", "epoch": e + 1, "step": 5 * (e + 1), "valid_ppl": valid + e,
                "valid_ppl_mean_batch_exp": per_batch + e, "time_s": t, "machine": machine}
               for e, t in enumerate(seconds)]
    return {"preset": f"paper-{cell}-{norm}", "seed": seed, "status": "finished",
            "config": {"cell": cell, "norm": norm, "lr": lr, "epochs": len(seconds)},
            "history": history, "best_valid_ppl": valid, "best_step": 5}


def test_paired_differences_are_per_seed_in_both_measures():
    """Hand-made runs: online 100 / layer 110 / none 130 on seed 0 (per-batch 105 / 116 / 137), and only layer and
    none on seed 1; each difference is the first norm's best minus the second's, same cell and seed."""
    runs = [_fake_run("lstm", "online", 0, 100.0, 105.0), _fake_run("lstm", "layer", 0, 110.0, 116.0),
            _fake_run("lstm", "none", 0, 130.0, 137.0), _fake_run("lstm", "layer", 1, 120.0, 125.0),
            _fake_run("lstm", "none", 1, 119.0, 126.5), _fake_run("rnn", "online", 0, 200.0, 210.0)]
    rows = [line for line in compare.paired_table(runs).splitlines() if line.startswith("| lstm")]
    assert rows == ["| lstm | 0 | -10.0 (-11.0) | -20.0 (-21.0) |", "| lstm | 1 | — | +1.0 (-1.5) |"]
    assert compare.paired_table(runs[-1:]) == ""  # no pair: no table
    slow = _fake_run("rnn", "none", 0, 150.0, 160.0, seconds=(100.0, 3600.0, 140.0))  # one epoch slowed by other work
    line = compare.compute_line(runs + [slow])
    # summed: 6 x 30 s + 3840 s = 4020 s = 1.1 h; at the median epoch: 6 x 2 x 15 s + 3 x 140 s = 600 s = 0.17 h
    assert line == ("Training time of these runs, summed: 1.1 hours on CPU X; at each run's median epoch time: "
                    "0.2 hours of single-thread runs, 0.1 hours of wall time with two side by side on a 2-core CPU.\n")


def test_the_compute_line_counts_each_thread_count_apart():
    """A run of 2 threads is not a single-thread run: its hours stand apart, and so do the epochs of a run resumed
    with another thread count; the thread count is read from the machine string each epoch records."""
    one = "AMD EPYC (AVX2), 1 thread, torch 2.13.0+cpu"
    two = "AMD EPYC (AVX512), 2 threads, torch 2.13.0+cpu"
    assert (threads_of(one), threads_of(two), threads_of("NVIDIA H100, torch 2.13.0+cu128"), threads_of(None)) == \
           (1, 2, 1, 1)
    runs = [_fake_run("rnn", "online", 0, 100.0, 105.0, seconds=(3600.0, 3600.0), machine=one),
            _fake_run("rnn", "online", 1, 100.0, 105.0, seconds=(1800.0, 1800.0, 5400.0), machine=two)]
    resumed = _fake_run("rnn", "layer", 1, 100.0, 105.0, seconds=(3600.0, 1800.0), machine=one)
    resumed["history"][1]["machine"] = two
    # one thread: 2 x 3600 s + 3600 s = 3 h; two threads: 3 x 1800 s (the median) + 1800 s = 2 h
    assert compare.compute_line(runs + [resumed]) == (
        f"Training time of these runs, summed: 6.0 hours on {one}; {two}; at each run's median epoch time: "
        "3.0 hours of single-thread runs, 1.5 hours of wall time with two side by side on a 2-core CPU; "
        "2.0 hours of 2-thread runs.\n")


def test_the_cell_table_gives_each_norms_median_and_range_in_both_measures_beside_the_paper():
    """Hand-made runs: LSTM online on seeds 0, 1, 2 (best 100 / 120 / 110, per-batch 104 / 125 / 115), layer on
    seed 0 only, no none run; a GRU run has no paper row. The row names each norm's seeds where they differ."""
    runs = [_fake_run("lstm", "online", 0, 100.0, 104.0, lr=6.5),
            _fake_run("lstm", "online", 1, 120.0, 125.0, lr=6.5),
            _fake_run("lstm", "online", 2, 110.0, 115.0, lr=6.5),
            _fake_run("lstm", "layer", 0, 130.0, 136.0, lr=3.25),
            _fake_run("gru", "online", 0, 150.0, 155.0, seconds=(1.0, 1.0, 1.0))]
    lines = compare.cell_table(runs).splitlines()
    assert lines[2:6] == [
        "| LSTM: lr 6.5 / 3.25 / —, 2 epochs, seeds 0, 1, 2 / 0 / — | corpus | 110.0 (100.0–120.0) | 130.0 | — |",
        "| | per-batch | 115.0 (104.0–125.0) | 136.0 | — |",
        "| | paper, per-batch | 113.4 (110.8–123.0) | 121.6 (118.2–21217.6) | 124.4 (121.0–133293.5) |",
        "| GRU: lr 1 / — / —, 3 epochs, seeds 0 | corpus | 150.0 | — | — |"]
    assert lines[7] == ""  # no paper row for the GRU
    same = [run for run in runs if run["seed"] == 0 and run["preset"].startswith("paper-lstm")]
    assert ", 2 epochs, seeds 0 | corpus" in compare.cell_table(same)  # every norm on the same seeds: one list


def test_every_epoch_record_names_the_machine(corpus_dir, tmp_path):
    from lm import machine
    cfg = TrainConfig(data=str(corpus_dir), out=str(tmp_path / "m"), emsize=8, nhid=8, epochs=1, max_steps=2,
                      batch_size=4, bptt=6, eval_batch_size=2, eval_bptt=4)
    (record,) = Trainer(cfg, progress=False).run()["history"]
    assert record["machine"] == machine.describe(torch.device("cpu"))
    assert machine.cpu_model() in record["machine"] and f"torch {torch.__version__}" in record["machine"]
    assert f"({torch.backends.cpu.get_cpu_capability()})" in record["machine"]  # AVX2 or AVX512: speed, last bits


def test_retaken_counts_a_run_stopped_mid_epoch():
    """A --max-steps run ends on an "end" record, which holds the retaken updates of its epoch so far; an "end"
    record that a later epoch record continued is counted in that one (the epoch's sums carry over)."""
    end, epoch = (lambda n: {"event": "end", "retries": n}), (lambda n: {"event": "epoch", "retries": n})
    assert compare._retaken({"history": [end(1)]}) == 1
    assert compare._retaken({"history": [epoch(2), end(1)]}) == 3
    assert compare._retaken({"history": [end(1), epoch(3)]}) == 3


def test_clip_moves_the_weights_by_lr_times_clip(corpus_dir, tmp_path):
    """--clip c on a step whose gradient norm is above c: plain SGD without weight decay moves the weights by
    -lr * g * c / ||g||, a step of norm lr * c exactly."""
    cfg = small_config(corpus_dir, tmp_path / "run", max_steps=1, lr=2.0, weight_decay=0.0, clip=1e-3)
    trainer = Trainer(cfg, progress=False, log_every=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.run()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before)])
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert step["grad_norm"] > 1e-3 and step["undone"] == "as written"
    assert float(torch.linalg.vector_norm(moved)) == pytest.approx(2.0 * 1e-3, rel=1e-4)


def test_every_epoch_starts_from_a_zero_hidden_state(corpus_dir, tmp_path):
    """As in pytorch/examples' word_language_model, the state carried from segment to segment is reset when an
    epoch begins: the checkpoint at an epoch's end holds zeros, one saved inside an epoch the carried state."""
    train(small_config(corpus_dir, tmp_path / "epoch", epochs=1), progress=False)
    train(small_config(corpus_dir, tmp_path / "inside", max_steps=3), progress=False)
    states = {name: load_checkpoint(tmp_path / name / "last.pt")["train"]["hidden"] for name in ("epoch", "inside")}
    assert all(not h.any() for h in states["epoch"]) and all(h.any() for h in states["inside"])


def test_the_test_perplexity_is_that_of_the_best_validation_epoch(corpus_dir, tmp_path, monkeypatch):
    """Epoch 2 validates worse (forced): the summary's test perplexity is best.pt's (epoch 1), measured here by
    loading it and evaluating the test split, not last.pt's."""
    validate = Trainer._evaluate

    def worse_in_epoch_2(self, split):
        result = validate(self, split)
        return {**result, "perplexity": result["perplexity"] * (10.0 if self.epoch == 1 else 1.0)}

    monkeypatch.setattr(Trainer, "_evaluate", worse_in_epoch_2)
    summary = train(small_config(corpus_dir, tmp_path / "run", epochs=2), progress=False)
    assert summary["best_epoch"] == 1
    test = load_corpus(corpus_dir).test
    best, last = (load_model(tmp_path / "run" / name)[0] for name in ("best.pt", "last.pt"))
    assert summary["test_ppl"] == pytest.approx(evaluate(best, test, 3, 8)["perplexity"], rel=1e-6)
    assert summary["test_ppl"] != pytest.approx(evaluate(last, test, 3, 8)["perplexity"], rel=1e-6)


def test_weight_decay_adds_lr_times_decay_times_the_weights_to_the_step(corpus_dir, tmp_path):
    """SGD's weight decay d: from the same weights and batch, the step with decay differs from the step without
    by -lr * d * w0 exactly (the gradient term is the same; both runs start from the same seeded weights w0)."""
    runs = {}
    for decay in (0.0, 0.25):
        trainer = Trainer(small_config(corpus_dir, tmp_path / str(decay), max_steps=1, lr=2.0, weight_decay=decay),
                          progress=False)
        start = [p.detach().clone() for p in trainer.model.parameters()]
        assert trainer.run()["history"][-1]["retries"] == 0
        runs[decay] = [p.detach() for p in trainer.model.parameters()]
    for w0, plain, decayed in zip(start, runs[0.0], runs[0.25]):
        torch.testing.assert_close(decayed - plain, -2.0 * 0.25 * w0, rtol=1e-4, atol=1e-6)


def test_an_epochs_train_loss_is_the_token_mean_of_its_steps_losses(corpus_dir, tmp_path):
    """The epoch record's train loss: each step's loss (steps.jsonl) weighted by its tokens, segment x batch."""
    cfg = small_config(corpus_dir, tmp_path / "run", epochs=1)
    record = Trainer(cfg, progress=False, log_every=1).run()["history"][-1]
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    tokens = [s["segment"] * cfg.batch_size for s in steps]
    mean = sum(s["loss"] * t for s, t in zip(steps, tokens)) / sum(tokens)
    assert record["event"] == "epoch" and record["train_loss"] == pytest.approx(mean, rel=1e-9)
    assert record["train_ppl"] == pytest.approx(math.exp(mean), rel=1e-9)
