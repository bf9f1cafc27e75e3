"""`bench`: timings printed as one JSON object per measurement.

    python -m dfrec_jax bench --config C
        --what forward|input_pipeline|train_step|step_profile|conv_profile|eval_profile|recover|
               learning|memory|peer_torch
        [--batch ..] [--workdir W] [--steps N --eval_every M]

`train_step` times the real sharded train step (model + frozen loss nets + AdamW) on
synthetic in-memory uint8 batches, so it needs no dataset and no TensorFlow: the same command
is the accelerator benchmark, run on a GPU/TPU machine it uses all of its devices (mesh from
config.mesh; `--batch` = global batch sizes, e.g. `--batch 64,128`; `--config.model.dtype=
bfloat16` for bf16 compute). It reports the step's FLOPs from XLA's cost analysis and the
model FLOPs utilisation against the best f32 matmul throughput measured in the same process.

`step_profile` times the step's parts alone (DFREC forward+backward, each frozen loss
network with its gradient, the optimizer update) next to the whole step
(dfrec_jax/step_profile.py); `conv_profile` times each of the step's convolutions alone
(dfrec_jax/conv_profile.py); `eval_profile` times each part of scoring one `eval` batch (the
identity nets, LPIPS, the FID Inception, PSNR/SSIM, the whole jitted metrics function, the
host's landmarks and inpainting; dfrec_jax/eval_profile.py).

`learning` is the learning check (dfrec_jax/learning.py): it overfits 32 fixed real examples
(identity morphs + pristine faces) for `--steps` steps at batch `--batch` (default 8) and
prints target IDSim vs the "None" row, pristine IDSim and mask IoU every `--eval_every`
steps; the last line is the final report.

`memory` compiles the train step for every fsdp size of the devices (nothing runs) and
reports one device's parameter, optimizer, argument and temporary bytes
(dfrec_jax/step_memory.py); emulate 8 devices on a CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=8.

`peer_torch` runs the train step beside a PyTorch peer of the same step (tests/torch_peer.py:
the same network, losses, frozen weights and batch, AdamW, eager float32 PyTorch), alternating
JAX float32 / PyTorch / JAX bfloat16 `--repeats` steps per turn, two rounds; the last line
holds jax_img_per_s, torch_img_per_s and ratio (JAX / PyTorch). PyTorch is imported there only.

`recover` times what a recovery does per batch on one device (host uint8 faces in, DFREC and
the identity nets, every output back on the host) at batch 1/8/32 unless `--batch`;
`--workdir W` uses that run's trained weights instead of a random init.
"""

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import (
    compile_cache,
    configlib,
    conv_profile,
    inference,
    learning,
    recover,
    step_memory,
    step_profile,
    trained,
)
from dfrec_jax.eval import identity
from dfrec_jax.run import malloc_policy
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.timing import peak_matmul_tflops, significant, time_call
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train import standalone


def bench_forward(config, batch_sizes=(1, 8), repeats: int = 5) -> list[dict]:
    """Inference forward pass of the model in `config`, random weights, synthetic batch."""
    model = inference.build_model(config)
    variables = inference.init_variables(model, jax.random.key(config.seed))
    counts = inference.param_counts(variables["params"])
    forward = inference.make_predict(model, int(config.seed))
    results = []
    for batch in batch_sizes:
        images = jax.random.uniform(
            jax.random.key(1), (batch, model.image_size, model.image_size, 3)
        )
        compile_start = time.perf_counter()
        times = time_call(forward, variables, images, repeats=repeats)
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
        dataset = input_pipeline.training_dataset(examples, data, batch_size=batch)
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


