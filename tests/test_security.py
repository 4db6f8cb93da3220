"""The security items of the reliability issue, as tests.

- The package never runs a shell or unpickles user files unsafely: an `ast` check of every `.py`
  file under `cmmasksd/` and `pipeline/` (comments and docstrings do not count), with a self-check
  that it does flag bad code.
- No secret reaches MLflow: a real sweep runs with tracking credentials, cloud keys and a Ray token
  in its environment, and everything it logged (the whole MLflow store, every artifact, the stage's
  outputs, Ray's storage, its own output) is searched for their values.
- The local Ray the stage starts listens on loopback only: the same sweep's processes are sampled
  for listening sockets while it runs.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import make_repo

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = ("cmmasksd", "pipeline")
SAFE_PICKLE = Path("cmmasksd/data/safe_pickle.py")  # the one place allowed to drive an Unpickler

# ------------------------------------------------------------------------------------------------
# a. static check of the package
# ------------------------------------------------------------------------------------------------

UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
              "_pickle.Unpickler", "dill.load", "dill.loads", "joblib.load", "pandas.read_pickle",
              "marshal.load", "marshal.loads", "shelve.open"}
SHELLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
EVALS = {"eval", "exec", "builtins.eval", "builtins.exec"}
YAML_UNSAFE = {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}
RUAMEL_SAFE = ("rt", "safe", "base")  # ruamel.yaml's YAML(typ=...) that construct no arbitrary objects


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it was imported as: `import pickle as pk` gives pk -> pickle,
    `from torch import load` gives load -> torch.load."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`pk.load` -> "pickle.load" (through the imports); None for anything but a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _root(node: ast.expr) -> str | None:
    """The name a chain starts from: `yaml` for `yaml.load`."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None, 0)


def unsafe_calls(source: str, filename: str = "<string>", allow_unpickler: bool = False) -> list[str]:
    """`file:line: what` for each call that can run a shell or code from a file's content."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def flag(node: ast.AST, why: str) -> None:
        found.append(f"{filename}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not allow_unpickler:
            for base in node.bases:
                if _dotted(base, aliases) in UNPICKLERS:
                    flag(node, f"subclasses {_dotted(base, aliases)} (unpickle only through {SAFE_PICKLE})")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is not None and "." in name and _root(node.func) not in aliases:
            name = None  # a method of a local object (`yaml = YAML(); yaml.load(text)`), not a module's function
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        spread = any(k.arg is None for k in node.keywords)  # **kwargs: cannot be checked
        if "shell" in keywords and not _is_false(keywords["shell"]):
            flag(node, f"{name or 'call'}(shell={ast.unparse(keywords['shell'])})")
        if name is None:
            continue
        if name in SHELLS:
            flag(node, f"{name}() runs a shell")
        elif name in EVALS:
            flag(node, f"{name}() runs code")
        elif name in UNPICKLERS and not allow_unpickler:
            flag(node, f"{name}() unpickles (use cmmasksd.data.safe_pickle.load_pickle)")
        elif name in YAML_UNSAFE:
            flag(node, f"{name}() builds arbitrary objects (use yaml.safe_load)")
        elif name == "ruamel.yaml.YAML":  # its round-trip and safe loaders build no Python objects
            typ = keywords.get("typ", node.args[0] if node.args else None)
            if spread or (typ is not None and not (isinstance(typ, ast.Constant) and typ.value in RUAMEL_SAFE)):
                flag(node, f"{name}(typ={ast.unparse(typ) if typ is not None else '**'}) may build arbitrary objects")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, aliases) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                flag(node, f"{name}() without Loader=yaml.SafeLoader")
        elif name in ("torch.load", "torch.serialization.load"):
            if spread or not _is_true(keywords.get("weights_only", ast.Constant(None))):
                flag(node, f"{name}() without weights_only=True")
        elif name in ("numpy.load", "np.load"):
            if spread or not _is_false(keywords.get("allow_pickle", ast.Constant(False))):
                flag(node, f"{name}(allow_pickle=...) unpickles")
    return found


def package_files() -> list[Path]:
    files = sorted(f for package in PACKAGES for f in (PROJECT / package).rglob("*.py"))
    assert len(files) > 20, files  # the walk found the package
    return files


def test_package_runs_no_shell_and_unpickles_nothing_unsafely():
    problems = []
    for path in package_files():
        relative = path.relative_to(PROJECT)
        problems += unsafe_calls(path.read_text(), str(relative), allow_unpickler=relative == SAFE_PICKLE)
    assert not problems, "unsafe calls in the package:\n" + "\n".join(problems)


BAD = """
import pickle, subprocess, os, yaml
import numpy as np
import torch
from pickle import loads as unpickle
from torch import load

