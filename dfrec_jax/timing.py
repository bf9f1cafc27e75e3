"""Timing jitted programs: seconds per call, XLA's FLOP count, and the same process's f32 matmul
peak that model FLOPs utilisation is measured against (bench, the step profile, the peer)."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def time_call(fn, *args, repeats: int) -> list[float]:
    """Seconds per call of an already compiled function, blocking on the outputs."""
    jax.block_until_ready(fn(*args))  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def compile_and_time(fn, *args, repeats: int) -> dict:
    """Lower and compile jitted `fn` for `args`, then `time_call` it: {"seconds" (median of
    `repeats`), "compile_s" (tracing, lowering and XLA's compile), "flops" (flops_of)}."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = time_call(compiled, *args, repeats=max(repeats, 1))
    return {"seconds": float(np.median(times)), "compile_s": compile_s,
            "flops": flops_of(compiled)}  # fmt: skip


def rate_fields(flops: float | None, seconds: float, peak_tflops: float) -> dict:
    """{"gflop", "achieved_tflops", "mfu"} of a program that ran `flops` in `seconds`, against
    the f32 matmul peak; None each where XLA reported no FLOPs (the profiles' records)."""
    if not flops:
        return {"gflop": None, "achieved_tflops": None, "mfu": None}
    achieved = flops / seconds / 1e12
    return {"gflop": significant(flops / 1e9), "achieved_tflops": significant(achieved),
            "mfu": round(achieved / peak_tflops, 3)}  # fmt: skip


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def flops_of(compiled) -> float | None:
    """FLOPs XLA's cost analysis counts for one run of a compiled program on one device (a
    sharded program's per-device part); None when the backend reports none."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def default_matmul_sizes() -> tuple[int, ...]:
    return (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)


def peak_matmul_tflops(mesh, sizes=None, repeats: int = 5, dtype=jnp.float32) -> dict:
    """Best throughput of jitted matmuls [n, m, m] @ [n, m, m] (float32 unless `dtype`), one
    per device of `mesh` (split over all its axes, so no communication): the same devices and
    the same default matmul precision as the train step, measured in this process."""
    n = mesh.devices.size
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    sharding = jax.sharding.NamedSharding(mesh, spec)
    matmul = jax.jit(
        lambda a, b: jnp.einsum("nij,njk->nik", a, b),
        in_shardings=(sharding, sharding),
        out_shardings=sharding,
    )
    best = {"tflops": 0.0, "size": 0}
    for size in sizes or default_matmul_sizes():
        keys = jax.random.split(jax.random.key(0))
        a, b = (
            jax.jit(
                lambda k: jax.random.normal(k, (n, size, size), dtype),
                out_shardings=sharding,
            )(k)
            for k in keys
        )
        seconds = min(time_call(matmul, a, b, repeats=repeats))
        tflops = 2 * n * size**3 / seconds / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "size": size}
    return best
