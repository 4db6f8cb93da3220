"""What a user sees for a bad checkpoint or a bad `--set`: one `error:` line, exit 2, nothing run from the file."""

import logging
import os
import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cmmasksd.cli import main
from cmmasksd.config import DataConfig, MaskSDConfig, TrainConfig
from cmmasksd.model import create_model, get_model_config
from cmmasksd.predict import load_checkpoint

EXPECTED = "not a cmmasksd checkpoint"
UNSAFE_ADVICE = ["weights_only=False", "`weights_only` set to `False`"]  # the latter is torch's wording


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def checkpoint_config(model_name: str = "cris-tiny-rn") -> TrainConfig:
    """The config a best.pt holds (nothing trains from it here)."""
    return TrainConfig(data=DataConfig(prepared_dir="unused"), model=get_model_config(model_name),
                       masksd=MaskSDConfig(branches="none"))


def best_state(config: TrainConfig, model_name: str = "cris-tiny-rn") -> dict:
    """What `train` writes to best.pt, with the weights of `model_name`."""
    model = create_model(get_model_config(model_name), config.masksd)
    return {"model": model.state_dict(), "info": {"input_size": 64, "word_len": 17},
            "config": config.model_dump(mode="json"), "epoch": 1}


def invalid_config_state() -> dict:
    state = best_state(checkpoint_config())
    state["config"]["masksd"]["mask_ratio_v"] = 1.5
    return state


# case -> (file name, its contents: bytes as they are, anything else through torch.save)
CASES = {
    "code_in_pickle": ("evil.pt", lambda folder: {"model": Payload(folder / "pwned")}),
    # a bare pickle (protocol 4, which makes torch warn) rather than torch.save's zip
    "code_in_bare_pickle": ("evil.p", lambda folder: pickle.dumps(Payload(folder / "pwned"))),
    "random_bytes": ("noise.pt", lambda folder: random.Random(0).randbytes(4096)),
    "empty_file": ("empty.pt", lambda folder: b""),
    "foreign_dict": ("foreign.pt", lambda folder: {"a": 1}),
    "foreign_list": ("list.pt", lambda folder: [1, 2]),
    # what `cmmasksd.train` writes to last.pt (its resume state holds the run's identity, not its config)
    "resume_last": ("last.pt", lambda folder: {"model": {}, "identity": {}, "info": {}, "epoch": 1}),
    "other_architecture": ("best.pt", lambda folder: best_state(checkpoint_config("cris-tiny-vit"))),  # RN weights
    "invalid_config": ("best.pt", lambda folder: invalid_config_state()),
}
# case -> what its error line says besides the path
FRAGMENTS = {
    "code_in_pickle": [EXPECTED, "weights_only=True", "posix.system"],
    "code_in_bare_pickle": [EXPECTED, "weights_only=True"],
    "random_bytes": [EXPECTED, "weights_only=True"],
    "empty_file": [EXPECTED],
    "foreign_dict": [EXPECTED, "config", "model", "info"],
    "foreign_list": [EXPECTED, "list"],
    "resume_last": ["resume checkpoint", "best.pt"],
    "other_architecture": ["do not fit", "missing", "unexpected", "of another shape", "conv1.weight"],
    "invalid_config": ["config is not valid", "mask_ratio_v"],
}


def write_case(case: str, folder: Path) -> Path:
    name, contents = CASES[case]
    path, data = folder / name, contents(folder)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    return path


def run_main(capsys, caplog, *argv) -> str:
    """stderr of `main(argv)`; log records and warnings fail the test, as they would reach a user's terminal."""
    caplog.clear()
    caplog.set_level(logging.INFO)  # what the CLI shows without -v
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        main(list(argv))
    assert exit_info.value.code == 2
    assert not caplog.records and not caught, [*caplog.messages, *map(str, caught)]
    return capsys.readouterr().err


def assert_one_error_line(stderr: str, *fragments) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    assert len(lines[0]) < 600  # a summary with a few keys (the path alone is ~80), not a wall of keys
    for fragment in fragments:
        assert str(fragment) in lines[0]
    assert "Traceback" not in stderr
    assert not any(advice in stderr for advice in UNSAFE_ADVICE)


def checkpoint_argv(command: str, path, folder) -> list[str]:
    if command == "evaluate":
        return ["evaluate", "--checkpoint", str(path)]
    return ["predict", "--checkpoint", str(path), "--image", str(folder / "x.png"), "--text", "the cat",
            "--out", str(folder / "overlay.png")]


def test_a_valid_checkpoint_loads(tmp_path):
    """The control: the files below fail for what is wrong with them, not for how they are written."""
    config = checkpoint_config()
    torch.save(best_state(config), tmp_path / "best.pt")
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert loaded.config == config and (loaded.input_size, loaded.word_len) == (64, 17)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_error_line(tmp_path, capsys, caplog, case, command):
    path = write_case(case, tmp_path)
    stderr = run_main(capsys, caplog, *checkpoint_argv(command, path, tmp_path))
    assert_one_error_line(stderr, path, *FRAGMENTS[case])
    assert not (tmp_path / "pwned").exists()


def test_real_cli_prints_nothing_else(tmp_path):
    """As a user runs it, for a file whose model gets built (open_clip logs each step): the error line alone."""
    path = write_case("other_architecture", tmp_path)
    result = subprocess.run([sys.executable, "-m", "cmmasksd.cli", *checkpoint_argv("predict", path, tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, path, *FRAGMENTS["other_architecture"])


@pytest.mark.parametrize("pair, fragments", [
    ('seed=!!python/object/apply:os.system ["touch {marker}"]', ["--set seed", "constructor"]),
    ("optim.milestones=[1,", ["--set optim.milestones", "not a plain YAML value"]),
    ("masksd.lambda_v", ["key=value", "masksd.lambda_v"]),
    ("masksd.mask_ratio_v=1.5", ["masksd.mask_ratio_v", "less than 1"]),
])
def test_bad_override_is_one_error_line(tmp_path, capsys, caplog, pair, fragments):
    config = tmp_path / "c.yaml"
    config.write_text("data: {prepared_dir: unused}\nmodel: cris-tiny-rn\n")
    stderr = run_main(capsys, caplog, "train", "--config", str(config), "--set", pair.format(marker=tmp_path / "pwned"))
    assert_one_error_line(stderr, *fragments)
    assert not (tmp_path / "pwned").exists()