torch.load(p)
torch.load(p, weights_only=False)
torch.load(p, **options)
load(p)
subprocess.run(x, shell=True)
subprocess.Popen(x, shell=flag)
pickle.load(f)
unpickle(b)
pickle.Unpickler(f).load()
class Mine(pickle.Unpickler): pass
os.system("ls")
eval("1")
exec("x = 1")
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
np.load(p, allow_pickle=True)
"""

GOOD = '''
"""Docstring: torch.load(p), pickle.load(f), subprocess.run(x, shell=True), eval("1")."""
import pickle, subprocess, yaml
import numpy as np
import torch

# torch.load(p)  subprocess.run(x, shell=True)  pickle.loads(b)  os.system("ls")
torch.load(p, map_location="cpu", weights_only=True)
subprocess.run(["git", "status"], check=True)
subprocess.run(x, shell=False)
pickle.dumps(obj, protocol=2)
model.eval()
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
np.load(p, mmap_mode="r")
'''


def test_the_static_check_flags_bad_code_and_passes_good_code():
    found = unsafe_calls(BAD, "bad.py")
    lines = sorted({int(entry.split(":")[1]) for entry in found})
    expected = [n for n, line in enumerate(BAD.splitlines(), 1)
                if line and not line.startswith(("import", "from"))]
    assert lines == expected, "\n".join(found)
    assert "bad.py:8: torch.load() without weights_only=True" in found
    assert "bad.py:12: subprocess.run(shell=True)" in found
    assert unsafe_calls(GOOD, "good.py") == []
    # ruamel.yaml (how the package edits dvc.yaml): a local named `yaml` is not PyYAML; an unsafe typ is flagged
    ruamel = "from ruamel.yaml import YAML\n\ndef read(text):\n    yaml = YAML()\n    return yaml.load(text)\n"
    assert unsafe_calls(ruamel) == []
    assert unsafe_calls("from ruamel.yaml import YAML\nYAML(typ='unsafe').load(text)\n", "r.py") == [
        "r.py:2: ruamel.yaml.YAML(typ='unsafe') may build arbitrary objects"]
    # the one exemption: safe_pickle.py may subclass and drive an Unpickler
    assert unsafe_calls("import pickle\nclass U(pickle.Unpickler): pass\nU(f).load()\n", allow_unpickler=True) == []


# ------------------------------------------------------------------------------------------------
# b, c. a real sweep with secrets in its environment, its listeners sampled while it runs
# ------------------------------------------------------------------------------------------------

SECRET_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME",
               "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")


def _listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process, address, port) of every listening inet socket of `root` and its descendants."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            label = " ".join(proc.cmdline()).strip()[:100] or proc.name()  # Ray pads process titles
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((label, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1, how a dual-stack gRPC socket shows an IPv4 bind
    return ip.is_loopback


@pytest.fixture(scope="module")
def secret_sweep(prepared_root, tmp_path_factory):
    """One real sweep (2 tiny trials on a local Ray) run with secrets in its environment; its
    processes' listening sockets are sampled every second while it runs."""
    repo = make_repo(tmp_path_factory.mktemp("secret-sweep"), prepared_root)
    values = {name: secrets.token_hex(32 if name == "RAY_AUTH_TOKEN" else 24) for name in SECRET_VARS}
    env = {**os.environ, **values, "RAY_AUTH_MODE": "token"}  # 64 hex digits: Ray's own token format
    log_path = repo.parent / "sweep.log"
    listeners: set[tuple[str, str, int]] = set()
    samples = 0
    with log_path.open("w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            root = psutil.Process(sweep.pid)
            deadline = time.time() + 400
            while sweep.poll() is None and time.time() < deadline:
                listeners |= _listeners(root)
                samples += 1
                time.sleep(1)
            sweep.wait(timeout=max(1.0, deadline - time.time()))
        finally:
            if sweep.poll() is None:  # timed out: stop what this test started, and its Ray
                os.killpg(sweep.pid, signal.SIGINT)
                try:
                    sweep.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(sweep.pid, signal.SIGKILL)
                    sweep.wait()
    output = log_path.read_text()
    assert sweep.returncode == 0, output[-5000:]
    return {"repo": repo, "secrets": values, "output": output, "listeners": listeners, "samples": samples}


def _store_dump(db: Path) -> str:
    """Every row of every table of the sqlite store, as SQL text (params, tags, metrics, experiments,
    experiment tags, datasets, inputs, ... and whatever a newer MLflow adds)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        dump = "\n".join(con.iterdump())
    con.close()
    assert {"params", "tags", "metrics", "experiments", "experiment_tags", "datasets", "inputs"} <= tables
    return dump


def _files(*folders: Path) -> dict[Path, bytes]:
    found = {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}
    assert found, folders
    return found


@pytest.mark.slow
def test_no_secret_from_the_environment_is_logged(secret_sweep):
    repo, values = secret_sweep["repo"], secret_sweep["secrets"]
    info = json.loads((repo / "sweep" / "sweep.json").read_text())
    assert info["n_trials"] == 2 and info["n_failed"] == 0
    dump = _store_dump(repo / "mlflow.db")
    artifacts = _files(repo / "mlartifacts")
    assert {"results.json", "per_expression_val.csv", "trials.csv"} <= {p.name for p in artifacts}
    outputs = _files(repo / "sweep")
    ray_storage = _files(repo / "ray_results")  # Tune's experiment state, trial params and results

    # the search is not vacuous: it finds what was logged
    child_run = pd.read_csv(repo / "sweep" / "trials.csv")["mlflow_run_id"].iloc[0]
    assert info["code_digest"] in dump and info["parent_run_id"] in dump and child_run in dump
    assert "'cmmasksd.variant','both'" in dump and "'model.clip','tiny-rn'" in dump
    assert any(child_run.encode() in content for content in artifacts.values())  # the parent's trials.csv
    assert any(info["parent_run_id"].encode() in content for content in outputs.values())
    assert any(b"tiny-rn" in content for content in ray_storage.values())

    leaks = []
    for name, value in values.items():
        if value in dump:
            leaks.append(f"{name}: in the MLflow store")
        leaks += [f"{name}: in {path.relative_to(repo)}" for group in (artifacts, outputs, ray_storage)
                  for path, content in group.items() if value.encode() in content]
        if value in secret_sweep["output"]:
            leaks.append(f"{name}: in the stage's output")
    assert not leaks, "\n".join(leaks)


@pytest.mark.slow
def test_the_listener_sampling_saw_the_local_ray(secret_sweep):
    """What makes the loopback check below mean something: it saw the servers of the local Ray
    (GCS, raylet) and of a trial's worker, and the check itself tells loopback from the rest."""
    listeners = secret_sweep["listeners"]
    assert secret_sweep["samples"] >= 3
    for part in ("gcs_server", "raylet", "ImplicitFunc"):
        assert any(part in label for label, _, _ in listeners), (part, sorted(listeners))
    assert all(map(is_loopback, ["127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:10.0.0.1"]))


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(secret_sweep):
    listeners = secret_sweep["listeners"]
    open_to_network = sorted(f"{address}:{port}  {label}" for label, address, port in listeners
                             if not is_loopback(address))
    assert not open_to_network, "listening beyond loopback:\n" + "\n".join(open_to_network)
