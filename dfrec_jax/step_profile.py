"""Where a train step's time goes: `bench --what step_profile --config C [--batch N]`.

The step (dfrec_jax/train/step.py) is cut into the sub-programs it is made of, each jitted and
timed alone on synthetic data of the step's shapes, with its FLOPs from XLA's cost analysis:

  model        DFREC forward + backward w.r.t. the parameters (train mode, batch statistics
               updated, masking included) with a unit cotangent on every output;
  identity     the identity loss as the step runs it: FaceNet (at loss.identity_size when
               set) on the 2B recovered faces with their gradient, and on the 2B true faces
               (no gradient);
  perceptual   the perceptual loss likewise (VGG, at loss.perceptual_size when set);
  attribute    the attribute loss (face-api on the B recovered and B true targets), if any;
  optimizer    the optimizer update (clip + AdamW) and its application to the parameters;
  step         the whole jitted step, for reference (on config.mesh; the parts run on one
               device, so on a multi-device mesh compare FLOPs, not times).

Each part prints one JSON line (ms, share of the step, GFLOP, achieved TFLOP/s and its
utilisation of the same process's f32 matmul peak), the last line sums them up: the parts'
total against the whole step shows what XLA gains or loses by fusing them into one program.
The sub-programs repeat some work the step does once (the model's forward inside `model`
is also what produces the recovered faces), so shares are of the step's time, not a partition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import losses, timing
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train import standalone


def _model_program(model):
    def run(variables, images, key):
        def outputs_sum(params):
            masking_key, dropout_key = jax.random.split(key)
            out, mutated = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                images,
                train=True,
                rngs={"masking": masking_key, "dropout": dropout_key},
                mutable=["batch_stats"],
            )
            total = sum(
                jnp.sum(out[k].astype(jnp.float32))
                for k in ("seg_logits", "forgery_logit", "source", "target", "pred_patches")
            )
            return total, mutated

        return jax.grad(outputs_sum, has_aux=True)(variables["params"])

    return jax.jit(run)


def _loss_program(per_sample_fn, net):
    """(jit(arrays, recovered, true) -> d loss / d recovered, arrays): the net's weights an
    argument, as in the train step (`losses.split_frozen`)."""
    arrays, layout = losses.split_frozen(net)

    def loss(recovered, true, arrays):
        out = per_sample_fn(layout(arrays), recovered, true)
        return jnp.sum(out[0] if isinstance(out, tuple) else out)  # identity: (per, parts)

    def run(arrays, recovered, true):
        return jax.grad(loss)(recovered, true, arrays)

    return jax.jit(run), arrays


def profile_train_step(config, batch_size: int | None = None, repeats: int = 5,
                       *, loss_nets=None, matmul_sizes=None) -> list[dict]:  # fmt: skip
    """One dict per part (module docstring) and a summary; `loss_nets` and the peak's
    `matmul_sizes` injectable for tests."""
    batch_size = int(batch_size or config.data.batch_size)
    mesh = sharding_lib.make_mesh(config.mesh)
    model, nets, tx, state, train_step = standalone.build_train_step(
        config, mesh, loss_nets=loss_nets
    )
    peak = timing.peak_matmul_tflops(mesh, matmul_sizes)["tflops"]
    size = model.image_size

    rng = np.random.default_rng(config.seed)
    faces = lambda n: jnp.asarray(rng.uniform(0, 1, (n, size, size, 3)), jnp.float32)  # noqa: E731
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    model_program = _model_program(model)
    parts = {
        "model": timing.compile_and_time(
            model_program, variables, faces(batch_size), jax.random.key(1), repeats=repeats
        )
    }
    recovered, true = faces(2 * batch_size), faces(2 * batch_size)
    for name, per_sample_fn, net, n in (
        ("identity", losses.identity_per_sample, nets.identity, 2 * batch_size),
        ("perceptual", losses.perceptual_per_sample, nets.perceptual, 2 * batch_size),
        ("attribute", losses.attribute_per_sample, nets.attribute, batch_size),  # targets only
    ):
        if net is not None:
            program, arrays = _loss_program(per_sample_fn, net)
            parts[name] = timing.compile_and_time(
                program, arrays, recovered[:n], true[:n], repeats=repeats
            )

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    parts["optimizer"] = timing.compile_and_time(
        jax.jit(update), state.params, state.opt_state, grads, repeats=repeats
    )

    batch = standalone.global_batch(
        standalone.synthetic_batch(batch_size, size, config.seed), sharding_lib.batch_sharding(mesh)
    )
    _, measured = standalone.measure_step(train_step, state, batch, repeats=repeats, warmup=1)
    step_s = float(np.median(measured["times"]))
    per_device = measured["flops_per_device"]
    parts["step"] = {"seconds": step_s, "compile_s": measured["compile_s"],
                     "flops": per_device * mesh.devices.size if per_device else None}  # fmt: skip

    results = []
    for name, part in parts.items():
        results.append({
            "what": "step_profile",
            "part": name,
            "batch": batch_size,
            "dtype": str(config.model.dtype),
            "ms": round(1e3 * part["seconds"], 1),
            "share_of_step": round(part["seconds"] / step_s, 3),
            **timing.rate_fields(part["flops"], part["seconds"], peak),
            "compile_s": round(part["compile_s"], 1),
        })  # fmt: skip
    summed = sum(p["seconds"] for n, p in parts.items() if n != "step")
    results.append({
        "what": "step_profile",
        "part": "summary",
        "batch": batch_size,
        "dtype": str(config.model.dtype),
        "step_ms": round(1e3 * step_s, 1),
        "parts_sum_ms": round(1e3 * summed, 1),
        "img_per_s": round(batch_size / step_s, 2),
        "peak_matmul_tflops": round(peak, 4),
        "slowest_part": max((n for n in parts if n != "step"), key=lambda n: parts[n]["seconds"]),
        "device": jax.devices()[0].device_kind,
    })  # fmt: skip
    return results
