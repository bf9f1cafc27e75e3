"""`bench`: timings printed as one JSON object per measurement."""

import json
import os
import platform
import time

import jax
import numpy as np

from dfrec_jax import inference


def time_call(fn, *args, repeats: int) -> list[float]:
    """Seconds per call of an already compiled function, blocking on the outputs."""
    jax.block_until_ready(fn(*args))  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def bench_forward(config, batch_sizes=(1, 8), repeats: int = 5) -> list[dict]:
    """Inference forward pass of the model in `config`, random weights, synthetic batch."""
    model = inference.build_model(config)
    variables = inference.init_variables(model, jax.random.key(config.seed))
    counts = inference.param_counts(variables["params"])
    forward = inference.make_forward(model)
    results = []
    for batch in batch_sizes:
        images = jax.random.uniform(
            jax.random.key(1), (batch, model.image_size, model.image_size, 3)
        )
        compile_start = time.perf_counter()
        times = time_call(forward, variables, images, jax.random.key(2), repeats=repeats)
        median = float(np.median(times))
        results.append(
            {
                "what": "forward",
                "image_size": model.image_size,
                "batch": batch,
                "dtype": str(config.model.dtype),
                "params": counts["total"],
                "params_ism": counts.get("ism", 0),
                "params_sirm": counts.get("sirm", 0),
                "params_tirm": counts.get("tirm", 0),
                "median_s_per_batch": round(median, 5),
                "ms_per_image": round(1e3 * median / batch, 3),
                "images_per_s": round(batch / median, 2),
                "repeats": repeats,
                "first_call_s": round(time.perf_counter() - compile_start - sum(times), 3),
                "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
                "host": platform.processor() or platform.machine(),
            }
        )
    return results


WARMUP_BATCHES = 3
MIN_TIMED_IMAGES = 512


def bench_input_pipeline(config, batch_sizes=(), repeats: int = 5) -> list[dict]:
    """Host tf.data training pipeline of `config.data` (built or reused), images/s per batch.

    Batch sizes: the config's global batch, then each `--batch` value (one process). Each
    measurement warms up on WARMUP_BATCHES batches, then times max(repeats, enough batches
    for MIN_TIMED_IMAGES images).
    """
    from data_pipelines import datasets, input_pipeline  # TensorFlow only when asked for

    data = config.data
    start = time.perf_counter()
    was_prepared = datasets.get_builder(data).is_prepared()
    builder = datasets.prepare(data)
    prepare_s = time.perf_counter() - start
    examples = input_pipeline.load_examples(builder, "train")
    mix = {k: float(v) for k, v in dict(data.mix).items()}
    results = []
    for batch in dict.fromkeys([int(data.batch_size), *batch_sizes]):
        start = time.perf_counter()
        dataset = input_pipeline.make_dataset(
            examples,
            batch_size=batch,
            seed=data.seed,
            training=True,
            mix=mix,
            flip=data.flip,
            shuffle_buffer=data.shuffle_buffer,
        )
        iterator = dataset.as_numpy_iterator()
        first = next(iterator)
        first_batch_s = time.perf_counter() - start
        for _ in range(WARMUP_BATCHES - 1):
            next(iterator)
        timed = max(repeats, -(-MIN_TIMED_IMAGES // batch))
        start = time.perf_counter()
        for _ in range(timed):
            next(iterator)
        elapsed = time.perf_counter() - start
        results.append(
            {
                "what": "input_pipeline",
                "dataset": builder.info.full_name,
                "image_size": int(first["image"].shape[1]),
                "train_examples": builder.info.splits["train"].num_examples,
                "batch": batch,
                "mix": input_pipeline.mix_counts(mix, batch),
                "images_per_s": round(batch * timed / elapsed, 1),
                "ms_per_batch": round(1e3 * elapsed / timed, 2),
                "batches_timed": timed,
                "first_batch_s": round(first_batch_s, 2),
                "prepare_s": round(prepare_s, 2),
                "prepared_now": not was_prepared,
                "host_cpus": os.cpu_count(),
                "host": platform.processor() or platform.machine(),
            }
        )
    return results


BENCHES = {"forward": bench_forward, "input_pipeline": bench_input_pipeline}


def run(what: str, config, **kwargs) -> None:
    if what not in BENCHES:
        raise ValueError(f"unknown bench {what!r}; known: {', '.join(sorted(BENCHES))}")
    for result in BENCHES[what](config, **kwargs):
        print(json.dumps(result), flush=True)
