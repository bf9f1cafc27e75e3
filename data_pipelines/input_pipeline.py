"""Host input pipeline: tf.data batches per process -> global batches sharded over the mesh.

`make_dataset` turns a dataset's examples (the feature dict of `features.py`) into batches of
fixed-shape tensors, no strings:
- `image`, `source`, `target` uint8 [B,S,S,3]; `mask` uint8 [B,S,S,1] (255 = pixel carries
  source information; a forgery's mask is its soft blend region; a pristine face, its own
  source, is 255 everywhere);
- `label` int32 [B] (0 pristine, 1 forgery); `has_mask` float32 [B] (1.0: every example of
  our datasets carries a true mask, pristine = all 255); `method_id` int32 [B] (index into
  `METHODS`); `alpha` float32 [B] (share of source texture inside the region: 0 pristine,
  1 splice, (0, 1) morph, -1 unknown; `features.py`; examples without the feature get 0 for
  pristine and -1 for forgeries);
- evaluation only: `valid` float32 [B] (0 for padding) and `index` int32 [B] (the example's
  position in `examples`, -1 for padding).

Process part (`process_part`, training and evaluation): each process takes a contiguous
block of the examples, `tfds.even_splits(split, process_count)[process_index]` with
drop_remainder=False (block sizes differ by at most 1, the first N % process_count blocks
hold one more). Given a `Split` (builder, split name), a host reads only its own block's
records (tfds file instructions), never the whole split; a dataset is cut into the same
blocks with skip/take (reading the records before its block).

Training (`training=True`):
- All processes yield one batch per step forever, each from its own part only.
- Streams: the part is split by label into a pristine stream, a forgery stream and two
  blended-image (BI) streams (targets, partners) of blendable pristine faces
  (`blending.is_blendable`). Each stream repeats forever; its epoch e is the stream's records
  rotated by a random offset and permuted in blocks of `shuffle_buffer` records (one block =
  a full permutation when the stream is smaller), with stateless random ops keyed by
  (seed, stream, epoch, block): a pure function of the seed, independent of TF's global seed
  and of iterator state. This happens on the encoded records, before decoding. A stream
  selects its records by the metadata pass's label / blendability of each position, so no
  image (not even `face_mask`) is decoded to filter; each stream still reads the part once
  per epoch of its own (keeping the part in memory would not fit large datasets; tfds
  already caches datasets under 250 MiB).
- Mix: every batch holds exactly `mix_counts(mix, B)` examples of each kind: dataset forgeries,
  fresh BI forgeries and pristine faces, at a fixed interleaved slot pattern
  (`choice_pattern`, via `tf.data.Dataset.choose_from_datasets`). A BI forgery is
  `blending.blend_pair(target, partner)`: per batch the BI part takes its targets and
  max(count, PARTNER_CANDIDATES) partner candidates; each target takes the first candidate
  (cyclically from its own slot) of a different identity. Only if every candidate shares the
  target's identity (probability <= (largest identity share)^PARTNER_CANDIDATES; ~1e-17 on
  LFW) is a same-identity partner used. Blend randomness is keyed by (seed, BI index),
  including whether a BI forgery is a texture morph (probability `blended_morph_fraction`,
  alpha ~ U[morph_alpha], method "morph_blended") or a splice ("blended", alpha 1).
- A kind whose stream is empty in this process's part (no pristine faces, no forgeries, or
  fewer than 2 blendable identities) is dropped from `mix` with a logged warning and the other
  fractions are renormalised; nothing usable at all is a ValueError.
- Flip: each example's image/source/target/mask are flipped left-right together with
  probability 1/2, keyed by (seed, batch index, slot).

Evaluation (`training=False`): the process part of `examples` once, in order, no mix or
flip; `perturb` (e.g. "jpeg:70", `perturbations.parse`) applied to `image` only, seeded by
(seed, example index). Every process yields the same number of batches, ceil(largest part /
B) = ceil(ceil(N / process_count) / B) for a plain split; the last ones are padded with zero
examples marked `valid` = 0 (`has_mask` = 0 too, so a masked loss ignores them). A
process's real examples are one contiguous range of split positions (its part).

Resume: `start_batch=k` gives exactly the batches k, k+1, ... of an uninterrupted run: every
stream's position after k batches is known (k * its per-batch count), so each stream starts
at that epoch and skips the rest on encoded records; all randomness is keyed by example,
batch or epoch index. `InputPipeline` saves {"next_batch": k} with the checkpoint.

Images may come decoded (uint8 [S,S,C]) or encoded (PNG/JPEG strings: `load_examples` reads a
TFDS builder that way, so that skipped records are never decoded). One metadata pass over the
process's part counts labels and identities when a pipeline is built.
"""

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import blending, perturbations, swap
from dfrec_jax.host_tf import tf

