"""Per-host reading: with 2 simulated processes (process_index 0 and 1 in this one Python
process), each reads only its own tfds.even_splits block of a tiny TFDS dataset, for training
and evaluation, and the blocks cover the split exactly once."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import features
from data_pipelines import input_pipeline as ip
from tests.test_input_pipeline import S, _examples

SIZES = {"train": 41, "validation": 19}  # odd: the blocks differ in size (21/20, 10/9)
MIX = {"pristine": 0.25, "forgery": 0.5, "blended": 0.25}
B = 4  # training: 1 pristine, 2 forgeries, 1 blended per batch


class TinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The synthetic examples of test_input_pipeline as a prepared TFDS dataset (PNG images,
    stored in tfds' shuffled order like the real builders): the i-th generated example of a
    split carries i in landmarks[0, 0] (a field the pipeline never outputs)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features.features_dict(S))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        _, data = _split_data(split)
        for i in range(SIZES[split]):
            ex = {k: v[i] for k, v in data.items()}
            ex["landmarks"] = np.zeros((features.NUM_LANDMARKS, 2), np.float32)
            ex["landmarks"][0, 0] = i
            yield i, ex


def _split_data(split):
    return _examples(n=SIZES[split])  # same faces in both splits: each is checked on its own


def _stored(builder, split):
    """(the split as an in-memory dataset, its columns, generated index -> stored position),
    in stored order: evaluation `index` and the process blocks count stored positions."""
    ds = builder.as_dataset(split=split, shuffle_files=False)
    data = {k: np.asarray(v) for k, v in next(iter(tfds.as_numpy(ds.batch(100)))).items()}
    position = {int(g): i for i, g in enumerate(data["landmarks"][:, 0, 0])}
    return tf.data.Dataset.from_tensor_slices(data), data, position


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    built = TinyFaces(data_dir=str(tmp_path_factory.mktemp("tfds")))
    # 4 files per split: a block's file instructions name only some of them
    built.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
    return built


def _face_position(data):
    """target face bytes -> stored position (the faces are unique random images)."""
    return {t.tobytes(): i for i, t in enumerate(data["target"])}


def _blocks(split, count=2):
    sizes = ip.part_sizes(SIZES[split], count)
    starts = np.cumsum([0] + sizes)
    return [set(range(starts[p], starts[p + 1])) for p in range(count)]


def _eval(examples, p, count=2, **kw):
    kw = {"batch_size": B, "seed": 0, "training": False, "process_index": p, **kw}
    return list(ip.make_dataset(examples, process_count=count, **kw).as_numpy_iterator())


def _train(examples, p, n, count=2):
    kw = {"batch_size": B, "seed": 0, "training": True, "mix": MIX, "flip": False}
    ds = ip.make_dataset(examples, process_index=p, process_count=count, **kw)
    return list(ds.take(n).as_numpy_iterator())


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_part_sizes_are_tfds_even_splits(builder):
    for split, total in SIZES.items():
        for count in (1, 2, 3, 4):
            parts = tfds.even_splits(split, n=count, drop_remainder=False)
            want = [builder.info.splits[part].num_examples for part in parts]
            assert ip.part_sizes(total, count) == want
            assert max(want) == -(-total // count)  # ceil(N / process_count)


def test_evaluation_covers_the_split_once_across_processes(builder):
    examples = ip.Split(builder, "validation")
    in_memory, data, _ = _stored(builder, "validation")
    blocks, seen = _blocks("validation"), []
    for p in range(2):  # blocks of 10 and 9 examples: 3 batches of 4 each, 2 and 3 padded
        batches = _eval(examples, p)
        assert len(batches) == 3  # ceil(ceil(19 / 2) / 4), the same for both processes
        valid = np.concatenate([b["valid"] for b in batches])
        index = np.concatenate([b["index"] for b in batches])
        real = index[valid > 0]
        assert set(real) == blocks[p] and list(real) == sorted(real)  # its block, in order
        assert valid.sum() == len(blocks[p]) and not valid[len(blocks[p]):].any()
        assert (index[valid == 0] == -1).all()
        np.testing.assert_array_equal(np.concatenate([b["has_mask"] for b in batches]), valid)
        for b in batches:
            for i in np.flatnonzero(b["valid"]):
                j = b["index"][i]
                assert np.array_equal(b["image"][i], data["image"][j])
                assert b["label"][i] == data["label"][j]
        seen += real.tolist()
        # An in-memory dataset of the same examples is cut into the same blocks.
        assert _same(_eval(in_memory, p), batches)
        assert _same(_eval(examples, p, start_batch=1), batches[1:])  # resume
    assert sorted(seen) == list(range(SIZES["validation"]))  # every example exactly once


def test_one_process_reads_the_split_as_given(builder):
    examples = ip.load_examples(builder, "validation")
    part = ip.process_part(examples, 0, 1)
    assert part.examples is examples and part.offset == 0
    batches = _eval(examples, 0, count=1)
    index = np.concatenate([b["index"] for b in batches])
    assert len(batches) == 5 and index.tolist() == list(range(19)) + [-1]
    assert _same(_eval(ip.Split(builder, "validation"), 0, count=1), batches)


def test_more_processes_than_examples_pad_the_empty_blocks(builder):
    examples = ip.Split(builder, "validation")
    in_memory, _, _ = _stored(builder, "validation")
    for source in (examples, in_memory):
        (last_real,) = _eval(source, 18, count=20)
        (empty,) = _eval(source, 19, count=20)  # tfds has no empty sub-split: nothing read
        assert last_real["index"].tolist() == [18, -1, -1, -1]
        assert empty["index"].tolist() == [-1] * 4 and not empty["valid"].any()
        assert empty["image"].shape == last_real["image"].shape == (B, S, S, 3)


def test_training_streams_stay_in_the_process_block(builder):
    examples = ip.Split(builder, "train")
    in_memory, data, _ = _stored(builder, "train")
    faces, blocks = _face_position(data), _blocks("train")
    blended = [ip.METHODS.index("blended"), ip.METHODS.index("morph_blended")]
    used = []
    for p in range(2):  # 9 and 11 forgeries per block, 2 per batch: 12 batches pass an epoch
        batches = _train(examples, p, n=12)
        targets, sources, forgeries = set(), set(), set()
        for b in batches:
            targets |= {faces[t.tobytes()] for t in b["target"]}
            bi = np.isin(b["method_id"], blended)
            sources |= {faces[s.tobytes()] for s in b["source"][bi]}  # BI partners
            forgeries |= {faces[t.tobytes()] for t in b["target"][~bi & (b["label"] == 1)]}
        assert targets | sources <= blocks[p]  # nothing from the other process's block
        own = {i for i in blocks[p] if data["label"][i] == 1}
        assert forgeries == own  # the forgery stream passed its whole block
        used.append(targets)
        assert _same(_train(in_memory, p, n=4), batches[:4])  # same blocks in memory
    assert not used[0] & used[1]


def _spy(builder, monkeypatch):
    """Records the split of every as_dataset call and the generated index of every record
    read."""
    calls, read = [], []
    as_dataset = builder.as_dataset

    def record(landmarks):
        read.append(int(landmarks.numpy()[0, 0]))
        return landmarks

    def spied(*, split, **kw):
        calls.append(split)

        def tap(ex):
            ex = dict(ex)
            out = tf.py_function(record, [ex["landmarks"]], tf.float32)
            ex["landmarks"] = tf.ensure_shape(out, ex["landmarks"].shape)
            return ex

        return as_dataset(split=split, **kw).map(tap)

    monkeypatch.setattr(builder, "as_dataset", spied)
    return calls, read


@pytest.mark.parametrize("training", [True, False])
def test_each_process_reads_only_its_block(builder, monkeypatch, training):
    """The old read-the-whole-split-then-shard pipeline read every record in every process."""
    split = "train" if training else "validation"
    blocks, (_, _, position) = _blocks(split), _stored(builder, split)
    for p in range(2):
        calls, read = _spy(builder, monkeypatch)
        examples = ip.Split(builder, split)
        if training:
            _train(examples, p, n=12)
        else:
            _eval(examples, p)
        part = tfds.even_splits(split, n=2, drop_remainder=False)[p]
        # The whole split is opened only lazily (its feature check, its first record for
        # padding an empty part); what is read is exactly the block.
        assert part in calls and set(calls) <= {split, part}, calls
        assert {position[g] for g in read} == blocks[p]  # all of its block, nothing else
        monkeypatch.undo()
