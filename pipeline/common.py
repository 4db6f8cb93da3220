"""What every stage needs: the repo root, its params, and absolute paths under the repo."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_params(path: str | Path = REPO_ROOT / "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the stage parameters ({err})") from err
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of stage sections")
    return params


def section(params: dict[str, Any], *keys: str) -> Any:
    """`params[k1][k2]...`, with an error that names the missing key path."""
    node: Any = params
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"params.yaml: missing `{'.'.join(keys[: i + 1])}`")
        node = node[key]
    return node


def repo_path(path: str | Path) -> Path:
    """Absolute path for a repo-relative one (Ray and MLflow need absolute paths)."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def setup_logging() -> None:
    # force: an imported library may have configured the root logger already, hiding our INFO lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
