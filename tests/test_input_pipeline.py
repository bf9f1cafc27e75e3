"""Host input pipeline: batch contract, mix, determinism, resume, process shards, evaluation
padding and perturbation, and the host -> device InputPipeline on 8 emulated devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import input_pipeline as ip
from dfrec_jax.batch import batch_sharding, normalize_batch

S = 16
N = 40
MIX = {"pristine": 0.25, "forgery": 0.5, "blended": 0.25}
B = 8  # counts per batch: 2 pristine, 4 forgeries, 2 blended


def _examples(n=N, labels=None, encode=False):
    """Synthetic feature dicts: unique random faces; person i // 2 % 10 (10 identities)."""
    rng = np.random.default_rng(0)
    face_mask = np.zeros((S, S, 1), np.uint8)
    face_mask[3:13, 2:10] = 255  # asymmetric: a flip bug shows
    if labels is None:
        labels = [int(i % 4 in (1, 2)) for i in range(n)]  # both labels in every shard of 2
    cols = {k: [] for k in ("image", "source", "target", "mask", "label", "method")}
    cols.update(source_id=[], target_id=[], alpha=[], mask_source=[])
    for i, label in enumerate(labels):
        face = rng.integers(0, 256, (S, S, 3), np.uint8)
        person = f"p{i // 2 % 10}"
        if label == 0:  # pristine: its own source, mask 255 everywhere
            full = np.full_like(face_mask, 255)
            row = (face, face, face, full, 0, "pristine", person, person, 0.0, "pristine")
        else:
            source = rng.integers(0, 256, (S, S, 3), np.uint8)
            image = np.where(face_mask > 0, source, face)
            row = (image, source, face, face_mask, 1, "hull_blend", "other", person, 1.0,
                   "generated")  # fmt: skip
        for k, v in zip(cols, row):
            cols[k].append(v)
    data = {k: np.stack(v) for k, v in cols.items()}
    data["alpha"] = data["alpha"].astype(np.float32)
    data["face_mask"] = np.repeat(face_mask[None], n, 0)
    data["landmarks"] = np.zeros((n, 68, 2), np.float32)
    ds = tf.data.Dataset.from_tensor_slices(data)
    if encode:
        ds = ds.map(lambda e: {**e, **{k: tf.io.encode_png(e[k]) for k in ip.IMAGE_KEYS}})
    return ds, data


EXAMPLES, DATA = _examples()


def _train(examples=EXAMPLES, n=9, **kw):
    kw = {"batch_size": B, "seed": 0, "training": True, "mix": MIX, **kw}
    return list(ip.make_dataset(examples, **kw).take(n).as_numpy_iterator())


def _key(img):
    return np.asarray(img).tobytes()


FACES = {_key(img): i for i, img in enumerate(DATA["target"])}  # every true face -> example


@functools.cache
def fresh():
    return _train()


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_mix_counts_and_pattern():
    assert ip.mix_counts(MIX, 8) == {"pristine": 2, "forgery": 4, "blended": 2}
    counts = ip.mix_counts({"pristine": 0.0, "forgery": 0.5, "blended": 0.5}, 3)
    assert sum(counts.values()) == 3 and counts["pristine"] == 0
    assert ip.choice_pattern({"pristine": 2, "forgery": 4, "blended": 2}) == [
        1,
        0,
        2,
        1,
        1,
        0,
        2,
        1,
    ]
    with pytest.raises(ValueError, match="sum to 1"):
        ip.mix_counts({"pristine": 0.5}, 8)
    with pytest.raises(ValueError, match="unknown mix"):
        ip.mix_counts({"real": 1.0}, 8)