def bench_train_step(
    config,
    batch_sizes=(),
    repeats: int = 5,
    *,
    loss_nets=None,
    warmup: int = 2,
    matmul_sizes=None,
    devices=None,
) -> list[dict]:
    """The real sharded, jitted train step of `config` on synthetic in-memory uint8 batches.

    Same code on CPU, GPU and TPU: the mesh comes from config.mesh over all devices, no
    TensorFlow is involved. Batch sizes: each `--batch` value (global), else the config's.
    Per batch: compile time, the median of `repeats` timed steps after `warmup` steps (each
    synced), img/s, the step's FLOPs from XLA's cost analysis and the model FLOPs utilisation
    = achieved FLOP/s over the best jitted f32 matmul FLOP/s on the same devices.
    `loss_nets`: frozen loss networks (None: the real ones from config.loss); `devices`: the
    mesh's devices (None: all).
    """
    start = time.perf_counter()
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    devices = mesh.devices.size
    batch_sizes = list(dict.fromkeys(batch_sizes or [int(config.data.batch_size)]))
    for batch_size in batch_sizes:
        if batch_size % devices:
            raise ValueError(f"bench: batch {batch_size} does not split over {devices} devices")
    model, _, _, state, train_step = standalone.build_train_step(config, mesh, loss_nets=loss_nets)
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - start
    counts = inference.param_counts(state.params)
    peak = peak_matmul_tflops(mesh, matmul_sizes)
    peak_compute = None  # bf16 compute: its own matmul peak as well (MFU vs f32 may pass 1)
    if str(config.model.dtype) == "bfloat16":
        peak_compute = peak_matmul_tflops(mesh, matmul_sizes, dtype=jnp.bfloat16)
    batch_sharding = sharding_lib.batch_sharding(mesh)

    results = []
    for batch_size in batch_sizes:
        batch = standalone.global_batch(
            standalone.synthetic_batch(batch_size, model.image_size, config.seed), batch_sharding
        )
        state, measured = standalone.measure_step(
            train_step, state, batch, repeats=repeats, warmup=warmup
        )
        result = {
            "what": "train_step",
            "image_size": model.image_size,
            "batch": batch_size,
            "dtype": str(config.model.dtype),
            "params": counts["total"],
            "mesh": dict(mesh.shape),
            "setup_s": round(setup_s, 2),
        }
        result.update(step_report(measured, batch_size, mesh, peak))
        if peak_compute is not None and result["achieved_tflops"] is not None:
            result["peak_matmul_tflops_bf16"] = significant(peak_compute["tflops"])
            result["mfu_bf16"] = significant(result["achieved_tflops"] / peak_compute["tflops"])
        results.append(result)
    return results


def step_report(measured: dict, batch_size: int, mesh, peak: dict) -> dict:
    """The JSON fields of one measured step: times, img/s, FLOPs, achieved TFLOP/s, MFU."""
    step_s = float(np.median(measured["times"]))
    devices = mesh.devices.size
    flops_device = measured["flops_per_device"]
    result = {
        "compile_s": round(measured["compile_s"], 2),
        "step_ms": round(1e3 * step_s, 2),
        "step_ms_min": round(1e3 * min(measured["times"]), 2),
        "img_per_s": round(batch_size / step_s, 2),
        "repeats": len(measured["times"]),
        "loss": significant(measured["loss"], 6),
        "flops_per_step": None,
        "flops_per_device": flops_device,
        "achieved_tflops": None,
        "peak_matmul_tflops": significant(peak["tflops"]),
        "peak_matmul_size": peak["size"],
        "mfu": None,
        "device": mesh.devices.flat[0].platform,
        "device_kind": mesh.devices.flat[0].device_kind,
        "device_count": devices,
        "host": platform.processor() or platform.machine(),
    }
    if flops_device is None:
        result["note"] = "XLA reported no FLOPs for this program: no MFU"
    else:
        flops = flops_device * devices  # cost analysis counts one device's share
        achieved = flops / step_s / 1e12
        result.update(
            flops_per_step=flops,
            achieved_tflops=significant(achieved),
            mfu=significant(achieved / peak["tflops"]),
        )
    return result


