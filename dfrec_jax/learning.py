"""The learning check: can the model OVERFIT a fixed set of 32 real examples?

    python -m dfrec_jax bench --what learning --config configs/demo.py [--learning_steps N]

A model that cannot memorise 32 examples is broken (a data convention, a loss balance or a
gradient that does not reach the target), whatever its code looks like. The check builds a
fixed set from real LFW faces (config.data.lfw_dir): `num_forged` identity-morph forgeries
(`data_pipelines.swap`, method `morph_blend`: the target's pose, expression and part of its
texture kept, the rest from another person) and `num_pristine` pristine faces (their own
source and target, mask 255 everywhere: the project's pristine convention). It trains the
config's model with the real frozen loss networks on these examples only (the same sharded
step as `train`), and every `eval_every` steps prints one JSON line with, on the same
examples (each image alone, fixed masking key, as `eval` and `recover` run):

- none_target_idsim: FaceNet cosine(forgery, true target) over the forgeries: the "None" row;
- target_idsim / source_idsim: cosine(recovered, true) over the forgeries;
- pristine_idsim: cosine(input, recovered target) over the pristine faces (1 = unchanged);
- mask_iou: IoU of seg > 0.5 with the true mask over the forgeries;
- forgery_accuracy: the share of all examples whose forgery_logit has the right sign.

The last line repeats the final values with `steps` and the whole curve. The learning check
passes when target_idsim ends at least 0.3 above none_target_idsim and mask_iou >= 0.8
(tests/test_learning.py, marked slow).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import landmarks as landmarks_lib
from data_pipelines import swap
from dfrec_jax import images as images_lib
from dfrec_jax import inference, losses
from dfrec_jax.eval import identity, metrics
from dfrec_jax.forward import first_image_per_person
from dfrec_jax.pretrained import facenet
from dfrec_jax.train import sharding as sharding_lib
from dfrec_jax.train import standalone

MORPH_METHOD = "morph_blend"


def make_examples(
    lfw_dir: str,
    image_size: int,
    *,
    num_forged: int = 16,
    num_pristine: int = 16,
    seed: int = 0,
    landmark_detector=None,
) -> dict[str, np.ndarray]:
    """The fixed example set as arrays shaped like input-pipeline batches, forgeries
    and pristine faces interleaved so every batch of an even size holds both kinds. Each
    example uses a different person; people are taken in a seeded order."""

    people = first_image_per_person(lfw_dir, count=-1)  # every person's first image
    order = np.random.default_rng(seed).permutation(len(people))
    detector = landmark_detector or landmarks_lib.LandmarkDetector(batch_size=16)
    cursor = 0

    def take(count):
        nonlocal cursor
        chosen = [people[i] for i in order[cursor : cursor + count]]
        cursor += count
        return np.stack(
            [np.rint(images_lib.load_rgb(p, image_size) * 255).astype(np.uint8) for p in chosen]
        )

    forged = []
    while len(forged) < num_forged:
        if cursor + 2 > len(people):
            raise ValueError(f"learning check: not enough usable people in {lfw_dir}")
        pair = take(2)
        lm = detector(pair)
        try:
            result = swap.swap_faces(
                pair[0], pair[1], lm[0], lm[1], MORPH_METHOD, np.random.default_rng(seed + cursor)
            )
        except swap.SwapError:
            continue
        forged.append((result.image, pair[1], pair[0], result.mask, result.alpha))
    pristine = [(f, f, f, np.full(f.shape[:2] + (1,), 255, np.uint8), 0.0)
                for f in take(num_pristine)]  # fmt: skip

    rows = []
    for i in range(max(num_forged, num_pristine)):
        if i < num_forged:
            rows.append((*forged[i], 1))
        if i < num_pristine:
            rows.append((*pristine[i], 0))
    image, source, target, mask, alpha, label = (np.stack(col) for col in zip(*rows))
    label = label.astype(np.float32)
    return {
        "image": image,
        "source": source,
        "target": target,
        "mask": mask,
        "label": label,
        "has_mask": np.ones_like(label),
        "method_id": np.zeros(len(label), np.int32),
        "alpha": alpha.astype(np.float32),
    }


def reference_embeddings(examples: dict, embed) -> dict:
    """Embeddings of the examples' fixed images (input, true target, true source)."""
    return {k: embed(jnp.asarray(examples[k], jnp.float32) / 255.0)
            for k in ("image", "target", "source")}  # fmt: skip