def test_training_batch_structure_and_mix():
    batches = fresh()
    blended_id, morph_id = ip.METHODS.index("blended"), ip.METHODS.index("morph_blended")
    lo, hi = ip.swap.MORPH_ALPHA
    bi_alphas = []
    for batch in batches:
        assert set(batch) == set(ip.OUTPUT_KEYS)
        for k in ("image", "source", "target"):
            assert batch[k].dtype == np.uint8 and batch[k].shape == (B, S, S, 3)
        assert batch["mask"].dtype == np.uint8 and batch["mask"].shape == (B, S, S, 1)
        assert batch["label"].dtype == np.int32 and batch["method_id"].dtype == np.int32
        assert batch["alpha"].dtype == np.float32 and batch["alpha"].shape == (B,)
        np.testing.assert_array_equal(batch["has_mask"], np.ones(B, np.float32))
        bi = np.isin(batch["method_id"], [blended_id, morph_id])
        pristine = batch["label"] == 0
        # alpha: 0 pristine, 1 the dataset's splices and BI splices, U[morph_alpha] BI morphs
        np.testing.assert_array_equal(batch["alpha"][pristine], 0.0)
        np.testing.assert_array_equal(batch["alpha"][~bi & ~pristine], 1.0)
        np.testing.assert_array_equal(batch["alpha"][batch["method_id"] == blended_id], 1.0)
        morphs = batch["alpha"][batch["method_id"] == morph_id]
        assert ((morphs >= lo) & (morphs <= hi)).all()
        bi_alphas += batch["alpha"][bi].tolist()
        assert (bi.sum(), pristine.sum(), (~bi & ~pristine).sum()) == (2, 2, 4)
        np.testing.assert_array_equal(batch["label"], (~pristine).astype(np.int32))
        for i in range(B):
            mask = batch["mask"][i]
            if pristine[i]:  # pristine: its own source (mask all 255), source == target == image
                assert (mask == 255).all()
                assert np.array_equal(batch["source"][i], batch["image"][i])
                assert np.array_equal(batch["target"][i], batch["image"][i])
            else:  # image == target outside the mask, in every flip state
                assert mask.any()
                outside = np.broadcast_to(mask == 0, batch["image"][i].shape)
                assert np.array_equal(batch["image"][i][outside], batch["target"][i][outside])
                if not bi[i]:  # the synthetic swaps paste the source unchanged: same flip
                    inside = ~outside
                    assert np.array_equal(batch["image"][i][inside], batch["source"][i][inside])
            if bi[i]:  # a fresh BI forgery of two different pristine people
                faces = [batch[k][i] for k in ("source", "target")]
                faces = [f if _key(f) in FACES else f[:, ::-1] for f in faces]
                src, tgt = (FACES[_key(f)] for f in faces)
                assert DATA["label"][src] == DATA["label"][tgt] == 0
                assert DATA["target_id"][src] != DATA["target_id"][tgt]
    flipped = [_key(img) not in FACES for batch in batches for img in batch["target"]]
    assert 0.2 < np.mean(flipped) < 0.8  # random flips happen, about half the time
    # blended_morph_fraction 0.5 (the default): both BI kinds occur among the 18 BI forgeries
    assert 1.0 in bi_alphas and any(a < 1.0 for a in bi_alphas)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_blended_morph_fraction_sets_the_bi_kind(fraction):
    batches = _train(n=3, blended_morph_fraction=fraction, morph_alpha=(0.3, 0.4))
    ids = {ip.METHODS.index("blended"): "splice", ip.METHODS.index("morph_blended"): "morph"}
    kinds, alphas = set(), []
    for batch in batches:
        for method_id, alpha in zip(batch["method_id"], batch["alpha"]):
            if method_id in ids:
                kinds.add(ids[method_id])
                alphas.append(alpha)
    assert len(alphas) == 6
    if fraction == 0.0:
        assert kinds == {"splice"} and set(alphas) == {1.0}
    else:
        assert kinds == {"morph"} and all(0.3 <= a <= 0.4 for a in alphas)
        assert len(set(alphas)) == 6
    # Only the BI kind depends on the fraction: the other examples are the same.
    default = fresh()[:3]
    for a, b in zip(batches, default):
        keep = ~np.isin(b["method_id"], list(ids))
        for k in ("image", "target", "mask", "alpha"):
            np.testing.assert_array_equal(a[k][keep], b[k][keep])


def test_examples_without_alpha_get_0_pristine_and_minus_1_forgeries():
    bare = EXAMPLES.map(lambda e: {k: v for k, v in e.items() if k != "alpha"})
    (batch,) = _train(bare, n=1, mix={"pristine": 0.5, "forgery": 0.5})
    np.testing.assert_array_equal(batch["alpha"], np.where(batch["label"] == 0, 0.0, -1.0))
    (ev, *_) = _eval(bare)
    np.testing.assert_array_equal(ev["alpha"], np.where(DATA["label"][:B] == 0, 0.0, -1.0))


def test_encoded_examples_give_the_same_batches():
    encoded, _ = _examples(encode=True)
    assert _same(_train(encoded, n=3), fresh()[:3])


def test_deterministic_for_a_seed():
    assert _same(_train(n=4), fresh()[:4])
    other = _train(n=4, seed=1)
    assert not _same(other, fresh()[:4])


def test_resume_matches_uninterrupted_run_across_epochs():
    # Per epoch: forgeries 20 / 4 = 5 batches, BI partners 20 / 16 per batch; batch 3 on
    # crosses epoch boundaries of every stream.
    resumed = _train(n=6, start_batch=3)
    assert _same(resumed, fresh()[3:9])


def test_every_epoch_covers_each_example_once_in_a_new_order():
    batches = _train(n=10, mix={"forgery": 1.0}, flip=False, batch_size=4)  # 20 / 4 per epoch
    order = [FACES[_key(t)] for batch in batches for t in batch["target"]]
    forgeries = sorted(np.flatnonzero(DATA["label"] == 1))
    assert sorted(order[:20]) == sorted(order[20:]) == forgeries
    assert order[:20] != order[20:]


def test_process_shards_are_disjoint_and_cover_an_epoch():
    seen = []
    for process in range(2):  # 10 pristine + 10 forgeries each; 2 + 2 per batch, 5 batches
        batches = _train(
            n=5,
            batch_size=4,
            mix={"pristine": 0.5, "forgery": 0.5},
            flip=False,
            process_index=process,
            process_count=2,
        )
        seen.append([FACES[_key(t)] for batch in batches for t in batch["target"]])
        assert len(set(seen[-1])) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N))


