"""Getting the data onto disk: resumable verified downloads, safe extraction, fetching a source."""

from cmmasksd.io.archive import UnsafeArchiveError, missing_members, safe_extract_zip, verify_layout
from cmmasksd.io.download import ChecksumError, DownloadError, download, file_mismatch
from cmmasksd.io.sources import Source, fetch_source, with_settings

__all__ = [
    "ChecksumError",
    "DownloadError",
    "Source",
    "UnsafeArchiveError",
    "download",
    "fetch_source",
    "file_mismatch",
    "missing_members",
    "safe_extract_zip",
    "verify_layout",
    "with_settings",
]
