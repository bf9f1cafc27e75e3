"""`bench`: timings printed as one JSON object per measurement."""

import json
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


BENCHES = {"forward": bench_forward}


def run(what: str, config, **kwargs) -> None:
    if what not in BENCHES:
        raise ValueError(f"unknown bench {what!r}; known: {', '.join(sorted(BENCHES))}")
    for result in BENCHES[what](config, **kwargs):
        print(json.dumps(result), flush=True)
