"""A trained DFREC model read back from a run folder, for eval / recover / export / bench.

    trained = load(workdir="runs/demo")            # newest checkpoint of the run
    trained = load(checkpoint="runs/demo/checkpoints", step=100)
    outputs = trained.predict(images_uint8_or_float01)   # jitted, deterministic

The config comes from the run's `config.json` (written by `train`, or by `convert` for the
authors' released model, which also writes `provenance.json`: the source file and its sha256,
carried into every record made with the model), so recovery needs no config file; the
parameters and batch statistics from the orbax checkpoint, read alone onto one device of this
process (the optimizer state is never read or built: a run whose optimizer config has
changed since still loads). Nothing here imports TensorFlow.

Inference is `inference.apply_per_image`: deterministic and per image (the masking-key rule
is written there), so the same input and checkpoint give the same outputs, which the evidence
records rely on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dfrec_jax import inference, paths
from dfrec_jax.models import DFREC
from dfrec_jax.run import checkpoints
from dfrec_jax.run import workdir as workdir_lib

PROVENANCE = "provenance.json"  # beside config.json in a converted workdir (`convert`)


def params_sha256(variables: Any) -> str:
    """sha256 over every array of `variables` (sorted paths; path, dtype, shape and bytes), so
    equal parameters give equal digests on any machine and any change shows."""
    digest = hashlib.sha256()
    flat = traverse_util.flatten_dict(jax.device_get(variables))
    for path in sorted(flat):
        leaf = np.ascontiguousarray(flat[path])
        digest.update("/".join(map(str, path)).encode())
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


# Model keys added after runs were written, with the value that rebuilds such a run exactly
# (the module default at the time): an older config.json lacks them.
LEGACY_MODEL_DEFAULTS = {
    ("ism", "encoder_bn_momentum"): 0.99,
    ("ism", "depthwise_impl"): "auto",
    ("tirm", "identity_pos_embed"): False,
    ("ism", "encoder_padding"): "symmetric",
    ("ism", "encoder_dilation_start"): "stage",
    ("ism", "align_corners"): False,
    ("tirm", "token_indexing"): "patch",
    ("masking_threshold",): "fixed",
}


def read_config(path: str) -> ml_collections.ConfigDict:
    """A run's config.json as a ConfigDict (lists where the config file had tuples), older
    runs' model configs completed with `LEGACY_MODEL_DEFAULTS`."""
    try:
        data = json.loads(paths.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no config.json at {path} (is this a `train` workdir?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"unreadable config {path}: {e}") from None
    model = data.get("model", {})
    for path, value in LEGACY_MODEL_DEFAULTS.items():
        *blocks, key = path
        node = model
        for block in blocks:
            node = node.get(block) if isinstance(node, dict) else None
        if isinstance(node, dict) and node:
            node.setdefault(key, value)
    return ml_collections.ConfigDict(data)


def _locate(workdir: str | None, checkpoint: str | None) -> tuple[str, str]:
    """(checkpoint directory, config.json path) from --workdir or --checkpoint."""
    if bool(workdir) == bool(checkpoint):
        raise ValueError("give exactly one of --workdir (a train run) or --checkpoint (its "
                         "checkpoints folder)")  # fmt: skip
    if workdir:
        workdir = paths.resolve(workdir)
        if not paths.isdir(workdir):
            raise FileNotFoundError(f"workdir not found: {workdir}")
        return paths.join(workdir, "checkpoints"), paths.join(workdir, "config.json")
    checkpoint = paths.resolve(checkpoint).rstrip("/")
    if not paths.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
    for candidate in (checkpoint, os.path.dirname(checkpoint)):
        if paths.exists(paths.join(candidate, "config.json")):
            return checkpoint, paths.join(candidate, "config.json")
    raise FileNotFoundError(f"no config.json in {checkpoint} or its parent folder")


@dataclasses.dataclass
class TrainedModel:
    config: ml_collections.ConfigDict
    model: DFREC
    variables: dict  # {"params": ..., "batch_stats": ...} on one device
    checkpoint_dir: str
    step: int
    params_sha256: str
    config_hash: str
    provenance: dict | None = None  # provenance.json of a converted model (`convert`)

    def checkpoint_record(self) -> dict:
        """What evidence records say about the weights: checkpoint path, step, params sha256,
        and for a converted model where they came from (`converted_from`)."""
        record = {"path": self.checkpoint_dir, "step": self.step,
                  "params_sha256": self.params_sha256}  # fmt: skip
        if self.provenance is not None:
            record["converted_from"] = self.provenance
        return record

    @property
    def image_size(self) -> int:
        return int(self.config.model.image_size)

    @functools.cached_property
    def _predict(self):
        return inference.make_predict(self.model, int(self.config.seed))

    def predict(self, images) -> dict[str, jax.Array]:
        """Model outputs (seg, forgery_logit, source, target, mask) for images [B,S,S,3] (uint8,
        or float in [0, 1]); float outputs in float32; each image independent of its batch."""
        return self._predict(self.variables, images)


def load(
    workdir: str | None = None, checkpoint: str | None = None, step: int | None = None
) -> TrainedModel:
    """The model of a run: `workdir` (its checkpoints/ and config.json) or `checkpoint` (a
    checkpoints folder whose config.json is beside or inside it); newest step unless `step`."""
    ckpt_dir, config_path = _locate(workdir, checkpoint)
    config = read_config(config_path)
    model = inference.build_model(config)
    # This process's first device: with several processes (multi-host eval) jax.devices()[0]
    # belongs to process 0, and each process reads the whole variables for itself.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        inference.abstract_variables(model),
    )
    with checkpoints.Checkpointer(ckpt_dir, save_every=1, keep=1, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (train first)")
        # Parameters and batch statistics only: the optimizer state is never read. Without
        # `step`, the newest intact checkpoint (a damaged newer one is named on stderr).
        variables = ckpt.restore_variables(target, step)
        step = ckpt.restored_step
    hash_path = paths.join(os.path.dirname(config_path), "config_hash.txt")
    if paths.exists(hash_path):
        digest = paths.read_text(hash_path).strip()
    else:
        digest = workdir_lib.config_hash(config)
    provenance_path = paths.join(os.path.dirname(config_path), PROVENANCE)
    provenance = None
    if paths.exists(provenance_path):
        provenance = json.loads(paths.read_text(provenance_path))
    return TrainedModel(
        config=config,
        model=model,
        variables=variables,
        checkpoint_dir=ckpt_dir,
        step=int(step),
        params_sha256=params_sha256(variables),
        config_hash=digest,
        provenance=provenance,
    )
