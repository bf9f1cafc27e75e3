"""Memory per device of the sharded train step, read from XLA's compiled program; nothing runs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m dfrec_jax bench --what memory --config configs/official.py --batch 8,16

For each fsdp size that divides the devices (data = the rest), the real train step of the
config (model, frozen loss networks, AdamW) is lowered with abstract arguments and compiled
for the mesh; `compiled.memory_analysis()` gives one device's argument, output, alias and
temporary bytes, and the compiled program's collectives are counted by kind (what the mesh
costs in communication: a data-parallel step should hold all-reduces only). Next to it, from
the shardings alone: the parameter and optimizer bytes a device holds, and the leaves the
FSDP rule leaves replicated. Two batch sizes give the temporary bytes per example, from which
the batch that fits a device follows.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import numpy as np

from dfrec_jax import inference, losses
from dfrec_jax import loss_nets as loss_nets_lib
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train import standalone
from dfrec_jax.train import state as state_lib
from dfrec_jax.train import step as step_lib

GIB = 2**30


def _device_bytes(abstract_tree, sharding_tree) -> int:
    """Bytes of `abstract_tree` on its most loaded device under `sharding_tree`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(sharding_tree)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


_COLLECTIVE = re.compile(
    r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective ops of a compiled program's HLO text by kind (async starts count once)."""
    return dict(sorted(collections.Counter(_COLLECTIVE.findall(hlo_text)).items()))


def _tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def replicated_params(abstract_params, sharding_tree) -> dict:
    """What the FSDP rule keeps whole on every device: count, elements, and the reasons."""
    small = unsplittable = elements = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(sharding_tree)):
        if tuple(sharding.shard_shape(leaf.shape)) != tuple(leaf.shape):
            continue
        elements += math.prod(leaf.shape)
        if any(d % sharding.mesh.shape["fsdp"] == 0 for d in leaf.shape):
            small += 1  # under fsdp_min_size elements (biases, norms, small kernels)
        else:
            unsplittable += 1  # no dimension divisible by the fsdp size
    return {"leaves_small": small, "leaves_no_divisible_dim": unsplittable, "elements": elements}


def _abstract_batch(batch_size: int, image_size: int, sharding) -> dict:
    example = standalone.synthetic_batch(1, image_size)
    return {
        k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
        for k, v in example.items()
    }


def measure(config, batch_sizes, fsdp_sizes, *, loss_nets=None) -> list[dict]:
    """One record per (fsdp size, batch size): per-device bytes of the compiled train step."""
    devices = jax.devices()
    model = inference.build_model(config)
    nets = loss_nets if loss_nets is not None else loss_nets_lib.build_loss_nets(config.loss)
    weights = loss_nets_lib.loss_weights(config.loss)
    frozen_bytes = _tree_bytes(losses.split_frozen(nets)[0])
    results = []
    for fsdp in fsdp_sizes:
        if len(devices) % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} devices")
        mesh_config = config.mesh.copy_and_resolve_references()
        mesh_config.data, mesh_config.fsdp = len(devices) // fsdp, fsdp
        mesh = sharding_lib.make_mesh(mesh_config, devices)
        # The optimizer as `train` builds it for this mesh (flat AdamW only without fsdp).
        tx = state_lib.make_optimizer(config.optim, int(config.train.steps), mesh)
        abstract = state_lib.abstract_train_state(config, model, tx)
        shardings = state_lib.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
        step = step_lib.make_train_step(model, nets, weights, tx, mesh, shardings)
        state = sharding_lib.placed(abstract, shardings)
        for batch_size in batch_sizes:
            if batch_size % len(devices):
                raise ValueError(f"batch {batch_size} does not split over {len(devices)} devices")
            batch = _abstract_batch(batch_size, model.image_size, sharding_lib.batch_sharding(mesh))
            compiled = step.lower(state, batch).compile()
            stats = compiled.memory_analysis()
            results.append(
                {
                    "what": "memory",
                    "params": inference.param_counts(abstract.params)["total"],
                    "mesh": dict(mesh.shape),
                    "batch": batch_size,
                    "dtype": str(config.model.dtype),
                    "params_bytes": _device_bytes(abstract.params, shardings.params),
                    "opt_state_bytes": _device_bytes(abstract.opt_state, shardings.opt_state),
                    "params_bytes_unsharded": _tree_bytes(abstract.params),
                    "frozen_nets_bytes": frozen_bytes,
                    "replicated_params": replicated_params(abstract.params, shardings.params),
                    "argument_bytes": int(stats.argument_size_in_bytes),
                    "output_bytes": int(stats.output_size_in_bytes),
                    "alias_bytes": int(stats.alias_size_in_bytes),
                    "temp_bytes": int(stats.temp_size_in_bytes),
                    "collectives": collective_counts(compiled.as_text()),
                    "peak_bytes": int(
                        stats.argument_size_in_bytes
                        + stats.output_size_in_bytes
                        - stats.alias_size_in_bytes
                        + stats.temp_size_in_bytes
                    ),
                }
            )
    return results


def fitting_batch(records: list[dict], device_gib: float) -> int | None:
    """Largest global batch (a multiple of the device count) whose per-device peak fits
    `device_gib`, by a line through two batch sizes' peaks of one mesh; None if even the
    fixed part (arguments) does not fit."""
    (a, b) = sorted(records, key=lambda r: r["batch"])[:2]
    slope = (b["peak_bytes"] - a["peak_bytes"]) / (b["batch"] - a["batch"])
    fixed = a["peak_bytes"] - slope * a["batch"]
    devices = math.prod(a["mesh"].values())
    if fixed > device_gib * GIB:
        return None
    batch = int((device_gib * GIB - fixed) / slope) if slope > 0 else 0
    return batch - batch % devices


__all__ = ["collective_counts", "fitting_batch", "measure", "replicated_params"]
