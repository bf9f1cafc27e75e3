"""`forward`: run a DFREC model on real face images and write its outputs.

Until the training issue lands this runs a randomly initialised model: it shows the data
flow and output contract on real LFW faces, not recovery quality.
"""

import json
import os

import jax
import numpy as np

from dfrec_jax import images as image_io
from dfrec_jax import inference, recover


def first_image_per_person(root: str, count: int) -> list[str]:
    """The first image of each of the first `count` people of an LFW-layout folder (every
    person when count < 0)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"LFW folder not found: {root} (expected <root>/<Person>/<Person>_NNNN.jpg; "
            f"set DFREC_LFW_DIR or --config.data.lfw_dir)"
        )
    chosen = []
    for person in sorted(os.listdir(root)):
        files = (
            image_io.list_images(os.path.join(root, person))
            if os.path.isdir(os.path.join(root, person))
            else []
        )
        if files:
            chosen.append(files[0])
        if len(chosen) == count:
            break
    return chosen


def run(config, output_dir: str, num_images: int = 8) -> dict:
    paths = first_image_per_person(config.data.lfw_dir, num_images)
    size = config.model.image_size
    batch, used, skipped = [], [], []
    for path in paths:
        try:
            batch.append(image_io.load_rgb(path, size))
            used.append(path)
        except image_io.ImageError as e:
            skipped.append(str(e))
            print(f"skip: {e}")
    if not batch:
        raise ValueError(f"no readable images among {len(paths)} in {config.data.lfw_dir}")

    model = inference.build_model(config)
    variables = inference.init_variables(model, jax.random.key(config.seed))
    images = np.stack(batch)
    outputs = jax.device_get(inference.make_predict(model, int(config.seed))(variables, images))
    # recover's evidence panel: input | forged pixels tinted | source | target, 8 bits.
    pictures = [image_io.to_uint8(x) for x in (images, outputs["seg"], outputs["source"],
                                                outputs["target"])]  # fmt: skip

    os.makedirs(output_dir, exist_ok=True)
    records = []
    for i, path in enumerate(used):
        stem = os.path.splitext(os.path.basename(path))[0]
        image_io.save_rgb(
            os.path.join(output_dir, f"{stem}_panel.png"),
            recover.panel(*(x[i] for x in pictures)),
        )
        records.append(
            {
                "input": path,
                "forgery_probability": float(jax.nn.sigmoid(outputs["forgery_logit"][i])),
                "masked_patches": int(outputs["mask"][i].sum()),
            }
        )
    summary = {
        "weights": f"random initialisation, seed {config.seed}",
        "params": inference.param_counts(variables["params"])["total"],
        "images": records,
        "skipped": skipped,
    }
    with open(os.path.join(output_dir, "forward.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {len(records)} panels and forward.json to {output_dir} ({len(skipped)} skipped)")
    return summary
