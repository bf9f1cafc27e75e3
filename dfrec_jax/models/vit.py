"""Vision Transformer pieces shared by the TIRM encoder and its fusion decoder.

Names follow timm / MAE (`patch_embed`, `cls_token`, `pos_embed`, `blocks_i/{norm1,attn/{qkv,proj},
norm2,mlp/{fc1,fc2}}`, `norm`) so that the converters can map ViT-B/16, ViT-L/16 and MAE
checkpoints by name. Attention is `jax.nn.dot_product_attention` with its default
implementation, which in jax 0.10.2 is XLA's on every platform (cuDNN flash attention is only
used when asked for with implementation="cudnn", which this project does not do, so exports
carry no cuDNN call).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfrec_jax import masking
from dfrec_jax.models.layers import Conv

Dtype = Any

# MAE / timm initialise transformer linears with xavier-uniform and LayerNorm eps 1e-6.
_dense_init = nn.initializers.xavier_uniform()
_LN_EPS = 1e-6


def sincos_pos_embed_2d(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sine-cosine position embedding [grid_h * grid_w, width] (MAE's choice).

    Half of the channels encode the row, half the column; each half is [sin, cos] of
    positions times geometrically spaced frequencies.
    """
    if width % 4:
        raise ValueError(f"sincos position embedding needs width % 4 == 0, got {width}")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """Adds a [1, T, D] position embedding: learned (ViT) or fixed 2D sin-cos (MAE).

    `num_prefix` leading tokens (the class token) get their own learned row (zeros when fixed).
    """

    grid_h: int
    grid_w: int
    kind: str = "learned"  # "learned" | "sincos"
    num_prefix: int = 0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        length = self.num_prefix + self.grid_h * self.grid_w
        if self.kind == "learned":
            pos = self.param(
                "pos_embed", nn.initializers.normal(0.02), (1, length, width), self.param_dtype
            )
        elif self.kind == "sincos":
            table = sincos_pos_embed_2d(width, self.grid_h, self.grid_w)
            table = np.concatenate([np.zeros((self.num_prefix, width), np.float32), table])
            pos = jnp.asarray(table)[None]
        else:
            raise ValueError(f"unknown position embedding kind {self.kind!r} (learned|sincos)")
        return x + pos.astype(x.dtype)


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = x.shape[-1]
        x = nn.Dense(
            self.hidden,
            kernel_init=_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc1",
        )(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(
            out, kernel_init=_dense_init, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2"
        )(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} not divisible by {self.num_heads} heads")
        qkv = nn.Dense(
            3 * width,
            kernel_init=_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        y = jax.nn.dot_product_attention(q, k, v).reshape(batch, length, width)
        return nn.Dense(
            width,
            kernel_init=_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(y)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + Attention(self.num_heads, name="attn", **kw)(
            nn.LayerNorm(epsilon=_LN_EPS, name="norm1", **kw)(x)
        )
        x = x + Mlp(self.mlp_dim, name="mlp", **kw)(
            nn.LayerNorm(epsilon=_LN_EPS, name="norm2", **kw)(x)
        )
        return x


class ViTEncoder(nn.Module):
    """ViT over the visible patches only (the MAE encoder).

    `__call__(images, keep_idx)` embeds all patches, adds position embeddings, keeps the tokens
    at `keep_idx` [B, M], prepends the class token and runs the blocks: returns [B, 1 + M, width].
    `token_indexing="released"` (the DFREC release, through lightly's MAEBackbone): keep_idx
    indexes the class-token-PREFIXED sequence (index 0 = the class token, j = patch j - 1) and
    no class token is added: returns [B, M, width].
    Embedding before selection keeps every shape static; the cost of embedding the masked
    patches is one small matmul.
    """

    patch_size: int
    image_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    pos_embed: str = "learned"
    token_indexing: str = "patch"  # | "released"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, keep_idx):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = self.image_size // self.patch_size
        x = Conv(
            self.width,
            (self.patch_size,) * 2,
            strides=(self.patch_size,) * 2,
            padding="VALID",
            name="patch_embed",
            **kw,
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], grid * grid, self.width)
        cls = self.param(
            "cls_token", nn.initializers.normal(0.02), (1, 1, self.width), self.param_dtype
        )
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
        x = PositionEmbedding(
            grid, grid, self.pos_embed, num_prefix=1, param_dtype=self.param_dtype, name="pos_embed"
        )(jnp.concatenate([cls, x], axis=1))
        if self.token_indexing == "released":
            x = masking.take_tokens(x, keep_idx)
        elif self.token_indexing == "patch":
            cls, patches = x[:, :1], x[:, 1:]
            x = jnp.concatenate([cls, masking.take_tokens(patches, keep_idx)], axis=1)
        else:
            raise ValueError(f"token_indexing must be 'patch' or 'released', got "
                             f"{self.token_indexing!r}")  # fmt: skip
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_dim, name=f"blocks_{i}", **kw)(x)
        return nn.LayerNorm(epsilon=_LN_EPS, name="norm", **kw)(x)