def bench_recover(
    config, batch_sizes=(1, 8, 32), repeats: int = 5, workdir=None, nets=None
) -> list[dict]:
    """Recovery latency and throughput: `recover`'s own jitted batch function (DFREC per image
    from uint8 faces, the identity nets' embeddings of each input and its 8-bit recovered
    target, their cosines).

    Each timed call transfers a host uint8 batch to the device and fetches every output back,
    as a real recovery does (file writing and alignment are not timed). Weights: the newest
    checkpoint of `workdir` (its own config.json sets the model) or, without one, a random
    init of `config`'s model; identity nets: `nets` (IdentityNets) or the real ones from
    `config.eval`.
    """
    if workdir:
        run = trained.load(workdir=workdir)
        model, variables, seed = run.model, run.variables, int(run.config.seed)
        weights = f"checkpoint {run.checkpoint_dir} step {run.step}"
        if run.provenance:  # a `convert`ed release: name the file the weights came from
            weights += (
                f" (converted from {run.provenance['file']}, sha256 {run.provenance['sha256']})"
            )
        digest = run.config_hash
    else:
        model = inference.build_model(config)
        seed = int(config.seed)
        variables = inference.init_variables(model, jax.random.key(seed))
        weights = f"random init (seed {seed})"
        digest = workdir_lib.config_hash(config)
    nets = nets if nets is not None else identity.load(config.eval)
    recover_fn = recover.make_recover_fn(model, nets, seed)
    size = model.image_size
    device = jax.devices()[0]
    rng = np.random.default_rng(seed)
    results = []
    for batch in batch_sizes:
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        start = time.perf_counter()
        compiled = recover_fn.lower(variables, images).compile()
        compile_s = time.perf_counter() - start
        run_once = lambda x: jax.device_get(recover_fn.call(compiled, variables, x))  # noqa: E731
        times = time_call(run_once, images, repeats=repeats)
        median = float(np.median(times))
        results.append(
            {
                "bench": "recover",
                "config": digest,
                "image_size": size,
                "batch": batch,
                "ms_per_batch": round(1e3 * median, 3),
                "ms_per_image": round(1e3 * median / batch, 3),
                "images_per_s": round(batch / median, 2),
                "compile_s": round(compile_s, 3),
                "repeats": repeats,
                "weights": weights,
                "device": f"{device.platform} ({device.device_kind})",
            }
        )
    return results


def bench_learning(
    config, batch_sizes=(), repeats: int = 5, *, steps: int = 900, eval_every: int = 100
) -> list[dict]:
    """The learning check (dfrec_jax/learning.py): overfit 32 fixed real examples; its
    progress lines are printed as it runs, the returned report is the last line."""
    del repeats
    batch = int(batch_sizes[0]) if batch_sizes else 8
    report = learning.run_learning_check(
        config, steps=steps, eval_every=eval_every, batch_size=batch, log=_print_flush
    )
    return [report]


def bench_step_profile(config, batch_sizes=(), repeats: int = 5) -> list[dict]:
    """Where the train step's time goes (dfrec_jax/step_profile.py), at each batch size."""
    results = []
    for batch in batch_sizes or [None]:
        results += step_profile.profile_train_step(config, batch, repeats)
    return results


def bench_eval_profile(
    config, batch_sizes=(), repeats: int = 3, *, nets=None, matmul_sizes=None
) -> list[dict]:
    """Where eval's time per batch goes (dfrec_jax/eval_profile.py), at each batch size (the
    config's eval batch unless given)."""
    # Here, not at the top: eval's runner reads datasets with TensorFlow, which the machines
    # that run the other benches (GPU hosts) may lack.
    from dfrec_jax import eval_profile

    results = []
    for batch in batch_sizes or [None]:
        results += eval_profile.profile_eval(
            config, batch, repeats, nets=nets, matmul_sizes=matmul_sizes
        )
    return results