# Append only: ids are saved in metrics. Compared lower-case; unknown methods map to "other".
METHODS = (
    "pristine",
    blending.METHOD,  # "blended": BI forgeries made in this pipeline
    # lfw_swap (data_pipelines/swap.py)
    "hull_blend",
    "hull_poisson",
    "elastic_blend",
    "template_blend",
    # FaceForensics++
    "deepfakes",
    "face2face",
    "faceswap",
    "neuraltextures",
    "faceshifter",
    # CelebaMegaFS
    "ftm",
    "idinjection",
    "lcr",
    # FFHQ-E4S
    "e4s",
    "other",
    # lfw_swap identity morphs and morphed BI forgeries (appended after "other": ids above
    # stay what older metrics recorded)
    "morph_blend",
    blending.MORPH_METHOD,  # "morph_blended"
)
OTHER_METHOD_ID = METHODS.index("other")
MIX_KINDS = ("pristine", "forgery", "blended")
BLENDED_MORPH_FRACTION = 0.5  # config.data.blended_morph_fraction
PARTNER_CANDIDATES = 16
IMAGE_KEYS = {"image": 3, "source": 3, "target": 3, "mask": 1, "face_mask": 1}
OUTPUT_KEYS = ("image", "source", "target", "mask", "label", "has_mask", "method_id", "alpha")
EVAL_KEYS = OUTPUT_KEYS + ("valid", "index")
_EPOCHS = 2**62  # "forever" for Dataset.range
_META_BATCH = 1024


