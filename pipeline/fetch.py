"""DVC stage `fetch@<dataset>`: make `data/raw/<dataset>` hold the refer files and the images.

    python -m pipeline.fetch refshapes     (generated offline: the embedded default)
    python -m pipeline.fetch refcoco       (download, or `fetch.refcoco.source: <folder or zip>`)

Real datasets: the annotation zip is downloaded (mirrors, resume, checksum) or taken from a
local copy, and the COCO train2014 images are linked from `fetch.coco_train2014.source` or
downloaded into `data/raw/coco` (shared by the three datasets).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pipeline.common import load_params, repo_path, section, setup_logging

log = logging.getLogger(__name__)
RAW = Path("data/raw")
CACHE = Path("data/cache")


def fetch_refshapes(settings: dict, out: Path) -> None:
    from cmmasksd.data import RefShapesConfig, generate_refshapes

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = generate_refshapes(tmp, RefShapesConfig(**(settings.get("generate") or {})))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a stage interrupted mid-generation leaves no half-written output
    log.info("generated refshapes: %s", counts)


def fetch_refer(dataset: str, params: dict, out: Path) -> None:
    from cmmasksd.io import fetch_source, get_source

    settings = section(params, "fetch", dataset) or {}
    local = settings.get("source")
    annotations = fetch_source(get_source(dataset), repo_path(CACHE), repo_path(RAW / "annotations"),
                               local=repo_path(local) if local else None)
    coco_settings = section(params, "fetch", "coco_train2014") or {}
    coco_local = coco_settings.get("source")
    coco = fetch_source(get_source("coco_train2014"), repo_path(CACHE), repo_path(RAW / "coco"),
                        local=repo_path(coco_local) if coco_local else None)
    out.mkdir(parents=True, exist_ok=True)
    for file in annotations.iterdir():
        target = out / file.name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(file.resolve())
    images = out / "train2014"
    if images.is_symlink():
        images.unlink()
    images.symlink_to(coco.resolve())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fetch one dataset into data/raw/<dataset>")
    parser.add_argument("dataset")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    out = repo_path(RAW / args.dataset)
    if args.dataset == "refshapes":
        fetch_refshapes(section(params, "fetch", "refshapes") or {}, out)
    else:
        fetch_refer(args.dataset, params, out)


if __name__ == "__main__":
    main()
