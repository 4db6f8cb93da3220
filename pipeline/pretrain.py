"""DVC stage `pretrain`: the tiny CLIP trained contrastively on RefShapes captions.

    python -m pipeline.pretrain        (what `dvc repro` runs)

Reads the raw refer layout `data/raw/<pretrain.dataset>` (objects' attributes, train scenes for
training, val scenes for the zero-shot metrics) and writes the open_clip state dict
`pretrain.out` (the default profile's `model.pretrained`) and `reports/pretrain.json` (zero-shot
attribute classification, scene retrieval and corr_top mask hit rate, against the random
initial weights). An interrupted run resumes from `runs/pretrain/` after its last epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.common import REPO_ROOT, load_params, repo_path, run_main, setup_logging

if TYPE_CHECKING:
    from pipeline.params_schema import Params

log = logging.getLogger(__name__)
METRICS = Path("reports/pretrain.json")


def pretrain_config(params: Params):
    """`params.yaml: pretrain` (validated by its schema) as a `PretrainConfig`, paths under the repo."""
    from cmmasksd.config import PretrainConfig

    settings = params.pretrain.model_dump(exclude={"dataset"})
    paths = {"raw_dir": repo_path(Path("data/raw") / params.pretrain.dataset), "out": repo_path(settings["out"]),
             "work_dir": repo_path(settings["work_dir"])}
    return PretrainConfig.model_validate({**settings, **paths})


def main(argv: list[str] | None = None) -> None:
    from cmmasksd.pretrain import pretrain

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    parser.add_argument("--metrics", default=str(METRICS))
    args = parser.parse_args(argv)
    setup_logging()
    config = pretrain_config(load_params(args.params))
    metrics = pretrain(config)
    history = metrics.pop("history")
    metrics["final_loss"] = history[-1]["loss"]
    path = Path(args.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    shown = {k: metrics[k] for k in ("pretrained", "random_init", "chance")}
    log.info("wrote %s and %s: %s", config.out, path, json.dumps(shown))


if __name__ == "__main__":
    run_main(main)
