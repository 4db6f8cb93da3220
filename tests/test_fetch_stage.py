"""The `fetch` stage for real datasets: params.yaml settings -> mirrors, checksums, local copies.

A local HTTP server plays the refer host and images.cocodataset.org; the zips have the official
layout (tiny contents).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import time
import zipfile

import pytest
import yaml
from http_server import FileServer

import pipeline.fetch as stage
from cmmasksd.catalogue import SOURCES
from cmmasksd.io import ChecksumError
from pipeline.common import REPO_ROOT
from pipeline.fetch import configured_source, fetch_refer
from pipeline.params_schema import validate_params

REFCOCOG = {
    "refcocog/instances.json": json.dumps({"images": [], "annotations": [], "categories": []}).encode(),
    "refcocog/refs(umd).p": pickle.dumps([], protocol=2),
    "refcocog/refs(google).p": pickle.dumps([], protocol=2),
}
# Incompressible and larger than the downloader's 64 KiB reads, so a cut-off keeps some bytes.
COCO = {f"train2014/COCO_train2014_{i:012d}.jpg": random.Random(i).randbytes(70_000) for i in (9, 25, 30)}


def zipped(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path.read_bytes()


@pytest.fixture
def sleeps(monkeypatch):
    """The downloader's backoff sleeps (`time.sleep`), recorded instead of slept."""
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


@pytest.fixture
def served(tmp_path, sleeps):
    """The two zips on a local server, and params that point at it (first mirror down)."""
    annotations = zipped(tmp_path / "refcocog.zip", REFCOCOG)
    coco = zipped(tmp_path / "train2014.zip", COCO)
    with FileServer() as server:
        server.files["/referit/refcocog.zip"] = annotations
        server.files["/zips/train2014.zip"] = coco
        server.unavailable.add("/down/refcocog.zip")
        params = {"fetch": {
            "refcocog": {"source": None, "urls": [server.url("/down/refcocog.zip"), server.url("/referit/refcocog.zip")],
                         "size": len(annotations), "sha256": hashlib.sha256(annotations).hexdigest(), "md5": None},
            "coco_train2014": {"source": None, "urls": [server.url("/zips/train2014.zip")], "size": None,
                               "sha256": None, "md5": hashlib.md5(coco).hexdigest()},
        }}
        yield server, params


def run_stage(params: dict, tmp_path):
    """The stage's fetch of refcocog with `params` (as params.yaml holds them, validated as the stage does)."""
    return fetch_refer("refcocog", validate_params(params), tmp_path / "raw", tmp_path / "cache", progress=False)


def test_params_yaml_states_the_catalogue():
    """The checksums users see and edit in params.yaml are those the code defaults to."""
    fetch = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["fetch"]
    params = validate_params({"fetch": fetch})
    for name, source in SOURCES.items():
        configured, local = configured_source(params, name)
        assert configured == source and local is None


def test_stage_downloads_resumes_and_links_the_refer_layout(served, sleeps, tmp_path):
    server, params = served
    server.cut_once["/zips/train2014.zip"] = 150_000  # the 13 GB zip is cut off once and resumed
    out = run_stage(params, tmp_path)
    assert out == tmp_path / "raw" / "refcocog"
    assert sorted(p.name for p in out.iterdir()) == ["instances.json", "refs(google).p", "refs(umd).p", "train2014"]
    assert (out / "refs(umd).p").read_bytes() == REFCOCOG["refcocog/refs(umd).p"]
    assert sorted(p.name for p in (out / "train2014").iterdir()) == sorted(n.split("/")[1] for n in COCO)
    assert server.ranges("/down/refcocog.zip") == [None] * 6  # 503: retried, then the next mirror
    assert sleeps[:5] == [1, 2, 4, 8, 16]  # exponential backoff between the retries
    first, resumed = server.ranges("/zips/train2014.zip")
    assert first is None and resumed == f"bytes={2 * 65536}-"  # the bytes before the cut are kept

    image = out / "train2014" / "COCO_train2014_000000000009.jpg"
    mtime = image.stat().st_mtime_ns
    n_requests = len(server.requests)
    assert run_stage(params, tmp_path) == out  # verified zips in the cache, extraction stamped
    assert len(server.requests) == n_requests and image.stat().st_mtime_ns == mtime


def test_checksum_from_params_rejects_a_corrupt_download(served, tmp_path):
    server, params = served
    server.corrupt.add("/zips/train2014.zip")
    with pytest.raises(ChecksumError) as caught:
        run_stage(params, tmp_path)
    expected = params["fetch"]["coco_train2014"]["md5"]
    assert "train2014.zip" in str(caught.value) and expected in str(caught.value) and "got " in str(caught.value)
    assert not list((tmp_path / "cache").glob("coco_train2014.zip*"))  # neither kept as final nor as .part
    assert not (tmp_path / "raw" / "coco").exists()


def test_local_folder_and_local_zip_from_params(served, tmp_path):
    _, params = served
    (tmp_path / "mine").mkdir()
    with zipfile.ZipFile(tmp_path / "train2014.zip") as archive:
        archive.extractall(tmp_path / "mine")
    params["fetch"]["coco_train2014"] = {"source": str(tmp_path / "mine" / "train2014")}
    params["fetch"]["refcocog"]["source"] = str(tmp_path / "refcocog.zip")
    params["fetch"]["refcocog"]["urls"] = ["http://127.0.0.1:9/never-asked"]
    out = run_stage(params, tmp_path)
    assert (out / "train2014").resolve() == (tmp_path / "mine" / "train2014").resolve()
    assert (out / "refs(google).p").read_bytes() == REFCOCOG["refcocog/refs(google).p"]
    assert not (tmp_path / "cache").exists()

    (tmp_path / "mine" / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"mine/train2014 lacks COCO_train2014_000000000009\.jpg"):
        run_stage(params, tmp_path)


def test_unknown_fetch_setting_names_the_params_key(tmp_path, monkeypatch):
    """Refused when params.yaml is read, before anything is fetched."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"fetch": {"refcoco": {"source": None, "sha": "x"}}}))

    def fetched(*args, **kwargs):
        raise AssertionError("the stage fetched with a setting it does not know")

    monkeypatch.setattr(stage, "fetch_refer", fetched)
    with pytest.raises(ValueError, match=rf"^{path}: `fetch.refcoco`: unknown setting\(s\) \['sha'\]; expected "
                                         r"some of \['md5', 'sha256', 'size', 'urls'\]$"):
        stage.main(["refcoco", "--params", str(path)])
