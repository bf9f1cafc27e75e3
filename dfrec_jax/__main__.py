"""Command line: `python -m dfrec_jax COMMAND --config configs/X.py[:arg] [--config.a.b=v]`.

Commands: train (resumable training into --workdir), forward (run the model on real faces
and write panels), bench (timings as JSON),
build_data (prepare the configured dataset; prints split sizes and skip counts), sweep (one
`train` run per point of a sweep file, see dfrec_jax/sweep.py).

A `--config.a.b=v` naming a key the config does not have stops with one line naming the key.
"""

import json
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from dfrec_jax import bench, forward, sweep

COMMANDS = ("train", "forward", "bench", "build_data", "sweep")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py")
_OUTPUT = flags.DEFINE_string("output", "runs/demo/forward", "forward: output folder")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "forward: how many LFW faces")
_WHAT = flags.DEFINE_string("what", "forward", f"bench: one of {sorted(bench.BENCHES)}")
_BATCH = flags.DEFINE_list(
    "batch", ["1", "8"], "bench: batch sizes (train_step: the config's batch unless given)"
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "bench: timed repetitions per batch size")
_WORKDIR = flags.DEFINE_string("workdir", None, "train/sweep: run folder (sweep: one per point)")
_SWEEP = flags.DEFINE_string("sweep", None, "sweep: sweep file, e.g. configs/sweeps/x.py[:arg]")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "sweep: check the points, print the commands only")


def build_data(config) -> None:
    from data_pipelines import datasets  # TensorFlow is only imported by commands that read data

    print(json.dumps(datasets.describe(datasets.prepare(config.data))))  # last line: the report


def train(config, workdir: str) -> int:
    from dfrec_jax.train import trainer  # TensorFlow (input pipeline) only when training

    try:
        result = trainer.train(config, workdir)
    except trainer.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"step": result.step, "stopped": result.stopped, "workdir": workdir}))
    return 0


def _config_key_message(argv, error: Exception) -> str:
    """One line naming the bad `--config.` override (the config file is read again to say
    which part of the path is unknown); falls back to the parser's own message."""
    config_arg = next(
        (a.split("=", 1)[1] if "=" in a else argv[i + 1] for i, a in enumerate(argv)
         if re.match(r"^--?config(=|$)", a) and ("=" in a or i + 1 < len(argv))),
        None,
    )  # fmt: skip
    overrides = [a for a in argv if re.match(r"^--?(no)?config\.", a)]
    try:
        config = sweep.load_config(config_arg)
        for arg in overrides:
            path = re.sub(r"^--?(no)?config\.", "", arg.split("=", 1)[0])
            message = sweep.config_key_error(config, path)
            if message:
                return f"{arg}: {message}"
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass
    first = str(error.args[0] if error.args else error).strip("'\"").split("\\n")[0]
    return f"bad config override ({', '.join(overrides)}): {first}"


def parse_flags(argv):
    """absl's parser, plus one clear line (exit 2) for `--config.x=v` with an unknown key."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:  # ml_collections' locked-config lookups
        print(f"error: {_config_key_message(argv, e)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m dfrec_jax {{{'|'.join(COMMANDS)}}} --config FILE")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    try:
        if argv[1] == "train":
            if not _WORKDIR.value:
                raise app.UsageError("train needs --workdir DIR (re-running it resumes)")
            return train(_CONFIG.value, _WORKDIR.value)
        elif argv[1] == "forward":
            forward.run(_CONFIG.value, _OUTPUT.value, _NUM_IMAGES.value)
        elif argv[1] == "build_data":
            build_data(_CONFIG.value)
        elif argv[1] == "sweep":
            if not _SWEEP.value or not _WORKDIR.value:
                raise app.UsageError("sweep needs --sweep FILE and --workdir DIR")
            failed = sweep.run(
                config_flags.get_config_filename(flags.FLAGS["config"]),
                _CONFIG.value,
                _SWEEP.value,
                _WORKDIR.value,
                base_overrides=config_flags.get_override_values(flags.FLAGS["config"]),
                dry_run=_DRY_RUN.value,
            )
            return 1 if failed else 0
        else:
            batch_sizes = [int(b) for b in _BATCH.value]
            if _WHAT.value == "train_step" and not flags.FLAGS["batch"].present:
                batch_sizes = []  # the config's global batch
            bench.run(_WHAT.value, _CONFIG.value, batch_sizes=batch_sizes, repeats=_REPEATS.value)
    except (ValueError, FileNotFoundError) as e:  # people errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
