"""Run metadata in the workdir: the resolved config, its hash and the library versions.

    workdir/config.json        the config of the newest run in the folder (sorted keys): what
                               eval / recover / export read
    workdir/config_hash.txt    its hash (`config_hash`)
    workdir/versions.json      library versions and devices of the newest start
    workdir/config.<UTC time>.json
                               the previous config.json, kept when a run is resumed with a
                               config whose hash differs (e.g. a changed log interval): the
                               change is on record and logged as a warning, not refused.

Only process 0 writes; every process gets the hash back. Files are written to a temporary name
and renamed, so a run killed mid-write never leaves a half-written config. File access goes
through `dfrec_jax.paths` (remote workdirs such as gs:// work; local ones need no TensorFlow).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from typing import Any

import jax

from dfrec_jax import paths

log = logging.getLogger(__name__)

# Key in versions.json -> distributions that provide it (the first one installed is reported).
_DISTRIBUTIONS = {
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "flax": ("flax",),
    "optax": ("optax",),
    "orbax-checkpoint": ("orbax-checkpoint",),
    "chex": ("chex",),
    "ml-collections": ("ml-collections", "ml_collections"),
    "numpy": ("numpy",),
    "tensorflow": ("tensorflow-cpu", "tensorflow", "tf-nightly", "tensorflow-macos"),
    "tensorflow-datasets": ("tensorflow-datasets", "tfds-nightly"),
    "dm-pix": ("dm-pix", "dm_pix"),
    "opencv": (
        "opencv-python-headless",
        "opencv-python",
        "opencv-contrib-python-headless",
        "opencv-contrib-python",
    ),
}


def _distribution_version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def library_versions() -> dict[str, str]:
    """Versions of Python, the libraries the results depend on, the platform and the devices."""
    versions = {"python": platform.python_version()}
    versions.update({key: _distribution_version(names) for key, names in _DISTRIBUTIONS.items()})
    versions["platform"] = platform.platform()
    devices = jax.devices()
    versions["devices"] = f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
    versions["processes"] = str(jax.process_count())
    return versions


def config_to_dict(config) -> Any:
    """A ConfigDict / FrozenConfigDict / mapping as plain JSON-able Python (tuples -> lists)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # NumPy / JAX scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def canonical_json(config) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":"))


def config_hash(config) -> str:
    """First 16 hex digits of the sha256 of the config's canonical JSON (sorted keys, no
    spaces): equal for equal configs whatever the key order, different if any value differs."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def _pretty(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def save_json(path: str, data) -> None:
    """Writes `data` as indented JSON to `path` (local or remote) atomically."""
    paths.makedirs(os.path.dirname(path))
    paths.write_atomic(path, _pretty(data))


def _saved_hash(workdir: str) -> str | None:
    """Hash of the run's config.json, None if there is none."""
    path = paths.join(workdir, "config.json")
    if not paths.exists(path):
        return None
    return config_hash(json.loads(paths.read_text(path)))


def save_run_metadata(workdir: str, config, *, resumed: bool = False) -> str:
    """Writes config.json, config_hash.txt and versions.json to `workdir` (process 0 only) and
    returns the config's hash. The trainer calls it once the model is built and its state
    created or restored, so a config that fails never lands here.

    config.json is always the config of the newest run in the folder, which is what eval,
    recover and export read: a fresh run (`resumed=False`, no checkpoint yet) overwrites
    whatever an earlier, failed run left; a resume with a different config first renames the
    old config.json to config.<time>.json (the config the earlier steps were trained with) and
    logs a warning. The trainer refuses a resume whose config changes array shapes."""
    digest = config_hash(config)
    if jax.process_index() != 0:
        return digest
    paths.makedirs(workdir)
    previous = _saved_hash(workdir)
    if previous != digest:
        if resumed and previous is not None:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            kept = paths.join(workdir, f"config.{stamp}.json")
            paths.rename(paths.join(workdir, "config.json"), kept)
            log.warning(
                "resuming %s with a different config (hash %s, was %s); config.json is the new "
                "one, the previous one is kept as %s",
                workdir,
                digest,
                previous,
                os.path.basename(kept),
            )
        paths.write_atomic(paths.join(workdir, "config.json"), _pretty(config_to_dict(config)))
        paths.write_atomic(paths.join(workdir, "config_hash.txt"), digest + "\n")
    paths.write_atomic(paths.join(workdir, "versions.json"), _pretty(library_versions()))
    return digest
