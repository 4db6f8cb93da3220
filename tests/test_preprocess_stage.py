"""The `preprocess` stage on COCO-like files named refcoco: params, report table, official counts."""

from __future__ import annotations

import pytest
import yaml

import pipeline.preprocess as stage
from cmmasksd.data import PreparedSplit
from cmmasksd.data.cocolike import generate_cocolike


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repo root in tmp_path with data/raw/refcoco (4 splits) and a params file for it."""
    generate_cocolike(tmp_path / "data" / "raw" / "refcoco", {"train": 4, "val": 3, "testA": 2, "testB": 2})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preprocess": {"refcoco": {"split_by": "unc", "size": 64, "word_len": 17,
                                                                 "workers": 2}}}))
    monkeypatch.setattr(stage, "repo_path", lambda path: tmp_path / path)
    return tmp_path, params


def test_stage_prints_table_and_official_comparison(repo, capsys):
    root, params = repo
    stage.main(["refcoco", "--params", str(params)])
    prepared, official = capsys.readouterr().out.split("refcoco (unc) against the published split sizes:")
    rows = {cells[0]: cells for line in prepared.splitlines()[2:]
            for cells in [[cell.strip() for cell in line.split("|")[1:-1]]]}
    for split, n_images in (("train", 4), ("val", 3), ("testA", 2), ("testB", 2)):
        assert PreparedSplit(root / "data" / "prepared" / "refcoco" / split).n_images == n_images
        assert rows[split][1] == str(n_images) and rows[split][5] == "prepared"
    assert official.count("MISMATCH") == 4  # a handful of images is not RefCOCO

    stage.main(["refcoco", "--params", str(params)])
    assert capsys.readouterr().out.count("up to date") == 4  # nothing to do the second time


def test_unknown_setting_is_named(repo):
    root, params = repo
    params.write_text(yaml.safe_dump({"preprocess": {"refcoco": {"split_by": "unc", "size": 64, "word_len": 17,
                                                                 "worker": 2}}}))
    with pytest.raises(ValueError, match=r"`preprocess.refcoco.worker`: Extra inputs are not permitted "
                                         r"\(allowed: split_by, size, word_len, workers\)"):
        stage.main(["refcoco", "--params", str(params)])
