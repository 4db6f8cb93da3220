"""Data-parallel training on the CPU: 2 gloo processes under torchrun, killed and resumed.

What `torchrun --nproc-per-node N -m cmmasksd.cli train` does on N GPUs, with gloo on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from cmmasksd.train import CHECKPOINT_DIR

pytestmark = pytest.mark.slow


def write_config(tiny_config, tmp_path: Path, name: str) -> Path:
    """The debug profile on 64 objects (8 steps an epoch: 4 per rank), 1 thread per process."""
    config = tiny_config(tmp_path / name, data__max_train_objects=64, masksd__strategy="corr_sample",
                         masksd__mask_cell=8, threads=1, run__num_overlays=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(config: Path, nproc: int = 2, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
         "-m", "cmmasksd.cli", "train", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-5000:]
    return output


def last_state(run: Path) -> dict:
    return torch.load(run / CHECKPOINT_DIR / "last.pt", weights_only=True)


def test_two_gloo_processes_train_resume_after_a_kill_and_repeat_exactly(tiny_config, tmp_path):
    straight = tmp_path / "straight"
    output = finish(torchrun(write_config(tiny_config, tmp_path, "straight")))
    results = json.loads(output[output.index("{\n"):output.rindex("}") + 1])  # rank 0 alone prints
    assert output.count('"best_epoch"') == 1
    state = last_state(straight)
    assert state["epoch"] == 3 and len(state["rng_ranks"]) == 2  # every rank's random stream, for resume
    assert not torch.equal(state["rng_ranks"][0][0], state["rng_ranks"][1][0])  # ranks draw different masks
    assert {"learning_curves.png", "overlays_val.png"} <= {p.name for p in straight.iterdir()}
    table = (straight / "per_expression_val.csv").read_text().splitlines()
    assert len(table) == 1 + 16  # both ranks' shards of the evaluation, gathered

    killed = tmp_path / "killed"
    proc = torchrun(write_config(tiny_config, tmp_path, "killed"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / CHECKPOINT_DIR / "last.pt").exists():
            launcher = psutil.Process(proc.pid)
            for process in [launcher, *launcher.children(recursive=True)]:  # workers run in sessions of their own
                process.kill()
            break
        time.sleep(0.05)
    proc.communicate(timeout=60)
    interrupted_at = last_state(killed)["epoch"]
    assert 1 <= interrupted_at < 3 and not (killed / "results.json").exists(), "the kill came too late"
    output = finish(torchrun(write_config(tiny_config, tmp_path, "killed")))
    assert f"resumed {killed} at epoch {interrupted_at}" in output

    again = json.loads(output[output.index("{\n"):output.rindex("}") + 1])
    assert again["final"] == results["final"] and again["best_epoch"] == results["best_epoch"]
    a, b = last_state(straight)["model"], last_state(killed)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def listening_addresses(root: psutil.Process) -> set[str]:
    """The local addresses the process tree under `root` listens on (TCP)."""
    found = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_one_machine_recipe_listens_on_loopback_only(tiny_config, tmp_path):
    """docs/cluster.md's single-node recipe: file rendezvous for torchrun and for the process group,
    gloo on `lo`. While it trains, every listening socket of the launcher and its workers is on
    127.0.0.1 (with --standalone, torchrun's TCP store listens on '::', every interface: measured)."""
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "CMMASKSD_INIT_METHOD": f"file://{rendezvous}/workers"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rendezvous / "agents"), "--rdzv-conf", "store_type=file",
         "-m", "cmmasksd.cli", "train", "--config", str(write_config(tiny_config, tmp_path, "loopback"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    seen, deadline = set(), time.time() + 300
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None and time.time() < deadline:
        seen |= listening_addresses(launcher)
        time.sleep(0.2)
    output = finish(proc)
    assert '"best_epoch"' in output
    assert seen == {"127.0.0.1"}, seen  # gloo listened, on loopback alone