def bench_conv_profile(
    config, batch_sizes=(), repeats: int = 3, *, loss_nets=None, top: int = 30
) -> list[dict]:
    """Every convolution of the config's train step timed alone, slowest first
    (dfrec_jax/conv_profile.py): the `top` slowest and a summary line per batch size."""
    mesh = sharding_lib.make_mesh(config.mesh)
    model, _, _, state, train_step = standalone.build_train_step(
        config, mesh, loss_nets=loss_nets, initialise=False
    )
    results = []
    for batch_size in list(batch_sizes) or [int(config.data.batch_size)]:
        batch = standalone.synthetic_batch(batch_size, model.image_size, config.seed)
        for record in conv_profile.profile(train_step, state, batch, repeats=repeats, top=top):
            results.append({"what": "conv_profile", "batch": batch_size, **record})
    return results


def bench_memory(config, batch_sizes=(), repeats: int = 0, *, loss_nets=None):
    """Per-device memory of the compiled train step (dfrec_jax/step_memory.py) for every fsdp
    size in 1, 2, 4, ... that divides the devices; batches: `--batch` or 1 and 2 per device.
    After each mesh: the largest global batch that fits 24, 40 and 80 GiB per device."""
    del repeats  # nothing is timed
    devices = jax.device_count()
    batch_sizes = list(batch_sizes) or [devices, 2 * devices]
    fsdp_sizes = [f for f in (1, 2, 4, 8, 16, 32, 64) if f <= devices and devices % f == 0]
    for fsdp in fsdp_sizes:  # a generator: each mesh's lines print as soon as it compiled
        records = step_memory.measure(config, batch_sizes, [fsdp], loss_nets=loss_nets)
        yield from records
        if len(records) >= 2:
            fits = {f"{gib}GiB": step_memory.fitting_batch(records, gib) for gib in (24, 40, 80)}
            yield {"what": "memory_fit", "mesh": records[0]["mesh"], "batch": fits}


class PeerUnavailableError(RuntimeError):
    """bench --what peer_torch without PyTorch or without the repository's tests/."""


def bench_peer_torch(config, batch_sizes=(), repeats: int = 3) -> list[dict]:
    """The JAX train step beside its PyTorch peer (tests/torch_peer.py), alternating."""
    if os.path.isfile(os.path.join(configlib.REPO_ROOT, "tests", "torch_peer.py")):
        sys.path.insert(0, configlib.REPO_ROOT)  # `dfrec-jax` puts only its own folder first
    try:
        from tests import torch_peer  # test-side: PyTorch is a test dependency
    except ImportError as e:
        raise PeerUnavailableError(
            f"bench --what peer_torch needs PyTorch (pip install -r requirements-test.txt) "
            f"and the repository's tests/ folder (a checkout, not a plain pip install): {e}"
        ) from None
    batch = int(batch_sizes[0]) if batch_sizes else int(config.data.batch_size)
    yield from torch_peer.compare(config, batch, repeats=repeats)


def _print_flush(line: str) -> None:
    print(line, flush=True)


BENCHES = {
    "forward": bench_forward,
    "input_pipeline": bench_input_pipeline,
    "train_step": bench_train_step,
    "recover": bench_recover,
    "learning": bench_learning,
    "step_profile": bench_step_profile,
    "conv_profile": bench_conv_profile,
    "eval_profile": bench_eval_profile,
    "memory": bench_memory,
    "peer_torch": bench_peer_torch,
}


def run(what: str, config, **kwargs) -> None:
    if what not in BENCHES:
        raise ValueError(f"unknown bench {what!r}; known: {', '.join(sorted(BENCHES))}")
    for result in BENCHES[what](config, **kwargs):
        # Programs this process has read from the persistent cache by now (0: all compiled).
        result["compile_cache_hits"] = compile_cache.hits()
        result["host_malloc"] = malloc_policy.status  # run/malloc_policy.py: it moves CPU steps
        print(json.dumps(result), flush=True)
