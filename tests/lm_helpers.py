"""Shared helpers for the lm tests: the PTB folder and small generated corpora."""
import functools
import os
import random
from pathlib import Path

import pytest

from lm.data import DATA_ENV, DEFAULT_DATA_DIR
from lm.download import PTB_FILES, DownloadError, download_ptb

REPO = Path(__file__).resolve().parents[1]
GET_PTB = "seqnorm-lm data ptb"


def locate_ptb(env: dict, default: Path, fetch=download_ptb) -> tuple[Path | None, str]:
    """Where a user keeps PTB: ``$SEQNORM_DATA``, else the CLI's default folder.  Missing or altered files there
    are fetched (``fetch``, verified by SHA-256).  Returns (folder, "") or (None, why not)."""
    folder = Path(env[DATA_ENV]) if env.get(DATA_ENV) else default
    try:
        fetch(folder, progress=False)
    except (DownloadError, OSError) as err:
        return None, (f"PTB is not in {folder} and could not be fetched there ({err}); run `{GET_PTB}` "
                      f"(or set ${DATA_ENV} to a folder holding it)")
    return folder, ""


@functools.cache
def _ptb() -> tuple[Path | None, str]:
    return locate_ptb(os.environ, REPO / DEFAULT_DATA_DIR,
                      fetch=functools.partial(download_ptb, timeout=20.0))


def ptb_dir() -> Path:
    """The verified PTB folder (``locate_ptb``, looked up once per session); without one the test skips with the
    command that gets it, and fails under CI=true, where a skip would hide the PTB tests."""
    folder, why = _ptb()
    if folder is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return folder


def ptb_digests() -> dict[str, str]:
    """{file: SHA-256} that the code ships (lm/download.py)."""
    return {name: digest for name, (_, digest) in PTB_FILES.items()}


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
