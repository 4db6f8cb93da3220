"""`ray.storage`: where Ray keeps the sweep's trials and checkpoints.

A folder (relative to the repo), a shared mount (NFS, Lustre, ...), or a URI that pyarrow opens
(`s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://...`). On a cluster of several machines it
must be one every machine reaches: Ray restores a retried trial from the checkpoints in storage,
and a checkpoint left on the disk of a lost node is lost with it. The MLflow server must be
shared too (a sqlite file is one machine's), and so must `data/prepared` (trials read it at the
same path everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Filesystems every machine of a cluster can mount (as psutil reports the mount's type).
SHARED_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "glusterfs", "fuse.glusterfs",
                      "ceph", "fuse.ceph", "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs",
                      "fuse.mount-s3", "wekafs", "9p", "virtiofs"}


@dataclass(frozen=True)
class RayStorage:
    uri: str  # what Tune and Ray Train get as `storage_path`: an absolute path or scheme://...

    @classmethod
    def from_param(cls, value: str, repo_root: Path) -> "RayStorage":
        if "://" in value:
            return cls(value.rstrip("/"))
        path = Path(value)
        return cls(str(path if path.is_absolute() else (repo_root / path).resolve()))

    @property
    def scheme(self) -> str | None:
        return self.uri.split("://", 1)[0] if "://" in self.uri else None

    @property
    def local_path(self) -> Path | None:
        """The folder on this machine, for a plain path or a `file://` URI; None for remote storage."""
        if self.scheme is None:
            return Path(self.uri)
        if self.scheme == "file":
            return Path(self.uri.removeprefix("file://"))
        return None

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def _fs(self, relative: str):
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.join(relative)) if self.scheme else \
            (pyarrow.fs.LocalFileSystem(), self.join(relative))

    def read_text(self, relative: str) -> str | None:
        """The file's text, None if it does not exist."""
        import pyarrow.fs

        fs, path = self._fs(relative)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, relative: str, text: str) -> None:
        fs, path = self._fs(relative)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())


def mount_type(path: Path) -> str:
    """The filesystem type of the mount that holds `path` (its deepest existing folder)."""
    import psutil

    path = path.resolve()
    while not path.exists():
        path = path.parent
    mounts = sorted(psutil.disk_partitions(all=True), key=lambda m: len(m.mountpoint), reverse=True)
    for mount in mounts:
        if path == Path(mount.mountpoint) or Path(mount.mountpoint) in path.parents:
            return mount.fstype
    return "unknown"


def check_shared(storage: RayStorage, tracking_uri: str, nodes: list[dict[str, Any]]) -> None:
    """On a Ray cluster that spans several machines, refuse what only one machine can reach."""
    machines = sorted({node["NodeManagerAddress"] for node in nodes if node.get("Alive")})
    if len(machines) <= 1:
        return  # one machine (however many Ray nodes): its own disk is shared
    local = storage.local_path
    if local is not None:
        kind = mount_type(local)
        if kind not in SHARED_FILESYSTEMS:
            raise ValueError(
                f"ray.storage: {local} is on this machine's own disk ({kind}), but the Ray cluster spans "
                f"{len(machines)} machines ({', '.join(machines)}); a trial retried on another machine could not "
                f"restore its checkpoints. Use a shared mount (NFS, Lustre, ...) or a URI (s3://bucket/prefix, "
                f"gs://bucket/prefix)")
    if tracking_uri.startswith("sqlite:"):
        raise ValueError(
            f"mlflow.tracking_uri: a sqlite file is this machine's alone, but the Ray cluster spans {len(machines)} "
            f"machines; run an MLflow server (`mlflow server --host <address>`) and set its http:// URI")

