"""Example inputs for `recover`: a few forgeries and pristine faces of a split, with the truth.

    out/inputs/<index>_<method>.png           the image a forensic user would have
    out/truth/<index>_<method>_{source,target,mask}.png
    out/samples.json                          index, method, label, identities per input

`./run.sh` recovers `out/inputs` after training so the demo ends with evidence records that
can be checked against `out/truth`. Examples are taken in stored order (deterministic):
the first `num_forged` forgeries and the first `num_pristine` pristine images.
"""

import json
import os

import numpy as np
from PIL import Image


def _save(path: str, array: np.ndarray) -> None:
    if array.shape[-1] == 1:
        array = array[..., 0]
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def write_samples(builder, split: str, output_dir: str, num_forged: int = 6,
                  num_pristine: int = 2) -> list[dict]:  # fmt: skip
    """Writes the files above from a prepared builder's `split`; returns the records."""
    if split not in builder.info.splits:
        raise ValueError(f"no split {split!r} in {builder.info.full_name}; "
                         f"have {sorted(builder.info.splits)}")  # fmt: skip
    wanted = {1: num_forged, 0: num_pristine}
    os.makedirs(os.path.join(output_dir, "inputs"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "truth"), exist_ok=True)
    records = []
    for index, ex in enumerate(builder.as_dataset(split=split, shuffle_files=False)):
        label = int(ex["label"])
        if wanted[label] <= 0:
            if not any(wanted.values()):
                break
            continue
        wanted[label] -= 1
        method = ex["method"].numpy().decode() or ("pristine" if label == 0 else "forgery")
        stem = f"{index:05d}_{method}"
        _save(os.path.join(output_dir, "inputs", f"{stem}.png"), ex["image"].numpy())
        for key in ("source", "target", "mask"):
            _save(os.path.join(output_dir, "truth", f"{stem}_{key}.png"), ex[key].numpy())
        records.append({
            "input": f"inputs/{stem}.png",
            "index": index,
            "label": "forgery" if label else "pristine",
            "method": method,
            "source_id": ex["source_id"].numpy().decode(),
            "target_id": ex["target_id"].numpy().decode(),
        })  # fmt: skip
    with open(os.path.join(output_dir, "samples.json"), "w") as f:
        json.dump({"split": split, "dataset": builder.info.full_name, "samples": records}, f,
                  indent=2, sort_keys=True)  # fmt: skip
    return records
