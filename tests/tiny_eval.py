"""Tiny scoring networks for `eval` tests, and `eval` run in its own process.

    python -m tests.tiny_eval --workdir W --lfw_dir L --data_dir D [--devices N]
        [--max_examples 0,1]

runs dfrec_jax.eval.runner.run on the tiny config's lfw_swap (test split, eval batch BATCH)
with `eval_nets`, once per config.eval.max_examples value, each run's W/eval/test moved to
W/eval/max<value> (0: the whole split). Several processes (DFREC_NUM_PROCESSES etc.) start
multi-host by themselves (config.mesh.distributed="auto"). Prints one JSON line: this
process's index and the process count.
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tests import tiny  # noqa: E402

BATCH = 8


class Features(nn.Module):
    """A few strided convolutions: feature maps for the tiny FID and LPIPS stand-ins."""

    @nn.compact
    def __call__(self, x):
        feats = []
        for i, ch in enumerate((4, 8, 8)):
            x = nn.tanh(nn.Conv(ch, (3, 3), strides=2, name=f"conv{i}")(x - 0.5))
            feats.append(x)
        return feats


def _init(module, seed):
    return module.init(jax.random.key(seed), jnp.zeros((1, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3)))


def fake_landmarks(template):
    """The dataset's 68 points of one face, rotated about the image centre by -30..30 degrees
    as a hash of the pixels: plausible faces whose head pose differs between any two images."""
    template = np.asarray(template, np.float64)
    centre = (tiny.IMAGE_SIZE - 1) / 2

    def landmarks(images):
        sums = np.asarray(images, np.int64).sum(axis=(1, 2, 3))
        angles = np.deg2rad(sums % 61 - 30.0)
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        x, y = template[None, :, 0] - centre, template[None, :, 1] - centre
        return np.stack([cos * x - sin * y, sin * x + cos * y], -1).astype(np.float32) + centre

    return landmarks


def eval_nets(landmark_template):
    """Tiny random scoring nets: the identity nets plain closures (static in the jitted
    metrics), FID features and LPIPS pytrees (jax.tree_util.Partial: weights as arguments)."""
    from dfrec_jax.eval import identity, runner

    identity_net = tiny.TinyIdentity()
    facenet, dlib = (_init(identity_net, seed) for seed in (1, 2))
    features, variables = Features(), _init(Features(), 3)

    def fid_features(variables, x):
        return jnp.mean(features.apply(variables, x)[-1], axis=(1, 2))

    def lpips(variables, a, b):  # a [R*B] against b [B], as EvalNets.lpips
        b = jnp.tile(b, (a.shape[0] // b.shape[0], 1, 1, 1))
        fa, fb = features.apply(variables, a), features.apply(variables, b)
        return sum(jnp.mean((x - y) ** 2, axis=(1, 2, 3)) for x, y in zip(fa, fb))

    return runner.EvalNets(
        identity=identity.IdentityNets(
            facenet=lambda x: identity_net.apply(facenet, x)[1],
            dlib=lambda x: identity_net.apply(dlib, x)[1],
        ),
        fid_features=jax.tree_util.Partial(fid_features, variables),
        lpips=jax.tree_util.Partial(lpips, variables),
        landmarks=fake_landmarks(landmark_template),
    )


def config(lfw_dir, data_dir):
    """The tiny config with its lfw_swap in `data_dir` and eval batch BATCH."""
    config = tiny.tiny_config()
    config.data.update(lfw_dir=str(lfw_dir), data_dir=str(data_dir))
    config.eval.batch_size = BATCH
    return config


def landmark_template(data_dir_config) -> np.ndarray:
    """The first test face's 68 points (the template of `fake_landmarks`)."""
    import tensorflow_datasets as tfds

    from data_pipelines import datasets

    builder = datasets.prepare(data_dir_config.data)
    first = next(iter(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False))))
    return first["landmarks"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--lfw_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max_examples", default="0")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    from dfrec_jax.eval import runner
    from dfrec_jax.run import gc_policy, multihost

    gc_policy.collect_less()
    cfg = config(args.lfw_dir, args.data_dir)
    multihost.initialize(cfg.mesh.distributed)  # before the nets touch a device
    nets = eval_nets(landmark_template(cfg))
    for limit in args.max_examples.split(","):
        cfg.eval.max_examples = int(limit)
        runner.run(cfg, workdir=args.workdir, nets=nets)
        if jax.process_index() == 0:
            folder = os.path.join(args.workdir, "eval")
            os.replace(os.path.join(folder, "test"), os.path.join(folder, f"max{limit}"))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count()}))


if __name__ == "__main__":
    main()
