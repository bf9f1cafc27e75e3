"""Pure Flax modules of DFREC; see dfrec.py for how they compose."""

from dfrec_jax.models.dfrec import DFREC
from dfrec_jax.models.efficientnet import EfficientNetB0
from dfrec_jax.models.ism import ISM
from dfrec_jax.models.sirm import SIRM
from dfrec_jax.models.tirm import TIRM
from dfrec_jax.models.vit import ViTEncoder

__all__ = ["DFREC", "EfficientNetB0", "ISM", "SIRM", "TIRM", "ViTEncoder"]
