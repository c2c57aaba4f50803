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
from lm.compare import _same_corpus
from lm.data import (EOS, PTB_FINGERPRINT, UNK, WordVocab, corpus_fingerprint, load_corpus, resolve_data_dir,
                     split_paths)
import lm_helpers
from lm_helpers import REPO, locate_ptb, ptb_digests, ptb_dir, write_corpus


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
    assert WordVocab.build(["d b", "b d"]).itos == ["d", "b", EOS, UNK]  # a tie of three: first seen, not sorted
    with pytest.raises(ValueError, match="repeated words"):  # e.g. a damaged checkpoint's word list
        WordVocab(["a", "b", "a"])
    with pytest.raises(ValueError, match="unknown word") as err:
        c.vocab.encode_prompt("a z")
    assert "lower case" not in str(err.value)
    with pytest.raises(ValueError, match=r"\['A', 'z'\].*this vocabulary is lower case: a\)"):
        c.vocab.encode_prompt("A b z")
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
    """A loopback HTTP server over a folder; ``fail=True`` answers every request with 500, ``stall=True`` answers
    none until the server is closed."""

    def __init__(self, root, fail=False, stall=False):
        self.released = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(handler):
                if stall:
                    self.released.wait(30)
                if fail:
                    handler.send_error(500, "boom")
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
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    for name, (remote, _) in download.PTB_FILES.items():
        shutil.copy(ptb_dir() / name, root / remote)
    return root


def test_the_ptb_files_have_the_digests_the_code_ships():
    """The corpus the tests read hashes to lm/download.py's digests, and data/README.md lists the same ones."""
    for name, digest in ptb_digests().items():
        assert hashlib.sha256((ptb_dir() / name).read_bytes()).hexdigest() == digest, name
    readme = (REPO / "data" / "README.md").read_text()
    for name, digest in ptb_digests().items():
        assert f"{digest}  {name}" in readme, name


def test_ptb_is_found_in_the_clis_default_folder_without_seqnorm_data(tmp_path, served):
    default = tmp_path / "data" / "ptb"
    default.mkdir(parents=True)
    for name, (remote, _) in download.PTB_FILES.items():
        shutil.copy(served / remote, default / name)
    unreachable = partial(download.download_ptb, base_url="http://127.0.0.1:9/")  # any fetch would fail
    assert locate_ptb({}, default, fetch=unreachable) == (default, "")
    assert locate_ptb({"SEQNORM_DATA": str(tmp_path / "elsewhere")}, default, fetch=unreachable)[0] is None


def test_without_ptb_or_network_the_ptb_tests_skip_naming_the_command(tmp_path, monkeypatch):
    def no_network(folder, progress):
        raise download.DownloadError("downloading https://example.invalid failed: no network")

    folder, why = locate_ptb({}, tmp_path / "data" / "ptb", fetch=no_network)
    assert folder is None and "seqnorm-lm data ptb" in why
    monkeypatch.setattr(lm_helpers, "_ptb", lambda: (folder, why))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="seqnorm-lm data ptb"):
        lm_helpers.ptb_dir()
    monkeypatch.setenv("CI", "true")  # in CI a missing corpus is a failure, not a skip
    with pytest.raises(pytest.fail.Exception, match="seqnorm-lm data ptb"):
        lm_helpers.ptb_dir()


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
    assert not (tmp_path / "ptb").exists()  # the folder it made is not left behind empty


def test_a_corrupt_file_already_there_is_downloaded_again(served, tmp_path):
    dest = tmp_path / "ptb"
    dest.mkdir()
    (dest / "valid.txt").write_text("not the treebank\n")
    with _Server(served) as server:
        status = download.download_ptb(dest, server.url, progress=False)
    assert status["valid.txt"] == "downloaded"
    assert download.sha256_of(dest / "valid.txt") == download.PTB_FILES["valid.txt"][1]


def test_a_server_that_does_not_answer_times_out_and_the_users_folder_stays(served, tmp_path):
    dest = tmp_path / "ptb"
    dest.mkdir()  # made by the user: kept even though the download leaves it empty
    with _Server(served, stall=True) as server, pytest.raises(download.DownloadError, match="timed out"):
        download.download_ptb(dest, server.url, progress=False, timeout=0.2)
    assert dest.is_dir() and not any(dest.iterdir())


def test_a_corpus_folder_absent_here_stands_for_the_verified_ptb(tmp_path):
    """Reading runs back without their corpus: a run recorded on PTB matches a folder this machine lacks, a run
    on another corpus does not."""
    other = corpus_fingerprint(write_corpus(tmp_path / "toy"))
    missing = str(tmp_path / "no-corpus-here")
    assert _same_corpus("/elsewhere/ptb", PTB_FINGERPRINT, missing)
    assert not _same_corpus("/elsewhere/toy", other, missing)
    assert not _same_corpus("/elsewhere/toy", PTB_FINGERPRINT, str(tmp_path / "toy"))


def test_the_shipped_ptb_fingerprint_is_the_one_its_files_give():
    assert corpus_fingerprint(ptb_dir()) == PTB_FINGERPRINT
