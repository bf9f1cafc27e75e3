"""Command line: `python -m dfrec_jax COMMAND --config configs/X.py[:arg] [--config.a.b=v]`.

Commands: train (resumable training into --workdir), eval (metrics tables of a trained run on
a dataset split), recover (forensic recovery of images, or with --video of a clip's main face,
with JSON evidence records; --report adds an HTML page), report (that page for a recover
output folder), trace
(rank a gallery of known people for recovered faces), export (serialized StableHLO + params),
forward (run a randomly initialised model on real faces and write panels), bench (timings as
JSON lines), build_data (prepare the configured dataset; prints split sizes and skip counts),
samples (write a few forgeries and pristine faces of a split, with their truth, as inputs
for recover), sweep (one `train` run per point of a sweep file, see dfrec_jax/sweep.py),
convert (the authors' released checkpoint as a workdir: --released FILE --output DIR).

recover, trace and export read the config of the run they use (its config.json) and report
reads evidence records: they need no --config. convert takes configs/official.py:exact=released
unless --config is given.

A `--config.a.b=v` naming a key the config does not have stops with one line naming the key.

Errors a user causes (paths, permissions, config files and values, unreadable inputs) end the
command with one `error: ...` line and exit code 1 (an unknown `--config.` key: 2); output
folders and files are checked before any model is built or compiled.
"""

# Before anything starts a thread (JAX, TensorFlow) or holds state: malloc arenas bind to
# threads at their first allocation, and the default (huge pages) may re-execute the process,
# so the imports below come after it on purpose (E402). See dfrec_jax/run/malloc_policy.py.
import sys  # isort: skip

from dfrec_jax.run import malloc_policy  # isort: skip

try:  # may re-execute this command line with glibc's huge-page tunable (same PID)
    malloc_policy.apply(malloc_policy.command_to_rerun())
except ValueError as e:  # a bad DFREC_MALLOC: one line, like every error a user causes
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)

import json
import logging
import os
import re

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from data_pipelines import samples as samples_lib
from dfrec_jax import (
    bench,
    compile_cache,
    convert,
    export,
    forward,
    html_report,
    paths,
    recover,
    sweep,
    trace,
    video,
)
from dfrec_jax.run import gc_policy

COMMANDS = (
    "train", "eval", "recover", "trace", "export", "forward", "bench", "build_data", "samples",
    "sweep", "convert", "report",
)  # fmt: skip
# The run's own config.json, or their own (convert; report reads records only).
NO_CONFIG = ("recover", "trace", "export", "convert", "report")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py")
_OUTPUT = flags.DEFINE_string(
    "output", None, "recover/export: output folder; trace: JSON file; forward: output folder "
    "(default runs/demo/forward)"
)  # fmt: skip
_INPUT = flags.DEFINE_multi_string(
    "input", [], "recover: image file or folder (repeatable); trace: a recover output folder "
    "or a recover --video clip record"
)
_RELEASED = flags.DEFINE_string(
    "released", None, "convert: the authors' released checkpoint (.pth or .safetensors)"
)
_ALIGN = flags.DEFINE_bool("align", False, "recover: detect, align, recover and paste back")
_VIDEO = flags.DEFINE_string(
    "video", None, "recover: a video clip (main face tracked, identities aggregated)"
)
_EVERY = flags.DEFINE_integer("every", 1, "recover --video: every N-th frame")
_MAX_FRAMES = flags.DEFINE_integer("max_frames", 0, "recover --video: at most M frames (0: all)")
_REPORT = flags.DEFINE_bool("report", False, "recover: also write OUT/report.html (see `report`)")
_RECOVERED_VIDEO = flags.DEFINE_bool(
    "recovered_video", False, "recover --video: also write the clip with the target pasted back"
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "recover/export/eval: a checkpoints folder instead of --workdir"
)
_STEP = flags.DEFINE_integer("step", None, "recover/export/eval: checkpoint step (default newest)")
_SPLIT = flags.DEFINE_string("split", "test", "eval/samples: dataset split")
_PERTURB = flags.DEFINE_string(
    "perturb", "", "eval: gaussian_blur|jpeg|gaussian_noise[:level] (no level: each of "
    "config.eval.perturb_levels)"
)  # fmt: skip
_GALLERY = flags.DEFINE_string("gallery", None, "trace: folder with one sub-folder per person")
_TOP_K = flags.DEFINE_integer("top_k", 5, "trace: candidates listed per recovered face")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"], "export: lowering platforms")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 8, "forward: how many LFW faces; samples: how many inputs (1/4 pristine)"
)
_WHAT = flags.DEFINE_string("what", "forward", f"bench: one of {sorted(bench.BENCHES)}")
_BATCH = flags.DEFINE_list(
    "batch", ["1", "8"], "bench: batch sizes (train_step: the config's batch unless given)"
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "bench: timed repetitions per batch size")
_STEPS = flags.DEFINE_integer("steps", 900, "bench --what learning: training steps")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 100, "bench --what learning: steps per report")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "train/eval/recover/export/bench: run folder (sweep: one per point)"
)
_SWEEP = flags.DEFINE_string("sweep", None, "sweep: sweep file, e.g. configs/sweeps/x.py[:arg]")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "sweep: check the points, print the commands only")


