"""lm data: PTB reader and vocabulary, other corpora, batchify/BPTT segments, the downloader."""
import hashlib
import http.server
import shutil
import threading
from functools import partial

import pytest
import torch

from lm import download
from lm.batching import SegmentLengths, batchify, segments
from lm.data import EOS, UNK, WordVocab, load_corpus, resolve_data_dir, split_paths
from lm_helpers import ptb_dir, write_corpus


@pytest.fixture(scope="module")
def ptb():
    return load_corpus(ptb_dir())


def test_ptb_counts_and_vocabulary(ptb):
    assert (ptb.train.numel(), ptb.valid.numel(), ptb.test.numel()) == (929_589, 73_760, 82_430)
    assert len(ptb.vocab) == 10_000
    assert EOS in ptb.vocab.stoi and UNK in ptb.vocab.stoi


def test_ptb_tokens_follow_the_text(ptb):
    path = split_paths(ptb_dir())["valid"]
    first = open(path).readline().split() + [EOS]
    assert ptb.vocab.decode(ptb.valid[:len(first)].tolist()).split() == first[:-1]
    assert ptb.valid[len(first) - 1] == ptb.vocab.stoi[EOS]


def test_ptb_file_naming_and_missing_files(tmp_path):
    write_corpus(tmp_path / "a", names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"))
    assert load_corpus(tmp_path / "a").train.numel() > 0
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.txt.*seqnorm-lm data ptb"):
        load_corpus(tmp_path / "b")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQNORM_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("x") == type(tmp_path)("x")
    monkeypatch.delenv("SEQNORM_DATA")
    assert str(resolve_data_dir(None)) == "data/ptb"


def test_vocab_built_from_train_with_unk(tmp_path):
    (tmp_path / "train.txt").write_text("a b a\nc a\n")
    (tmp_path / "valid.txt").write_text("a z\n")
    (tmp_path / "test.txt").write_text("b\n")
    c = load_corpus(tmp_path)
    assert c.vocab.itos == ["a", EOS, "b", "c", UNK]  # by count, ties in first-seen order, <unk> added
    s = c.vocab.stoi
    assert c.train.tolist() == [s["a"], s["b"], s["a"], s[EOS], s["c"], s["a"], s[EOS]]
    assert c.valid.tolist() == [s["a"], s[UNK], s[EOS]]
    capped = WordVocab.build(["a b a", "c a"], max_size=3)
    assert capped.itos == ["a", EOS, UNK]
    with pytest.raises(ValueError, match="unknown word"):
        c.vocab.encode_prompt("a z")
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "train.txt").write_text("\n")
        load_corpus(tmp_path)


def test_sentencepiece_corpus(tmp_path):
    write_corpus(tmp_path, vocab=60)
    c = load_corpus(tmp_path, tokenizer="sentencepiece", vocab_size=50)
    assert c.vocab.kind == "sentencepiece" and len(c.vocab) <= 50
    first_line = open(tmp_path / "valid.txt").readline().strip()
    n = len(c.vocab.encode_prompt(first_line))
    assert c.vocab.decode(c.valid[:n + 1].tolist()).split("\n")[0] == first_line
    assert c.valid[n] == c.vocab.eos_id
    with pytest.raises(ValueError, match="vocab-size"):
        load_corpus(tmp_path, tokenizer="sentencepiece")


def test_batchify_columns_are_contiguous_streams():
    ids = torch.arange(23)
    data = batchify(ids, 4)
    assert data.shape == (5, 4)
    for b in range(4):
        assert data[:, b].tolist() == list(range(5 * b, 5 * b + 5))
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(5), 4)


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_segments_cover_the_data_once(mode):
    data = batchify(torch.arange(400), 4)
    lengths = SegmentLengths(7, mode, seed=3)
    seen, expected_pos = [], 0
    for pos, x, y in segments(data, lengths):
        assert pos == expected_pos and x.shape == y.shape and x.shape[1] == 4
        assert torch.equal(y, data[pos + 1:pos + 1 + x.shape[0]])
        assert 1 <= x.shape[0] <= 7 and (mode == "random" or x.shape[0] == 7 or pos + x.shape[0] == 99)
        seen.append(x)
        expected_pos += x.shape[0]
    assert torch.equal(torch.cat(seen), data[:-1])


def test_random_lengths_are_uniform_and_resumable():
    a = SegmentLengths(10, "random", seed=1)
    draws = [a.next() for _ in range(2000)]
    assert set(draws) == set(range(2, 11))
    state = a.state_dict()
    nxt = [a.next() for _ in range(20)]
    b = SegmentLengths(10, "random", seed=99)
    b.load_state_dict(state)
    assert [b.next() for _ in range(20)] == nxt
    with pytest.raises(ValueError, match="bptt mode"):
        SegmentLengths(10, "exotic")


class _Server:
    """A loopback HTTP server over a folder; ``fail=True`` answers every request with 500."""

    def __init__(self, root, fail=False):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                if fail:
                    self.send_error(500, "boom")
                else:
                    super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for name, (remote, _) in download.PTB_FILES.items():
        shutil.copy(ptb_dir() / name, root / remote)
    return root


def test_ptb_sums_match_shared_sha256sums():
    lines = (ptb_dir() / "SHA256SUMS").read_text().split("\n")
    shared = {name: digest for digest, name in (ln.split() for ln in lines if ln.strip())}
    assert shared == {name: digest for name, (_, digest) in download.PTB_FILES.items()}


def test_download_good_then_present(served, tmp_path):
    dest = tmp_path / "ptb"
    with _Server(served) as server:
        assert download.download_ptb(dest, server.url, progress=False) == {n: "downloaded" for n in download.PTB_FILES}
        assert download.download_ptb(dest, server.url, progress=False) == {n: "present" for n in download.PTB_FILES}
    for name, (_, digest) in download.PTB_FILES.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in dest.iterdir()) == sorted(download.PTB_FILES)
    assert load_corpus(dest).valid.numel() == 73_760


def test_download_bad_checksum_keeps_nothing(served, tmp_path):
    (served / "ptb.valid.txt").write_text("not the treebank\n")
    dest = tmp_path / "ptb"
    with _Server(served) as server, pytest.raises(download.DownloadError, match="checksum mismatch"):
        download.download_ptb(dest, server.url, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == ["train.txt"]  # valid.txt not kept, no temp file left


def test_download_server_error(served, tmp_path):
    with _Server(served, fail=True) as server, pytest.raises(download.DownloadError, match="500"):
        download.download_ptb(tmp_path / "ptb", server.url, progress=False)
    assert list((tmp_path / "ptb").iterdir()) == []
