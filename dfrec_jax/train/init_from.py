"""Pretrained initialisation of a fresh run (`config.init`), applied once at step 0.

    state = state_lib.create_train_state(...)            # random init, sharded
    state, applied = init_from.apply(config, state, mesh)  # converted weights merged in
    init_from.record(workdir, applied)                   # W/init.json + one console line each

Sources (configs/default.py `init_config`; "" = off), in the order they are applied (a later
source overrides the leaves it shares with an earlier one):
  released      the authors' released checkpoint layout -> the whole model
                (pretrained/convert_released.py; the leaves the release lacks keep their init)
  workdir       an earlier run of this project -> params + batch stats of its newest
                checkpoint (restored straight onto this run's mesh; its optimizer state and
                step are not taken)
  ism_encoder   an EfficientNet checkpoint -> params/ism/encoder + batch_stats/ism/encoder
  tirm_encoder  a ViT / MAE checkpoint -> params/tirm/encoder
Every source's leaves are checked against the model's before anything is replaced: a leaf the
model does not have, or a shape that differs, is one `InitError` line naming the leaf and both
shapes. Leaves of the targeted part that a source did not fill keep their random init and are
counted (`kept_init`); checkpoint keys nothing used are counted too (`unused_checkpoint_keys`).

Sharding: a replaced leaf is rebuilt with the SAME sharding as the leaf it replaces
(`jax.make_array_from_callback` from the host copy every process reads, or a reshard of the
restored run's arrays), so the merged state has exactly the layout `create_train_state` gave.
The optimizer state is left as created: AdamW's moments are zeros whatever the parameters.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from dfrec_jax import inference, paths, trained
from dfrec_jax.exported import file_sha256  # one file hasher for the project
from dfrec_jax.pretrained import convert_backbones, convert_released
from dfrec_jax.pretrained.checkpoint import ConversionError
from dfrec_jax.run import checkpoints
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.train import sharding as sharding_lib

# (config key, part of the model it targets); applied in this order.
SOURCES = (
    ("released", ""),
    ("workdir", ""),
    ("ism_encoder", "ism/encoder"),
    ("tirm_encoder", "tirm/encoder"),
)
COLLECTIONS = ("params", "batch_stats")
_EXAMPLES = 10  # names listed in init.json per kind


class InitError(ValueError):
    """A pretrained source that cannot initialise this model: one line saying what and where."""


@dataclasses.dataclass
class Applied:
    """What one source did to the fresh state (one entry of W/init.json)."""

    source: str  # config key: released | workdir | ism_encoder | tirm_encoder
    path: str
    sha256: str | None  # of the file; for a workdir, of the restored params + batch stats
    arrays: int  # leaves replaced (params and batch stats)
    parameters: int  # elements of the replaced params leaves
    batch_stats_arrays: int
    kept_init: list[str]  # leaves of the targeted part no checkpoint tensor filled
    unused_checkpoint_keys: list[str]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # naming, step, notes

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("kept_init", "unused_checkpoint_keys"):
            names = data.pop(key)
            data[key] = len(names)
            data[f"{key}_examples"] = names[:_EXAMPLES]
        return data

    def line(self) -> str:
        digest = f"sha256 {self.sha256[:16]}" if self.sha256 else "sha256 n/a"
        text = (
            f"init.{self.source} <- {self.path} ({digest}): {self.arrays} arrays replaced "
            f"({self.parameters:,} parameters, {self.batch_stats_arrays} batch-stat arrays); "
            f"{len(self.kept_init)} kept their init; "
            f"{len(self.unused_checkpoint_keys)} checkpoint keys unused"
        )
        notes = self.details.get("notes")
        return text + ("; " + "; ".join(notes) if notes else "")


# ----------------------------------------------------------------------------- configuration


def enabled(init_config) -> list[tuple[str, str]]:
    """(source, path) of every source set in `config.init`, in application order."""
    if init_config is None:
        return []
    return [(name, str(init_config[name])) for name, _ in SOURCES if init_config.get(name, "")]


def validate(init_config) -> None:
    """Config-level checks (namings, conflicting sources, paths exist): one InitError line."""
    sources = dict(enabled(init_config))
    if not sources:
        return
    if "released" in sources and "workdir" in sources:
        raise InitError("init.released and init.workdir both give the whole model: set one")
    namings = {
        "ism_encoder": convert_backbones.EFFICIENTNET_NAMINGS,
        "tirm_encoder": convert_backbones.VIT_NAMINGS,
    }
    for name, known in namings.items():
        naming = init_config.get(f"{name}_naming", "")
        if name in sources and naming not in known:
            raise InitError(f"init.{name}_naming={naming!r} is not one of {', '.join(known)}")
    for name, path in sources.items():
        if name == "workdir":
            if not paths.isdir(path):
                raise InitError(f"init.workdir: no run folder at {path}")
        elif paths.is_remote(path):  # converters read local files (torch-free readers)
            raise InitError(f"init.{name}: {path} is remote; copy the file to a local disk")
        elif not paths.isfile(path):
            raise InitError(f"init.{name}: no file at {path}")


# ----------------------------------------------------------------------------- sources


def _flat(tree, root: str = "") -> dict[str, Any]:
    """{"params/<root>/a/b": leaf} for a {"params": ..., "batch_stats": ...} tree."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        collection, rest = path[0], "/".join(path[1:])
        out["/".join(p for p in (collection, root, rest) if p)] = leaf
    return out


