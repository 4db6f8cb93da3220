"""`cmmasksd.io.download` against a real local HTTP server: resume, retries, mirrors, checksums."""

from __future__ import annotations

import hashlib
import random
import re

import pytest
from http_server import FileServer

from cmmasksd.io.download import ChecksumError, DownloadError, download

PAYLOAD = random.Random(0).randbytes(300_000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    with FileServer() as server:
        server.files["/data.zip"] = PAYLOAD
        yield server


def fetch(urls, dest, **kwargs):
    kwargs = {"sha256": SHA256, "retries": 2, "backoff": 0, "timeout": 5, "progress": False, **kwargs}
    return download(urls, dest, **kwargs)


def test_full_download_is_verified_and_renamed(server, tmp_path):
    dest = tmp_path / "sub" / "data.zip"
    assert fetch([server.url("/data.zip")], dest, md5=MD5, size=len(PAYLOAD)) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("data.zip.part").exists()
    assert server.ranges("/data.zip") == [None]


def test_existing_verified_file_needs_no_network(server, tmp_path):
    dest = tmp_path / "data.zip"
    dest.write_bytes(PAYLOAD)
    fetch([server.url("/data.zip")], dest)
    assert server.requests == []


def test_existing_wrong_file_is_replaced(server, tmp_path):
    dest = tmp_path / "data.zip"
    dest.write_bytes(b"old version")
    fetch([server.url("/data.zip")], dest)
    assert dest.read_bytes() == PAYLOAD


def test_cut_off_download_resumes_with_range(server, tmp_path):
    server.cut_once["/data.zip"] = 100_000
    dest = fetch([server.url("/data.zip")], tmp_path / "data.zip")
    first, second = server.ranges("/data.zip")
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second)[1])
    assert 0 < resumed_at <= 100_000  # the bytes kept from the cut response were not fetched again
    assert dest.read_bytes() == PAYLOAD


def test_part_file_from_an_interrupted_run_is_resumed(server, tmp_path):
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(PAYLOAD[:1234])
    fetch([server.url("/data.zip")], dest)
    assert server.ranges("/data.zip") == ["bytes=1234-"]
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range.add("/data.zip")
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(PAYLOAD[:1234])
    fetch([server.url("/data.zip")], dest)
    assert server.ranges("/data.zip") == ["bytes=1234-"]  # the 200 body replaced the part: no second try
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_file_answered_416_is_verified(server, tmp_path):
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(PAYLOAD)
    fetch([server.url("/data.zip")], dest)
    assert server.ranges("/data.zip") == [f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD


def test_stale_part_file_is_discarded_and_download_restarted(server, tmp_path):
    dest = tmp_path / "data.zip"
    dest.with_name("data.zip.part").write_bytes(b"x" * 1000)
    fetch([server.url("/data.zip")], dest)
    assert server.ranges("/data.zip") == ["bytes=1000-", None]
    assert dest.read_bytes() == PAYLOAD


def test_corrupt_file_is_rejected_and_not_left_behind(server, tmp_path):
    server.corrupt.add("/data.zip")
    dest = tmp_path / "data.zip"
    url = server.url("/data.zip")
    with pytest.raises(ChecksumError) as caught:
        fetch([url], dest)
    middle = len(PAYLOAD) // 2
    served = PAYLOAD[:middle] + bytes([PAYLOAD[middle] ^ 0xFF]) + PAYLOAD[middle + 1 :]
    message = str(caught.value)
    assert url in message and SHA256 in message and hashlib.sha256(served).hexdigest() in message
    assert isinstance(caught.value, ValueError)
    assert not dest.exists() and not dest.with_name("data.zip.part").exists()


def test_corrupt_mirror_does_not_stop_a_good_one(server, tmp_path):
    server.files["/bad.zip"] = PAYLOAD
    server.corrupt.add("/bad.zip")
    dest = fetch([server.url("/bad.zip"), server.url("/data.zip")], tmp_path / "data.zip")
    assert dest.read_bytes() == PAYLOAD


def test_failing_mirror_is_retried_then_the_next_one_used(server, tmp_path):
    server.unavailable.add("/down.zip")
    dest = fetch([server.url("/down.zip"), server.url("/data.zip")], tmp_path / "data.zip", retries=2)
    assert server.ranges("/down.zip") == [None, None, None]
    assert dest.read_bytes() == PAYLOAD


def test_all_mirrors_failing_names_each_url_and_why(server, tmp_path):
    server.unavailable.add("/down.zip")
    urls = [server.url("/down.zip"), server.url("/missing.zip")]
    with pytest.raises(DownloadError) as caught:
        fetch(urls, tmp_path / "data.zip", retries=1)
    assert not isinstance(caught.value, ChecksumError)
    message = str(caught.value)
    assert urls[0] in message and "503" in message
    assert urls[1] in message and "404" in message
    assert [url for url, _ in caught.value.failures] == urls
    assert server.ranges("/missing.zip") == [None]  # a 404 is not retried
