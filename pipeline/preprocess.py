"""DVC stage `preprocess@<dataset>`: refer files -> the compact per-split training format.

    python -m pipeline.preprocess refshapes

Writes `data/prepared/<dataset>/<split>/` (letterboxed images, packed masks, tokens, tables,
`skipped.json` listing bad records, `manifest.json`) via `cmmasksd.data.prepare_dataset`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.common import load_params, repo_path, section, setup_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    from cmmasksd.data import Refer, prepare_dataset

    parser = argparse.ArgumentParser(description="preprocess one dataset into data/prepared/<dataset>")
    parser.add_argument("dataset")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    settings = section(load_params(args.params), "preprocess", args.dataset)
    refer = Refer(repo_path(Path("data/raw") / args.dataset), settings["split_by"])
    reports = prepare_dataset(refer, repo_path(Path("data/prepared") / args.dataset),
                              size=int(settings["size"]), word_len=int(settings["word_len"]))
    for split, report in reports.items():
        log.info("%s/%s: %s", args.dataset, split, report)
    print(json.dumps({split: str(report) for split, report in reports.items()}, indent=2))


if __name__ == "__main__":
    main()