def test_missing_kinds_renormalise_or_fail():
    forgeries_only, _ = _examples(n=12, labels=[1] * 12)
    (batch,) = _train(forgeries_only, n=1, batch_size=4)  # pristine + blended dropped
    np.testing.assert_array_equal(batch["label"], np.ones(4))
    bi_ids = [ip.METHODS.index("blended"), ip.METHODS.index("morph_blended")]
    assert not np.isin(batch["method_id"], bi_ids).any()
    pristine_only, _ = _examples(n=12, labels=[0] * 12)
    (batch,) = _train(pristine_only, n=1, batch_size=4, blended_morph_fraction=0.0)
    assert sorted(batch["method_id"].tolist()) == [0, 0, 1, 1]  # forgery dropped: 1/3 + 2/3
    with pytest.raises(ValueError, match="no usable training examples"):
        _train(pristine_only, n=1, mix={"forgery": 1.0})


def _eval(examples=EXAMPLES, **kw):
    kw = {"batch_size": B, "seed": 0, "training": False, **kw}
    return list(ip.make_dataset(examples, **kw).as_numpy_iterator())


def test_evaluation_covers_each_example_once_with_padding():
    seen = []
    for process in range(2):  # 20 examples per process -> 3 batches of 8, 4 padded
        batches = _eval(process_index=process, process_count=2)
        assert len(batches) == 3
        assert set(batches[0]) == set(ip.EVAL_KEYS)
        valid = np.concatenate([b["valid"] for b in batches])
        index = np.concatenate([b["index"] for b in batches])
        assert valid.sum() == 20 and not valid[20:].any()
        assert (index[20:] == -1).all()
        np.testing.assert_array_equal(np.concatenate([b["has_mask"] for b in batches]), valid)
        for b in batches:
            for i in np.flatnonzero(b["valid"]):
                j = b["index"][i]
                assert np.array_equal(b["image"][i], DATA["image"][j])  # in order, no flip
                assert b["label"][i] == DATA["label"][j]
        seen += index[valid > 0].tolist()
    assert sorted(seen) == list(range(N))
    resumed = _eval(process_index=1, process_count=2, start_batch=1)
    assert _same(resumed, batches[1:])


def test_perturbation_in_evaluation_changes_image_only():
    (first, *_) = _eval(perturb="gaussian_noise:30")
    (again, *_) = _eval(perturb="gaussian_noise:30")
    clean = DATA["image"][:B]
    assert np.mean(first["image"] != clean) > 0.5
    diff = first["image"].astype(np.float32) - clean
    assert 3.0 < diff.std() < 8.0  # variance 30 noise (sd 5.5), clipped at 0/255
    np.testing.assert_array_equal(first["source"], DATA["source"][:B])
    np.testing.assert_array_equal(first["image"], again["image"])
    with pytest.raises(ValueError):
        _train(n=1, perturb="jpeg")


def test_normalize_batch():
    batch = fresh()[0]
    out = jax.jit(normalize_batch)(batch)
    for k in ("image", "source", "target", "mask", "label", "has_mask"):
        assert out[k].dtype == jnp.float32
    np.testing.assert_allclose(out["image"], batch["image"] / 255.0, atol=1e-7)
    np.testing.assert_allclose(out["mask"], batch["mask"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(out["label"], batch["label"].astype(np.float32))
    assert out["method_id"].dtype == jnp.int32


@pytest.mark.parametrize("shape", [(2, 4), (8,)])
def test_input_pipeline_global_sharded_batches_and_restore(shape):
    names = ("data", "fsdp")[: len(shape)]
    mesh = jax.make_mesh(shape, names, devices=jax.devices()[:8])
    sharding = batch_sharding(mesh)
    assert sharding.spec == jax.sharding.PartitionSpec(names)

    def dataset_fn(start):
        return ip.make_dataset(
            EXAMPLES, batch_size=B, seed=0, training=True, mix=MIX, start_batch=start
        )

    pipeline = ip.InputPipeline(dataset_fn, sharding, global_batch_size=B)
    got = [next(pipeline) for _ in range(3)]
    assert pipeline.state() == {"next_batch": 3}
    for batch, want in zip(got, fresh()):
        for k, v in batch.items():
            assert isinstance(v, jax.Array) and v.shape == want[k].shape
            assert v.sharding.is_equivalent_to(sharding, v.ndim)
            assert len(v.addressable_shards) == 8
            np.testing.assert_array_equal(np.asarray(v), want[k])
    restored = ip.InputPipeline(dataset_fn, sharding, global_batch_size=B)
    restored.restore({"next_batch": 4})
    np.testing.assert_array_equal(np.asarray(next(restored)["image"]), fresh()[4]["image"])
    assert restored.state() == {"next_batch": 5}
    with pytest.raises(ValueError, match="not divisible"):
        ip.InputPipeline(dataset_fn, sharding, global_batch_size=12)