def build_data(config) -> None:
    from data_pipelines import datasets  # TensorFlow is only imported by commands that read data

    print(json.dumps(datasets.describe(datasets.prepare(config.data))))  # last line: the report


def samples(config, split: str, output_dir: str, count: int) -> None:
    from data_pipelines import datasets

    pristine = count // 4
    records = samples_lib.write_samples(
        datasets.prepare(config.data), split, output_dir, count - pristine, pristine
    )
    print(f"wrote {len(records)} inputs to {output_dir}/inputs (truth in {output_dir}/truth)")


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


class UserError(ValueError):
    """A problem with what the user asked for: reported as one line."""


def _writable_folder(path: str, flag: str) -> None:
    """`path` is a folder this process can write into, or one it could create (nothing is
    created here: a command that fails its other checks leaves no folder behind)."""
    if paths.is_remote(path):  # an object store: whether it may be written shows on writing
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} exists and is not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: cannot create the folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable")


def _writable_file(path: str, flag: str) -> None:
    """`path` can be written as a file: not a folder, its folder exists and is writable."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        raise UserError(f"{flag} {path}: not writable")


def _check_paths(command: str) -> None:
    """Run folders to read, then output locations, checked before anything is built (a bad
    one must not cost a compile); no output folder is created for a command that fails here."""
    for flag, value in (("--workdir", _WORKDIR.value), ("--checkpoint", _CHECKPOINT.value)):
        if command in ("recover", "export", "eval") and value and not paths.isdir(value):
            what = "not a folder" if paths.exists(value) else "not found"
            raise UserError(f"{flag} {value}: {what}")
    output = _OUTPUT.value
    if command == "trace":
        if output:
            _writable_file(output, "--output")
        elif len(_INPUT.value) == 1 and os.path.isdir(_INPUT.value[0]):
            _writable_folder(_INPUT.value[0], "--input (trace.json is written there)")
    elif command == "report" and output:
        _writable_file(output, "--output")
    elif command in ("recover", "export", "samples", "convert") and output:
        _writable_folder(output, "--output")
    elif command == "forward":
        _writable_folder(output or "runs/demo/forward", "--output")
    elif command == "train" and _WORKDIR.value:
        _writable_folder(_WORKDIR.value, "--workdir")
    elif command == "sweep" and _WORKDIR.value and os.path.isfile(_WORKDIR.value):
        raise UserError(f"--workdir {_WORKDIR.value} exists and is not a folder")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean a bad path, value or input (TensorFlow's only if it is
    already imported: it is never imported for this)."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, bench.PeerUnavailableError)
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "errors"):
        errors += (tf.errors.OpError,)
    return errors


def _with_report(code: int) -> int:
    """recover --report: the HTML page of the output folder, once something was recovered."""
    if _REPORT.value and code == 0:
        print(f"wrote {html_report.write(_OUTPUT.value)}")
    return code


def _no_config_command(command: str) -> int:
    """recover / trace / export: they read the run's own config; convert writes one."""
    if command == "convert":
        if not _RELEASED.value or not _OUTPUT.value:
            raise app.UsageError("convert needs --released FILE (.pth or .safetensors) and "
                                 "--output DIR")  # fmt: skip
        convert.run(_RELEASED.value, _OUTPUT.value, config=_CONFIG.value)
        return 0
    if command == "report":
        if len(_INPUT.value) != 1:
            raise app.UsageError("report needs one --input RECOVER_OUTPUT_DIR")
        print(f"wrote {html_report.write(_INPUT.value[0], _OUTPUT.value)}")
        return 0
    if command == "trace":
        if not _GALLERY.value or len(_INPUT.value) != 1:
            raise app.UsageError("trace needs --gallery DIR and one --input RECOVERY_DIR (or "
                                 "CLIP_RECORD.json)")  # fmt: skip
        return trace.run(_GALLERY.value, _INPUT.value[0], output=_OUTPUT.value,
                         top_k=_TOP_K.value)  # fmt: skip
    if not (_WORKDIR.value or _CHECKPOINT.value) or not _OUTPUT.value:
        raise app.UsageError(
            f"{command} needs --workdir DIR (or --checkpoint DIR) and --output DIR"
        )
    weights = {"workdir": _WORKDIR.value, "checkpoint": _CHECKPOINT.value, "step": _STEP.value}
    if command == "recover" and _VIDEO.value:
        if _INPUT.value:
            raise app.UsageError("recover takes --input images or one --video clip, not both")
        return _with_report(video.run(_VIDEO.value, _OUTPUT.value, every=_EVERY.value,
                                      max_frames=_MAX_FRAMES.value,
                                      recovered_video=_RECOVERED_VIDEO.value, **weights))
    if command == "recover":
        if not _INPUT.value:
            raise app.UsageError("recover needs --input FILE_OR_DIR (repeatable) or --video CLIP")
        return _with_report(recover.run(_INPUT.value, _OUTPUT.value, align=_ALIGN.value,
                                        **weights))
    export.run(_OUTPUT.value, platforms=tuple(_PLATFORMS.value), **weights)
    return 0


