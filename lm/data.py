"""Text corpora for language modeling: where the files are, tokenizers, id tensors.

A corpus is a folder with ``train.txt``, ``valid.txt`` and ``test.txt`` (the
``ptb.train.txt`` naming is accepted too).  Word level: each line is split on
whitespace and ends with ``<eos>``; the vocabulary is built from the train
split only (10,000 words for PTB) and unknown words map to ``<unk>``.
Subword level: a SentencePiece model trained on the train split; each line
ends with the model's end-of-sentence id.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .download import PTB_FILES, sha256_of

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
DEFAULT_DATA_DIR = Path("data/ptb")
DATA_ENV = "SEQNORM_DATA"


def resolve_data_dir(data: str | os.PathLike | None = None) -> Path:
    """``data`` if given, else ``$SEQNORM_DATA``, else ``data/ptb``."""
    if data is not None:
        return Path(data)
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def split_paths(directory: str | os.PathLike) -> dict[str, Path]:
    """The train/valid/test files of a corpus folder, or an error saying where it looked."""
    directory = Path(directory)
    paths, missing = {}, []
    for split in SPLITS:
        candidates = [directory / f"{split}.txt", directory / f"ptb.{split}.txt"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(" or ".join(str(p) for p in candidates))
        paths[split] = found
    if missing:
        raise FileNotFoundError(
            f"corpus files not found; looked for {'; '.join(missing)}. Get PTB with `seqnorm-lm data ptb --dir "
            f"{directory}`, or point --data (or ${DATA_ENV}) at a folder with train.txt, valid.txt and test.txt")
    return paths


def corpus_fingerprint(directory: str | os.PathLike) -> str:
    """SHA-256 of the train, valid and test files' own SHA-256s, in that order: the corpus's identity
    wherever its folder lies, so that a run recorded on one machine is recognized on another."""
    return _fingerprint_of(sha256_of(path) for path in split_paths(directory).values())


def _fingerprint_of(file_digests) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in file_digests)).hexdigest()


PTB_FINGERPRINT = _fingerprint_of(PTB_FILES[f"{split}.txt"][1] for split in SPLITS)  # the verified PTB's


def read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte offset {e.start} ({e.reason}); convert it to UTF-8") from None


class WordVocab:
    """Word-level tokenizer: a fixed list of words; ``<eos>`` ends each line, unknown words become ``<unk>``."""

    kind = "word"

    def __init__(self, itos: list[str]):
        if len(set(itos)) != len(itos):
            raise ValueError("vocabulary has repeated words")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, lines: list[str], max_size: int | None = None) -> "WordVocab":
        """Words by descending count (first occurrence breaks ties); ``<eos>`` and ``<unk>`` always included."""
        counts = Counter(w for line in lines for w in line.split() + [EOS])
        counts.setdefault(UNK, 0)
        ranked = sorted(counts, key=lambda w: -counts[w])  # stable: ties keep first-occurrence order
        uncapped = len(ranked)
        if max_size is not None:
            if max_size < 2:
                raise ValueError(f"vocab_size must be at least 2 (<eos> and <unk>), got {max_size}")
            keep = set([w for w in ranked if w not in (EOS, UNK)][:max_size - 2]) | {EOS, UNK}
            ranked = [w for w in ranked if w in keep]
        vocab = cls(ranked)
        vocab.uncapped_size = uncapped  # how many distinct words the text had, for error messages
        return vocab

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, WordVocab) and self.itos == other.itos

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    def encode_lines(self, lines: list[str]) -> list[int]:
        unk, stoi = self.stoi[UNK], self.stoi
        return [stoi.get(w, unk) for line in lines for w in line.split() + [EOS]]

    def encode_prompt(self, text: str) -> list[int]:
        """Strict encoding for user input: an unknown word is an error, not ``<unk>``."""
        unknown = [w for w in text.split() if w not in self.stoi]
        if unknown:
            lower = [w for w in unknown if w.lower() in self.stoi]
            hint = f"; this vocabulary is lower case: {' '.join(w.lower() for w in lower[:5])}" if lower else ""
            raise ValueError(f"unknown word(s) {unknown[:5]} not in the {len(self)}-word vocabulary "
                             f"(write {UNK} for an unknown word{hint})")
        return [self.stoi[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join("\n" if self.itos[i] == EOS else self.itos[i] for i in ids).replace(" \n ", "\n")

    def state(self) -> dict:
        return {"kind": self.kind, "itos": self.itos}


class SentencePieceVocab:
    """Subword tokenizer: a SentencePiece model trained on the train split; the model travels with checkpoints."""

    kind = "sentencepiece"

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self.model = bytes(model)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)

    @classmethod
    def build(cls, lines: list[str], vocab_size: int) -> "SentencePieceVocab":
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter([ln for ln in lines if ln.strip()]), model_writer=buf,
                                       vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                                       hard_vocab_limit=False, minloglevel=2)
        return cls(buf.getvalue())

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def __eq__(self, other) -> bool:
        return isinstance(other, SentencePieceVocab) and self.model == other.model

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode_lines(self, lines: list[str]) -> list[int]:
        eos = self.sp.eos_id()
        return [i for ids in self.sp.encode(lines) for i in ids + [eos]]

    def encode_prompt(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        eos, lines, cur = self.sp.eos_id(), [], []
        for i in ids:
            if i == eos:
                lines.append(cur)
                cur = []
            else:
                cur.append(i)
        return "\n".join(self.sp.decode(x) for x in lines + [cur])

    def state(self) -> dict:
        return {"kind": self.kind, "model": self.model}


def vocab_from_state(state: dict):
    if state.get("kind") == WordVocab.kind:
        return WordVocab(state["itos"])
    if state.get("kind") == SentencePieceVocab.kind:
        return SentencePieceVocab(state["model"])
    raise ValueError(f"unknown tokenizer kind {state.get('kind')!r}")


@dataclass
class Corpus:
    """A tokenizer and the three splits as 1-D int64 id tensors."""

    vocab: WordVocab | SentencePieceVocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


def load_corpus(data=None, tokenizer: str = "word", vocab_size: int | None = None, vocab=None) -> Corpus:
    """Read a corpus folder (see ``resolve_data_dir``).

    tokenizer: "word" (vocabulary from train, at most ``vocab_size`` words when
    given) or "sentencepiece" (``vocab_size`` pieces).  ``vocab``: use this
    tokenizer instead of building one (e.g. the one saved in a checkpoint).
    """
    paths = split_paths(resolve_data_dir(data))
    lines = {split: read_lines(paths[split]) for split in SPLITS}
    if not any(ln.strip() for ln in lines["train"]):
        raise ValueError(f"the train split {paths['train']} is empty")
    if vocab is None:
        vocab = build_vocab(lines["train"], tokenizer, vocab_size)
    ids = {split: torch.tensor(vocab.encode_lines(lines[split]), dtype=torch.long) for split in SPLITS}
    return Corpus(vocab, ids["train"], ids["valid"], ids["test"])


def build_vocab(train_lines: list[str], tokenizer: str, vocab_size: int | None):
    if tokenizer == "word":
        return WordVocab.build(train_lines, vocab_size)
    if tokenizer == "sentencepiece":
        if vocab_size is None:
            raise ValueError("--tokenizer sentencepiece needs --vocab-size")
        return SentencePieceVocab.build(train_lines, vocab_size)
    raise ValueError(f"tokenizer must be 'word' or 'sentencepiece', got {tokenizer!r}")
