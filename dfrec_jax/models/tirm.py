"""TIRM: target identity recovery with an identity-aware masked autoencoder.

The ViT encoder sees only the visible patches of the input (those the semantic-guided masking
kept); the SIRM's target-identity features are fused with the visible token embeddings; a
transformer "identity fusion decoder" with mask tokens predicts the pixels of the masked
patches. Recovered target = visible input patches + predicted masked patches.

Fusion modes (`fusion`):
  "channel"   the paper's wording and the released code: identity row j is concatenated on the
              feature axis with visible token j, then linearly embedded to the decoder width.
              Needs identity_tokens == number of visible patches (98 for 196 patches at 0.5;
              DFREC.from_config derives it when config.model.sirm.identity_tokens is 0).
  "sequence"  identity rows are embedded as extra decoder tokens that every patch token can
              attend to; works for any identity shape. Dropped before the pixel prediction.
Identity-row positions (`identity_pos_embed=True`, an option, off by default): a learned
embedding per identity row is added to the rows before fusion. The SIRM's row j is always the
same feature channel, but channel fusion attaches it to the j-th visible token of a random
keep order; the embedding tells the decoder which row it is looking at.
Predicted pixels pass through a sigmoid (as in the released code) so the target stays in [0,1].

Token indexing (`token_indexing`): "patch" (default) applies keep_idx / mask_idx to the patch
tokens, the class token handled apart. "released" reproduces the DFREC release (lightly's
MAEBackbone / MAEDecoder driven without the class-token offset): the encoder keeps positions
keep_idx of the class-token-prefixed sequence (index 0 is the class token, j is patch j - 1)
and has no separate class token; the decoder runs N + 1 tokens (a learned position row each)
whose positions keep_idx / mask_idx are read as patch indices, so token N is always a mask
token. A likely off-by-one in the release, reproduced on purpose for exact outputs.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dfrec_jax import masking
from dfrec_jax.models import vit

Dtype = Any


class TIRM(nn.Module):
    image_size: int
    patch_size: int
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    encoder_mlp_dim: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int
    pos_embed: str = "learned"  # encoder: "learned" (ViT) | "sincos" (MAE)
    decoder_pos_embed: str = "sincos"
    fusion: str = "channel"  # "channel" | "sequence"
    identity_pos_embed: bool = False  # a learned embedding per identity row (module docstring)
    token_indexing: str = "patch"  # | "released" (module docstring)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, target_identity, keep_idx, mask_idx):
        """images [B,H,W,3] in [0,1]; target_identity [B,T,E]; keep_idx [B,M]; mask_idx [B,K].

        Returns dict(target [B,H,W,3] float32, pred_patches [B,K,p*p*3] float32 in [0,1]).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        grid = self.image_size // self.patch_size
        num_patches = grid * grid
        batch = images.shape[0]
        released = self.token_indexing == "released"
        if released and self.decoder_pos_embed != "learned":
            raise ValueError("token_indexing='released' needs decoder_pos_embed='learned' (the "
                             "release's N + 1 learned rows)")  # fmt: skip

        encoded = vit.ViTEncoder(
            self.patch_size,
            self.image_size,
            self.encoder_width,
            self.encoder_depth,
            self.encoder_heads,
            self.encoder_mlp_dim,
            self.pos_embed,
            token_indexing=self.token_indexing,
            name="encoder",
            **kw,
        )(images, keep_idx)
        # The class token carries no patch; the decoder needs patches ("released": none added).
        visible = encoded if released else encoded[:, 1:]
        identity = target_identity.astype(self.dtype)
        if self.identity_pos_embed:
            rows = self.param(
                "identity_pos",
                nn.initializers.normal(0.02),
                (1,) + identity.shape[1:],
                self.param_dtype,
            )
            identity = identity + rows.astype(self.dtype)

        if self.fusion == "channel":
            if identity.shape[1] != visible.shape[1]:
                raise ValueError(
                    f"channel fusion needs one identity row per visible patch: got "
                    f"{identity.shape[1]} identity rows for {visible.shape[1]} visible patches "
                    f"(leave sirm.identity_tokens at 0 to derive it, or fusion='sequence')"
                )
            visible = jnp.concatenate([visible, identity], axis=-1)
        elif self.fusion != "sequence":
            raise ValueError(f"unknown fusion {self.fusion!r} (channel|sequence)")
        tokens = nn.Dense(self.decoder_width, name="decoder_embed", **kw)(visible)

        mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_width), self.param_dtype
        )
        extra = int(released)  # the release's always-masked token N
        x = jnp.broadcast_to(
            mask_token.astype(tokens.dtype), (batch, num_patches + extra, self.decoder_width)
        )
        x = masking.scatter_tokens(x, keep_idx, tokens)
        x = vit.PositionEmbedding(
            grid,
            grid,
            self.decoder_pos_embed,
            num_prefix=extra,  # one more learned row; rows stay in sequence order
            param_dtype=self.param_dtype,
            name="decoder_pos_embed",
        )(x)
        num_prefix = 0
        if self.fusion == "sequence":
            prefix = nn.Dense(self.decoder_width, name="identity_embed", **kw)(identity)
            num_prefix = prefix.shape[1]
            x = jnp.concatenate([prefix, x], axis=1)
        for i in range(self.decoder_depth):
            x = vit.Block(
                self.decoder_heads, self.decoder_mlp_dim, name=f"decoder_blocks_{i}", **kw
            )(x)
        x = nn.LayerNorm(epsilon=1e-6, name="decoder_norm", **kw)(x)[:, num_prefix:]

        pred = nn.Dense(self.patch_size * self.patch_size * 3, name="decoder_pred", **kw)(
            masking.take_tokens(x, mask_idx)
        )
        pred = nn.sigmoid(pred.astype(jnp.float32))
        patches = masking.patchify(images.astype(jnp.float32), self.patch_size)
        target = masking.unpatchify(
            masking.scatter_tokens(patches, mask_idx, pred),
            self.patch_size,
            self.image_size,
            self.image_size,
        )
        return {"target": target, "pred_patches": pred}
