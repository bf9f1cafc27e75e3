"""`export`: a trained DFREC as serialized StableHLO + weights, usable without this project.

    python -m dfrec_jax export --workdir W --output DIR [--platforms cpu,cuda]

writes to DIR

    model.stablehlo   `jax.export` serialization of f(variables, images) -> outputs, lowered for
                      every platform asked for (default cpu and cuda; a GPU is not needed to
                      lower for cuda), with a symbolic batch dimension "b"
    variables.npz     the weights f takes as its first argument, one array per leaf, named by
                      its path ("params/ism/classifier/kernel"); plain np.savez, no pickle
    config.json       the run's config
    manifest.json     the input/output contract, the leaf order of `variables`, versions,
                      the checkpoint (path, step, params sha256), the config hash and the
                      sha256 of model.stablehlo and variables.npz
    README.md         how to call it with jax + numpy alone

The weights are an argument, not constants folded into the program: the program stays small
and weights of the same shapes (another checkpoint of the same config) can be swapped in. The
program computes what `trained.predict` computes: each image is run alone with the TIRM's
masking key fixed to config.seed, so a recovery is deterministic (same image and weights, same
outputs, whatever else is in the batch). `dfrec_jax.exported` loads
the folder back (json, numpy and jax only).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import inference
from dfrec_jax import trained as trained_lib
from dfrec_jax.exported import file_sha256
from dfrec_jax.models import layers
from dfrec_jax.run import workdir as workdir_lib

# Platform names jax.export lowers for (the CLI's "gpu" is not one: say cuda or rocm).
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MODEL_FILE = "model.stablehlo"
VARIABLES_FILE = "variables.npz"
FILES = (MODEL_FILE, VARIABLES_FILE)  # checked against their sha256 by dfrec_jax.exported
BATCH_DIM = "b"


def key_paths(tree) -> list[str]:
    """The leaves' dict-key paths ("params/ism/classifier/kernel"), in jax.tree.leaves order."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(entry.key) for entry in path]
        if any("/" in name for name in names):
            raise ValueError(f"export: a variable name contains '/': {names}")
        paths.append("/".join(names))
    return paths


def _shape(shape) -> list:
    """A shape for JSON: symbolic dimensions as their names ("b")."""
    return [d if isinstance(d, int) else str(d) for d in shape]


def export_model(trained, platforms=("cpu", "cuda")) -> jax.export.Exported:
    """The `jax.export.Exported` of `trained.predict`'s computation (`inference.apply_per_image`,
    float images) for `trained`'s variables and a symbolic batch of images at its size, lowered for
    `platforms`."""
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if unknown or not platforms:
        raise ValueError(
            f"export: unknown platform(s) {unknown or '(none given)'}; use some of "
            f"{', '.join(KNOWN_PLATFORMS)} (NVIDIA GPUs: cuda)"
        )
    (batch,) = jax.export.symbolic_shape(BATCH_DIM)
    size = trained.image_size
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trained.variables)
    model, seed = trained.model, int(trained.config.seed)
    function = inference.make_predict(model, seed)
    try:
        with layers.several_platforms(True):  # each platform's own convolutions
            return jax.export.export(function, platforms=platforms)(variables, images)
    except Exception as e:  # noqa: BLE001 - shape-polymorphism / lowering errors, for people
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"export: lowering for {', '.join(platforms)} failed: {first}") from None


def manifest_for(exported, trained, variable_keys, files: dict[str, str]) -> dict:
    """What a user needs to call the program correctly, and where it came from."""
    images = exported.in_avals[-1]
    outputs = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    return {
        "format": "dfrec_jax export 1",
        "function": "f(variables, images) -> outputs (jax.export; call as exported.call)",
        "inputs": {
            "variables": {
                "file": VARIABLES_FILE,
                "keys": variable_keys,  # npz names, in the order of jax.tree.leaves(variables)
            },
            "images": {
                "shape": _shape(images.shape),
                "dtype": str(images.dtype),
                "range": [0.0, 1.0],
                "layout": "RGB, aligned face crops (NHWC)",
            },
        },
        "outputs": {
            name: {"shape": _shape(aval.shape), "dtype": str(aval.dtype)}
            for name, aval in outputs.items()
        },
        "batch_dimension": BATCH_DIM,
        "image_size": trained.image_size,
        "patch_size": int(trained.config.model.patch_size),
        "masking_seed": int(trained.config.seed),
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        "checkpoint": trained.checkpoint_record(),  # + converted_from for `convert` runs
        "config_hash": trained.config_hash,
        "sha256": files,
    }


