"""Getting the data onto disk: resumable verified downloads, safe extraction, the source catalogue."""

from cmmasksd.io.archive import UnsafeArchiveError, safe_extract_zip, verify_layout
from cmmasksd.io.download import ChecksumError, DownloadError, download
from cmmasksd.io.sources import SOURCES, Source, fetch_source, get_source

__all__ = [
    "SOURCES",
    "ChecksumError",
    "DownloadError",
    "Source",
    "UnsafeArchiveError",
    "download",
    "fetch_source",
    "get_source",
    "safe_extract_zip",
    "verify_layout",
]
