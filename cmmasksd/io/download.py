"""Resumable, checksum-verified downloads from a list of mirrors.

The official RefCOCO links died in 2022 and COCO train2014 is 13 GB: a download that cannot
resume, does not verify what it got, or stops at the first dead mirror wastes hours or silently
hands corrupt data to training.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from tqdm import tqdm

# Small enough that an interrupted read loses little: urllib3 drops a partly filled chunk.
_CHUNK = 1 << 16
# Failures worth another try at the same mirror: the network, not the request, was at fault.
_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


class DownloadError(RuntimeError):
    """No mirror delivered a verified file; `failures` holds (url, reason) for each mirror."""

    def __init__(self, dest: Path, failures: list[tuple[str, str]]):
        self.dest = dest
        self.failures = failures
        reasons = "\n".join(f"  {url}: {why}" for url, why in failures)
        super().__init__(f"could not download {dest.name} from any mirror:\n{reasons}")


class ChecksumError(DownloadError, ValueError):
    """Some mirror served a file with the wrong size or digest, and no mirror served a good one."""


class _Transient(Exception):
    """A failure worth retrying at the same mirror (5xx, 429, truncated body)."""


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file (4xx, retries exhausted): try the next one."""


class _Corrupt(Exception):
    """This mirror delivered a complete file that does not match the expected size or digest."""


def download(
    urls: Sequence[str],
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Fetch `dest` from the first of `urls` that delivers a file matching `size`/`sha256`/`md5`.

    An existing `dest` that matches is returned without touching the network (with nothing to
    check, any existing `dest` is trusted: this function only ever writes verified files). The
    bytes go to `<dest>.part` first, which a later call resumes with a `Range` request; `dest`
    appears only once complete and verified. Each mirror gets `retries` more attempts, sleeping
    `backoff * 2**k` seconds between them.
    """
    dest = Path(dest)
    if dest.is_file() and file_mismatch(dest, sha256, md5, size) is None:
        return dest
    if not urls:
        raise ValueError(f"no URL given to download {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    failures: list[tuple[str, str]] = []
    corrupt = False
    with requests.Session() as session:
        # Ranges count bytes of the file as stored: never let the server compress it on the fly.
        session.headers["Accept-Encoding"] = "identity"
        for url in urls:
            try:
                _download_from(session, url, part, sha256, md5, size, retries, backoff, timeout, progress)
            except _Corrupt as err:
                corrupt = True
                failures.append((url, str(err)))
            except (_MirrorFailed, requests.RequestException) as err:
                failures.append((url, str(err)))
            else:
                os.replace(part, dest)
                return dest
    raise (ChecksumError if corrupt else DownloadError)(dest, failures)


def _download_from(
    session: requests.Session,
    url: str,
    part: Path,
    sha256: str | None,
    md5: str | None,
    size: int | None,
    retries: int,
    backoff: float,
    timeout: float,
    progress: bool,
) -> None:
    """Leave a verified `part` from one mirror, resuming and retrying transient failures."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        offset = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(session, url, part, offset, size, timeout, progress)
        except (_Transient, *_TRANSIENT) as err:
            last = f"{type(err).__name__}: {err}"
            continue
        why = file_mismatch(part, sha256, md5, size)
        if why is None:
            return
        part.unlink()
        if not offset:
            raise _Corrupt(why)
        # The first bytes came from an earlier run or another mirror: blame them, start over.
        last = f"{why} after resuming at byte {offset}"
    raise _MirrorFailed(f"gave up after {retries + 1} attempts; last error: {last}")


def _fetch_once(
    session: requests.Session,
    url: str,
    part: Path,
    offset: int,
    size: int | None,
    timeout: float,
    progress: bool,
) -> None:
    """One GET of `url` into `part`, asking only for the bytes after `offset` when it is > 0."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        status = response.status_code
        if status == 416:  # nothing after `offset`: the part is complete, or too long (verification says which)
            return
        if status >= 500 or status == 429:
            raise _Transient(f"HTTP {status} {response.reason}")
        if status >= 400:
            raise _MirrorFailed(f"HTTP {status} {response.reason}")
        if status != 206:  # the server ignored the Range header and sends the whole file
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        with part.open("ab" if offset else "wb") as out, tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.stem,
            disable=not progress,
        ) as bar:
            for chunk in response.iter_content(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Transient(f"truncated body: got {got} of {total} bytes")


def file_mismatch(path: Path, sha256: str | None, md5: str | None, size: int | None) -> str | None:
    """Why `path` is not the expected file, naming both digests, or None when it is.

    Digests are streamed, not loaded: a 13 GB zip costs time, not memory.
    """
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size mismatch for {path.name}: expected {size} bytes, got {actual_size}"
    wanted = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if not wanted:
        return None
    hashes = {name: hashlib.new(name, usedforsecurity=False) for name in wanted}
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            for digest in hashes.values():
                digest.update(chunk)
    for name, expected in wanted.items():
        actual = hashes[name].hexdigest()
        if actual != expected:
            return f"{name} mismatch for {path.name}: expected {expected}, got {actual}"
    return None