def _rooted(names, root: str) -> list[str]:
    """Converter-relative leaf names ("params/conv_stem/kernel") under `root`."""
    out = []
    for name in names:
        collection, _, rest = name.partition("/")
        out.append("/".join(p for p in (collection, root, rest) if p))
    return out


def _convert_file(name: str, path: str, config) -> tuple[dict, list[str], dict]:
    """(updates {leaf: numpy}, unused checkpoint keys, details) for one file. The leaves the
    converter could not fill (zeros in its output) are not updates: they keep their init."""
    init, model = config.init, config.model
    root = dict(SOURCES)[name]
    if name == "released":
        variables, report = convert_released.convert_released_checkpoint(path, config)
        details: dict[str, Any] = {}
    elif name == "ism_encoder":
        naming = init.ism_encoder_naming
        variables, report = convert_backbones.convert_efficientnet_b0(
            path,
            naming,
            prefix=init.ism_encoder_prefix,
            width_coefficient=float(model.ism.get("width_coefficient", 1.0)),
            depth_coefficient=float(model.ism.get("depth_coefficient", 1.0)),
        )
        details = {"naming": naming, "prefix": init.ism_encoder_prefix}
        if naming == "timm":
            details["notes"] = [
                "timm BatchNorm eps is 1e-5, the ISM encoder's 1e-3 (outputs differ slightly)"
            ]
    else:
        naming = init.tirm_encoder_naming
        variables, report = convert_backbones.convert_vit(
            path,
            naming,
            int(model.image_size),
            int(model.patch_size),
            pos_embed=model.tirm.get("pos_embed", "learned"),
            prefix=init.tirm_encoder_prefix,
        )
        details = {"naming": naming, "prefix": init.tirm_encoder_prefix}
    missing = set(_rooted(report.missing, root))
    updates = {k: v for k, v in _flat(variables, root).items() if k not in missing}
    return updates, list(report.unexpected), details


