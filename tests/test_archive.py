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

from cmmasksd.io import sources
from cmmasksd.io.archive import UnsafeArchiveError, missing_members, safe_extract_zip, verify_layout
from cmmasksd.catalogue import SOURCES, get_source
from cmmasksd.io.sources import fetch_source, with_settings

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


def test_local_zip_is_verified_and_extracted(tmp_path):
    archive = make_zip(tmp_path / "refcoco.zip", REFCOCO_FILES)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    source = with_settings(SOURCES["refcoco"], {"sha256": digest, "size": archive.stat().st_size})
    folder = fetch_source(source, tmp_path / "cache", tmp_path / "raw", local=archive, progress=False)
    assert (folder / "refs(unc).p").read_bytes() == REFCOCO_FILES["refcoco/refs(unc).p"]
    assert not (tmp_path / "cache").exists()


def test_local_zip_with_wrong_checksum_is_refused(tmp_path):
    archive = make_zip(tmp_path / "refcoco.zip", REFCOCO_FILES)
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    expected = SOURCES["refcoco"].sha256
    with pytest.raises(ValueError, match="not the expected refcoco archive") as caught:
        fetch_source(with_settings(SOURCES["refcoco"], {"size": None}), tmp_path / "cache", tmp_path / "raw",
                     local=archive, progress=False)
    assert str(archive) in str(caught.value) and expected in str(caught.value) and actual in str(caught.value)
    assert not (tmp_path / "raw").exists()
    # A repacked copy is accepted once its checks are turned off.
    unchecked = with_settings(SOURCES["refcoco"], {"sha256": None, "size": None})
    assert fetch_source(unchecked, tmp_path / "cache", tmp_path / "raw", local=archive, progress=False).is_dir()


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
    assert folder_files(tmp_path / "raw") == sorted([*REFCOCO_FILES, ".refcoco.extracted.json"])
    assert (tmp_path / "cache" / "refcoco.zip").read_bytes() == data


def _served_source(tmp_path, members):
    """A refcoco source whose checks match `members` zipped, and the zip's bytes."""
    data = make_zip(tmp_path / "served.zip", members).read_bytes()
    return with_settings(SOURCES["refcoco"], {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}), data


def test_second_fetch_does_not_extract_again(tmp_path, monkeypatch):
    source, data = _served_source(tmp_path, REFCOCO_FILES)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "refcoco.zip").write_bytes(data)  # as left by an earlier download
    extractions = []
    real_extract = sources.safe_extract_zip

    def counting_extract(*args, **kwargs):
        extractions.append(args)
        return real_extract(*args, **kwargs)

    def fetch():  # the verified zip in the cache means no request reaches the (closed) port
        return fetch_source(source, tmp_path / "cache", tmp_path / "raw", urls=["http://127.0.0.1:9/unused"],
                            progress=False)

    monkeypatch.setattr(sources, "safe_extract_zip", counting_extract)
    folder = fetch()
    mtime = (folder / "instances.json").stat().st_mtime_ns
    assert fetch() == folder
    assert len(extractions) == 1 and (folder / "instances.json").stat().st_mtime_ns == mtime
    stamp = json.loads((tmp_path / "raw" / ".refcoco.extracted.json").read_text())
    assert stamp == {"digest": f"sha256:{source.sha256}"}

    (folder / "refs(google).p").unlink()  # the layout check fails: extract again
    fetch()
    assert len(extractions) == 2 and (folder / "refs(google).p").is_file()
    (folder / "refs(unc).p").write_bytes(b"truncated")  # a member with the wrong size: likewise
    fetch()
    assert len(extractions) == 3 and (folder / "refs(unc).p").read_bytes() == REFCOCO_FILES["refcoco/refs(unc).p"]


def test_changed_archive_is_extracted_again(tmp_path):
    old, old_data = _served_source(tmp_path, REFCOCO_FILES)
    new_files = {**REFCOCO_FILES, "refcoco/instances.json": b'{"images": [], "annotations": [], "version": 2}'}
    new, new_data = _served_source(tmp_path, new_files)
    with FileServer() as server:
        server.files["/refcoco.zip"] = old_data
        folder = fetch_source(old, tmp_path / "cache", tmp_path / "raw", urls=[server.url("/refcoco.zip")],
                              progress=False)
        server.files["/refcoco.zip"] = new_data
        fetch_source(new, tmp_path / "cache", tmp_path / "raw", urls=[server.url("/refcoco.zip")], progress=False)
    assert (folder / "instances.json").read_bytes() == new_files["refcoco/instances.json"]
    stamp = json.loads((tmp_path / "raw" / ".refcoco.extracted.json").read_text())
    assert stamp == {"digest": f"sha256:{new.sha256}"}


def test_interrupted_extraction_leaves_no_stamp(tmp_path, monkeypatch):
    source, data = _served_source(tmp_path, REFCOCO_FILES)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "refcoco.zip").write_bytes(data)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "safe_extract_zip", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch_source(source, tmp_path / "cache", tmp_path / "raw", progress=False)
    assert not (tmp_path / "raw" / ".refcoco.extracted.json").exists()
    monkeypatch.undo()
    folder = fetch_source(source, tmp_path / "cache", tmp_path / "raw", progress=False)
    assert folder_files(folder) == sorted(name.split("/")[1] for name in REFCOCO_FILES)


def test_missing_members_names_absent_and_resized_files(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"top/a.txt": b"a", "top/b.txt": b"bb"})
    safe_extract_zip(archive, tmp_path / "out")
    assert missing_members(archive, tmp_path / "out") == []
    (tmp_path / "out/top/a.txt").unlink()
    (tmp_path / "out/top/b.txt").write_bytes(b"b")
    assert missing_members(archive, tmp_path / "out") == ["top/a.txt", "top/b.txt"]


@pytest.mark.parametrize("settings, message", [
    ({"sha": "00"}, r"unknown setting\(s\) \['sha'\]"),
    ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
    ({"md5": 5}, "md5 must be 32 hex digits"),
    ({"urls": []}, "urls must be a non-empty list"),
    ({"urls": "http://x/a.zip"}, "urls must be a non-empty list"),
    ({"size": -1}, "size must be a positive number"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        with_settings(SOURCES["refcoco"], settings)


def test_settings_override_only_what_they_name():
    source = with_settings(SOURCES["coco_train2014"], {"urls": ["http://127.0.0.1/a.zip"], "md5": None})
    assert source.urls == ("http://127.0.0.1/a.zip",) and source.md5 is None
    assert source.expected_files == SOURCES["coco_train2014"].expected_files
    assert with_settings(SOURCES["refcoco"], {}) == SOURCES["refcoco"]
