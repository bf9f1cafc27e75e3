"""Building a DFREC model from a config, initialising it, and a jitted forward function."""

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


def make_forward(model: DFREC):
    """jit(variables, images, rng) -> outputs dict, in inference mode."""

    @jax.jit
    def forward(variables: Any, images: jax.Array, rng: jax.Array):
        return model.apply(variables, images, train=False, rngs={"masking": rng})

    return forward
