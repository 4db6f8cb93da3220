"""`ray.storage`: paths and URIs, and what a cluster of several machines must share."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.storage import RayStorage, check_shared, mount_type

ONE_MACHINE = [{"NodeManagerAddress": "127.0.0.1", "Alive": True}, {"NodeManagerAddress": "127.0.0.1", "Alive": True}]
TWO_MACHINES = [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]


def test_paths_resolve_against_the_repo_and_uris_stay_uris(tmp_path):
    assert RayStorage.from_param("ray_results", tmp_path).uri == str(tmp_path / "ray_results")
    assert RayStorage.from_param("/shared/ray", tmp_path).local_path == Path("/shared/ray")
    s3 = RayStorage.from_param("s3://bucket/sweeps/", tmp_path)
    assert (s3.uri, s3.scheme, s3.local_path) == ("s3://bucket/sweeps", "s3", None)
    assert s3.join("exp", "train") == "s3://bucket/sweeps/exp/train"


@pytest.mark.parametrize("as_uri", [False, True])
def test_text_files_round_trip_through_pyarrow(tmp_path, as_uri):
    storage = RayStorage(f"file://{tmp_path}" if as_uri else str(tmp_path))
    assert storage.read_text("exp/sweep.json") is None
    storage.write_text("exp/sweep.json", '{"parent_run_id": "abc"}')
    assert (tmp_path / "exp" / "sweep.json").read_text() == '{"parent_run_id": "abc"}'
    assert storage.read_text("exp/sweep.json") == '{"parent_run_id": "abc"}'


def test_several_machines_need_shared_storage_and_a_tracking_server(tmp_path):
    local = RayStorage(str(tmp_path))
    check_shared(local, "sqlite:////tmp/mlflow.db", ONE_MACHINE)  # Ray nodes on one machine share its disk
    check_shared(local, "sqlite:////tmp/mlflow.db", TWO_MACHINES[:1] + [{**TWO_MACHINES[1], "Alive": False}])
    assert mount_type(tmp_path) not in {"nfs", "nfs4"}  # this test's folder is on the machine's own disk
    with pytest.raises(ValueError, match=r"ray.storage: .* own disk .* spans 2 machines \(10.0.0.1, 10.0.0.2\)"):
        check_shared(local, "http://127.0.0.1:5000", TWO_MACHINES)
    with pytest.raises(ValueError, match="ray.storage"):
        check_shared(RayStorage(f"file://{tmp_path}"), "http://127.0.0.1:5000", TWO_MACHINES)
    check_shared(RayStorage("s3://bucket/sweeps"), "http://mlflow.lab:5000", TWO_MACHINES)
    with pytest.raises(ValueError, match="mlflow.tracking_uri: a sqlite file is this machine's alone"):
        check_shared(RayStorage("gs://bucket/sweeps"), "sqlite:////tmp/mlflow.db", TWO_MACHINES)
