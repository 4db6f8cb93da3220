"""Split sizes against the published ones: the comparison itself, and (realdata) the real files."""

from __future__ import annotations

import copy

import pytest

from cmmasksd.catalogue import DATASETS, split_sizes
from cmmasksd.data import Refer, check_official_counts, format_count_checks, refshapes_stats
from pipeline.common import REPO_ROOT
from pipeline.preprocess import official_count_report

REFCOCO_UNC = split_sizes("refcoco", "unc")
PUBLISHED = sorted((name, by) for name, entry in DATASETS.items() for by in entry.split_sizes)


@pytest.mark.realdata
@pytest.mark.parametrize("dataset, split_by", PUBLISHED)
def test_real_files_have_the_published_split_sizes(dataset, split_by):
    root = REPO_ROOT / "data" / "raw" / dataset
    for name in (f"refs({split_by}).p", "instances.json"):
        if not (root / name).is_file():
            pytest.skip(f"{root / name} not found: fetch the real {dataset} (dvc repro fetch@{dataset}) to check it")
    checks = check_official_counts(Refer(root, split_by).split_counts(), split_sizes(dataset, split_by))
    assert all(check.ok for check in checks), "\n" + format_count_checks(checks)


def test_table_matches_the_data_spec():
    assert REFCOCO_UNC["train"] == {"refs": 42_404, "images": 16_994, "expressions": 120_624}
    assert split_sizes("refcoco+", "unc")["testB"] == {"refs": 1_798, "images": 750, "expressions": 4_889}
    assert split_sizes("refcocog", "umd")["test"] == {"refs": 5_023, "images": 2_600, "expressions": 9_602}
    assert split_sizes("refcocog", "google")["val"] == {"refs": 5_000, "images": 4_650, "expressions": None}
    assert {split for name, by in PUBLISHED if by == "unc" for split in split_sizes(name, by)} == {
        "train", "val", "testA", "testB"}


def test_exact_counts_are_ok_and_each_difference_is_a_mismatch():
    found = copy.deepcopy(REFCOCO_UNC)
    assert [(c.split, c.ok) for c in check_official_counts(found, REFCOCO_UNC)] == [
        ("train", True), ("val", True), ("testA", True), ("testB", True)]
    found["val"]["expressions"] -= 1
    del found["testB"]
    found["test"] = {"refs": 3, "images": 1, "expressions": 9}
    checks = check_official_counts(found, REFCOCO_UNC)
    assert [(c.split, c.ok) for c in checks] == [
        ("train", True), ("val", False), ("testA", True), ("testB", False), ("test", False)]
    assert checks[3].found == {"refs": 0, "images": 0, "expressions": 0}  # a missing split counts zero
    assert checks[4].official == {"refs": 0, "images": 0, "expressions": 0}  # an unexpected one too

    table = format_count_checks(checks).splitlines()
    assert "split" in table[0] and "refs (found / official)" in table[0]
    val = next(line for line in table if line.startswith("| val "))
    assert "3,811 / 3,811" in val and "10,833 / 10,834" in val and val.rstrip(" |").endswith("MISMATCH")
    assert next(line for line in table if line.startswith("| train ")).rstrip(" |").endswith("OK")


def test_unpublished_counts_are_not_compared():
    google = split_sizes("refcocog", "google")
    found = {split: {**counts, "expressions": 12_345} for split, counts in google.items()}
    checks = check_official_counts(found, google)
    assert all(c.ok for c in checks)
    assert "12,345 / -" in format_count_checks(checks)


def test_split_counts_of_the_reader(refshapes_root):
    stats = refshapes_stats(refshapes_root)
    counts = Refer(refshapes_root, "unc").split_counts()
    assert counts == {split: {k: stats[split][k] for k in ("refs", "images", "expressions")} for split in stats}


def test_stage_reports_only_datasets_with_published_counts():
    assert official_count_report("refshapes", "unc", {"train": {}}) is None
    assert official_count_report("refcoco", "google", {"train": {}}) is None
    text = official_count_report("refcoco", "unc", copy.deepcopy(REFCOCO_UNC))
    assert text.startswith("refcoco (unc) against the published split sizes:")
    assert text.count(" OK ") == 4 and "MISMATCH" not in text
