"""DVC stage `fetch@<dataset>`: make `data/raw/<dataset>` hold the refer files and the images.

    python -m pipeline.fetch refshapes     (generated offline: the embedded default)
    python -m pipeline.fetch refcoco       (download, or `fetch.refcoco.source: <folder or zip>`)

Real datasets: the annotation zip is downloaded (mirrors, resume, checksum) or taken from a
local copy, and the COCO train2014 images are linked from `fetch.coco_train2014.source` or
downloaded into `data/raw/coco` (shared by the three datasets). `fetch.<name>` may set `source`
(a local folder or zip), `urls` (mirrors, in order), `sha256`, `md5` and `size` (null: not
checked); absent keys take the catalogue's values (`cmmasksd.catalogue`).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.common import load_params, repo_path, run_main, setup_logging

if TYPE_CHECKING:
    from cmmasksd.io import Source
    from pipeline.params_schema import Params, RefShapesFetch

log = logging.getLogger(__name__)
RAW = Path("data/raw")
CACHE = Path("data/cache")


def fetch_refshapes(settings: RefShapesFetch, out: Path) -> None:
    from cmmasksd.data import generate_refshapes

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = generate_refshapes(tmp, settings.generate)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a stage interrupted mid-generation leaves no half-written output
    log.info("generated refshapes: %s", counts)


def configured_source(params: Params, name: str) -> tuple[Source, Path | None]:
    """The catalogue's `name` with the mirrors and checks of `fetch.<name>`, and its local copy if any."""
    from cmmasksd.catalogue import get_source
    from cmmasksd.io import with_settings

    settings = params.fetch.settings(name)
    local = settings.pop("source", None)
    try:
        source = with_settings(get_source(name), settings)
    except ValueError as err:
        raise ValueError(f"params.yaml `fetch.{name}`: {err}") from err
    return source, repo_path(Path(local).expanduser()) if local else None


def fetch_refer(dataset: str, params: Params, raw: Path, cache: Path, progress: bool = True) -> Path:
    """Make `raw/<dataset>` the refer layout: links to the annotation files and to COCO train2014."""
    from cmmasksd.io import fetch_source

    source, local = configured_source(params, dataset)
    annotations = fetch_source(source, cache, raw / "annotations", local=local, progress=progress)
    coco_source, coco_local = configured_source(params, "coco_train2014")
    coco = fetch_source(coco_source, cache, raw / "coco", local=coco_local, progress=progress)
    out = raw / dataset
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
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fetch one dataset into data/raw/<dataset>")
    parser.add_argument("dataset")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    if args.dataset == "refshapes":
        fetch_refshapes(params.fetch.refshapes, repo_path(RAW / args.dataset))
    else:
        fetch_refer(args.dataset, params, repo_path(RAW), repo_path(CACHE))


if __name__ == "__main__":
    run_main(main)
