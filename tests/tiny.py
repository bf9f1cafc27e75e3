"""A tiny DFREC and tiny frozen loss networks for tests that train (seconds, not minutes).

Same code paths as the real configs: only the widths, depths and image size shrink. The loss
networks have the real ones' interfaces (4 identity maps + an L2-normalised embedding, 5
perceptual maps, an attribute vector) with fixed random weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import default, demo
from dfrec_jax import losses

IMAGE_SIZE = 32


def tiny_config(image_size: int = IMAGE_SIZE):
    """configs/demo.py with a tiny model at `image_size` (patch 8) and a batch of 8."""
    config = demo.get_config()
    config.model = default.model_config(image_size=image_size, patch_size=8)
    model = config.model
    model.ism.update(
        decoder_channels=16,
        low_level_channels=8,
        atrous_rates=(1, 2, 3),
        width_coefficient=0.25,
        depth_coefficient=0.25,
        # The grouped conv: at these sizes it runs as fast and compiles ~25% faster than the
        # CPU slice sum (the tiny model's gradient: 12.6 vs 16.4 s), which the suite pays per
        # compile. tests/test_layers.py and the demo-size tests cover the slice sum.
        depthwise_impl="xla",
    )
    model.sirm.update(channels=(4, 8, 8, 16, 32), source_channels=16)
    model.tirm.update(
        encoder_width=32,
        encoder_depth=1,
        encoder_heads=2,
        encoder_mlp_dim=64,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        decoder_mlp_dim=64,
    )
    config.data.image_size = image_size
    return config


class TinyIdentity(nn.Module):
    @nn.compact
    def __call__(self, x):
        feats = []
        x = x - 0.5
        for i, ch in enumerate((4, 4, 8, 8)):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=2, name=f"conv{i}")(x))
            feats.append(x)
        emb = nn.Dense(8, name="embed")(jnp.mean(x, axis=(1, 2)))
        return tuple(feats), emb / jnp.sqrt(jnp.sum(emb**2, axis=-1, keepdims=True) + 1e-12)


class TinyPerceptual(nn.Module):
    @nn.compact
    def __call__(self, x):
        feats = []
        for i, ch in enumerate((4, 4, 8, 8, 8)):
            x = nn.relu(nn.Conv(ch, (3, 3), strides=1 if i == 0 else 2, name=f"conv{i}")(x))
            feats.append(x)
        return tuple(feats)


class TinyAttribute(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def tiny_loss_nets(seed: int = 0, nan: bool = False) -> losses.LossNets:
    """Frozen random loss nets; `nan=True` makes the identity net emit NaN (guard tests)."""
    probe = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    modules = (TinyIdentity(), TinyPerceptual(), TinyAttribute())
    variables = [m.init(k, probe) for m, k in zip(modules, keys)]
    identity = losses.frozen(modules[0].apply, variables[0])
    if nan:

        def identity(images, _fn=identity):  # noqa: E306
            feats, emb = _fn(images)
            return feats, emb * jnp.nan

    return losses.LossNets(
        identity=identity,
        perceptual=losses.frozen(modules[1].apply, variables[1]),
        attribute=losses.frozen(modules[2].apply, variables[2]),
    )


def tiny_identity_nets(image_size: int = IMAGE_SIZE):
    """Two different random TinyIdentity nets standing in for FaceNet and dlib (8-D)."""
    from dfrec_jax.eval import identity

    module = TinyIdentity()
    probe = jnp.zeros((1, image_size, image_size, 3))
    fn_vars, dlib_vars = (module.init(jax.random.key(k), probe) for k in (1, 2))
    return identity.IdentityNets(
        facenet=lambda x: module.apply(fn_vars, x)[1], dlib=lambda x: module.apply(dlib_vars, x)[1]
    )


def write_lfw_tree(destination, people_per_split=(10, 4, 2), images_per_person=2) -> str:
    """Copies real LFW people (several images each) into an LFW-layout tree at `destination`:
    `people_per_split` people for train / validation / test (by `splits.identity_split`)."""
    import os
    import shutil

    from data_pipelines import splits
    from dfrec_jax import configlib

    wanted = dict(zip(splits.SPLITS, people_per_split))
    for person, paths in splits.scan_lfw(configlib.lfw_dir()).items():
        split = splits.identity_split(person)
        if len(paths) >= images_per_person and wanted[split] > 0:
            wanted[split] -= 1
            os.makedirs(os.path.join(destination, person))
            for path in paths[:images_per_person]:
                shutil.copy(path, os.path.join(destination, person))
        if not any(wanted.values()):
            return str(destination)
    raise AssertionError(f"not enough LFW people with {images_per_person} images: {wanted}")


def host_values(abstract, seed: int = 0):
    """Values for a tree of abstract variables (jax.ShapeDtypeStruct leaves), filled by numpy
    the way initialisers fill them: ones for norm scales and running variances, zeros for
    biases and running means, fan-in-scaled normals for kernels and everything else (a learned
    masking threshold, init 250, included: not for tests of `masking_threshold="learned"`).

    Compiling flax's random initialisers is the costly part of building a model on CPU (XLA
    time: ~9 s for the tiny DFREC, ~16 s for the demo's, hundreds of inlined threefry hashes);
    tests that need some weights rather than init's own use these. `inference.init_variables`
    and `create_train_state` themselves are tested in tests/test_train_step.py.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in ("scale", "var"):
            value = np.ones(leaf.shape)
        elif name in ("bias", "mean"):
            value = np.zeros(leaf.shape)
        else:  # conv kernels HWIO (depthwise: I == 1), dense kernels IO, embeddings, tokens
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def model_variables(model, seed: int = 0):
    """`host_values` for a DFREC's variables (params + batch_stats), in init's tree and dtypes."""
    from dfrec_jax import inference

    return host_values(inference.abstract_variables(model), seed)


def make_workdir(workdir, config=None, step: int = 3, seed: int = 0) -> str:
    """A `train`-style run folder (config.json, config_hash.txt, versions.json, one orbax
    checkpoint at `step`) holding a tiny model with `host_values` weights and a fresh
    optimizer state: what eval / recover / export read, without training. Returns the folder."""
    import os

    from dfrec_jax import inference
    from dfrec_jax.run import checkpoints
    from dfrec_jax.run import workdir as workdir_lib
    from dfrec_jax.train import sharding, state

    config = config or tiny_config()
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_run_metadata(str(workdir), config)
    model = inference.build_model(config)
    mesh = sharding.make_mesh(config.mesh)
    tx = state.make_optimizer(config.optim, config.train.steps, mesh)
    abstract = state.abstract_train_state(config, model, tx)
    # The state's own abstract variables: the model is traced once, not again for its weights.
    variables = host_values({"params": abstract.params, "batch_stats": abstract.batch_stats}, seed)
    train_state = state.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=jax.jit(tx.init)(variables["params"]),
        rng=jnp.asarray(
            np.random.default_rng(seed).integers(0, 2**32, abstract.rng.shape), abstract.rng.dtype
        ),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )
    assert jax.tree.structure(train_state) == jax.tree.structure(abstract)
    for leaf, want in zip(jax.tree.leaves(train_state), jax.tree.leaves(abstract)):
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype), (leaf, want)
    shardings = state.state_shardings(abstract, mesh, int(config.mesh.fsdp_min_size))
    train_state = jax.device_put(train_state, shardings)
    with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=2) as c:
        c.save(step, train_state, {"next_batch": step}, force=True)
        c.wait()
    return str(workdir)
