"""Runs a tiny training in its own process (kill-and-resume tests send it signals).

    python -m tests.tiny_training --workdir W --lfw_dir L --data_dir D --steps N
        [--checkpoint_every K] [--devices 8] [--record FILE]

--record appends one JSON line per step: the step and a fingerprint of its batch (written
and flushed at once, so a killed run keeps what it did). At the end the final parameters go
to W/final_params.npz.
"""

import argparse
import hashlib
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--lfw_dir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint_every", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--record", default="")
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)

    from dfrec_jax.train import trainer
    from tests import tiny

    config = tiny.tiny_config()
    config.data.update(lfw_dir=args.lfw_dir, data_dir=args.data_dir)
    config.train.update(
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        log_every=1,
        image_every=0,
        eval_every=0,
    )

    def record(step, batch):
        if args.record:
            digest = hashlib.sha256(np.asarray(jax.device_get(batch["image"])).tobytes())
            with open(args.record, "a") as f:
                f.write(json.dumps({"step": step, "batch": digest.hexdigest()[:16]}) + "\n")

    result = trainer.train(config, args.workdir, loss_nets=tiny.tiny_loss_nets(), batch_hook=record)
    if result.stopped == "finished":
        params = jax.device_get(result.state.params)
        flat = {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(params)}
        np.savez(os.path.join(args.workdir, "final_params.npz"), **flat)
    print(json.dumps({"step": result.step, "stopped": result.stopped}))


def _flatten(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(getattr(p, "key", p) for p in path), leaf) for path, leaf in leaves]


if __name__ == "__main__":
    main()
