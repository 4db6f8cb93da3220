"""Safe zip extraction, layout checks, and `fetch_source` from a local copy or a local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import stat
import zipfile

import pytest
from http_server import FileServer

from cmmasksd.io.archive import UnsafeArchiveError, safe_extract_zip, verify_layout
from cmmasksd.io.sources import SOURCES, fetch_source, get_source

REFCOCO_FILES = {
    "refcoco/instances.json": json.dumps({"images": [], "annotations": [], "categories": []}).encode(),
    "refcoco/refs(unc).p": pickle.dumps([], protocol=2),
    "refcoco/refs(google).p": pickle.dumps([], protocol=2),
}


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def folder_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_extracts_members_and_cleans_up(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/a.txt": b"a", "top/sub/b.txt": b"b"})
    target = tmp_path / "out"
    assert safe_extract_zip(archive, target) == [target / "top/a.txt", target / "top/sub/b.txt"]
    assert (target / "top/sub/b.txt").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "out"]  # no staging folder left


def test_second_extraction_over_identical_files_is_fine(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/a.txt": b"a"})
    target = tmp_path / "out"
    (target / "top").mkdir(parents=True)
    (target / "top/other.txt").write_text("kept")
    safe_extract_zip(archive, target)
    safe_extract_zip(archive, target)
    assert folder_files(target) == ["top/a.txt", "top/other.txt"]


@pytest.mark.parametrize(
    "evil", ["../evil.txt", "top/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt"]
)
def test_member_escaping_the_target_is_rejected_before_writing(tmp_path, evil):
    archive = make_zip(tmp_path / "a.zip", {"top/fine.txt": b"fine", evil: b"evil"})
    target = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchiveError, match="would be written outside") as caught:
        safe_extract_zip(archive, target)
    assert str(archive) in str(caught.value) and repr(evil) in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.zip"]  # nothing written anywhere


def test_member_reaching_out_through_an_existing_symlink_is_rejected(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "top").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    archive = make_zip(tmp_path / "a.zip", {"top/a.txt": b"a"})
    with pytest.raises(UnsafeArchiveError, match="would be written outside"):
        safe_extract_zip(archive, target)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_symlink_member_is_rejected(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("top/passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_layout_names_folder_and_missing_files(tmp_path):
    (tmp_path / "instances.json").write_text("{}")
    verify_layout(tmp_path, ["instances.json"])
    with pytest.raises(FileNotFoundError, match=r"lacks refs\(unc\)\.p") as caught:
        verify_layout(tmp_path, ["instances.json", "refs(unc).p"])
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="there is none"):
        verify_layout(tmp_path / "nowhere", ["instances.json"])


def test_catalogue_matches_the_data_spec():
    assert set(SOURCES) == {"refcoco", "refcoco+", "refcocog", "coco_train2014"}
    stamps = {"refcoco": "20220413011718", "refcoco+": "20220413011656", "refcocog": "20220413012904"}
    for name, stamp in stamps.items():
        source = get_source(name)
        original = f"https://bvisionweb1.cs.unc.edu/licheng/referit/data/{name}.zip"
        assert source.urls == (original, f"https://web.archive.org/web/{stamp}id_/{original}")
        assert len(source.sha256) == 64 and source.archive_root == name
    assert get_source("refcocog").expected_files == ("instances.json", "refs(umd).p", "refs(google).p")
    assert get_source("coco_train2014").md5 == "0da8c0bd3d6becc4dcb32757491aca88"
    with pytest.raises(KeyError, match="refcoco"):
        get_source("refcoco-")


def test_local_folder_is_checked_and_linked(tmp_path):
    mine = tmp_path / "my_refcoco"
    make_zip(tmp_path / "r.zip", REFCOCO_FILES)
    safe_extract_zip(tmp_path / "r.zip", tmp_path / "unpacked")
    (tmp_path / "unpacked/refcoco").rename(mine)
    out = tmp_path / "raw"
    for _ in range(2):  # a second call replaces its own link
        folder = fetch_source(SOURCES["refcoco"], tmp_path / "cache", out, local=mine)
        assert folder == out / "refcoco" and folder.is_symlink() and folder.resolve() == mine.resolve()
    assert not (tmp_path / "cache").exists()
    (mine / "refs(google).p").unlink()
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        fetch_source(SOURCES["refcoco"], tmp_path / "cache", out, local=mine)


def test_local_zip_is_extracted(tmp_path):
    archive = make_zip(tmp_path / "refcoco.zip", REFCOCO_FILES)
    folder = fetch_source(SOURCES["refcoco"], tmp_path / "cache", tmp_path / "raw", local=archive)
    assert (folder / "refs(unc).p").read_bytes() == REFCOCO_FILES["refcoco/refs(unc).p"]


def test_missing_local_copy_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zip"):
        fetch_source(SOURCES["refcoco"], tmp_path / "cache", tmp_path / "raw", local=tmp_path / "nowhere.zip")


def test_refcoco_zip_served_and_fetched_end_to_end(tmp_path):
    data = make_zip(tmp_path / "refcoco.zip", REFCOCO_FILES).read_bytes()
    source = dataclasses.replace(SOURCES["refcoco"], sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    with FileServer() as server:
        server.files["/licheng/referit/data/refcoco.zip"] = data
        urls = [server.url("/gone/refcoco.zip"), server.url("/licheng/referit/data/refcoco.zip")]
        for _ in range(2):  # the second run finds the verified zip in the cache
            folder = fetch_source(source, tmp_path / "cache", tmp_path / "raw", urls=urls)
        assert len(server.requests) == 2  # one 404, one download
    assert folder == tmp_path / "raw" / "refcoco"
    assert folder_files(tmp_path / "raw") == sorted(REFCOCO_FILES)
    assert (tmp_path / "cache" / "refcoco.zip").read_bytes() == data
