"""Run-folder paths that may be remote (gs://, s3://): one place decides local vs remote.

TPU pods keep their workdirs in Cloud Storage; a GPU cluster needs a filesystem every node
mounts (NFS, Lustre) or an object store. `os.path.abspath("gs://b/run")` is "/cwd/gs:/b/run",
so a pod's hosts would each write their own local disk and disagree on the newest checkpoint
after a restart. Everything that reads or writes a workdir therefore goes through here:
local paths are made absolute, remote ones kept as given, and the file operations are
`etils.epath`'s, the layer orbax writes checkpoints through.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath

from etils import epath


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/run (anything with a scheme)."""
    return "://" in os.fspath(path)


def resolve(path) -> str:
    """An absolute local path, or the remote URL unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts: str) -> str:
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def _path(path) -> epath.Path:
    if is_remote(path) and importlib.util.find_spec("tensorflow") is not None:
        # epath reads remote paths with TensorFlow's gfile when TensorFlow is installed: it
        # must hide the accelerators from itself before it first runs (dfrec_jax.host_tf).
        import dfrec_jax.host_tf  # noqa: F401
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return _path(path).exists()


def isdir(path) -> bool:
    return _path(path).is_dir()


def isfile(path) -> bool:
    p = _path(path)
    return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
    """Names in the folder `path` (empty when it does not exist)."""
    p = _path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path) -> None:
    _path(path).mkdir(parents=True, exist_ok=True)


def rename(source, target) -> None:
    _path(source).rename(_path(target))


def read_text(path) -> str:
    return _path(path).read_text()


def write_atomic(path, data: str | bytes) -> None:
    """Writes `data` under a temporary name in the same folder, then renames it into place, so
    a reader (or a run killed mid-write) never sees a half-written file."""
    tmp = _path(f"{os.fspath(path)}.tmp-{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(_path(path))


__all__ = [
    "exists",
    "is_remote",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "makedirs",
    "read_text",
    "rename",
    "resolve",
    "write_atomic",
]