def _restore_run(run_dir: str, mesh, min_size: int) -> tuple[dict, int]:
    """(params + batch stats of the run's newest checkpoint, laid out for `mesh`, its step)."""
    ckpt_dir = paths.join(run_dir, "checkpoints")
    config_path = paths.join(run_dir, "config.json")
    if not paths.isdir(ckpt_dir):
        raise InitError(f"init.workdir: no checkpoints folder in {run_dir} (train it first)")
    if not paths.isfile(config_path):
        raise InitError(f"init.workdir: no config.json in {run_dir} (not a `train` run folder)")
    source = trained.read_config(config_path)  # the model the run was saved with
    abstract = inference.abstract_variables(inference.build_model(source))
    rep = sharding_lib.replicated(mesh)
    target = {
        "params": sharding_lib.placed(
            abstract["params"], sharding_lib.tree_shardings(abstract["params"], mesh, min_size)
        ),
        "batch_stats": jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract["batch_stats"]
        ),
    }
    with checkpoints.Checkpointer(ckpt_dir, save_every=1, keep=1, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise InitError(f"init.workdir: no checkpoint in {ckpt_dir} (train it first)")
        variables = ckpt.restore_variables(target)  # newest intact; no optimizer state read
        step = ckpt.restored_step
    return variables, int(step)


def _variables_sha256(variables) -> str | None:
    leaves = jax.tree.leaves(variables)
    if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return None  # multi-host: the arrays are not all on this process
    return trained.params_sha256(variables)


# ----------------------------------------------------------------------------- merging


def _check(name: str, path: str, updates: dict, current: dict) -> None:
    for key, value in updates.items():
        if key not in current:
            raise InitError(
                f"init.{name} ({path}): the model has no {key} (checkpoint shape "
                f"{tuple(value.shape)}); the source does not fit model config"
            )
        want, got = tuple(current[key].shape), tuple(value.shape)
        if want != got:
            raise InitError(
                f"init.{name} ({path}): shape mismatch at {key}: checkpoint {got}, model {want}"
            )


def _place(value, like: jax.Array) -> jax.Array:
    """`value` (numpy or jax) as an array with `like`'s dtype and sharding."""
    if isinstance(value, jax.Array):
        if value.dtype != like.dtype:
            value = value.astype(like.dtype)
        if value.sharding.is_equivalent_to(like.sharding, like.ndim):
            return value
        return jax.device_put(value, like.sharding)
    host = np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: host[index])


def _source_updates(name: str, path: str, config, mesh) -> tuple[dict, list, str | None, dict]:
    """(updates {leaf: array}, unused checkpoint keys, sha256, details) of one source."""
    if name == "workdir":
        variables, step = _restore_run(path, mesh, int(config.mesh.fsdp_min_size))
        updates = _flat(variables)
        details = {"checkpoint_step": step, "sha256_of": "params + batch stats"}
        return updates, [], _variables_sha256(variables), details
    try:
        updates, unused, details = _convert_file(name, path, config)
    except (ConversionError, ValueError) as e:  # the converters' own one-line errors
        raise InitError(f"init.{name} ({path}): {e}") from None
    return updates, unused, file_sha256(path), dict(details, sha256_of="file")


def apply(config, state, mesh) -> tuple[Any, list[Applied]]:
    """`state` with every source of `config.init` merged into its params / batch stats.

    Call once, on a freshly created state. Returns (state, what each source did); the state is
    returned unchanged (and the list empty) when no source is set.
    """
    sources = enabled(config.get("init"))
    if not sources:
        return state, []
    validate(config.init)
    current = _flat({"params": state.params, "batch_stats": state.batch_stats})
    applied = []
    for name, path in sources:
        path = paths.resolve(path)
        updates, unused, digest, details = _source_updates(name, path, config, mesh)
        _check(name, path, updates, current)
        root = dict(SOURCES)[name]
        prefix = root + "/" if root else ""  # "" = the whole model
        part = [k for k in current if k.split("/", 1)[1].startswith(prefix)]
        kept = sorted(set(part) - set(updates))
        for key, value in updates.items():
            current[key] = _place(value, current[key])
        applied.append(
            Applied(
                source=name,
                path=path,
                sha256=digest,
                arrays=len(updates),
                parameters=sum(int(np.prod(v.shape)) for k, v in updates.items()
                               if k.startswith("params/")),  # fmt: skip
                batch_stats_arrays=sum(k.startswith("batch_stats/") for k in updates),
                kept_init=kept,
                unused_checkpoint_keys=sorted(unused),
                details=details,
            )
        )
    tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in current.items()})
    return state.replace(
        params=tree.get("params", {}), batch_stats=tree.get("batch_stats", {})
    ), applied


def record(workdir: str, applied: list[Applied], step: int = 0) -> None:
    """W/init.json (process 0) and one console line per applied source."""
    if not applied or jax.process_index() != 0:
        return
    workdir_lib.save_json(
        paths.join(workdir, "init.json"),
        {"step": step, "sources": [a.to_json() for a in applied]},
    )
    for item in applied:
        print(item.line(), file=sys.stderr, flush=True)


__all__ = ["Applied", "InitError", "SOURCES", "apply", "enabled", "record", "validate"]
