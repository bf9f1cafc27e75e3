"""One entry point from `config.data` to a prepared TFDS builder, whatever the dataset."""

import dataclasses
import logging
import os
import sys
import time

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from data_pipelines import splits
from data_pipelines.builders import (
    celeba_megafs,
    faceforensics,
    ffhq_e4s,
    lfw_swap,
    paired_images,
)
from dfrec_jax import host_tf  # noqa: F401  (TensorFlow kept off the accelerators)

DATASETS = ("lfw_swap", "faceforensics", "celeba_megafs", "ffhq_e4s")


_BUILDER_MODULES = {
    "lfw_swap": lfw_swap,
    "faceforensics": faceforensics,
    "celeba_megafs": celeba_megafs,
    "ffhq_e4s": ffhq_e4s,
}


def _builder_module(name: str):
    if name not in _BUILDER_MODULES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _BUILDER_MODULES[name]


def _chosen_methods(method_dirs, methods) -> dict:
    if not methods:
        return {}
    wanted = {m.lower() for m in methods}
    known = {name.lower() for name, _ in method_dirs}
    if not wanted <= known:
        raise ValueError(f"unknown methods {sorted(wanted - known)}; known: {sorted(known)}")
    return {"method_dirs": tuple(md for md in method_dirs if md[0].lower() in wanted)}


def get_builder(data) -> tfds.core.DatasetBuilder:
    """The (not necessarily prepared) builder `config.data` describes."""
    module = _builder_module(data.dataset)
    methods = tuple(data.methods) or None
    if data.dataset == "lfw_swap":
        config = module.make_config(
            image_size=data.image_size,
            lfw_dir=data.lfw_dir,
            seed=data.seed,
            max_people=data.max_people,
            forgeries_per_image=data.forgeries_per_image,
            methods=methods,
            morph_fraction=data.get("morph_fraction", module.MORPH_FRACTION),
            morph_alpha=tuple(data.get("morph_alpha", None) or module.swap.MORPH_ALPHA),
        )
    elif data.dataset == "faceforensics":
        chosen = {"methods": methods} if methods else {}
        config = module.make_config(image_size=data.image_size, **chosen, **options(data))
    else:
        chosen = _chosen_methods(module.DEFAULT_CONFIG.method_dirs, methods)
        config = module.make_config(image_size=data.image_size, **chosen, **options(data))
    builder = module.BUILDER(config=config, data_dir=data.data_dir)
    if isinstance(builder, paired_images.ManualBuilder):
        builder.manual_dir = data.manual_dir or None  # its tree's fingerprint: `_stale`
        builder.build_workers = data.get("build_workers", 0)
    return builder


# Fields of a builder config that are not builder options (tfds' own, or set above).
_NOT_OPTIONS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)} | {
    "image_size", "methods", "method_dirs"}  # fmt: skip


def option_names(dataset: str) -> list[str]:
    """The builder options of `dataset` that config.data may set (configs/default.py
    builder_options adds them for the `dataset=` config arg)."""
    default = _builder_module(dataset).make_config()
    return [f.name for f in dataclasses.fields(default) if f.name not in _NOT_OPTIONS]


def options(data) -> dict:
    """The builder options config.data sets (a config made for another dataset has none)."""
    return {k: data[k] for k in option_names(data.dataset) if k in data}


def _download_config(data) -> tfds.download.DownloadConfig:
    manual_dir = data.manual_dir or None
    if data.dataset != "lfw_swap":
        splits.require_dir(manual_dir, data.dataset, _builder_module(data.dataset).LAYOUT)
    return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)


def prepare(data) -> tfds.core.DatasetBuilder:
    """The builder, prepared (built once into data.data_dir, reused afterwards). A builder
    that records its input folder's fingerprint (lfw_swap's folder, the manual_dir of the
    others) is rebuilt when the folder it reads now differs from the one it was built from;
    the stale copy is kept beside it, renamed. Without a manual_dir configured, a prepared
    manual dataset is reused as it is."""
    builder = get_builder(data)
    if builder.is_prepared() and _stale(builder):
        stale = f"{builder.data_dir}.stale-{time.strftime('%Y%m%dT%H%M%S')}"
        logging.warning("%s was built from another input folder than the one configured "
                        "now: rebuilding (the old build is kept as %s)", builder.info.full_name,
                        stale)  # fmt: skip
        os.rename(builder.data_dir, stale)
        builder = get_builder(data)
    if not builder.is_prepared():
        start = time.perf_counter()
        logging.info("building %s into %s", builder.info.full_name, builder.data_dir)
        if not sys.stderr.isatty():  # in a log file or pipe every bar update is a new line
            tfds.disable_progress_bar()
        builder.download_and_prepare(download_config=_download_config(data))
        logging.info("built %s in %.0f s", builder.info.full_name, time.perf_counter() - start)
    return builder


def prepare_in_every_process(data) -> tfds.core.DatasetBuilder:
    """`prepare(data)` in every process, process 0 first: with several processes it builds a
    missing dataset while the others wait at a barrier, then they open it (several hosts
    writing one TFDS folder at once would corrupt it). Call it in all processes."""
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            prepare(data)
        multihost_utils.sync_global_devices("dfrec_jax dataset prepared")
    return prepare(data)


def _stale(builder) -> bool:
    """True when the builder's input folder no longer has the fingerprint it was built from."""
    fingerprint = getattr(builder, "source_fingerprint", None)
    if fingerprint is None:
        return False
    built = (builder.info.metadata or {}).get("source_fingerprint")
    now = fingerprint()
    return built is not None and now is not None and built != now


def describe(builder: tfds.core.DatasetBuilder) -> dict:
    """Split sizes and skip counts of a prepared builder (what `build_data` prints)."""
    return {
        "dataset": builder.info.full_name,
        "data_dir": builder.data_dir,
        "splits": {name: info.num_examples for name, info in builder.info.splits.items()},
        "skipped": builder.skip_summary(),
    }
