"""Runs a tiny training in its own process (kill-and-resume tests send it signals).

    python -m tests.tiny_training --workdir W --lfw_dir L --data_dir D --steps N
        [--checkpoint_every K] [--devices 8] [--record FILE] [--emulate_processes P]

--record appends one JSON line per step: the step, a fingerprint of its batch and one of
each input image and target face in it (written and flushed at once, so a killed run keeps
what it did); with several processes (DFREC_NUM_PROCESSES etc., multi-host starts by
itself) each records the
rows it put in, to FILE.<process index>. At the end process 0 writes the final parameters to
W/final_params.npz. --emulate_processes P: one process builds the global batch from the P
process parts of the data, as P processes would (the single-process reference of a
multi-process run).
"""

import argparse
import hashlib
import json
import os

from tests import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_flags.add_to_environment()

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
    parser.add_argument("--emulate_processes", type=int, default=0)
    args = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.emulate_processes:
        _emulate_processes(args.emulate_processes)

    from dfrec_jax.run import gc_policy, multihost
    from dfrec_jax.train import trainer
    from tests import tiny

    gc_policy.collect_less()

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
        if not args.record:
            return
        image, target = _local_rows(batch["image"]), _local_rows(batch["target"])
        path = args.record if jax.process_count() == 1 else f"{args.record}.{jax.process_index()}"
        item = {"step": step, "batch": _digest(image), "images": [_digest(x) for x in image],
                "targets": [_digest(t) for t in target]}  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps(item) + "\n")

    multihost.initialize(config.mesh.distributed)  # before the loss nets touch a device
    result = trainer.train(config, args.workdir, loss_nets=tiny.tiny_loss_nets(), batch_hook=record)
    if result.stopped == "finished" and jax.process_index() == 0:
        # Replicated parameters (fsdp 1): this process's first copy is the whole value.
        flat = {"/".join(map(str, k)): np.asarray(v.addressable_data(0))
                for k, v in _flatten(result.state.params)}  # fmt: skip
        np.savez(os.path.join(args.workdir, "final_params.npz"), **flat)
    print(json.dumps({"step": result.step, "stopped": result.stopped}))


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _local_rows(array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process holds, in batch order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # a row block held by several local devices counts once
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


def _emulate_processes(count: int) -> None:
    """The trainer's input pipeline made of `count` process parts, concatenated in process
    order: the global batch `count` processes would assemble (rows of process 0 first)."""
    from data_pipelines import datasets, input_pipeline
    from dfrec_jax.host_tf import tf
    from dfrec_jax.train import sharding, trainer

    built = trainer._data_pipelines

    def pipelines(config, mesh):
        _, validation = built(config, mesh)
        split = input_pipeline.Split(datasets.prepare(config.data), "train")
        local = config.data.batch_size // count

        def dataset_fn(start):
            parts = tuple(
                input_pipeline.training_dataset(split, config.data, batch_size=local,
                    start_batch=start, process_index=i, process_count=count)  # fmt: skip
                for i in range(count)
            )
            return tf.data.Dataset.zip(parts).map(
                lambda *b: {k: tf.concat([x[k] for x in b], 0) for k in b[0]}
            )

        train = input_pipeline.InputPipeline(
            dataset_fn, sharding.batch_sharding(mesh), config.data.batch_size
        )
        return train, validation

    trainer._data_pipelines = pipelines


def _flatten(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(getattr(p, "key", p) for p in path), leaf) for path, leaf in leaves]


if __name__ == "__main__":
    main()