def readme_text(manifest: dict) -> str:
    size = manifest["image_size"]
    outputs = "\n".join(
        f"- `{name}`: {spec['dtype']} [{', '.join(map(str, spec['shape']))}]"
        for name, spec in manifest["outputs"].items()
    )
    source = manifest["checkpoint"].get("converted_from")
    converted = (
        f" Weights converted from `{source['file']}` (sha256 `{source['sha256']}`), the authors'"
        " released model." if source else ""
    )
    return f"""# DFREC export

A trained DFREC (deepfake identity recovery) model, exported with `jax.export`: from one
face-swapped face it predicts the identity segmentation map, a forgery logit, the recovered
source face and the recovered target face. Checkpoint step {manifest["checkpoint"]["step"]}
(params sha256 `{manifest["checkpoint"]["params_sha256"]}`), config hash
`{manifest["config_hash"]}` (config.json).{converted} Platforms: {", ".join(manifest["platforms"])};
jax {manifest["jax_version"]}, calling convention {manifest["calling_convention_version"]}.

## Input contract

`images`: float32 `[b, {size}, {size}, 3]`, RGB in [0, 1], any batch size b >= 1. The faces
must be aligned crops at {size} x {size} as in training (the `recover --align` path detects,
aligns and pastes back); other sizes are refused, unaligned faces give meaningless results.

Outputs (a dict; b is the batch size; N = ({size}/{manifest["patch_size"]})^2 patches):
{outputs}

`seg` is the identity segmentation map in [0, 1], `forgery_logit` the logit of "this face is
swapped", `source`/`target` the recovered faces in [0, 1], `mask` the patches the TIRM
regenerated (True = masked).

Deterministic: each image is processed on its own with the masking key fixed to the config's
seed ({manifest["masking_seed"]}) inside the program, so an image and the weights always give
the same outputs, whatever the batch size and the other images of the batch.

## Loading with jax + numpy only

```python
import json, numpy as np, jax

d = "path/to/this/folder"
exp = jax.export.deserialize(bytearray(open(f"{{d}}/model.stablehlo", "rb").read()))
keys = json.load(open(f"{{d}}/manifest.json"))["inputs"]["variables"]["keys"]
npz = np.load(f"{{d}}/variables.npz")
images = np.random.rand(2, {size}, {size}, 3).astype(np.float32)  # your aligned faces
args, _ = jax.tree.unflatten(exp.in_tree, [npz[k] for k in keys] + [images])
outputs = jax.jit(exp.call)(*args)  # dict: {", ".join(manifest["outputs"])}
```

Or `dfrec_jax.exported.load(d)(images)`, which also checks the sha256 of both files against
manifest.json and accepts uint8 images. `variables.npz` holds the weights as an argument of
the program: weights of another checkpoint of the same config (same keys and shapes) can be
swapped in.
"""


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def run(
    output_dir: str,
    *,
    workdir: str | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
    platforms=("cpu", "cuda"),
) -> dict:
    """Exports the run's model (newest checkpoint unless `step`) into `output_dir`; prints and
    returns a summary. manifest.json is written last: a folder without one is incomplete."""
    trained = trained_lib.load(workdir=workdir, checkpoint=checkpoint, step=step)
    exported = export_model(trained, platforms)
    variables = jax.device_get(trained.variables)
    keys = key_paths(variables)
    leaves = jax.tree.leaves(variables)
    for key, leaf in zip(keys, leaves):  # npz without pickle: numpy's own dtypes only
        if np.dtype(leaf.dtype).kind not in "biuf":
            raise ValueError(f"export: variable {key} has dtype {leaf.dtype}, not storable in npz")
    if len(leaves) + 1 != len(exported.in_avals):  # variables' leaves, then the images
        raise AssertionError("exported arguments do not match the variables' leaves")

    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.exists(manifest_path):  # a re-export that fails midway must not look complete
        os.remove(manifest_path)
    model_path = os.path.join(output_dir, MODEL_FILE)
    variables_path = os.path.join(output_dir, VARIABLES_FILE)
    with open(model_path, "wb") as f:
        f.write(exported.serialize())
    with open(variables_path, "wb") as f:
        np.savez(f, **{key: np.asarray(leaf) for key, leaf in zip(keys, leaves)})
    _write_json(os.path.join(output_dir, "config.json"), workdir_lib.config_to_dict(trained.config))
    files = {name: file_sha256(os.path.join(output_dir, name)) for name in FILES}
    manifest = manifest_for(exported, trained, keys, files)
    with open(os.path.join(output_dir, "README.md"), "w") as f:
        f.write(readme_text(manifest))
    _write_json(manifest_path, manifest)

    sizes = {name: os.path.getsize(os.path.join(output_dir, name)) for name in files}
    summary = {
        "output": os.path.abspath(output_dir),
        "platforms": list(exported.platforms),
        "image_size": trained.image_size,
        "checkpoint": trained.checkpoint_dir,
        "step": trained.step,
        "params_sha256": trained.params_sha256,
        "config_hash": trained.config_hash,
        "bytes": sizes,
    }
    print(
        f"exported step {trained.step} of {trained.checkpoint_dir} "
        f"(params sha256 {trained.params_sha256[:12]}, {len(keys)} arrays) for "
        f"{', '.join(exported.platforms)}, images float32 [b,{trained.image_size},"
        f"{trained.image_size},3]: "
        + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items())
    )
    print(summary["output"])
    return summary
