"""Getting the data onto disk: resumable verified downloads, safe extraction, the source catalogue."""

from cmmasksd.io.archive import UnsafeArchiveError, missing_members, safe_extract_zip, verify_layout
from cmmasksd.io.download import ChecksumError, DownloadError, download, file_mismatch
from cmmasksd.io.sources import SOURCES, Source, fetch_source, get_source, with_settings

__all__ = [
    "SOURCES",
    "ChecksumError",
    "DownloadError",
    "Source",
    "UnsafeArchiveError",
    "download",
    "fetch_source",
    "file_mismatch",
    "get_source",
    "missing_members",
    "safe_extract_zip",
    "verify_layout",
    "with_settings",
]
