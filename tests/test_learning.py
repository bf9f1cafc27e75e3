"""The learning check (dfrec_jax/learning.py): its scoring, its examples, and (slow) that the
demo model overfits 32 real examples: target IDSim >= None + 0.3 and mask IoU >= 0.8."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from dfrec_jax import configlib, inference, learning
from tests import tiny

LFW = configlib.lfw_dir()
needs_lfw = pytest.mark.skipif(not os.path.isdir(LFW), reason=f"no LFW faces at {LFW}")


def _pixels_embed(images):
    """A stand-in identity net: the mean-pooled 4x4 colour layout, centred."""
    x = jnp.asarray(images, jnp.float32)
    b, s = x.shape[0], x.shape[1]
    pooled = x.reshape(b, 4, s // 4, 4, s // 4, 3).mean(axis=(2, 4)).reshape(b, -1)
    return pooled - 0.5


def _examples(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    label = (np.arange(n) % 2 == 0).astype(np.float32)  # forged, pristine, ...
    mask = np.zeros((n, size, size, 1), np.uint8)
    mask[:, 4:12, 4:12] = 255
    mask[label == 0] = 255  # pristine convention: all source
    forged = label[:, None, None, None] > 0
    source = np.where(forged, source, target)
    image = np.where(forged & (mask > 0), source, target).astype(np.uint8)
    return {"image": image, "source": source, "target": target, "mask": mask, "label": label,
            "has_mask": np.ones_like(label), "method_id": np.zeros(n, np.int32)}  # fmt: skip


def test_score_perfect_recovery():
    ex = _examples()
    f = {k: ex[k].astype(np.float32) / 255 for k in ("image", "source", "target")}
    outputs = {
        "target": f["target"],
        "source": f["source"],
        "seg": ex["mask"].astype(np.float32) / 255,
        "forgery_logit": np.where(ex["label"] > 0, 3.0, -3.0),
    }
    got = learning.score(outputs, ex, _pixels_embed)
    forged = ex["label"] > 0
    e_img, e_tgt = np.asarray(_pixels_embed(f["image"])), np.asarray(_pixels_embed(f["target"]))
    cos = np.sum(e_img * e_tgt, -1) / np.linalg.norm(e_img, axis=-1) / np.linalg.norm(e_tgt, axis=-1)
    np.testing.assert_allclose(got["none_target_idsim"], cos[forged].mean(), rtol=1e-5)
    assert got["none_target_idsim"] < 0.99  # the forgery is not the target
    for key in ("target_idsim", "source_idsim", "pristine_idsim", "mask_iou", "forgery_accuracy"):
        np.testing.assert_allclose(got[key], 1.0, rtol=1e-5, err_msg=key)
    assert got["pristine_map_mean"] == 1.0
    # Scoring with the references embedded once gives the same numbers.
    refs = learning.reference_embeddings(ex, _pixels_embed)
    assert learning.score(outputs, ex, _pixels_embed, refs) == got


def test_score_doing_nothing_is_the_none_row():
    ex = _examples(seed=1)
    f = {k: ex[k].astype(np.float32) / 255 for k in ("image", "source", "target")}
    outputs = {  # "recover" by returning the input, map all zero, wrong detector
        "target": f["image"],
        "source": f["image"],
        "seg": np.zeros(ex["mask"].shape, np.float32),
        "forgery_logit": np.where(ex["label"] > 0, -1.0, 1.0),
    }
    got = learning.score(outputs, ex, _pixels_embed)
    np.testing.assert_allclose(got["target_idsim"], got["none_target_idsim"], rtol=1e-6)
    assert got["mask_iou"] == 0.0 and got["forgery_accuracy"] == 0.0
    np.testing.assert_allclose(got["pristine_idsim"], 1.0, rtol=1e-5)


def test_overfit_config_keeps_model_and_losses():
    config = demo.get_config()
    cfg = learning.overfit_config(config, steps=40, batch_size=8, learning_rate=1e-3)
    assert cfg.model.to_dict() == config.model.to_dict()
    assert cfg.loss.to_dict() == config.loss.to_dict()
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.train.steps) == (1e-3, 4, 40)
    assert config.optim.learning_rate != 1e-3  # the caller's config is not modified


def test_identity_pos_embed_option_is_used():
    config = tiny.tiny_config()
    config.model.tirm.identity_pos_embed = True
    model = inference.build_model(config)
    variables = tiny.model_variables(model)  # numpy weights: init's compile costs ~10 s
    rows = variables["params"]["tirm"]["identity_pos"]
    assert rows.shape == (1, model.sirm.identity_tokens, rows.shape[-1])
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    apply = jax.jit(lambda v: model.apply(v, images, rngs={"masking": jax.random.key(2)}))
    before = apply(variables)["target"]
    changed = jax.tree.map(lambda x: x, variables)
    changed["params"]["tirm"]["identity_pos"] = rows + 1.0
    assert float(jnp.max(jnp.abs(apply(changed)["target"] - before))) > 1e-4
    config.model.tirm.identity_pos_embed = False  # off: no such parameter
    plain = inference.abstract_variables(inference.build_model(config))  # shapes only
    assert "identity_pos" not in plain["params"]["tirm"]


@needs_lfw
def test_make_examples_from_lfw():
    ex = learning.make_examples(LFW, 112, num_forged=2, num_pristine=2, seed=3)
    assert ex["image"].shape == (4, 112, 112, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["label"], [1, 0, 1, 0])
    forged = ex["label"] > 0
    # Pristine: its own source and target, mask 255 everywhere.
    for k in ("source", "target"):
        np.testing.assert_array_equal(ex[k][~forged], ex["image"][~forged])
    assert np.all(ex["mask"][~forged] == 255)
    # Forgeries: the target outside the mask, bit for bit; a non-empty mask; three people.
    outside = ex["mask"][forged][..., 0] == 0
    assert outside.any() and (~outside).any()
    np.testing.assert_array_equal(ex["image"][forged][outside], ex["target"][forged][outside])
    assert not np.array_equal(ex["source"][forged], ex["target"][forged])


@pytest.mark.slow
@needs_lfw
def test_demo_model_overfits_32_examples(capsys):
    """The acceptance check: on 16 morph forgeries + 16 pristine faces the demo model, trained
    on them alone, recovers targets at least 0.3 FaceNet IDSim above the forgeries themselves
    and segments the forged region with IoU >= 0.8."""
    report = learning.run_learning_check(
        demo.get_config(), steps=LEARNING_STEPS, eval_every=LEARNING_STEPS // 4
    )
    with capsys.disabled():
        print(json.dumps({k: v for k, v in report.items() if k != "curve"}))
    assert report["steps"] == LEARNING_STEPS
    assert report["target_idsim"] >= report["none_target_idsim"] + 0.3, report
    assert report["mask_iou"] >= 0.8, report


LEARNING_STEPS = 900  # the check's default budget (README: ~55 min on 2 CPU cores)
