"""Loads a folder written by `python -m dfrec_jax export` and runs it: json, numpy and jax only.

    from dfrec_jax import exported
    model = exported.load("exports/demo")
    outputs = model(images)   # [b,S,S,3] uint8, or float in [0, 1] -> dict of jax arrays

Nothing of the training code (flax, optax, orbax, TensorFlow, dfrec_jax.models) is imported:
this module is the whole dependency of a downstream user, and can be copied on its own. Both
files are checked against the sha256 in manifest.json before use, and the weights against
the shapes and dtypes the program was exported with.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

FILES = ("model.stablehlo", "variables.npz")


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Exported:
    """A deserialized DFREC program with its weights on the default device."""

    def __init__(self, directory: str, program: jax.export.Exported, variables, manifest: dict):
        self.directory = directory
        self.program = program
        self.variables = variables
        self.manifest = manifest
        self._call = jax.jit(program.call)

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def __call__(self, images, variables=None) -> dict[str, jax.Array]:
        """Outputs (seg, forgery_logit, source, target, mask; see manifest.json) for aligned
        faces [b,S,S,3]: uint8 (scaled by 1/255) or float in [0, 1]. `variables`: other
        weights of the same tree, shapes and dtypes (default: the exported ones)."""
        images = np.asarray(images)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or not len(images):
            raise ValueError(
                f"exported model {self.directory}: images must be [b,{size},{size},3] with "
                f"b >= 1, got {list(images.shape)}"
            )
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        variables = self.variables if variables is None else variables
        return self._call(variables, images.astype(np.float32))


def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"exported model {directory}: no manifest.json (not an export, "
                                "or an interrupted one)")  # fmt: skip
    with open(path) as f:
        return json.load(f)


def _check_files(directory: str, manifest: dict) -> None:
    for name in FILES:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"exported model {directory}: {name} is missing")
        if file_sha256(path) != manifest["sha256"].get(name):
            raise ValueError(
                f"exported model {directory}: {name} does not match its sha256 in manifest.json "
                "(changed or corrupt)"
            )


def _variables(directory: str, program, keys: list[str]):
    """The weights as the pytree the program's first argument expects: the npz arrays in the
    manifest's leaf order, placed into the program's own input tree (no flax needed)."""
    avals = program.in_avals[: len(keys)]
    with np.load(os.path.join(directory, FILES[1])) as npz:
        if sorted(npz.files) != sorted(keys) or len(keys) + 1 != len(program.in_avals):
            raise ValueError(
                f"exported model {directory}: variables.npz holds other arrays than the "
                "program's arguments"
            )
        leaves = [npz[key] for key in keys]
    for key, leaf, aval in zip(keys, leaves, avals):
        if leaf.shape != aval.shape or leaf.dtype != aval.dtype:
            raise ValueError(
                f"exported model {directory}: variable {key} is {leaf.dtype}{list(leaf.shape)}, "
                f"the program takes {aval.dtype}{list(aval.shape)}"
            )
    (variables, _), _ = jax.tree.unflatten(program.in_tree, [*leaves, None])
    return jax.device_put(variables)


def load(directory: str) -> Exported:
    """The exported model in `directory`, after checking its files against manifest.json."""
    directory = os.path.abspath(directory)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest)
    with open(os.path.join(directory, FILES[0]), "rb") as f:
        serialized = bytearray(f.read())
    try:
        program = jax.export.deserialize(serialized)
    except Exception as e:  # noqa: BLE001 - e.g. a calling convention this jax cannot run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"exported model {directory}: jax {jax.__version__} cannot read model.stablehlo "
            f"(exported with jax {manifest.get('jax_version')}): {first}"
        ) from None
    keys = manifest["inputs"]["variables"]["keys"]
    return Exported(directory, program, _variables(directory, program, keys), manifest)