def quiet_library_logs() -> None:
    """Libraries' INFO lines (orbax writes ~20 per checkpoint; TFDS, XLA's backend probe) bury
    the progress line and the warnings that matter: keep WARNING and up from them and INFO
    from this project's own modules. absl's `--verbosity 0` (or `-v 0`) shows everything."""
    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("dfrec_jax", "data_pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv):
    quiet_library_logs()
    gc_policy.collect_less()  # full GC passes over the imported heap: see run/gc_policy.py
    compile_cache.enable()  # before anything compiles (dfrec_jax/compile_cache.py)
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: python -m dfrec_jax {{{'|'.join(COMMANDS)}}} --config FILE")
    command = argv[1]
    config = None if command in NO_CONFIG else _CONFIG.value
    try:
        # A config file that failed to load comes back as a stand-in that raises its loading
        # error on first use: use it here, so the error is one line before anything runs.
        config is None or config.keys()
    except OSError as e:
        reason = re.sub(r"\s+", " ", str(e)).split("Attempted")[-1].strip()
        print(f"error: --config: {reason}", file=sys.stderr)
        return 1
    if config is None and command not in NO_CONFIG:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    try:
        _check_paths(command)
        if command in NO_CONFIG:
            return _no_config_command(command)
        if command == "eval":
            from dfrec_jax.eval import runner

            if not (_WORKDIR.value or _CHECKPOINT.value):
                raise app.UsageError("eval needs --workdir DIR (a train run) or --checkpoint DIR")
            runner.run(
                _CONFIG.value,
                workdir=_WORKDIR.value,
                checkpoint=_CHECKPOINT.value,
                step=_STEP.value,
                split=_SPLIT.value,
                perturb=_PERTURB.value,
            )
        elif command == "train":
            if not _WORKDIR.value:
                raise app.UsageError("train needs --workdir DIR (re-running it resumes)")
            return train(_CONFIG.value, _WORKDIR.value)
        elif argv[1] == "forward":
            forward.run(_CONFIG.value, _OUTPUT.value or "runs/demo/forward", _NUM_IMAGES.value)
        elif argv[1] == "build_data":
            build_data(_CONFIG.value)
        elif argv[1] == "samples":
            if not _OUTPUT.value:
                raise app.UsageError("samples needs --output DIR")
            samples(_CONFIG.value, _SPLIT.value, _OUTPUT.value, _NUM_IMAGES.value)
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
            own_batch = (
                "train_step", "step_profile", "conv_profile", "eval_profile", "memory",
                "peer_torch",
            )  # fmt: skip
            if _WHAT.value in own_batch and not flags.FLAGS["batch"].present:
                batch_sizes = []  # the config's global batch (eval_profile: its eval batch)
            if _WHAT.value == "recover" and not flags.FLAGS["batch"].present:
                batch_sizes = [1, 8, 32]
            extra = {"workdir": _WORKDIR.value} if _WHAT.value == "recover" else {}
            if _WHAT.value == "learning":
                if not flags.FLAGS["batch"].present:
                    batch_sizes = []  # the check's own batch (8)
                extra = {"steps": _STEPS.value, "eval_every": _EVAL_EVERY.value}
            bench.run(
                _WHAT.value, _CONFIG.value, batch_sizes=batch_sizes, repeats=_REPEATS.value, **extra
            )
    except _user_errors() as e:  # people errors: one line, no traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def console_main() -> None:
    """The `dfrec-jax` command (pyproject.toml), the same as `python -m dfrec_jax`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console_main()
