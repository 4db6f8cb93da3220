"""A data source (one downloadable zip) and fetching it onto disk; the sources themselves are
entries of `cmmasksd.catalogue`. `with_settings` overrides a source's mirrors and checksums (the
pipeline takes them from `params.yaml`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmmasksd.io.archive import missing_members, safe_extract_zip, verify_layout
from cmmasksd.io.digest import file_sha256
from cmmasksd.io.download import download, file_mismatch

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Source:
    """One downloadable zip: where to get it, how to check it, and what it unpacks to."""

    name: str
    urls: tuple[str, ...]  # mirrors, tried in order
    sha256: str | None
    md5: str | None
    size: int | None  # bytes
    archive_root: str  # the folder the zip unpacks to
    expected_files: tuple[str, ...]  # inside archive_root; their absence means a wrong layout


_SETTINGS = {"urls", "sha256", "md5", "size"}
_HEX = {"sha256": 64, "md5": 32}


def with_settings(source: Source, settings: Mapping[str, Any]) -> Source:
    """`source` with the given mirrors (`urls`, tried in order) and checks (`sha256`, `md5`, `size`).

    Absent keys keep the catalogue's values; a null check is not made (for a repacked copy).
    """
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ValueError(f"{source.name}: unknown setting(s) {unknown}; expected some of {sorted(_SETTINGS)}")
    changes = dict(settings)
    if "urls" in changes:
        urls = changes["urls"]
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(f"{source.name}: urls must be a non-empty list of URLs, got {urls!r}")
        changes["urls"] = tuple(urls)
    for name, length in _HEX.items():
        value = changes.get(name)
        if value is not None and not (isinstance(value, str) and re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value)):
            raise ValueError(f"{source.name}: {name} must be {length} hex digits or null, got {value!r}")
    size = changes.get("size")
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"{source.name}: size must be a positive number of bytes or null, got {size!r}")
    return dataclasses.replace(source, **changes)


def fetch_source(
    source: Source,
    cache_dir: Path,
    out_dir: Path,
    *,
    urls: list[str] | None = None,
    local: Path | None = None,
    progress: bool = True,
) -> Path:
    """Make `out_dir/<archive_root>` hold the source's files and return that folder.

    `local`, a folder or zip the user already has, replaces the download: a folder (the one
    holding the expected files) is linked as `out_dir/<archive_root>`, or used in place if it is
    that folder; a zip is checked like a download. Otherwise the zip is downloaded from `urls`
    (default: the source's mirrors) into `cache_dir` and verified. A zip is safely extracted into
    `out_dir`, unless a stamp there says this very archive (by digest) was extracted already and
    all its members are still in place: a second fetch does not unpack 13 GB again.
    """
    out_dir = Path(out_dir)
    folder = out_dir / source.archive_root
    expected = list(source.expected_files)
    if local is not None and Path(local).is_dir():
        verify_layout(Path(local), expected)
        _link(folder, Path(local))
    elif local is not None and not Path(local).is_file():
        raise FileNotFoundError(f"local copy {local} of {source.name} does not exist (expected a folder or zip)")
    else:
        if local is None:
            archive = download(list(urls or source.urls), Path(cache_dir) / f"{source.name}.zip",
                               sha256=source.sha256, md5=source.md5, size=source.size, progress=progress)
        else:
            archive = Path(local)
            why = file_mismatch(archive, source.sha256, source.md5, source.size)
            if why is not None:
                raise ValueError(f"{archive} is not the expected {source.name} archive: {why} "
                                 "(for a repacked copy, give no checksum or size for it)")
        _extract_once(source, archive, out_dir, progress)
    verify_layout(folder, expected)
    return folder


def _extract_once(source: Source, archive: Path, out_dir: Path, progress: bool) -> None:
    """Extract a verified `archive` into `out_dir` unless its stamp shows it complete there."""
    stamp = out_dir / f".{source.archive_root}.extracted.json"
    record = {"digest": _digest(archive, source)}
    try:
        previous = json.loads(stamp.read_text())
    except (OSError, ValueError):
        previous = None
    if previous == record:
        missing = missing_members(archive, out_dir)
        if not missing:
            log.info("%s: already extracted from %s (%s), not extracting again", out_dir, archive, record["digest"])
            return
        log.warning("%s: %d file(s) of %s missing or changed (e.g. %s): extracting again",
                    out_dir, len(missing), archive, missing[0])
    stamp.unlink(missing_ok=True)
    folder = out_dir / source.archive_root
    if folder.is_symlink():  # a local folder used before: extracting through it would write into it
        folder.unlink()
    safe_extract_zip(archive, out_dir, progress=progress)
    stamp.write_text(json.dumps(record))


def _digest(archive: Path, source: Source) -> str:
    """The archive's identity: the checksum it was just verified against, or its SHA-256."""
    if source.sha256:
        return f"sha256:{source.sha256.lower()}"
    if source.md5:
        return f"md5:{source.md5.lower()}"
    return f"sha256:{file_sha256(archive)}"


def _link(folder: Path, local: Path) -> None:
    """Point `folder` at the user's `local` copy instead of copying gigabytes."""
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        if folder.resolve() == local.resolve():
            return
        raise FileExistsError(f"{folder} already exists; remove it to use the local copy {local}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(local.resolve(), target_is_directory=True)
