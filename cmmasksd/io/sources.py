"""The catalogue of official data sources (shared/spec/data.md), and fetching one onto disk.

The checksums of the refer zips are third-party figures: override them with
`dataclasses.replace(source, sha256=...)` when params say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmmasksd.io.archive import safe_extract_zip, verify_layout
from cmmasksd.io.download import download

_REFER_HOST = "https://bvisionweb1.cs.unc.edu/licheng/referit/data"


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


def _refer(name: str, archive_stamp: str, size: int, sha256: str, splits: tuple[str, ...]) -> Source:
    """A refer annotation zip: the original host (offline since 2022), then its web-archive copy."""
    url = f"{_REFER_HOST}/{name}.zip"
    return Source(
        name=name,
        urls=(url, f"https://web.archive.org/web/{archive_stamp}id_/{url}"),
        sha256=sha256,
        md5=None,
        size=size,
        archive_root=name,
        expected_files=("instances.json", *(f"refs({split}).p" for split in splits)),
    )


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        _refer(
            "refcoco",
            "20220413011718",
            53_993_993,
            "7f924bb7ed8dc4568058e4ff626281918d56e5206f4c868c5a80f088f38c8bf0",
            ("unc", "google"),
        ),
        _refer(
            "refcoco+",
            "20220413011656",
            45_613_210,
            "5f1238112d63199e68da54a28f201471909b21ded7ed79a57d51b4c1443c6b45",
            ("unc",),
        ),
        _refer(
            "refcocog",
            "20220413012904",
            56_712_951,
            "3d1f7e5b2ff2205940bf59de55f861f5f2cc1403fb980669933a7f9af1aa8211",
            ("umd", "google"),
        ),
        Source(
            name="coco_train2014",
            urls=("http://images.cocodataset.org/zips/train2014.zip",),
            sha256=None,
            md5="0da8c0bd3d6becc4dcb32757491aca88",
            size=None,  # about 13 GB; the MD5 is the authoritative check
            archive_root="train2014",
            # 82,783 images: check the first one, which tells train2014 from any other folder.
            expected_files=("COCO_train2014_000000000009.jpg",),
        ),
    )
}


def get_source(name: str) -> Source:
    """The catalogue entry for `name`, with an error that lists the known names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}") from None


def fetch_source(
    source: Source,
    cache_dir: Path,
    out_dir: Path,
    *,
    urls: list[str] | None = None,
    local: Path | None = None,
) -> Path:
    """Make `out_dir/<archive_root>` hold the source's files and return that folder.

    `local`, a folder or zip the user already has, replaces the download: a folder (the one
    holding the expected files) is linked as `out_dir/<archive_root>`, or used in place if it is
    that folder; a zip is safely extracted. Otherwise the zip is downloaded from `urls` (default:
    the source's mirrors) into `cache_dir`, verified, and safely extracted into `out_dir`.
    """
    out_dir = Path(out_dir)
    folder = out_dir / source.archive_root
    if local is None:
        archive = download(
            list(urls or source.urls),
            Path(cache_dir) / f"{source.name}.zip",
            sha256=source.sha256,
            md5=source.md5,
            size=source.size,
        )
        safe_extract_zip(archive, out_dir)
    elif Path(local).is_dir():
        verify_layout(Path(local), list(source.expected_files))
        _link(folder, Path(local))
    elif Path(local).is_file():
        safe_extract_zip(Path(local), out_dir)
    else:
        raise FileNotFoundError(f"local copy {local} of {source.name} does not exist (expected a folder or zip)")
    verify_layout(folder, list(source.expected_files))
    return folder


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
