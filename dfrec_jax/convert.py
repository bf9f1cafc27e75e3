"""`convert`: the authors' released DFREC checkpoint as a workdir every command reads.

    python -m dfrec_jax convert --released splitidentity_ftm.pth --output runs/released
        [--config configs/official.py:exact=released]

Reads the released file (botianzhe/DFREC's torch.save dict, or a .safetensors with the
"<group>.<name>" keys; pretrained/convert_released.py maps every weight) and writes:

    W/config.json, config_hash.txt, versions.json   as `train` writes them
    W/checkpoints/0/                                 params + batch_stats (no optimizer state)
    W/provenance.json                                the source file, its sha256 and size, the
                                                     conversion report; recover / eval / export
                                                     copy it into every record they make
                                                     (`checkpoint.converted_from`)

so that `eval`, `recover`, `trace`, `export` and `bench` take W like a trained run. The config
is configs/official.py with `exact=released` (the release's outputs exactly; README "Using the
authors' trained model"), or `exact=released_learned_threshold` when the file holds MAE(para=
True)'s learned `threshold`; `--config` replaces it (e.g. smaller widths in tests), and must
then describe the file's layout. A file of another layout is refused with one line naming the
first missing or unexpected key; an existing run in W is never overwritten.
"""

from __future__ import annotations

import datetime
import os

import jax

from configs import official
from dfrec_jax import paths
from dfrec_jax import trained as trained_lib
from dfrec_jax.exported import file_sha256
from dfrec_jax.pretrained import convert_released as cr
from dfrec_jax.pretrained.checkpoint import ConversionError
from dfrec_jax.run import checkpoints
from dfrec_jax.run import workdir as workdir_lib

SOURCE = "DFREC authors' released checkpoint (github.com/botianzhe/DFREC)"


def default_config(state):
    """configs/official.py at `exact=released`, with the learned threshold if the file has it."""
    learned = f"{cr.TIRM}:threshold" in state
    return official.get_config(
        "exact=released_learned_threshold" if learned else "exact=released"
    )


def _refuse_other_layouts(path: str, report) -> None:
    """One line naming the first key that is not the released layout's."""
    missing = [k for k in report.missing if k not in cr.EXPECTED_MISSING]
    if missing:
        raise ConversionError(f"{path}: nothing in the file fills {missing[0]} (not the "
                              f"released DFREC layout for this config)")  # fmt: skip
    if report.unexpected:
        raise ConversionError(f"{path}: unexpected key {report.unexpected[0]} (not the "
                              f"released DFREC layout for this config)")  # fmt: skip


def run(released: str, output: str, config=None) -> dict:
    """Converts `released` into the workdir `output`; returns the provenance record."""
    released = os.path.abspath(released)
    if not os.path.isfile(released):
        raise FileNotFoundError(f"--released: no file {released}")
    output = paths.resolve(output)
    for taken in ("config.json", "checkpoints"):
        if paths.exists(paths.join(output, taken)):
            raise FileExistsError(f"--output {output} already holds a run ({taken}); give a "
                                  f"new folder")  # fmt: skip
    state = cr.read_released(released)
    config = config if config is not None else default_config(state)
    variables, report = cr.convert_released_state(state, config)
    _refuse_other_layouts(released, report)

    provenance = {
        "source": SOURCE,
        "file": os.path.basename(released),
        "path": released,
        "sha256": file_sha256(released),
        "bytes": os.path.getsize(released),
        "converter": "dfrec_jax.pretrained.convert_released",
        "not_in_the_release": list(report.missing),  # left at zero (no forgery classifier)
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    # The checkpoint first, config.json last: a folder with a config.json is a whole run.
    with checkpoints.Checkpointer(paths.join(output, "checkpoints"), save_every=1, keep=1) as ckpt:
        device = jax.local_devices()[0]
        ckpt.save(0, jax.device_put(variables, device), {}, force=True,
                  meta={"converted_from": provenance["sha256"]})  # fmt: skip
    workdir_lib.save_json(paths.join(output, trained_lib.PROVENANCE), provenance)
    digest = workdir_lib.save_run_metadata(output, config)
    absent = ", ".join(report.missing) or "none"
    print(f"converted {released} (sha256 {provenance['sha256'][:16]}...) into {output} "
          f"(config hash {digest}; not in the release: {absent})")  # fmt: skip
    return provenance
