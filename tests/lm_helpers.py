"""Shared helpers for the lm tests: the PTB folder and small generated corpora."""
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ptb_dir() -> Path:
    """$SEQNORM_DATA, else ../shared/data/ptb beside the repository; a clear failure when neither exists."""
    candidates = [Path(os.environ["SEQNORM_DATA"])] if os.environ.get("SEQNORM_DATA") else []
    candidates.append(REPO.parent / "shared" / "data" / "ptb")
    for c in candidates:
        if (c / "train.txt").is_file():
            return c
    pytest.fail(f"PTB not found in {[str(c) for c in candidates]}; set SEQNORM_DATA to the verified PTB folder")


def write_corpus(directory: Path, n_train=3000, n_eval=600, vocab=40, seed=0, names=("train.txt", "valid.txt",
                                                                                       "test.txt")) -> Path:
    """A small corpus with some structure (a noisy cyclic word order), so a model can learn something."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]

    def text(n):
        lines, line, k = [], [], rng.randrange(vocab)
        for _ in range(n):
            k = (k + 1) % vocab if rng.random() < 0.8 else rng.randrange(vocab)
            line.append(words[k])
            if len(line) >= rng.randint(5, 12):
                lines.append(" ".join(line))
                line = []
        return "\n".join(lines + [" ".join(line)]) + "\n"

    directory.mkdir(parents=True, exist_ok=True)
    for name, n in zip(names, (n_train, n_eval, n_eval)):
        (directory / name).write_text(text(n))
    return directory
