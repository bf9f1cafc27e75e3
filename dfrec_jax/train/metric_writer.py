"""TensorBoard logging: scalars and image grids written with `tf.summary` under workdir/tensorboard.

`tf.summary` (with the pinned `tensorboard` package) writes the event files; the summaries run
as TensorFlow ops on the host CPU only (dfrec_jax/host_tf.py hides every accelerator from
TensorFlow, so they never claim GPU memory next to JAX). `tf.io.gfile` paths (gs://) work.
View them with `tensorboard --logdir runs/demo/tensorboard`.

Only process 0 writes (multi-host); other processes get a writer whose methods do nothing.
Each writer opens a new event file, so a resumed run appends a file; `read_scalars` merges them
(the newest value wins when a step was logged twice, as happens after resuming from an older
checkpoint). Every write is flushed at once: a preempted (SIGKILLed) run keeps what it logged.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from PIL import Image

from dfrec_jax import images as image_io
from dfrec_jax.host_tf import tf

TENSORBOARD_DIR = "tensorboard"
_SEPARATOR_PX = 2


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, TENSORBOARD_DIR)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MetricWriter:
    """Writes scalars and images for TensorBoard under `workdir/tensorboard`.

    `enabled`: None = only process 0 writes. A disabled writer creates no file and ignores
    every call, so the training loop can call it unconditionally on all processes.
    """

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.logdir = tensorboard_dir(workdir)
        self._writer = None
        if self.enabled:
            tf.io.gfile.makedirs(self.logdir)
            self._writer = tf.summary.create_file_writer(self.logdir)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Writes float scalars (Python/NumPy numbers or size-1 jax.Arrays; nested mappings are
        flattened with "/"). Device values are fetched with one `jax.device_get` call."""
        if not self.enabled or not values:
            return
        host = jax.device_get(_flatten(values))
        for tag, value in host.items():
            if np.asarray(value).size != 1:
                raise ValueError(f"scalar {tag!r} has shape {np.shape(value)}; expected one value")
        with self._writer.as_default(step=int(step)):
            for tag, value in host.items():
                tf.summary.scalar(tag, np.float32(np.asarray(value).reshape(())))
        self._writer.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes images: [N,H,W,C] or [H,W,C] with C in (1, 3), uint8 or float in [0, 1]
        (clipped; NaN shown as 0). All N images of a tag go into one summary."""
        if not self.enabled or not images:
            return
        arrays = {}
        for tag, value in jax.device_get(dict(images)).items():
            array = image_io.to_uint8(value)
            array = array[None] if array.ndim == 3 else array
            if array.ndim != 4 or array.shape[-1] not in (1, 3):
                raise ValueError(
                    f"image {tag!r} has shape {array.shape}; expected [N,H,W,C] or [H,W,C] "
                    "with C = 1 or 3"
                )
            arrays[tag] = array
        with self._writer.as_default(step=int(step)):
            for tag, array in arrays.items():
                tf.summary.image(tag, array, max_outputs=len(array))
        self._writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_float_image(x, rows: int) -> np.ndarray:
    array = np.asarray(x[:rows])
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(array, 0.0, 1.0)


def _as_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:  # [B,H,W] mask
        array = array[..., None]
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def image_grid(
    batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], max_rows: int = 4
) -> np.ndarray:
    """One row per example: input | predicted mask (gray) | true source | recovered source |
    true target | recovered target [| true mask, if `batch` has "mask"].

    `batch`: image/source/target [B,H,W,3] uint8 or float [0,1] (optional mask [B,H,W,1]);
    `outputs`: seg [B,H,W,1], source, target [B,H,W,3] float. Host arrays (in multi-host
    runs, fetch the rows first). Returns float32 [rows*H + 2*(rows-1), C*W + 2*(C-1), 3] in
    [0, 1] with white 2 px separators, C = 6 or 7 columns.
    """
    rows = min(max_rows, len(batch["image"]))
    sources = [(batch, "image"), (outputs, "seg"), (batch, "source"), (outputs, "source")]
    sources += [(batch, "target"), (outputs, "target")]
    if "mask" in batch:
        sources.append((batch, "mask"))
    columns = [_as_rgb(_as_float_image(tree[key], rows)) for tree, key in sources]
    height, width = columns[0].shape[1:3]
    for (tree, key), column in zip(sources, columns):
        if column.shape != (rows, height, width, 3):
            where = "batch" if tree is batch else "outputs"
            raise ValueError(
                f"image_grid: {where}[{key!r}] has shape {column.shape[1:]} per example; "
                f"expected ({height}, {width}, 1 or 3) like the input"
            )
    sep = _SEPARATOR_PX
    grid = np.ones(
        (rows * height + sep * (rows - 1), len(columns) * width + sep * (len(columns) - 1), 3),
        np.float32,
    )
    for r in range(rows):
        for c, column in enumerate(columns):
            y, x = r * (height + sep), c * (width + sep)
            grid[y : y + height, x : x + width] = column[r]
    return grid


def _events(logdir: str):
    """Yields the events of every event file in `logdir`, oldest file first; a record cut off
    by a killed writer ends that file's events instead of raising."""
    files = []
    for path in tf.io.gfile.glob(os.path.join(logdir, "*tfevents*")):
        events, iterator = [], tf.compat.v1.train.summary_iterator(path)
        while True:
            try:
                events.append(next(iterator))
            except (StopIteration, tf.errors.DataLossError):
                break
        if events:  # ordered by the time the file was opened (its first event)
            files.append((events[0].wall_time, path, events))
    for _, _, events in sorted(files, key=lambda f: f[:2]):
        yield from events


def _sorted_by_step(series: dict[str, dict[int, Any]]) -> dict[str, list[tuple[int, Any]]]:
    return {tag: sorted(by_step.items()) for tag, by_step in sorted(series.items())}


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Reads the scalars back from workdir/tensorboard: {tag: [(step, value), ...]} sorted by
    step; when a step was logged more than once (resumed runs) the newest value wins."""
    series: dict[str, dict[int, float]] = {}
    for event in _events(tensorboard_dir(workdir)):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                number = value.simple_value
            elif value.HasField("tensor") and value.tensor.dtype != tf.string.as_datatype_enum:
                array = tf.make_ndarray(value.tensor)
                if array.size != 1:
                    continue
                number = array.item()
            else:
                continue
            series.setdefault(value.tag, {})[event.step] = float(number)
    return _sorted_by_step(series)


def read_images(workdir: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Reads the image summaries back: {tag: [(step, uint8 [N,H,W,C]), ...]} sorted by step."""
    series: dict[str, dict[int, np.ndarray]] = {}
    for event in _events(tensorboard_dir(workdir)):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name != "images":
                continue
            blobs = tf.make_ndarray(value.tensor)
            images = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs[2:]]
            images = [i[..., None] if i.ndim == 2 else i for i in images]
            series.setdefault(value.tag, {})[event.step] = np.stack(images)
    return _sorted_by_step(series)
