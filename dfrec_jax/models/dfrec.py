"""DFREC: one face-swapped image in, the segmentation map, source face and target face out.

    seg, forgery_logit = ISM(image)
    source, target_identity = SIRM(image * seg)
    keep/mask = semantic_guided_masking(seg)          (no gradient: it is a ranking)
    target = TIRM(image, target_identity, keep/mask)  (visible input patches + predicted ones)

The ISM is trained only through the recovery losses (and an optional mask loss): its map
reaches them through the SIRM input `image * seg`.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from dfrec_jax import masking
from dfrec_jax.models.ism import ISM
from dfrec_jax.models.sirm import SIRM
from dfrec_jax.models.tirm import TIRM

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def identity_tokens(cfg: Mapping[str, Any]) -> int:
    """The SIRM's identity rows for a `config.model`: `sirm.identity_tokens` when set (> 0),
    else one per visible patch, N - int(N * mask_ratio), which channel fusion requires (a set
    value that differs is an error there); sequence fusion takes any count."""
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2
    visible = patches - masking.num_masked(patches, cfg["mask_ratio"])
    tokens = int(cfg["sirm"].get("identity_tokens") or 0)
    if tokens < 0:
        raise ValueError(f"model.sirm.identity_tokens must be >= 0 (0 = derived), got {tokens}")
    if cfg["tirm"].get("fusion", "channel") == "channel" and tokens not in (0, visible):
        raise ValueError(
            f"channel fusion needs one identity row per visible patch: model.sirm."
            f"identity_tokens={tokens}, but {patches} patches at mask_ratio={cfg['mask_ratio']} "
            f"leave {visible} visible (set it to 0 to derive it, or fusion='sequence')"
        )
    return tokens or visible


class DFREC(nn.Module):
    image_size: int
    patch_size: int
    mask_ratio: float
    masking_variant: str
    ism: ISM
    sirm: SIRM
    tirm: TIRM
    # "fixed" | "learned": the release's MAE(para=True) threshold, a parameter (masking.py).
    masking_threshold: str = "fixed"

    @nn.compact
    def __call__(self, images, train: bool = False):
        """images: float [B, image_size, image_size, 3] in [0, 1]. Needs a "masking" rng (and a
        "dropout" rng when train=True). Returns seg [B,H,W,1], forgery_logit [B], source and
        target [B,H,W,3] in [0, 1], mask bool [B,N] (the README's model snippet), plus seg_logits,
        mask_idx, keep_idx and pred_patches for the losses."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"DFREC expects images [B,{self.image_size},{self.image_size},3], "
                f"got {images.shape}"
            )
        images = jnp.asarray(images, jnp.float32)
        ism = self.ism(images, train)
        seg = ism["seg"]
        sirm = self.sirm(images * seg, train)
        threshold = None
        if self.masking_threshold == "learned":
            raw = self.param("masking_threshold", nn.initializers.constant(250.0), (),
                             jnp.float32)  # fmt: skip
            threshold = masking.learned_all_random_threshold(raw, self.patch_size)
        elif self.masking_threshold != "fixed":
            raise ValueError(f"masking_threshold must be 'fixed' or 'learned', got "
                             f"{self.masking_threshold!r}")  # fmt: skip
        chosen = masking.semantic_guided_masking(
            seg,
            self.make_rng("masking"),
            patch_size=self.patch_size,
            mask_ratio=self.mask_ratio,
            variant=self.masking_variant,
            all_random_threshold=threshold,
        )
        tirm = self.tirm(images, sirm["target_identity"], chosen.keep_idx, chosen.mask_idx)
        return {
            "seg": seg,
            "seg_logits": ism["seg_logits"],
            "forgery_logit": ism["forgery_logit"],
            "source": sirm["source"],
            "target": tirm["target"],
            "pred_patches": tirm["pred_patches"],
            "mask": chosen.mask,
            "mask_idx": chosen.mask_idx,
            "keep_idx": chosen.keep_idx,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "DFREC":
        """Builds the model from a `config.model` ConfigDict (see configs/default.py)."""
        dtype = _DTYPES.get(cfg["dtype"])
        if dtype is None:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {cfg['dtype']!r}")
        kw = dict(dtype=dtype, param_dtype=jnp.float32)
        sirm_cfg = _hashable(cfg["sirm"])
        sirm_cfg["identity_tokens"] = identity_tokens(cfg)
        try:
            ism = ISM(**_hashable(cfg["ism"]), **kw)
            sirm = SIRM(**sirm_cfg, **kw)
            tirm = TIRM(
                image_size=cfg["image_size"],
                patch_size=cfg["patch_size"],
                **_hashable(cfg["tirm"]),
                **kw,
            )
        except TypeError as e:  # unknown or missing hyperparameter: say which block
            raise ValueError(f"bad model config: {e}") from None
        return cls(
            image_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            mask_ratio=cfg["mask_ratio"],
            masking_variant=cfg["masking_variant"],
            ism=ism,
            sirm=sirm,
            tirm=tirm,
            masking_threshold=cfg.get("masking_threshold", "fixed"),
        )


def _hashable(block: Mapping[str, Any]) -> dict[str, Any]:
    """A config block's fields with lists as tuples (a config read back from JSON holds lists),
    so equal configs build equal, hashable modules (`inference.make_predict` caches on them)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(block).items()}
