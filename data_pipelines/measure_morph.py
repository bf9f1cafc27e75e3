"""How much of each face a synthetic forgery keeps, by FaceNet IDSim (the paper's metric).

    python -m data_pipelines.measure_morph [--pairs=50] [--alphas=0.5,0.6,0.7,0.8,1.0]
        [--range=LO,HI]

Takes `pairs` (target, source) pairs of different LFW people (config lfw_dir; people in a
seeded order, each person's first image, faces with implausible landmarks left out), makes
each pair's forgery with every splice method, with each morph method at each FIXED alpha (the
same rng seed per pair, so region and blur are the same across alphas) and with each morph
method at alphas drawn from `range` (default `swap.MORPH_ALPHA`), and prints one JSON
line per forgery kind: mean / std of the FaceNet (128-D Keras) cosine IDSim(forgery, target)
and IDSim(forgery, source); plus the same for two different people (target vs source) and for
two images of one person. This is how `swap.MORPH_ALPHA` (config.data.morph_alpha) was chosen
(README "Data").
"""

import json
import sys

import numpy as np

from data_pipelines import landmarks, skips, splits, swap
from data_pipelines.builders import lfw_swap
from dfrec_jax import configlib
from dfrec_jax.pretrained import facenet


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _stats(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "n": int(values.size)}  # fmt: skip


ALPHAS = (0.5, 0.6, 0.7, 0.8, 1.0)


def measure(lfw_dir: str, pairs: int = 50, alphas=ALPHAS, alpha_range=swap.MORPH_ALPHA, seed=0):
    people = splits.scan_lfw(lfw_dir)
    names = [sorted(people)[i] for i in np.random.default_rng(seed).permutation(len(people))]
    detector = landmarks.LandmarkDetector(batch_size=64)
    images, points, same = [], [], []
    for name in names[: 4 * pairs]:
        images.append(skips.read_rgb8(people[name][0]))
        same.append(skips.read_rgb8(people[name][1]) if len(people[name]) > 1 else None)
    lm = detector(np.stack(images))
    usable = [i for i in range(len(images)) if lfw_swap.plausible_landmarks(lm[i])]
    chosen = usable[: 2 * pairs]
    if len(chosen) < 2 * pairs:
        raise ValueError(f"only {len(chosen)} usable faces for {pairs} pairs")
    targets, sources = chosen[0::2], chosen[1::2]

    kinds = {m: [] for m in swap.SPLICE_METHODS}
    for method in swap.MORPH_METHODS:
        kinds.update({f"{method}@{a:g}": [] for a in alphas})
        kinds[f"{method}@{alpha_range[0]:g}-{alpha_range[1]:g}"] = []
    for k, (t, s) in enumerate(zip(targets, sources)):
        args = (images[t], images[s], lm[t], lm[s])
        for name in kinds:
            method, _, alpha = name.partition("@")
            extra = {}
            if alpha:
                lo, _, hi = alpha.partition("-")
                extra = {"morph_alpha": (float(lo), float(hi or lo))}
            result = swap.swap_faces(*args, method, np.random.default_rng([seed, k]), **extra)
            kinds[name].append(result.image)

    net = facenet.FaceNet.load()

    def embed(batch):
        out = []
        for start in range(0, len(batch), 50):
            chunk = np.stack(batch[start : start + 50]).astype(np.float32) / 255.0
            out.append(np.asarray(net(chunk)["embedding"]))
        return np.concatenate(out)

    tgt = embed([images[t] for t in targets])
    src = embed([images[s] for s in sources])
    rows = [{"kind": "different people (target vs source)", "idsim_target": _stats(_cos(tgt, src))}]
    both = [i for i in chosen if same[i] is not None][:pairs]
    rows.append({"kind": "same person (two images)",
                 "idsim_target": _stats(_cos(embed([images[i] for i in both]),
                                             embed([same[i] for i in both])))})  # fmt: skip
    for name, forged in kinds.items():
        e = embed(forged)
        rows.append({"kind": name, "idsim_target": _stats(_cos(e, tgt)),
                     "idsim_source": _stats(_cos(e, src))})  # fmt: skip
    return rows


def main(argv):
    pairs, alphas, alpha_range = 50, ALPHAS, swap.MORPH_ALPHA
    for arg in argv[1:]:
        key, _, value = arg.lstrip("-").partition("=")
        if key == "pairs":
            pairs = int(value)
        elif key == "alphas":
            alphas = tuple(float(v) for v in value.split(","))
        elif key == "range":
            alpha_range = swap.check_alpha_range(value.split(","))
        else:
            raise SystemExit(f"unknown argument {arg!r}; use --pairs=N --alphas=a,b --range=lo,hi")
    lfw_dir = configlib.lfw_dir()
    for row in measure(lfw_dir, pairs, alphas, alpha_range):
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv)
