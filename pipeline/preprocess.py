"""DVC stage `preprocess@<dataset>`: refer files -> the compact per-split training format.

    python -m pipeline.preprocess refshapes

Writes `data/prepared/<dataset>/<split>/` (letterboxed images, packed masks, tokens, tables,
`skipped.json` listing bad records, `manifest.json`) via `cmmasksd.data.prepare_dataset`, with
`preprocess.<dataset>.workers` processes decoding images. A split already prepared from the same
inputs and settings is kept; an interrupted one continues where it stopped. For RefCOCO, RefCOCO+
and G-Ref the split sizes of the files are compared with the published ones (OK / MISMATCH).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common import load_params, repo_path, run_main, setup_logging

log = logging.getLogger(__name__)


def official_count_report(dataset: str, split_by: str, counts: dict[str, dict[str, int]]) -> str | None:
    """The comparison table with the published split sizes, or None for a dataset that has none."""
    from cmmasksd.catalogue import split_sizes
    from cmmasksd.data import check_official_counts, format_count_checks

    official = split_sizes(dataset, split_by)
    if official is None:
        return None
    checks = check_official_counts(counts, official)
    bad = [check.split for check in checks if not check.ok]
    if bad:
        log.warning("%s (%s): split sizes differ from the published ones in %s: wrong or modified files?",
                    dataset, split_by, ", ".join(bad))
    return f"{dataset} ({split_by}) against the published split sizes:\n{format_count_checks(checks)}"


def main(argv: list[str] | None = None) -> None:
    from cmmasksd.data import Refer, format_reports, prepare_dataset

    parser = argparse.ArgumentParser(description="preprocess one dataset into data/prepared/<dataset>")
    parser.add_argument("dataset")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    settings = load_params(args.params).preprocess.get(args.dataset)
    if settings is None:
        raise KeyError(f"params.yaml: missing `preprocess.{args.dataset}`")
    refer = Refer(repo_path(Path("data/raw") / args.dataset), settings.split_by)
    reports = prepare_dataset(refer, repo_path(Path("data/prepared") / args.dataset), size=settings.size,
                              word_len=settings.word_len, workers=settings.workers)
    print(format_reports(reports))
    counts = official_count_report(args.dataset, settings.split_by, refer.split_counts())
    if counts is not None:
        print(counts)


if __name__ == "__main__":
    run_main(main)
