"""Where `eval`'s time per batch goes: `bench --what eval_profile --config C [--batch N]`.

`eval` (dfrec_jax/eval/runner.py) scores a batch of B examples in R rows ("none", each of
config.eval.inpaint_methods, "dfrec") with one jitted function over the batch's distinct faces,
and meanwhile works on the host. Each part is timed alone here, with the real scoring networks
(their weights arguments of the programs, as in eval), on synthetic faces of the config's
image size, with XLA's FLOPs:

  facenet, dlib  identity embeddings of the (R + 3) x B distinct faces: true targets, true
                 sources, inputs (the "none" row), the other rows' recovered targets, DFREC's
                 recovered sources;
  lpips          VGG16 LPIPS of the R x B recovered targets against the B true ones;
  fid            Inception v3 pool features of the (R + 1) x B recovered and true targets;
  pixels         PSNR and SSIM of the R x B recovered targets;
  metrics        eval's whole jitted function (`runner.device_metrics`: all of the above in
                 one program), the device's share of a batch of forgeries;
  pristine       FaceNet on the R x B faces of a batch of pristine examples
                 (`runner.input_similarity`: all eval scores of them);
  landmarks      the landmark net on the host, on the (R + 1) x B images of a batch's two calls
                 (inputs; true and recovered targets, for head pose);
  inpaint        the classical baselines' OpenCV inpainting of the B inputs, every method.

The last line sums up a batch of forgeries: `batch_ms` (metrics + landmarks + inpaint) and the
scoring's images per second. Not here: the model's forward (`bench --what forward --batch B`;
eval dispatches it before the host work) and reading the split. Noise faces: the networks'
cost does not depend on what the pixels show, OpenCV's inpainting time does on the filled
area, so with eval.inpaint_mask="landmarks" its time is that of the hull of the landmarks found
on noise (the "fixed" ellipse is a face's). The PSNR/SSIM FLOPs count SSIM's banded window
matrices whole, zeros included (metrics.ssim), so their utilisation is not comparable with the
networks'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import timing
from dfrec_jax.eval import baselines, metrics, runner


def face_counts(rows: int, b: int) -> dict[str, int]:
    """Images each scorer sees per batch of b examples in R rows, as `runner.device_metrics`
    and the runner's two landmark calls score them (tests/test_eval_profile.py reads them off
    device_metrics itself)."""
    return {"identity": (rows + 3) * b, "lpips": rows * b, "fid": (rows + 1) * b,
            "landmarks": (rows + 1) * b, "pristine_identity": rows * b}  # fmt: skip


def _host_seconds(fn, *args, repeats: int) -> float:
    """Median seconds of `fn(*args)` (`timing.time_call`: one untimed call first, e.g. the
    landmark net's compile)."""
    return float(np.median(timing.time_call(fn, *args, repeats=max(repeats, 1))))


def profile_eval(config, batch_size: int | None = None, repeats: int = 3, *, nets=None,
                 matmul_sizes=None) -> list[dict]:  # fmt: skip
    """One dict per part (module docstring) and a summary; `nets` (runner.EvalNets) and the
    peak's `matmul_sizes` injectable for tests."""
    eval_config = config.eval
    b = int(batch_size or eval_config.batch_size)
    if nets is None:
        eval_config = eval_config.copy_and_resolve_references()
        eval_config.batch_size = b  # the landmark net pads each call to it, as in eval
        nets = runner.load_eval_nets(eval_config)
    methods = tuple(eval_config.inpaint_methods)
    rows = 2 + len(methods)
    counts = face_counts(rows, b)
    size = int(config.model.image_size)
    rng = np.random.default_rng(config.seed)
    faces = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731
    unit = lambda x: jnp.asarray(x, jnp.float32) / 255.0  # noqa: E731

    arrays, layout = runner.split_scorers(nets)
    arrays = jax.device_put(arrays)

    def part(scorer, *inputs):
        index = runner.SCORERS.index(scorer)
        return jax.jit(lambda arrays, *x: layout(arrays)[index](*x)), (arrays, *inputs)

    distinct = unit(faces(counts["identity"]))
    recovered, truth = unit(faces(counts["lpips"])), unit(faces(b))
    programs = {
        "facenet": part("facenet", distinct),
        "dlib": part("dlib", distinct),
        "lpips": part("lpips", recovered, truth),
        "fid": part("fid_features", unit(faces(counts["fid"]))),
        "pixels": (
            jax.jit(lambda a, t: (metrics.psnr(a, t), metrics.ssim(a, t))),
            (recovered, jnp.tile(truth, (rows, 1, 1, 1))),
        ),
    }
    images = faces(b)
    dfrec = {"target": unit(faces(b)), "source": unit(faces(b))}
    device_metrics = jax.jit(functools.partial(runner.device_metrics, layout=layout))
    baseline_targets = faces((rows - 1) * b).reshape(rows - 1, b, size, size, 3)  # "none" first
    programs["metrics"] = (device_metrics, (arrays, images, faces(b), faces(b),
                                            baseline_targets, dfrec))  # fmt: skip
    input_similarity = jax.jit(functools.partial(runner.input_similarity, layout=layout))
    programs["pristine"] = (input_similarity, (arrays, baseline_targets, dfrec["target"]))
    parts = {
        name: timing.compile_and_time(fn, *args, repeats=repeats)
        for name, (fn, args) in programs.items()
    }

    host_images = faces(counts["landmarks"])
    parts["landmarks"] = {"seconds": _host_seconds(nets.landmarks, host_images, repeats=repeats)}
    if eval_config.inpaint_mask == "landmarks":
        regions = baselines.landmark_region(nets.landmarks(images), size)
    else:
        regions = np.broadcast_to(baselines.fixed_region(size), (b, size, size))
    radius = int(eval_config.inpaint_radius)
    parts["inpaint"] = {
        "seconds": _host_seconds(
            lambda: [baselines.inpaint(images, regions, m, radius) for m in methods],
            repeats=repeats,
        )
    }

    one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))  # eval's device
    peak = timing.peak_matmul_tflops(one_device, matmul_sizes)["tflops"]
    batch_s = sum(parts[name]["seconds"] for name in ("metrics", "landmarks", "inpaint"))
    results = []
    for name, measured in parts.items():
        # Shares of a batch of forgeries (metrics + landmarks + inpaint); pristine is another.
        share = None if name == "pristine" else round(measured["seconds"] / batch_s, 3)
        results.append({
            "what": "eval_profile",
            "part": name,
            "batch": b,
            "rows": rows,
            "ms": timing.significant(1e3 * measured["seconds"]),
            "share_of_batch": share,
            **timing.rate_fields(measured.get("flops"), measured["seconds"], peak),
            "compile_s": round(measured["compile_s"], 1) if "compile_s" in measured else None,
        })  # fmt: skip
    device_parts = ("facenet", "dlib", "lpips", "fid", "pixels")
    results.append({
        "what": "eval_profile",
        "part": "summary",
        "batch": b,
        "rows": rows,
        "batch_ms": timing.significant(1e3 * batch_s),
        "device_parts_sum_ms": timing.significant(
            1e3 * sum(parts[n]["seconds"] for n in device_parts)
        ),
        "img_per_s": timing.significant(b / batch_s),
        "peak_matmul_tflops": round(peak, 4),
        "slowest_part": max(device_parts, key=lambda n: parts[n]["seconds"]),
        "device": jax.devices()[0].device_kind,
    })  # fmt: skip
    return results