def _key(seed: int, tag: str) -> int:
    """A 31-bit stateless-RNG key for (seed, purpose), stable across runs and platforms."""
    digest = hashlib.sha256(f"dfrec-input:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _seed(key: int, index) -> tf.Tensor:
    return tf.stack([tf.constant(key, tf.int64), tf.cast(index, tf.int64)])


# ----------------------------------------------------------------------------- mix


def mix_counts(mix: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """Examples of each kind per batch: largest-remainder rounding of fraction * batch_size.

    Equals round(fraction * B) for each kind whenever those add up to B; always sums to B.
    """
    unknown = set(mix) - set(MIX_KINDS)
    if unknown:
        raise ValueError(f"unknown mix kinds {sorted(unknown)}; known: {', '.join(MIX_KINDS)}")
    fractions = {k: float(mix.get(k, 0.0)) for k in MIX_KINDS}
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"mix fractions must be >= 0 and sum to 1, got {dict(mix)}")
    exact = {k: f * batch_size for k, f in fractions.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = batch_size - sum(counts.values())
    # Largest remainders first; ties broken by MIX_KINDS order (deterministic).
    order = sorted(MIX_KINDS, key=lambda k: (-(exact[k] - counts[k]), MIX_KINDS.index(k)))
    for k in order[:left]:
        counts[k] += 1
    return counts


def choice_pattern(counts: Mapping[str, int]) -> list[int]:
    """Slot -> index into MIX_KINDS, each kind's slots spread evenly over the batch."""
    slots = []
    for i, kind in enumerate(MIX_KINDS):
        n = counts.get(kind, 0)
        slots += [((j + 0.5) / n, i) for j in range(n)]
    return [i for _, i in sorted(slots)]


# ----------------------------------------------------------------------------- examples


class Split(NamedTuple):
    """A prepared builder's split, given to `make_dataset` / `training_dataset` in place of its
    examples so that each process reads only its own part of it (`process_part`)."""

    builder: tfds.core.DatasetBuilder
    name: str


def load_examples(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """A prepared builder's split (or sub-split) in stored order, images left encoded
    (decoded later, and only for the records a pipeline actually uses)."""
    decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS}
    return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)


def part_sizes(total: int, process_count: int) -> list[int]:
    """Examples in each process part: tfds.even_splits(drop_remainder=False) sizes."""
    return [total // process_count + int(i < total % process_count) for i in range(process_count)]


def _count(examples: tf.data.Dataset) -> int:
    """The number of examples: their known cardinality, else one pass (nothing decoded)."""
    n = int(examples.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError("examples are an infinite dataset; process parts need a finite one")
    if n >= 0:
        return n
    return int(examples.reduce(np.int64(0), lambda n, _: n + 1))


class ProcessPart(NamedTuple):
    examples: tf.data.Dataset  # this process's block, in stored order
    offset: int  # position of its first example in the whole split
    largest: int | None  # the largest block's size; None for one process (the whole split)
    first: tf.data.Dataset  # the split's first example (image size for an empty part)


def process_part(
    examples: tf.data.Dataset | Split, process_index: int, process_count: int
) -> ProcessPart:
    """This process's contiguous block of `examples`:
    tfds.even_splits(split, process_count, drop_remainder=False)[process_index].

    A `Split` is read as that sub-split: only the block's records are read (tfds file
    instructions). A dataset is cut into the same blocks (skip/take, reading the records
    before the block); with one process it is used as given.
    """
    if isinstance(examples, Split):
        builder, split = examples
        first = load_examples(builder, split).take(1)  # lazy: reads one record if used
        if process_count == 1:
            return ProcessPart(load_examples(builder, split), 0, None, first)
        parts = tfds.even_splits(split, n=process_count, drop_remainder=False)
        sizes = [builder.info.splits[part].num_examples for part in parts]  # no read
        # tfds refuses an empty sub-split (fewer examples than processes): read nothing
        mine = parts[process_index]
        block = load_examples(builder, mine) if sizes[process_index] else first.take(0)
        return ProcessPart(block, sum(sizes[:process_index]), max(sizes), first)
    first = examples.take(1)
    if process_count == 1:  # the examples as given: the same reads as a one-process run
        return ProcessPart(examples, 0, None, first)
    sizes = part_sizes(_count(examples), process_count)
    offset = sum(sizes[:process_index])
    block = examples.skip(offset).take(sizes[process_index])
    return ProcessPart(block, offset, max(sizes), first)


def _decode(x: tf.Tensor, channels: int, size: int | None) -> tf.Tensor:
    if x.dtype == tf.string:
        x = tf.io.decode_image(x, channels=channels, dtype=tf.uint8, expand_animations=False)
    x = tf.cast(x, tf.uint8) if x.dtype != tf.uint8 else x
    return tf.ensure_shape(x, [size, size, channels]) if size else x


def _decoded(example: dict, size: int) -> dict:
    out = dict(example)
    for k, c in IMAGE_KEYS.items():
        if k in out:
            out[k] = _decode(out[k], c, size)
    return out


def method_ids(method: tf.Tensor) -> tf.Tensor:
    """int32 METHODS index of method strings (any shape), "other" for unknown ones."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(METHODS), tf.range(len(METHODS), dtype=tf.int32)
        ),
        default_value=OTHER_METHOD_ID,
    )
    return table.lookup(tf.strings.lower(method))


def _alpha(example: dict) -> tf.Tensor:
    """float32 share of source texture; without the feature 0 (pristine) or -1 (unknown)."""
    if "alpha" in example:
        return tf.cast(example["alpha"], tf.float32)
    return tf.where(tf.equal(tf.cast(example["label"], tf.int32), 0), 0.0, -1.0)


def _standard(example: dict) -> dict:
    """The output fields of one decoded example (strings turned into method_id)."""
    return {
        "image": example["image"],
        "source": example["source"],
        "target": example["target"],
        "mask": example["mask"],
        "label": tf.cast(example["label"], tf.int32),
        "method_id": method_ids(example["method"]),
        "alpha": _alpha(example),
    }


def _check_examples(examples: tf.data.Dataset) -> None:
    spec = examples.element_spec
    needed = set(IMAGE_KEYS) | {"label", "method", "source_id", "target_id"}
    if not isinstance(spec, Mapping) or needed - set(spec):
        have = sorted(spec) if isinstance(spec, Mapping) else spec
        raise ValueError(f"examples need the features.py keys {sorted(needed)}; got {have}")


def _meta(examples: tf.data.Dataset) -> dict:
    """label, target_id and blendability of every example (images: only face_mask decoded)."""

    def project(ex):
        face_mask = _decode(ex["face_mask"], 1, None)
        blendable = blending.is_blendable({"face_mask": face_mask, "label": ex["label"]})
        return {
            "label": tf.cast(ex["label"], tf.int32),
            "id": ex["target_id"],
            "blendable": blendable,
            "size": tf.shape(face_mask)[0],
        }

    parts = {"label": [], "id": [], "blendable": [], "size": []}
    for batch in examples.map(_as_written(project)).batch(_META_BATCH).as_numpy_iterator():
        for k in parts:
            parts[k].append(batch[k])
    meta = {k: np.concatenate(v) if v else np.zeros([0]) for k, v in parts.items()}
    sizes = np.unique(meta["size"])
    if len(sizes) > 1:
        raise ValueError(f"examples have mixed image sizes {sizes.tolist()}")
    meta["image_size"] = int(sizes[0]) if len(sizes) else 0
    return meta


# ----------------------------------------------------------------------------- streams


def _as_written(fn):
    """`fn` for tf.data, traced as written instead of through AutoGraph's source rewrite: the
    pipeline's functions branch and loop only on Python values, and the rewrite (parsing and
    transforming every function they call) took ~3 s of each pipeline's construction."""
    return tf.autograph.experimental.do_not_convert(fn)


def _permute(block: dict, seed: tf.Tensor) -> dict:
    n = tf.shape(block["label"])[0]
    order = tf.argsort(tf.random.stateless_uniform([n], seed))
    return {k: tf.gather(v, order) for k, v in block.items()}


def _stream(base: tf.data.Dataset, count: int, key: int, start: int, block: int):
    """Element `start` onwards of `base` repeated forever, each epoch reshuffled.

    Epoch e = base rotated by a random offset, then permuted in blocks of `block` records;
    all keyed by (key, e, block index). Epochs before `start` are never read.
    """
    first_epoch, offset = divmod(start, count)

    def epoch(e):
        seed = _seed(key, e)
        shift = tf.random.stateless_uniform([], seed, 0, count, dtype=tf.int64)
        rotated = base.skip(shift).concatenate(base.take(shift))
        blocks = rotated.batch(block).enumerate()
        return blocks.map(
            _as_written(lambda b, x: _permute(x, tf.random.experimental.stateless_fold_in(seed, b)))
        ).unbatch()

    return tf.data.Dataset.range(first_epoch, _EPOCHS).flat_map(_as_written(epoch)).skip(offset)


def _subset(examples: tf.data.Dataset, keep: np.ndarray) -> tf.data.Dataset:
    """The examples at the positions `keep` (from their metadata pass) marks, in order:
    a filter that decodes nothing (the blendability test would decode every face_mask)."""
    keep = tf.constant(np.asarray(keep, bool))
    kept = examples.enumerate().filter(_as_written(lambda i, _: tf.gather(keep, i)))
    return kept.map(_as_written(lambda _, ex: ex))


def _pick_partners(targets: dict, candidates: dict) -> dict:
    """For target i: the first candidate (i, i+1, ... cyclically) of a different identity."""
    n = tf.shape(targets["target_id"])[0]
    k = tf.shape(candidates["target_id"])[0]
    order = (tf.range(n)[:, None] + tf.range(k)[None, :]) % k  # [n, k]
    differs = tf.not_equal(tf.gather(candidates["target_id"], order), targets["target_id"][:, None])
    first = tf.argmax(tf.cast(differs, tf.int32), axis=1, output_type=tf.int32)  # 0 if none
    chosen = tf.gather(order, first, batch_dims=1)
    return {key: tf.gather(v, chosen) for key, v in candidates.items()}


def _training(
    examples,
    meta,
    *,
    batch_size,
    seed,
    mix,
    flip,
    start_batch,
    shuffle_buffer,
    blended_morph_fraction,
    morph_alpha,
):
    size = meta["image_size"]
    labels, ids, blendable = meta["label"], meta["id"], meta["blendable"]
    available = {
        "pristine": int(np.sum(labels == 0)),
        "forgery": int(np.sum(labels == 1)),
        "blended": int(np.sum(blendable)),
    }
    if len(np.unique(ids[blendable])) < 2:
        available["blended"] = 0
    mix = {k: float(v) for k, v in (mix or {"pristine": 0.5, "forgery": 0.5}).items()}
    mix_counts(mix, batch_size)  # validates
    dropped = [k for k, f in mix.items() if f > 0 and available[k] == 0]
    if dropped:
        kept = {k: f for k, f in mix.items() if k not in dropped}
        total = sum(kept.values())
        if total <= 0:
            raise ValueError(
                f"no usable training examples for mix {mix}: this process part has "
                f"{available['pristine']} pristine, {available['forgery']} forgeries, "
                f"{available['blended']} blendable faces ({len(np.unique(ids))} identities)"
            )
        logging.warning("input pipeline: no examples for %s; mix renormalised", dropped)
        mix = {k: f / total for k, f in kept.items()}
    counts = mix_counts(mix, batch_size)

    streams = [None] * len(MIX_KINDS)

    def decode_standard(ex):
        return _standard(_decoded(ex, size))

    for i, kind in enumerate(("pristine", "forgery")):
        n = counts[kind]
        if n:
            base = _subset(examples, labels == i)
            s = _stream(base, available[kind], _key(seed, kind), start_batch * n, shuffle_buffer)
            streams[MIX_KINDS.index(kind)] = s.map(
                _as_written(decode_standard), num_parallel_calls=tf.data.AUTOTUNE
            )

    n_bi = counts["blended"]
    if n_bi:
        n_cand = max(n_bi, PARTNER_CANDIDATES)
        base = _subset(examples, blendable)
        count = available["blended"]
        targets = _stream(base, count, _key(seed, "bi_target"), start_batch * n_bi, shuffle_buffer)
        partners = _stream(
            base, count, _key(seed, "bi_partner"), start_batch * n_cand, shuffle_buffer
        )
        pairs = tf.data.Dataset.zip(targets.batch(n_bi), partners.batch(n_cand))
        pairs = pairs.map(_as_written(lambda t, c: (t, _pick_partners(t, c)))).unbatch()
        bi_key = _key(seed, "blend")

        def blend(index, pair):
            target, partner = (_decoded(x, size) for x in pair)
            blended = blending.blend_pair(
                target, partner, _seed(bi_key, index), blended_morph_fraction, morph_alpha
            )
            return _standard(blended)

        streams[MIX_KINDS.index("blended")] = pairs.enumerate(start_batch * n_bi).map(
            _as_written(blend), num_parallel_calls=tf.data.AUTOTUNE
        )

    pattern = choice_pattern(counts)
    used = sorted(set(pattern))  # kinds with a nonzero count, as MIX_KINDS indices
    slots = [used.index(i) for i in pattern]
    choice = tf.data.Dataset.from_tensor_slices(tf.constant(slots, tf.int64)).repeat()
    mixed = tf.data.Dataset.choose_from_datasets([streams[i] for i in used], choice)
    batches = mixed.batch(batch_size, drop_remainder=True)
    flip_key = _key(seed, "flip")

    def finish(index, batch):
        batch = dict(batch)
        if flip:
            flips = tf.random.stateless_uniform([batch_size], _seed(flip_key, index)) < 0.5
            for k in ("image", "source", "target", "mask"):
                batch[k] = tf.where(flips[:, None, None, None], tf.reverse(batch[k], [2]), batch[k])
        batch["has_mask"] = tf.ones([batch_size], tf.float32)
        return {k: batch[k] for k in OUTPUT_KEYS}

    return batches.enumerate(start_batch).map(
        _as_written(finish), num_parallel_calls=tf.data.AUTOTUNE
    )


def _evaluation(part: ProcessPart, *, batch_size, seed, perturb, start_batch):
    # One full pass over the part for its count and image size (a partial read of a split
    # tfds cached in memory would log a truncation warning).
    meta = _meta(part.examples)
    local, size = len(meta["label"]), meta["image_size"]
    largest = local if part.largest is None else part.largest
    if largest == 0:
        raise ValueError("evaluation examples are empty")
    if local == 0:  # fewer examples than processes: pad at the others' image size
        size = _meta(part.first)["image_size"]
    num_batches = math.ceil(largest / batch_size)  # the same in every process
    skip = start_batch * batch_size
    pad = num_batches * batch_size - local - max(0, skip - local)
    name, level = None, None
    if perturb:
        name, level = perturbations.parse(perturb)
    perturb_key = _key(seed, f"perturb:{perturb}")

    def prepare(index, ex):
        out = _standard(_decoded(ex, size))
        if name is not None:
            out["image"] = tf.ensure_shape(
                perturbations.perturb(out["image"], name, _seed(perturb_key, index), level),
                [size, size, 3],
            )
        out["has_mask"] = tf.constant(1.0)
        out["valid"] = tf.constant(1.0)
        out["index"] = tf.cast(index, tf.int32)
        return {k: out[k] for k in EVAL_KEYS}

    real = (
        part.examples.enumerate(part.offset)  # index: the position in the whole split
        .skip(skip)
        .map(_as_written(prepare), num_parallel_calls=tf.data.AUTOTUNE)
    )
    blank = {
        "image": tf.zeros([size, size, 3], tf.uint8),
        "source": tf.zeros([size, size, 3], tf.uint8),
        "target": tf.zeros([size, size, 3], tf.uint8),
        "mask": tf.zeros([size, size, 1], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "has_mask": tf.constant(0.0),
        "method_id": tf.constant(OTHER_METHOD_ID, tf.int32),
        "alpha": tf.constant(0.0),
        "valid": tf.constant(0.0),
        "index": tf.constant(-1, tf.int32),
    }
    padding = tf.data.Dataset.from_tensors(blank).repeat(max(pad, 0))
    return real.concatenate(padding).batch(batch_size, drop_remainder=True)


def make_dataset(
    examples: tf.data.Dataset | Split,
    *,
    batch_size: int,
    seed: int,
    training: bool,
    mix: Mapping[str, float] | None = None,
    flip: bool = True,
    perturb: str = "",
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
    shuffle_buffer: int = 1024,
    blended_morph_fraction: float = BLENDED_MORPH_FRACTION,
    morph_alpha: tuple[float, float] = swap.MORPH_ALPHA,
) -> tf.data.Dataset:
    """Per-process batches of `examples` (see the module docstring for every rule); a
    `Split` is read one process part at a time.

    batch_size: this process's batch (global // process_count). mix: fractions of each
    training batch by kind (MIX_KINDS; default half pristine, half dataset forgeries).
    perturb: evaluation only, a `perturbations.parse` spec. start_batch: resume position.
    blended_morph_fraction, morph_alpha: training only, the share of BI forgeries that are
    texture morphs and their alpha range (`blending.blend_pair`).
    """
    _check_examples(load_examples(*examples) if isinstance(examples, Split) else examples)
    if batch_size < 1 or start_batch < 0 or shuffle_buffer < 1:
        raise ValueError(
            f"batch_size {batch_size} must be >= 1, start_batch {start_batch} >= 0, "
            f"shuffle_buffer {shuffle_buffer} >= 1"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if training:
        if perturb:
            raise ValueError("perturb is for evaluation (training=False) only")
        part = process_part(examples, process_index, process_count)
        meta = _meta(part.examples)
        if len(meta["label"]) == 0:
            raise ValueError(f"no training examples in process part {process_index}")
        ds = _training(
            part.examples,
            meta,
            batch_size=batch_size,
            seed=seed,
            mix=mix,
            flip=flip,
            start_batch=start_batch,
            shuffle_buffer=shuffle_buffer,
            blended_morph_fraction=float(blended_morph_fraction),
            morph_alpha=swap.check_alpha_range(morph_alpha),
        )
    else:
        ds = _evaluation(
            process_part(examples, process_index, process_count),
            batch_size=batch_size,
            seed=seed,
            perturb=perturb,
            start_batch=start_batch,
        )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def training_dataset(
    examples: tf.data.Dataset | Split,
    data_config,
    *,
    batch_size: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    """The training pipeline `config.data` describes (seed, mix, flip, shuffle buffer, BI
    morphs): the one the trainer iterates and the input-pipeline bench times. batch_size: per
    process."""
    return make_dataset(
        examples,
        batch_size=batch_size,
        seed=data_config.seed,
        training=True,
        mix={k: float(v) for k, v in dict(data_config.mix).items()},
        flip=data_config.flip,
        process_index=process_index,
        process_count=process_count,
        start_batch=start_batch,
        shuffle_buffer=data_config.shuffle_buffer,
        blended_morph_fraction=data_config.get("blended_morph_fraction", BLENDED_MORPH_FRACTION),
        morph_alpha=tuple(data_config.get("morph_alpha", None) or swap.MORPH_ALPHA),
    )


# ----------------------------------------------------------------------------- host -> device


class InputPipeline:
    """Iterator of global batches (dicts of jax.Array [global_batch, ...]) for the train loop.

    dataset_fn(start_batch) must return this process's tf.data pipeline starting at that
    batch (e.g. a `make_dataset` partial). `state()` / `restore()` carry the position in the
    checkpoint; batches after a restore are those an uninterrupted run would have given.
    Up to `prefetch` batches are transferred to the devices ahead of use. Typical use:

        fn = lambda start: make_dataset(Split(builder, "train"), training=True,
            batch_size=global_batch // jax.process_count(), seed=..., mix=...,
            process_index=jax.process_index(), process_count=jax.process_count(),
            start_batch=start)
        pipeline = InputPipeline(fn, batch_sharding(mesh), global_batch)

    The position is in batches of this per-process size: resuming with another process
    count or batch size gives a different (still deterministic) stream.
    """

    def __init__(
        self,
        dataset_fn: Callable[[int], tf.data.Dataset],
        sharding: jax.sharding.NamedSharding,
        global_batch_size: int,
        prefetch: int = 2,  # two batches on the devices ahead: a slow host step does not stall
    ):
        processes = jax.process_count()
        if global_batch_size % processes:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by {processes} processes"
            )
        shards = math.prod(
            sharding.mesh.shape[a] for a in _flat_axes(sharding.spec[0] if sharding.spec else None)
        )
        if global_batch_size % shards:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by the {shards} batch shards "
                f"of the mesh {dict(sharding.mesh.shape)}"
            )
        self.dataset_fn = dataset_fn
        self.sharding = sharding
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // processes
        self.prefetch = max(0, prefetch)
        self._next_batch = 0
        self._iterator = None
        self._queue: deque = deque()

    def state(self) -> dict:
        return {"next_batch": self._next_batch}

    def restore(self, state: Mapping) -> None:
        self._next_batch = int(state["next_batch"])
        self._iterator = None
        self._queue.clear()

    def __iter__(self):
        return self

    def _to_global(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        out = {}
        for k, v in local.items():
            v = np.asarray(v)
            if v.shape[0] != self.local_batch_size:
                raise ValueError(
                    f"pipeline batch {k!r} has {v.shape[0]} rows, expected the per-process "
                    f"batch {self.local_batch_size}"
                )
            shape = (self.global_batch_size,) + v.shape[1:]
            out[k] = jax.make_array_from_process_local_data(self.sharding, v, shape)
        return out

    def __next__(self) -> dict[str, jax.Array]:
        if self._iterator is None:
            self._iterator = iter(self.dataset_fn(self._next_batch).as_numpy_iterator())
        while len(self._queue) <= self.prefetch:
            try:
                self._queue.append(self._to_global(next(self._iterator)))
            except StopIteration:
                break
        if not self._queue:
            raise StopIteration
        self._next_batch += 1
        return self._queue.popleft()


def _flat_axes(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)
