"""The one inference path: build a DFREC model from a config, initialise it, and apply it
deterministically per image with float32 outputs.

Every user of a model's outputs outside training (eval, recover, trace, export, bench, the
learning check, the `forward` command and the trainer's validation and image grids) goes
through `apply_per_image`, so they all see the same numbers for the same image and weights.

The masking-key rule: at inference every image is run alone (a batch of one, vmapped over the
batch) with the masking key `jax.random.key(seed)`, `seed` being the run's `config.seed`. The
masking's tie-break noise is drawn per batch row, and on a pristine face the segmentation map is
~0 everywhere, so that noise decides which patches are masked: with one key per image, an
image's outputs never depend on the other images of its batch, its position in it, or which
batch of a validation pass it fell in. Training draws a fresh key per step (train/step.py).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dfrec_jax.models import DFREC


def build_model(config) -> DFREC:
    return DFREC.from_config(config.model)


def init_variables(model: DFREC, rng: jax.Array, batch_size: int = 1):
    """Random initial variables (params + batch_stats), computed under jit."""
    shape = (batch_size, model.image_size, model.image_size, 3)
    params_rng, masking_rng, dropout_rng = jax.random.split(rng, 3)

    def init():
        return model.init(
            {"params": params_rng, "masking": masking_rng, "dropout": dropout_rng},
            jnp.zeros(shape, jnp.float32),
            train=False,
        )

    # Init runs once; on CPU, XLA's backend optimisation costs most of its compile time
    # (about 3x) and buys nothing, so it is switched off for this one program.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return jax.jit(init).lower().compile(compiler_options=options)()


def abstract_variables(model: DFREC, batch_size: int = 1):
    """Shapes and dtypes of the variables without computing anything (jax.eval_shape)."""
    shape = jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), jnp.float32)
    rngs = {k: jax.random.key(0) for k in ("params", "masking", "dropout")}
    return jax.eval_shape(functools.partial(model.init, train=False), rngs, shape)


def param_counts(params) -> dict[str, int]:
    """Parameter counts per top-level module and per model part, plus the total."""
    counts: dict[str, int] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        size = int(np.prod(leaf.shape))
        for depth in (1, 2):
            if len(path) > depth:
                key = "/".join(path[:depth])
                counts[key] = counts.get(key, 0) + size
        counts["total"] = counts.get("total", 0) + size
    return dict(sorted(counts.items()))


OUTPUT_KEYS = ("seg", "forgery_logit", "source", "target", "mask")


def apply_per_image(
    model: DFREC, variables: Any, images: jax.Array, seed: int, keys=OUTPUT_KEYS
) -> dict:
    """DFREC outputs `keys` (None: every output, e.g. what the losses read) for images
    [B,S,S,3] (uint8, or float in [0, 1]), each image run alone with the masking key
    `jax.random.key(seed)` (the module's rule); floating outputs in float32 whatever the
    compute dtype. Traceable: use it under jit."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0

    def one(image):
        out = model.apply(variables, image[None], train=False,
                          rngs={"masking": jax.random.key(seed)})  # fmt: skip
        return {k: v[0] for k, v in out.items() if keys is None or k in keys}

    return float32_outputs(jax.vmap(one)(images))


def float32_outputs(outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Floating outputs in float32 (bf16 compute -> fp32 losses and records); indices and
    masks as they are."""
    return {
        k: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in outputs.items()
    }


def make_predict(model: DFREC, seed: int):
    """jit(variables, images) -> `apply_per_image(model, variables, images, seed)`.

    One jitted function per (model, seed) in a process: models compare by their fields, so
    every load of the same config (checkpoints of one run, a sweep's evaluations, the trainer's
    validation and image grids) shares one trace and one compiled program per input shape."""
    try:
        return _cached_predict(model, seed)
    except TypeError:  # a module with an unhashable field (built by hand): a jit of its own
        return _predict(model, seed)


def _predict(model: DFREC, seed: int):
    return jax.jit(functools.partial(apply_per_image, model, seed=seed))


_cached_predict = functools.lru_cache(maxsize=8)(_predict)
