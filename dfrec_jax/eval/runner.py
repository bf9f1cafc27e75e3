"""`eval`: score a trained DFREC and the classical baselines on a dataset split.

    python -m dfrec_jax eval --config C --workdir W [--split test] [--perturb jpeg[:75]]
    metrics = run(config, workdir=W, split="test", perturb="")   # the same, from Python

Rows ("recovery methods"), all scored by the same code on the same examples:
  - "none": the forgery itself taken as the recovered target and as the recovered source (the
    paper's first row: how far the input already is from the truth);
  - "inpaint_<m>" for each of config.eval.inpaint_methods: OpenCV inpainting of the input over
    the face region (the hull of the INPUT's landmarks, or a fixed ellipse; inpaint_mask);
  - "dfrec": the model.

Columns ("groups"): each forgery method present in the split, "Morphs (all)" and "Splices
(all)" when both kinds are present (lfw_swap: identity morphs keep part of the target's
identity, splices none), and "All". Quality metrics of
the recovered target (IDSim FaceNet and dlib, FID, LPIPS, PSNR, SSIM, pose error) and source
IDSim are over the FORGED examples of a group; recovery accuracy (IDSim(input, recovered
target) > threshold => pristine) and forgery-detection AUC are over a group's forgeries plus
every pristine example ("All": every example), since a detector needs both classes. Mask IoU
is over forgeries with a true mask: DFREC's seg > 0.5, or the inpainted region. Per-sample
metrics aggregate to {"mean", "std", "n"} over their finite values (metrics.summary: a NaN, e.g.
no landmarks for a pose, lowers n instead of crashing); FID, accuracy and AUC are one number
per group (null when undefined).

Several processes (multi-host, `config.mesh.distributed`; README "Running on GPU clusters and
TPU pods"): each reads and scores only its own contiguous block of the split
(input_pipeline.process_part) with the model on its own first device; the per-sample values
are then gathered to every process byte for byte, in process order (= split order), and
aggregated as one process would; process 0 alone writes. Per-sample values do not depend on
the other examples of a batch (per-image inference, per-row metrics), so the tables equal a
one-process run's on the same examples (tests/test_multiprocess_eval.py).

Per batch read (fixed size, padded, so every jitted function compiles once): the model's
predict is dispatched, the host meanwhile finds the inputs' landmarks and inpaints. The
examples then queue by label and are scored in batches of the same fixed size. Forgeries: ONE
jitted function (`device_metrics`) embeds every recovered face of every row together with the
inputs, sources and targets (one identity/Inception/LPIPS call each, not one per row or
sample) and returns per-sample values; head pose comes from landmarks on the host. Pristine
examples enter only recovery accuracy and AUC, so they get FaceNet on their rows alone
(`input_similarity`; their other per-sample values are NaN and no table reads them): on the
demo's test split, 170 of 320 examples are pristine. The weights of pytree networks
(Inception, LPIPS) enter those functions as arguments, not as program constants.

Outputs in W/eval/<split>[_<name>[_<level>]]: metrics.json (indent 2, sorted keys) and
table.md (dfrec_jax/eval/report.py). `--perturb NAME` without a level evaluates each level of
config.eval.perturb_levels[NAME] into one metrics.json {"levels": {level: rows}} with a
robustness table.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import datasets, input_pipeline, perturbations
from data_pipelines.input_pipeline import METHODS
from data_pipelines.landmarks import LandmarkDetector
from dfrec_jax import images as image_io
from dfrec_jax import losses, paths
from dfrec_jax import trained as trained_lib
from dfrec_jax.eval import baselines, identity, metrics, pose, report
from dfrec_jax.pretrained import inception_fid, vgg
from dfrec_jax.run import multihost
from dfrec_jax.run import workdir as workdir_lib
from dfrec_jax.run.progress import Progress

ALL = "All"
INPAINT_LABELS = {"telea": "Telea", "ns": "NS"}
INPAINT_MASKS = ("landmarks", "fixed")
# Per-sample metrics of the recovered target, aggregated over a group's forgeries.
TARGET_METRICS = (
    "idsim_target_facenet",
    "idsim_target_dlib",
    "dlib_match_target",
    "lpips",
    "psnr",
    "ssim",
    "pose_error",
)
SOURCE_METRICS = ("idsim_source_facenet", "idsim_source_dlib")
# Per-sample [R,B] outputs of the jitted metrics function, one row per recovery method.
DEVICE_METRICS = (
    "idsim_target_facenet",
    "idsim_target_dlib",
    "dlib_match_target",
    "idsim_input_facenet",
    "lpips",
    "psnr",
    "ssim",
)
DLIB_SAME_PERSON = (
    0.6  # dlib's descriptor distance threshold (its documented face-verification rule)
)
SOURCE_ROWS = ("none", "dfrec")  # rows that recover a source face


@dataclasses.dataclass(frozen=True)
class EvalNets:
    """The frozen networks eval scores with.

    identity: FaceNet + dlib embeddings (identity.IdentityNets). fid_features: images
    [B,S,S,3] in [0,1] -> [B,D] Inception pool features. lpips: (a [R*B], b [B]) -> [R*B],
    a[i] against b[i % B] (each row of recoveries against the same targets). landmarks:
    uint8 images [B,S,S,3] -> [B,68,2] (x, y) pixels, called on the host.
    Every scorer but landmarks may be a pytree (InceptionFID, LPIPS, identity.load's
    jax.tree_util.Partial nets): its arrays then enter the jitted metrics function as
    arguments; a plain function (tests' tiny nets) is static there and its closed-over weights
    become constants of the compiled program.
    """

    identity: identity.IdentityNets
    fid_features: Callable
    lpips: Callable
    landmarks: Callable


def load_eval_nets(eval_config) -> EvalNets:
    """The real networks (offline weights; see identity.load for the identity nets)."""
    return EvalNets(
        identity=identity.load(eval_config),
        fid_features=inception_fid.InceptionFID.load(),
        lpips=vgg.LPIPS.load(),
        # One eval batch per landmark call: the detector pads every call to its batch size.
        landmarks=LandmarkDetector(batch_size=int(eval_config.batch_size)),
    )


# ----------------------------------------------------------------------------- device metrics


SCORERS = ("facenet", "dlib", "fid_features", "lpips")  # device_metrics's layout order


def split_scorers(nets: EvalNets):
    """(arrays, layout) of the scoring networks (`losses.split_frozen`) for `device_metrics`:
    layout(arrays) -> (facenet, dlib, fid_features, lpips), in SCORERS order."""
    by_name = {"facenet": nets.identity.facenet, "dlib": nets.identity.dlib,
               "fid_features": nets.fid_features, "lpips": nets.lpips}  # fmt: skip
    return losses.split_frozen(tuple(by_name[name] for name in SCORERS))


def _unit(x):
    return x.astype(jnp.float32) / 255.0


def _recovered_rows(baseline_targets, dfrec_target):
    """Float [R,B,S,S,3] recovered targets of every row: the input ("none"), each inpainting
    (uint8 baseline_targets [R-1,B,S,S,3]), then DFREC's."""
    return jnp.concatenate([_unit(baseline_targets), dfrec_target[None]], axis=0)


@functools.partial(jax.jit, static_argnames=("layout",))
def device_metrics(arrays, images, sources, targets, baseline_targets, dfrec, *, layout):
    """Per-sample metrics of every row of one batch.

    images, sources, targets: uint8 [B,S,S,3]; baseline_targets: uint8 [R-1,B,S,S,3] (row 0 is
    the input itself); dfrec: the model's float outputs (target, source). Returns arrays
    [R,B] (idsim_target_*, idsim_input_facenet, lpips, psnr, ssim), [2,B] (idsim_source_*:
    rows "none" and "dfrec"), fid features [R,B,D] and the targets' [B,D].
    """
    facenet, dlib, fid_features, lpips = layout(arrays)
    identity_nets = identity.IdentityNets(facenet=facenet, dlib=dlib)
    images, sources, targets = _unit(images), _unit(sources), _unit(targets)
    recovered = _recovered_rows(baseline_targets, dfrec["target"])
    rec_sources = jnp.stack([images, dfrec["source"]])
    rows, b = recovered.shape[:2]
    flat = recovered.reshape((rows * b,) + recovered.shape[2:])
    tiled = jnp.broadcast_to(targets, recovered.shape).reshape(flat.shape)
    # Each distinct face once: the "none" row's target and source ARE the input images.
    faces = jnp.concatenate([targets, sources, images, flat[b:], rec_sources[1]])
    out = {}
    for name, emb in identity_nets.embed(faces).items():
        t, s, i = emb[:b], emb[b : 2 * b], emb[2 * b : 3 * b]
        r = jnp.concatenate([i[None], emb[3 * b : 2 * b + rows * b].reshape(rows - 1, b, -1)])
        rs = jnp.stack([i, emb[2 * b + rows * b :]])
        out[f"idsim_target_{name}"] = identity.cosine(r, t[None])
        out[f"idsim_source_{name}"] = identity.cosine(rs, s[None])
        if name == "facenet":
            out["idsim_input_facenet"] = identity.cosine(r, i[None])
        else:  # dlib's own rule: same person when the descriptors are closer than 0.6
            distance = jnp.sqrt(jnp.sum(jnp.square(r - t[None]), axis=-1))
            out["dlib_match_target"] = (distance < DLIB_SAME_PERSON).astype(jnp.float32)
    out["lpips"] = lpips(flat, targets).reshape(rows, b)  # the targets through VGG once
    out["psnr"] = metrics.psnr(flat, tiled).reshape(rows, b)
    out["ssim"] = metrics.ssim(flat, tiled).reshape(rows, b)
    features = fid_features(jnp.concatenate([targets, flat]))
    out["fid_target"] = features[:b]
    out["fid_recovered"] = features[b:].reshape(rows, b, -1)
    return out


@functools.partial(jax.jit, static_argnames=("layout",))
def input_similarity(arrays, baseline_targets, dfrec_target, *, layout):
    """IDSim(input, recovered target) with FaceNet [R,B], every row of a batch: all that a
    PRISTINE example adds to the tables (recovery accuracy; module docstring), so pristine
    examples are scored with this instead of `device_metrics`. Arguments as device_metrics's
    (row "none" of baseline_targets is the input; dfrec_target: the model's float target);
    the same embeddings and cosine."""
    facenet = layout(arrays)[SCORERS.index("facenet")]
    recovered = _recovered_rows(baseline_targets, dfrec_target)
    rows, b = recovered.shape[:2]
    emb = facenet(recovered.reshape((rows * b,) + recovered.shape[2:])).reshape(rows, b, -1)
    return identity.cosine(emb, emb[:1])


# ----------------------------------------------------------------------------- one pass

PRISTINE, FORGED = 0, 1  # the pipeline's labels
# Per-example values every example has, whatever its label, and their dtypes in `samples`.
META_DTYPES = {"label": np.int32, "method_id": np.int32, "has_mask": bool,
               "forgery_logit": np.float64}  # fmt: skip


def _concat(parts: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def _take(examples: dict, which) -> dict:
    return {k: v[which] for k, v in examples.items()}


class _Queue:
    """Prepared examples of one label waiting to be scored in batches of the eval batch size
    (fixed shapes: each scoring program compiles once), first in, first out."""

    def __init__(self, batch_size: int):
        self.batch_size, self.parts, self.count = batch_size, [], 0

    def add(self, examples: dict) -> None:
        n = len(examples["image"])
        if n:
            self.parts.append(examples)
            self.count += n

    def batches(self, flush: bool = False):
        """(batch, n real examples) while a whole batch is queued; with `flush`, the rest too,
        padded with copies of its first example (their values are dropped)."""
        while self.count >= self.batch_size or (flush and self.count):
            queued = _concat(self.parts)
            n = min(self.count, self.batch_size)
            batch, rest = _take(queued, slice(0, n)), _take(queued, slice(n, None))
            if n < self.batch_size:
                batch = _take(batch, np.r_[0:n, np.zeros(self.batch_size - n, int)])
            self.parts, self.count = [rest], self.count - n
            yield batch, n


class _Evaluator:
    """Scores every row on the batches of a split; per-sample values stay on the host.

    Forgeries and pristine examples are scored apart, each in full batches: a pristine
    example adds only its recovery accuracy (IDSim(input, recovered target)) and its forgery
    logit to the tables, so FaceNet alone runs on its rows (`input_similarity`), not dlib,
    LPIPS, Inception or the pose landmarks (`device_metrics`); its other values are NaN."""

    def __init__(self, model: trained_lib.TrainedModel, nets: EvalNets, eval_config, seed: int):
        self.model, self.nets, self.cfg, self.seed = model, nets, eval_config, seed
        self.methods = tuple(eval_config.inpaint_methods)
        unknown = [m for m in self.methods if m not in baselines.METHODS]
        if unknown:
            raise ValueError(
                f"config.eval.inpaint_methods: unknown {unknown}; known: "
                f"{sorted(baselines.METHODS)}"
            )
        if eval_config.inpaint_mask not in INPAINT_MASKS:
            raise ValueError(
                f"config.eval.inpaint_mask must be one of {INPAINT_MASKS}, got "
                f"{eval_config.inpaint_mask!r}"
            )
        self.rows = ("none",) + tuple(f"inpaint_{m}" for m in self.methods) + ("dfrec",)
        self.arrays, self.layout = split_scorers(nets)

    def _regions(self, input_landmarks, size: int) -> np.ndarray:
        """bool [B,S,S]: where the inpainting baselines fill."""
        if self.cfg.inpaint_mask == "landmarks":
            return baselines.landmark_region(input_landmarks, size)
        return np.broadcast_to(baselines.fixed_region(size), (len(input_landmarks), size, size))

    def _prepare(self, batch: dict) -> dict:
        """The real examples of one padded batch with what scoring needs: the model's outputs,
        the inputs' landmarks, the baselines' regions and inpainted images [B,M,S,S,3]."""
        images, size = batch["image"], batch["image"].shape[1]
        predicted = self.model.predict(images)  # dispatched: the host works meanwhile
        input_landmarks = self.nets.landmarks(images)
        regions = self._regions(input_landmarks, size)
        radius = int(self.cfg.inpaint_radius)
        inpainted = [baselines.inpaint(images, regions, m, radius) for m in self.methods]
        predicted = jax.device_get(predicted)
        examples = dict(batch)
        examples.update(
            input_landmarks=input_landmarks,
            regions=regions,
            inpainted=np.stack(inpainted, axis=1)
            if inpainted
            else np.zeros((len(images), 0) + images.shape[1:], images.dtype),
            forgery_logit=np.asarray(predicted["forgery_logit"], np.float64),
            **{f"dfrec_{k}": np.asarray(predicted[k]) for k in ("target", "source", "seg")},
        )
        return _take(examples, batch["valid"] > 0)

    @staticmethod
    def _baseline_targets(examples: dict) -> np.ndarray:
        """uint8 [R-1,B,S,S,3]: the input itself (row "none"), then each inpainting."""
        return np.concatenate([examples["image"][None], np.moveaxis(examples["inpainted"], 1, 0)])

    def _score_forged(self, examples: dict, n: int) -> dict:
        """Every per-sample value of a batch of forgeries (the first n real) and their FID
        features."""
        images, size = examples["image"], examples["image"].shape[1]
        baseline_targets = self._baseline_targets(examples)
        dfrec = {"target": examples["dfrec_target"], "source": examples["dfrec_source"]}
        device = device_metrics(
            self.arrays,
            images,
            examples["source"],
            examples["target"],
            baseline_targets,
            dfrec,
            layout=self.layout,
        )
        # Head pose of the true targets and of each row's recovered target: one landmark call.
        # The "none" row's target is the input, whose landmarks are known already.
        recovered = np.concatenate(
            [*baseline_targets[1:], image_io.to_uint8(examples["dfrec_target"])]
        )
        points = self.nets.landmarks(np.concatenate([examples["target"], recovered]))
        b = len(images)
        points = np.concatenate([points[:b], examples["input_landmarks"], points[b:]])
        poses = pose.head_pose(points, size).reshape(len(self.rows) + 1, b, 3)
        device = jax.device_get(device)
        rows, fid = {}, {"target": device["fid_target"][:n]}
        for r, row in enumerate(self.rows):
            values = {k: device[k][r] for k in DEVICE_METRICS}
            values["pose_error"] = pose.angle_error(poses[r + 1], poses[0])
            if row in SOURCE_ROWS:
                values.update({k: device[k][SOURCE_ROWS.index(row)] for k in SOURCE_METRICS})
            if row == "dfrec":
                values["mask_iou"] = metrics.mask_iou(examples["dfrec_seg"], examples["mask"])
            elif row != "none":
                values["mask_iou"] = metrics.mask_iou(examples["regions"], examples["mask"])
            rows[row] = {k: np.asarray(values[k], np.float64)[:n] for k in self._row_keys(row)}
            fid[row] = device["fid_recovered"][r][:n]
        return {"rows": rows, "fid": fid}

    @staticmethod
    def _row_keys(row: str) -> tuple[str, ...]:
        """The per-sample values of a row (every scorer gives these keys)."""
        keys = DEVICE_METRICS + ("pose_error",)
        keys += SOURCE_METRICS if row in SOURCE_ROWS else ()
        return keys + (("mask_iou",) if row != "none" else ())

    def _score_pristine(self, examples: dict, n: int) -> dict:
        """A batch of pristine examples: IDSim(input, recovered target) of every row, NaN for
        the values no table reads of them."""
        similarity = input_similarity(
            self.arrays,
            self._baseline_targets(examples),
            examples["dfrec_target"],
            layout=self.layout,
        )
        similarity = np.asarray(jax.device_get(similarity), np.float64)[:, :n]
        rows = {}
        for r, row in enumerate(self.rows):
            rows[row] = {k: np.full(n, np.nan) for k in self._row_keys(row)}
            rows[row]["idsim_input_facenet"] = similarity[r]
        return {"rows": rows}

    def samples(self, examples, perturb_spec: str) -> dict:
        """Per-sample values and labels of every example of `examples` (an
        input_pipeline.Split), in split order, padding dropped; with several processes each
        scores its own part and every process gets all values (`gather_samples`)."""
        batch_size = int(self.cfg.batch_size)
        index, processes = jax.process_index(), jax.process_count()
        dataset = input_pipeline.make_dataset(
            examples,
            batch_size=batch_size,
            seed=self.seed,
            training=False,
            perturb=perturb_spec,
            process_index=index,
            process_count=processes,
        )
        total = int(examples.builder.info.splits[examples.name].num_examples)
        largest = max(input_pipeline.part_sizes(total, processes))
        show = largest > 0 and index == 0  # one progress line per job
        progress = Progress(-(-largest // batch_size), every=10) if show else None
        queues = {FORGED: _Queue(batch_size), PRISTINE: _Queue(batch_size)}
        score = {FORGED: self._score_forged, PRISTINE: self._score_pristine}
        labels, scored = [], {FORGED: [], PRISTINE: []}
        for i, batch in enumerate(dataset.as_numpy_iterator()):
            if progress is not None:
                progress.update(i, images_per_step=batch_size)
            if not (batch["valid"] > 0).any():
                continue
            prepared = self._prepare(batch)
            labels.append({k: prepared[k] for k in META_DTYPES})
            for label, queue in queues.items():
                queue.add(_take(prepared, prepared["label"] == label))
                scored[label] += [score[label](*b) for b in queue.batches()]
        for label, queue in queues.items():
            scored[label] += [score[label](*b) for b in queue.batches(flush=True)]
        if progress is not None:
            progress.update(progress.total_steps, images_per_step=batch_size)
        samples = self._in_split_order(labels, scored)
        return gather_samples(samples) if processes > 1 else samples

    def _in_split_order(self, labels: list[dict], scored: dict) -> dict:
        """The samples dict: each label's scored values (in split order within the label) put
        back at their examples' places."""
        # Fixed dtypes: gather_samples reads every process's bytes with this process's dtypes.
        meta = {
            k: np.concatenate([part[k] for part in labels] or [np.zeros(0)]).astype(dtype)
            for k, dtype in META_DTYPES.items()
        }
        is_forged = meta["label"] == FORGED
        rows = {}
        for row in self.rows:
            rows[row] = {}
            for key in self._row_keys(row):
                values = np.full(len(is_forged), np.nan)
                for label, where in ((FORGED, is_forged), (PRISTINE, ~is_forged)):
                    parts = [s["rows"][row][key] for s in scored[label]]
                    values[where] = np.concatenate(parts) if parts else []
                rows[row][key] = values
        fid_rows = [s["fid"] for s in scored[FORGED]]
        fid = _concat(fid_rows) if fid_rows else self._no_fid_features()
        return {
            "method_id": meta["method_id"],
            "label": meta["label"],
            "has_mask": meta["has_mask"],
            "forgery_logit": meta["forgery_logit"],
            "rows": rows,
            "fid_method_id": meta["method_id"][is_forged],
            "fid": fid,
        }

    def _no_fid_features(self) -> dict:
        """Empty [0, D] FID feature sets (no forgery in this process's part)."""
        size = self.model.image_size
        fid_features = lambda arrays, x: self.layout(arrays)[SCORERS.index("fid_features")](x)  # noqa: E731
        shape = jax.eval_shape(fid_features, self.arrays,
                               jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))  # fmt: skip
        empty = np.zeros((0, shape.shape[-1]), shape.dtype)
        return {key: empty for key in ("target",) + self.rows}


def gather_samples(samples: dict) -> dict:
    """Every process's per-sample values, concatenated in process order (the parts are
    contiguous blocks in process order, so this is split order). Sent as raw bytes: two
    collectives whatever the number of arrays, and float64 values (pose error, logits) are
    not cast to float32 on the way, as JAX without x64 would."""
    leaves, treedef = jax.tree.flatten(samples)
    leaves = [np.ascontiguousarray(x) for x in leaves]
    lengths = multihost_utils.process_allgather(np.array([len(x) for x in leaves], np.int32))
    mine = np.concatenate([x.reshape(-1).view(np.uint8) for x in leaves])
    sizes = multihost_utils.process_allgather(np.array([mine.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: mine.size] = mine
    every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, bytes]
    gathered = [[] for _ in leaves]
    for p, (buffer, counts) in enumerate(zip(every, np.asarray(lengths))):
        offset = 0
        for i, (leaf, n) in enumerate(zip(leaves, counts)):
            row = leaf.dtype.itemsize * int(np.prod(leaf.shape[1:], dtype=np.int64))
            chunk = buffer[offset : offset + int(n) * row]
            gathered[i].append(chunk.view(leaf.dtype).reshape((int(n),) + leaf.shape[1:]))
            offset += int(n) * row
    return jax.tree.unflatten(treedef, [np.concatenate(parts) for parts in gathered])


# ----------------------------------------------------------------------------- aggregation


def _groups(samples: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """group -> (its forgeries, its accuracy/AUC population, its FID rows); methods in
    METHODS order, then "All"."""
    method_id, forged = samples["method_id"], samples["label"] == 1
    groups = {}
    present = sorted(set(method_id[forged].tolist()))
    for m in present:
        own = forged & (method_id == m)
        groups[METHODS[m]] = (own, own | ~forged, samples["fid_method_id"] == m)
    kinds = {forgery_kind(METHODS[m]) for m in present} - {None}
    if len(kinds) > 1:  # e.g. lfw_swap: morphs (target identity kept) vs splices (none kept)
        for kind in sorted(kinds):
            ids = [m for m in present if forgery_kind(METHODS[m]) == kind]
            own = forged & np.isin(method_id, ids)
            groups[KIND_GROUPS[kind]] = (own, own | ~forged,
                                         np.isin(samples["fid_method_id"], ids))  # fmt: skip
    groups[ALL] = (forged, np.ones_like(forged), np.ones_like(samples["fid_method_id"], bool))
    return groups


# Forgery kinds of the synthetic data: a morph keeps part of the target's identity inside the
# face (as learned swappers do), a splice pastes pure source pixels over it (the paper's
# Limitations: recovery is "significantly constrained" there).
KIND_GROUPS = {"morph": "Morphs (all)", "splice": "Splices (all)"}
_SPLICE_PREFIXES = ("hull_", "elastic_", "template_", "blended")


def forgery_kind(method: str) -> str | None:
    """"morph", "splice" or None (a dataset of learned swappers, or pristine)."""
    if method.startswith("morph"):
        return "morph"
    if method.startswith(_SPLICE_PREFIXES):
        return "splice"
    return None


def _cell(row: str, samples: dict, selectors, threshold: float) -> dict:
    """Every metric of one row over one group."""
    forged, population, fid_rows = selectors
    values, labels = samples["rows"][row], samples["label"][population]
    cell = {k: metrics.summary(values[k][forged]) for k in TARGET_METRICS}
    for k in SOURCE_METRICS:
        cell[k] = metrics.summary(values[k][forged]) if k in values else None
    if "mask_iou" in values:
        cell["mask_iou"] = metrics.summary(values["mask_iou"][forged & samples["has_mask"]])
    else:
        cell["mask_iou"] = None
    cell["fid"] = metrics.fid(samples["fid"][row][fid_rows], samples["fid"]["target"][fid_rows])
    # Accuracy and AUC rank/threshold finite values only; n of idsim_input_facenet says how many.
    similarity = values["idsim_input_facenet"][population]
    cell["idsim_input_facenet"] = metrics.summary(similarity)
    ok = np.isfinite(similarity)
    cell["recovery_accuracy"] = metrics.recovery_accuracy(similarity[ok], labels[ok], threshold)
    cell["auc"] = None
    if row == "dfrec":
        logits = samples["forgery_logit"][population]
        ok = np.isfinite(logits)
        cell["auc"] = metrics.roc_auc(logits[ok], labels[ok])
    return cell


def aggregate(samples: dict, rows: tuple[str, ...], threshold: float) -> tuple[list, dict]:
    """(group names in column order, {row: {group: {metric: summary | number | None}}})."""
    groups = _groups(samples)
    table = {
        row: {g: _cell(row, samples, sel, threshold) for g, sel in groups.items()} for row in rows
    }
    return list(groups), table


def count_examples(samples: dict) -> dict:
    """How many examples were scored: total, pristine, forged, forged per method."""
    labels, method_id = samples["label"], samples["method_id"]
    forged = labels == 1
    ids, counts = np.unique(method_id[forged], return_counts=True)
    return {
        "total": int(labels.size),
        "pristine": int(np.sum(~forged)),
        "forged": int(np.sum(forged)),
        "forged_per_method": {METHODS[i]: int(c) for i, c in zip(ids, counts)},
    }


def _json_ready(value):
    """NaN / inf -> null (strict JSON), NumPy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- run


def _first_difference(a, b, path: str):
    """(dotted key, a's value, b's value) of the first difference of two JSON trees, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


def _check_model(config, model: trained_lib.TrainedModel) -> None:
    found = _first_difference(
        workdir_lib.config_to_dict(config.model),
        workdir_lib.config_to_dict(model.config.model),
        "model",
    )
    if found:
        key, ours, theirs = found
        raise ValueError(
            f"--config sets {key}={ours!r} but the checkpoint in {model.checkpoint_dir} was "
            f"trained with {theirs!r}; evaluate with the run's model config"
        )


def _examples(config, split: str, image_size: int):
    """(prepared builder, input_pipeline.Split of the examples to score): the split, or its
    first config.eval.max_examples when that is > 0 (the rest are never read)."""
    if int(config.data.image_size) != image_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} but the model takes "
            f"{image_size}px faces; set --config.data.image_size={image_size}"
        )
    builder = datasets.prepare_in_every_process(config.data)  # process 0 builds a missing one
    if split not in builder.info.splits:
        raise ValueError(
            f"split {split!r} not in {builder.info.full_name} (splits: "
            f"{', '.join(sorted(builder.info.splits))})"
        )
    size = builder.info.features["image"].shape[0]
    if size != image_size:
        raise ValueError(
            f"{builder.info.full_name} holds {size}px faces but the model takes {image_size}px"
        )
    limit = int(config.eval.max_examples)
    if 0 < limit < builder.info.splits[split].num_examples:  # tfds refuses a longer slice
        split = f"{split}[:{limit}]"
    return builder, input_pipeline.Split(builder, split)


def _level_key(level) -> str:
    return f"{float(level):g}"  # 75 -> "75", 30.0 -> "30", 12.5 -> "12.5"


def _perturbations(perturb: str, eval_config) -> tuple[str, list[str]]:
    """(name, the specs to evaluate): ("", [""]) clean; ("jpeg", ["jpeg:75"]) for "jpeg:75";
    ("jpeg", ["jpeg:50", ...]) for "jpeg" (config.eval.perturb_levels.jpeg)."""
    if not perturb:
        return "", [""]
    name, level = perturbations.parse(perturb)
    levels = [level] if level is not None else list(eval_config.perturb_levels[name])
    specs = [f"{name}:{_level_key(lv)}" for lv in levels]
    for spec in specs:
        perturbations.parse(spec)  # a bad level in the config fails before any work
    return name, specs


def _row_labels(rows) -> dict[str, str]:
    labels = {"none": "None", "dfrec": "DFREC"}
    for row in rows:
        if row.startswith("inpaint_"):
            method = row.removeprefix("inpaint_")
            labels[row] = f"Inpaint ({INPAINT_LABELS.get(method, method)})"
    return {row: labels[row] for row in rows}


def run(
    config,
    workdir: str | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
    split: str = "test",
    perturb: str = "",
    nets: EvalNets | None = None,
) -> dict:
    """Evaluates a run's checkpoint on `split` of config.data and writes metrics.json and
    table.md (module docstring); returns the metrics dict. `nets` replaces the real scoring
    networks (tests). With several processes every process calls it (module docstring)."""
    multihost.initialize(config.mesh.distributed)  # before any other JAX use
    model = trained_lib.load(workdir=workdir, checkpoint=checkpoint, step=step)
    _check_model(config, model)
    name, specs = _perturbations(perturb, config.eval)
    each_level = bool(name) and ":" not in perturb
    builder, examples = _examples(config, split, model.image_size)
    evaluator = _Evaluator(
        model, nets or load_eval_nets(config.eval), config.eval, seed=int(config.data.seed)
    )
    threshold = float(config.eval.recovery_threshold)
    out = {
        "split": split,
        "checkpoint": model.checkpoint_record(),  # + converted_from for `convert` runs
        "config_hash": model.config_hash,
        "eval_config": workdir_lib.config_to_dict(config.eval),
        "dataset": {
            "name": builder.info.full_name,
            "version": str(builder.info.version),
            "split_examples": int(builder.info.splits[split].num_examples),
        },
        "row_order": list(evaluator.rows),
        "row_labels": _row_labels(evaluator.rows),
        "paper_reference": report.PAPER_TABLE_I,
    }
    if each_level:
        out["perturb"], out["levels"] = name, {}
        for spec in specs:
            samples = evaluator.samples(examples, spec)
            out["groups"], out["levels"][spec.partition(":")[2]] = aggregate(
                samples, evaluator.rows, threshold
            )
        folder = f"{split}_{name}"
    else:
        out["perturb"] = specs[0]
        samples = evaluator.samples(examples, specs[0])
        out["groups"], out["rows"] = aggregate(samples, evaluator.rows, threshold)
        folder = "_".join([split] + specs[0].split(":")) if specs[0] else split
    out["num_examples"] = count_examples(samples)
    out["versions"] = workdir_lib.library_versions()
    out["created_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out = _json_ready(out)
    if jax.process_index() != 0:  # the same tables everywhere; one process writes them
        return out

    run_dir = workdir or os.path.dirname(model.checkpoint_dir)
    output_dir = paths.join(run_dir, "eval", folder)  # may be remote (gs://...)
    paths.makedirs(output_dir)
    path = paths.join(output_dir, "metrics.json")
    paths.write_atomic(path, json.dumps(out, indent=2, sort_keys=True) + "\n")
    table = report.document(out)
    paths.write_atomic(paths.join(output_dir, "table.md"), table)
    print(table)
    print(path)
    return out
