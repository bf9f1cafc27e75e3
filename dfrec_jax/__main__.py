"""Command line: `python -m dfrec_jax COMMAND --config configs/X.py[:arg] [--config.a.b=v]`.

Commands: forward (run the model on real faces and write panels), bench (timings as JSON),
build_data (prepare the configured dataset; prints split sizes and skip counts).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from dfrec_jax import bench, forward

COMMANDS = ("forward", "bench", "build_data")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py")
_OUTPUT = flags.DEFINE_string("output", "runs/demo/forward", "forward: output folder")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "forward: how many LFW faces")
_WHAT = flags.DEFINE_string("what", "forward", f"bench: one of {sorted(bench.BENCHES)}")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "bench: batch sizes")
_REPEATS = flags.DEFINE_integer("repeats", 5, "bench: timed repetitions per batch size")


def build_data(config) -> None:
    from data_pipelines import datasets  # TensorFlow is only imported by commands that read data

    print(json.dumps(datasets.describe(datasets.prepare(config.data))))  # last line: the report


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m dfrec_jax {{{'|'.join(COMMANDS)}}} --config FILE")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    try:
        if argv[1] == "forward":
            forward.run(_CONFIG.value, _OUTPUT.value, _NUM_IMAGES.value)
        elif argv[1] == "build_data":
            build_data(_CONFIG.value)
        else:
            bench.run(
                _WHAT.value,
                _CONFIG.value,
                batch_sizes=[int(b) for b in _BATCH.value],
                repeats=_REPEATS.value,
            )
    except (ValueError, FileNotFoundError) as e:  # people errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
