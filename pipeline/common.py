"""What every stage needs: the repo root, its validated params, absolute paths, and how it fails."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from cmmasksd.errors import one_line

if TYPE_CHECKING:
    from pipeline.params_schema import Params

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_params(path: str | Path = REPO_ROOT / "params.yaml") -> Params:
    """params.yaml validated by its schema (`pipeline.params_schema`), every default filled in."""
    from pipeline.params_schema import validate_params  # loads the library's configs (torch): only when used

    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the stage parameters ({err})") from err
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of stage sections")
    try:
        return validate_params(params)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def repo_path(path: str | Path) -> Path:
    """Absolute path for a repo-relative one (Ray and MLflow need absolute paths)."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def setup_logging() -> None:
    # force: an imported library may have configured the root logger already, hiding our INFO lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """A stage's entry point: bad input (a param, a file, a server that does not answer) is one
    `error: <message>` line on stderr and exit status 2, as DVC shows it; a bug keeps its traceback."""
    try:
        status = main()
    except (ValueError, KeyError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(status)


def quiet_state_api_checks() -> None:
    """Ray worker setup hook (`init_ray`) for the local Ray, which runs without a dashboard and so
    without the State API: Ray Train's placement-group cleaner asks that API every second whether a
    multi-worker trial's controller still lives, and logs "State API may be temporarily unavailable"
    each time it cannot. Only that logger is quieted; the cleaner still removes the trial's placement
    group when the controller stops it."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