def score(outputs: dict, examples: dict, embed, references: dict | None = None) -> dict:
    """The check's numbers for model `outputs` (float, per image) on `examples` (uint8);
    `references`: `reference_embeddings(examples, embed)` when the caller scores repeatedly."""
    def _cos(a, b):
        return np.asarray(identity.cosine(a, b))

    refs = references if references is not None else reference_embeddings(examples, embed)
    forged = examples["label"] > 0.5
    e_image, e_target, e_source = refs["image"], refs["target"], refs["source"]
    e_rec_t, e_rec_s = embed(outputs["target"]), embed(outputs["source"])
    logit = np.asarray(outputs["forgery_logit"])
    iou = metrics.mask_iou(np.asarray(outputs["seg"])[forged], examples["mask"][forged])
    return {
        "none_target_idsim": float(np.mean(_cos(e_image, e_target)[forged])),
        "target_idsim": float(np.mean(_cos(e_rec_t, e_target)[forged])),
        "source_idsim": float(np.mean(_cos(e_rec_s, e_source)[forged])),
        "pristine_idsim": float(np.mean(_cos(e_image, e_rec_t)[~forged])),
        "mask_iou": float(metrics.finite_mean(iou)),
        "pristine_map_mean": float(np.mean(np.asarray(outputs["seg"])[~forged])),
        "forgery_accuracy": float(np.mean((logit > 0) == forged)),
    }


def overfit_config(config, *, steps: int, batch_size: int, learning_rate: float):
    """The config the check trains with: the model and losses of `config`, an optimiser for a
    short overfit (AdamW, warmup 10%, cosine to 0.1x, global-norm clip 1)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.batch_size = batch_size
        config.train.steps = steps
        config.optim.update(
            learning_rate=learning_rate,
            schedule="cosine",
            warmup_steps=max(1, steps // 10),
            end_factor=0.1,
            clip_norm=1.0,
            accumulate_steps=1,
        )
    return config


def run_learning_check(
    config,
    *,
    steps: int = 900,
    eval_every: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    num_forged: int = 16,
    num_pristine: int = 16,
    examples: dict | None = None,
    loss_nets=None,
    embed=None,
    log=print,
) -> dict:
    """Trains on the fixed examples and returns the final report (also logged as JSON lines
    through `log`). `examples`, `loss_nets`, `embed` (images -> embeddings): injectable for
    tests; by default the real LFW examples, loss networks and FaceNet."""
    start = time.perf_counter()
    config = overfit_config(config, steps=steps, batch_size=batch_size,
                            learning_rate=learning_rate)  # fmt: skip
    if examples is None:
        examples = make_examples(config.data.lfw_dir, int(config.model.image_size),
                                 num_forged=num_forged, num_pristine=num_pristine,
                                 seed=int(config.seed))  # fmt: skip
    n = len(examples["label"])
    if n % batch_size:
        raise ValueError(f"learning check: {n} examples do not split into batches of {batch_size}")
    if embed is None:
        net = facenet.load_named(config.eval.identity_net, config.eval.identity_weights, "eval")
        # The weights are an argument, not ~90 MB of constants compiled into the program.
        arrays, rebuild = losses.split_frozen(net)
        embed = losses.BoundToFrozen(
            jax.jit(lambda x, arrays: rebuild(arrays)(x)["embedding"]), jax.device_put(arrays)
        )

    mesh = sharding_lib.make_mesh(config.mesh)
    model, _, _, state, train_step = standalone.build_train_step(
        config, mesh, loss_nets=loss_nets, total_steps=steps
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)
    batches = [
        standalone.global_batch({k: v[i : i + batch_size] for k, v in examples.items()},
                                batch_sharding)  # fmt: skip
        for i in range(0, n, batch_size)
    ]
    predict = inference.make_predict(model, int(config.seed))
    inputs = jnp.asarray(examples["image"], jnp.float32) / 255.0
    references = reference_embeddings(examples, embed)  # fixed images: embedded once

    def evaluate(step: int, loss: float | None) -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs = jax.device_get(predict(variables, inputs))
        point = {"step": step, "loss": loss}
        scores = score(outputs, examples, embed, references)
        point.update({k: round(v, 4) for k, v in scores.items()})
        point["elapsed_s"] = round(time.perf_counter() - start, 1)
        log(json.dumps({"what": "learning", **point}))
        return point

    curve = [evaluate(0, None)]
    for step in range(1, steps + 1):
        state, metrics = train_step(state, batches[(step - 1) % len(batches)])
        if step % eval_every == 0 or step == steps:
            curve.append(evaluate(step, round(float(metrics["total"]), 4)))
    final = dict(curve[-1])
    report = {
        "what": "learning",
        "steps": steps,
        "examples": {"forged": int(np.sum(examples["label"] > 0.5)),
                     "pristine": int(np.sum(examples["label"] <= 0.5))},  # fmt: skip
        "batch": batch_size,
        "learning_rate": learning_rate,
        **{k: final[k] for k in final if k not in ("step", "elapsed_s")},
        "gain_over_none": round(final["target_idsim"] - final["none_target_idsim"], 4),
        "seconds": round(time.perf_counter() - start, 1),
        "curve": curve,
    }
    return report
