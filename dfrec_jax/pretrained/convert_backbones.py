"""Converters for user-supplied PyTorch backbone weights: EfficientNet-B0 and ViT (incl. MAE).

Each `convert_*` reads a .safetensors file or a torch.save file, zip or legacy (never executing
pickled code, see `checkpoint.read_state_dict`), maps every tensor by name onto our Flax module
and returns `(variables, Report)`: numpy trees ready for `module.apply`, plus the Flax leaves
no tensor filled (`missing`, zeros) and the checkpoint keys nothing used (`unexpected`). A
shape that does not fit raises `ConversionError` with one line naming the key. BatchNorm step
counters (`num_batches_tracked`) and heads our trunks do not have are dropped without a
report. Legacy (pre-1.6, non-zip) torch.save files, such as efficientnet_pytorch's released
weights, are read too (`torch_zip`).

EfficientNet-B0 (`models.efficientnet.EfficientNetB0`), two namings:
  "timm"                 conv_stem, bn1, blocks.S.I.{conv_dw,bn1,se.conv_reduce,se.conv_expand,
                         conv_pw,bn2} / {conv_pw,bn1,conv_dw,bn2,se,conv_pwl,bn3}; our names are
                         timm's (see efficientnet.py). Ignored: conv_head, bn2, classifier.
  "efficientnet_pytorch" (also segmentation_models_pytorch encoders, under prefix "encoder.")
                         _conv_stem, _bn0, _blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,
                         _se_reduce,_se_expand,_project_conv,_bn2} with N = 0..15 counted over
                         all stages. Ignored: _conv_head, _bn1 (the head's), _fc.
  Build the module with `bn_epsilon=BN_EPSILON[naming]`: timm's PyTorch BatchNorms use eps 1e-5,
  efficientnet_pytorch uses 1e-3. Padding: efficientnet_pytorch (and thus smp) pads its stride-2
  convs TF-"SAME" (0/1 or 1/2 px, fixed for a 224 input) where our module pads symmetrically
  like timm, so its weights load exactly but its outputs shift by a pixel at those convs.

ViT (`models.vit.ViTEncoder`; width, depth and MLP size are read from the checkpoint), namings:
  "timm"         patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1,attn.qkv,attn.proj,
                 norm2,mlp.fc1,mlp.fc2}, norm. Ignored: head, fc_norm (used as `norm` when a
                 fine-tuned MAE checkpoint has no `norm`).
  "torchvision"  conv_proj, class_token, encoder.pos_embedding, encoder.layers.encoder_layer_i.
                 {ln_1, self_attention.in_proj_{weight,bias}, self_attention.out_proj, ln_2,
                 mlp.0/mlp.3 (or mlp.linear_1/linear_2 from torchvision < 0.13)}, encoder.ln.
                 Ignored: heads.
  "mae"          timm names under the checkpoint's "model" entry (facebookresearch/mae files);
                 the MAE decoder (decoder_*, mask_token) is ignored.
  Both fused qkv layouts (timm qkv, torchvision in_proj) stack q, k, v and, inside each, the
  heads contiguously, which is exactly our fused `qkv` layout, so no per-head split is needed.
  Position embeddings are resampled when the checkpoint's grid differs from
  image_size // patch_size (`resample_pos_embed`). With `pos_embed="sincos"` our encoder has a
  fixed table and the checkpoint's position embedding is left unused (reported unexpected).
  Load MAE checkpoints with pos_embed="learned": that copies MAE's fixed table exactly, whereas
  our own sin-cos table puts the row code in the first half of the channels and MAE's
  `get_2d_sincos_pos_embed` the column code, so the two tables differ.
"""

import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dfrec_jax.models.efficientnet import B0_STAGES, EfficientNetB0, scaled_repeats
from dfrec_jax.models.vit import ViTEncoder
from dfrec_jax.pretrained.checkpoint import (
    ConversionError,
    Report,
    Rule,
    conv_kernel,
    dense_kernel,
    fill,
    read_state_dict,
)

BN_EPSILON = {"timm": 1e-5, "efficientnet_pytorch": 1e-3}
EFFICIENTNET_NAMINGS = tuple(BN_EPSILON)
VIT_NAMINGS = ("timm", "torchvision", "mae")

# Checkpoint parts our trunks do not have; dropped without being reported as unexpected.
EFFICIENTNET_IGNORED = {
    "timm": ("conv_head.", "bn2.", "classifier."),
    "efficientnet_pytorch": ("_conv_head.", "_bn1.", "_fc."),
}
VIT_IGNORED = {
    "timm": ("head.", "fc_norm."),
    "torchvision": ("heads.",),
    "mae": ("head.", "fc_norm.", "decoder_", "mask_token"),
}


# ----------------------------------------------------------------------------- shared helpers


def drop_step_counters(state: dict) -> dict:
    """Removes BatchNorm `num_batches_tracked` counters (not weights)."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def template(abstract) -> dict:
    """Zero-filled numpy tree (read-only, no memory) with the shapes/dtypes of `abstract`."""
    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


def materialize(tree) -> dict:
    """Turns the template's zero views that no rule replaced into ordinary arrays."""
    return jax.tree.map(lambda a: a if a.flags.writeable else np.array(a), tree)


def conv_rules(target: str, source: str, bias: bool = False) -> list[Rule]:
    rules = [Rule(f"params/{target}/kernel", f"{source}.weight", conv_kernel)]
    if bias:
        rules.append(Rule(f"params/{target}/bias", f"{source}.bias"))
    return rules


def dense_rules(target: str, source: str) -> list[Rule]:
    return [
        Rule(f"params/{target}/kernel", f"{source}.weight", dense_kernel),
        Rule(f"params/{target}/bias", f"{source}.bias"),
    ]


def bn_rules(target: str, source: str) -> list[Rule]:
    """PyTorch BatchNorm2d -> flax BatchNorm (affine in params, running stats in batch_stats)."""
    return [
        Rule(f"params/{target}/scale", f"{source}.weight"),
        Rule(f"params/{target}/bias", f"{source}.bias"),
        Rule(f"batch_stats/{target}/mean", f"{source}.running_mean"),
        Rule(f"batch_stats/{target}/var", f"{source}.running_var"),
    ]


def layer_norm_rules(target: str, source: str) -> list[Rule]:
    return [
        Rule(f"params/{target}/scale", f"{source}.weight"),
        Rule(f"params/{target}/bias", f"{source}.bias"),
    ]


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _check_naming(naming: str, known: Sequence[str]) -> None:
    if naming not in known:
        raise ValueError(f"unknown naming {naming!r}; known: {', '.join(known)}")


# ----------------------------------------------------------------------------- EfficientNet-B0


def efficientnet_b0_rules(
    naming: str, prefix: str = "", root: str = "", depth_coefficient: float = 1.0
) -> list[Rule]:
    """Rules for every EfficientNetB0 leaf: Flax paths under `root`, keys under `prefix`.

    `depth_coefficient` scales the block repeats as our module (and timm / efficientnet_pytorch
    for B1-B7) do, so a scaled trunk's blocks are named by the same stage / flat indices.
    """
    _check_naming(naming, EFFICIENTNET_NAMINGS)

    def t(name):
        return _join(root, name)

    def s(name):
        return prefix + name

    if naming == "timm":
        rules = conv_rules(t("conv_stem"), s("conv_stem")) + bn_rules(t("bn1"), s("bn1"))
    else:
        rules = conv_rules(t("conv_stem"), s("_conv_stem")) + bn_rules(t("bn1"), s("_bn0"))
    flat_index = 0
    for stage, (expand, _, _, _, repeats) in enumerate(B0_STAGES):
        for i in range(scaled_repeats(repeats, depth_coefficient)):
            ours = t(f"blocks_{stage}_{i}")
            if naming == "timm":
                theirs = s(f"blocks.{stage}.{i}")
                pairs = [("se/conv_reduce", "se.conv_reduce"), ("se/conv_expand", "se.conv_expand")]
                convs = [("conv_dw", "conv_dw"), ("conv_pw", "conv_pw")]
                bns = [("bn1", "bn1"), ("bn2", "bn2")]
                if expand != 1:
                    convs.append(("conv_pwl", "conv_pwl"))
                    bns.append(("bn3", "bn3"))
            else:
                theirs = s(f"_blocks.{flat_index}")
                pairs = [("se/conv_reduce", "_se_reduce"), ("se/conv_expand", "_se_expand")]
                if expand == 1:  # depthwise-separable block: dw, bn, se, project, bn
                    convs = [("conv_dw", "_depthwise_conv"), ("conv_pw", "_project_conv")]
                    bns = [("bn1", "_bn1"), ("bn2", "_bn2")]
                else:  # inverted residual: expand, bn0, dw, bn1, se, project, bn2
                    convs = [
                        ("conv_pw", "_expand_conv"),
                        ("conv_dw", "_depthwise_conv"),
                        ("conv_pwl", "_project_conv"),
                    ]
                    bns = [("bn1", "_bn0"), ("bn2", "_bn1"), ("bn3", "_bn2")]
            for a, b in convs:
                rules += conv_rules(f"{ours}/{a}", f"{theirs}.{b}")
            for a, b in pairs:
                rules += conv_rules(f"{ours}/{a}", f"{theirs}.{b}", bias=True)
            for a, b in bns:
                rules += bn_rules(f"{ours}/{a}", f"{theirs}.{b}")
            flat_index += 1
    return rules


def convert_efficientnet_b0(
    path: str,
    naming: str = "timm",
    *,
    prefix: str = "",
    key: str | None = None,
    width_coefficient: float = 1.0,
    depth_coefficient: float = 1.0,
) -> tuple[dict, Report]:
    """EfficientNetB0 variables {"params", "batch_stats"} from a timm or efficientnet_pytorch
    checkpoint. `prefix` selects a sub-model's keys (e.g. "encoder." for an smp model), `key` a
    nested dict in the file (e.g. "state_dict"). Build the module with
    `EfficientNetB0(bn_epsilon=BN_EPSILON[naming])` and the same width / depth coefficients
    (1.0 = B0; a scaled trunk, e.g. timm's efficientnet_b1 at 1.0 / 1.1, maps the same way).
    """
    _check_naming(naming, EFFICIENTNET_NAMINGS)
    state = drop_step_counters(read_state_dict(path, key))
    if prefix:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    module = EfficientNetB0(
        width_coefficient=width_coefficient, depth_coefficient=depth_coefficient
    )
    abstract = jax.eval_shape(
        functools.partial(module.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )
    ignored = tuple(prefix + p for p in EFFICIENTNET_IGNORED[naming])
    rules = efficientnet_b0_rules(naming, prefix, depth_coefficient=depth_coefficient)
    tree, report = fill(template(abstract), state, rules, ignored)
    return materialize(tree), report


# ----------------------------------------------------------------------------- ViT


def resample_pos_embed(
    pos: np.ndarray, grid: int, num_prefix: int = 1, method: str = "bicubic"
) -> np.ndarray:
    """Resizes a [1, num_prefix + g*g, D] position embedding to a grid x grid patch grid.

    The prefix (class token) rows are kept as they are; the patch rows are resized as a
    g x g image with `jax.image.resize` (half-pixel centres, antialiased when shrinking, like
    timm's `resample_abs_pos_embed`). "bilinear" matches PyTorch's bilinear
    (align_corners=False) when enlarging; "bicubic" uses the Keys a=-0.5 kernel where PyTorch
    uses a=-0.75, so a bicubic resize differs slightly from timm's.
    """
    pos = np.asarray(pos)
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ConversionError(f"position embedding must be [1, tokens, width], got {pos.shape}")
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    count, width = patches.shape[1], patches.shape[2]
    src = int(round(np.sqrt(count)))
    if src * src != count:
        raise ConversionError(f"position embedding has {count} patch rows, not a square grid")
    if src == grid:
        return pos
    image = jnp.asarray(patches.reshape(1, src, src, width), jnp.float32)
    resized = jax.image.resize(image, (1, grid, grid, width), method=method, antialias=True)
    resized = np.asarray(resized).reshape(1, grid * grid, width).astype(pos.dtype)
    return np.concatenate([prefix, resized], axis=1)


def _block_names(naming: str, mlp_keys: tuple[str, str]) -> dict[str, str]:
    """Our block-relative names -> the checkpoint's, for one transformer block."""
    if naming == "torchvision":
        fc1, fc2 = mlp_keys
        return {
            "norm1": "ln_1",
            "attn/qkv:in": "self_attention.in_proj",
            "attn/proj": "self_attention.out_proj",
            "norm2": "ln_2",
            "mlp/fc1": f"mlp.{fc1}",
            "mlp/fc2": f"mlp.{fc2}",
        }
    return {
        "norm1": "norm1",
        "attn/qkv": "attn.qkv",
        "attn/proj": "attn.proj",
        "norm2": "norm2",
        "mlp/fc1": "mlp.fc1",
        "mlp/fc2": "mlp.fc2",
    }


def transformer_block_rules(target: str, source: str, naming: str, mlp_keys=("0", "3")):
    """Rules for one pre-norm block (our vit.Block) from timm or torchvision names."""
    rules = []
    for ours, theirs in _block_names(naming, mlp_keys).items():
        if ours.startswith("norm"):
            rules += layer_norm_rules(f"{target}/{ours}", f"{source}.{theirs}")
        elif ours.endswith(":in"):  # torchvision MultiheadAttention: in_proj_weight / _bias
            ours = ours.removesuffix(":in")
            rules += [
                Rule(f"params/{target}/{ours}/kernel", f"{source}.{theirs}_weight", dense_kernel),
                Rule(f"params/{target}/{ours}/bias", f"{source}.{theirs}_bias"),
            ]
        else:
            rules += dense_rules(f"{target}/{ours}", f"{source}.{theirs}")
    return rules


def torchvision_mlp_keys(state, block_prefix: str) -> tuple[str, str]:
    """("0", "3") for torchvision >= 0.13 MLPBlock, ("linear_1", "linear_2") before."""
    if f"{block_prefix}.mlp.linear_1.weight" in state:
        return ("linear_1", "linear_2")
    return ("0", "3")


def vit_rules(
    naming: str,
    depth: int,
    grid: int,
    *,
    prefix: str = "",
    root: str = "",
    state=None,
    resample: str = "bicubic",
    learned_pos_embed: bool = True,
) -> list[Rule]:
    """Rules for a ViTEncoder under `root` from keys under `prefix`.

    `grid` is our patch grid (position embeddings are resampled to it); `state` is needed to
    detect torchvision's MLP naming and MAE fine-tune checkpoints that keep only `fc_norm`.
    """
    _check_naming(naming, VIT_NAMINGS)
    state = state or {}

    def t(name):
        return _join(root, name)

    pos_rule = functools.partial(resample_pos_embed, grid=grid, method=resample)
    if naming == "torchvision":
        rules = conv_rules(t("patch_embed"), prefix + "conv_proj", bias=True)
        rules.append(Rule(f"params/{t('cls_token')}", prefix + "class_token"))
        pos_key = prefix + "encoder.pos_embedding"
        norm_key = prefix + "encoder.ln"
    else:
        rules = conv_rules(t("patch_embed"), prefix + "patch_embed.proj", bias=True)
        rules.append(Rule(f"params/{t('cls_token')}", prefix + "cls_token"))
        pos_key = prefix + "pos_embed"
        norm_key = prefix + "norm"
        if f"{norm_key}.weight" not in state and f"{prefix}fc_norm.weight" in state:
            norm_key = prefix + "fc_norm"  # MAE fine-tuned with global pooling
    if learned_pos_embed:
        rules.append(Rule(f"params/{t('pos_embed/pos_embed')}", pos_key, pos_rule))
    rules += layer_norm_rules(t("norm"), norm_key)
    for i in range(depth):
        if naming == "torchvision":
            source = f"{prefix}encoder.layers.encoder_layer_{i}"
            mlp = torchvision_mlp_keys(state, source)
        else:
            source, mlp = f"{prefix}blocks.{i}", ("0", "3")
        rules += transformer_block_rules(t(f"blocks_{i}"), source, naming, mlp)
    return rules


def count_blocks(state, pattern: str) -> int:
    """Number of transformer blocks: 1 + the largest index matched by `pattern`'s group."""
    indices = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


def _vit_state(path: str, naming: str, key: str | None) -> dict:
    if key is None and naming == "mae" and not path.endswith(".safetensors"):
        try:
            return read_state_dict(path, "model")
        except ConversionError:
            pass  # an encoder saved without the "model" wrapper
    return read_state_dict(path, key)


def convert_vit(
    path: str,
    naming: str = "timm",
    image_size: int = 224,
    patch_size: int = 16,
    *,
    pos_embed: str = "learned",
    resample: str = "bicubic",
    prefix: str = "",
    key: str | None = None,
) -> tuple[dict, Report]:
    """ViTEncoder variables {"params"} from a timm, torchvision or MAE checkpoint.

    Width, depth and MLP size come from the checkpoint; build the module with them, your
    `num_heads`, and the same image_size, patch_size and pos_embed. A checkpoint trained at
    another resolution gets its position embedding resampled (`resample`: bicubic|bilinear).
    """
    _check_naming(naming, VIT_NAMINGS)
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    state = _vit_state(path, naming, key)
    if prefix:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    if naming == "torchvision":
        cls_key, pattern = "class_token", r"encoder\.layers\.encoder_layer_(\d+)\."
        fc1 = torchvision_mlp_keys(state, prefix + "encoder.layers.encoder_layer_0")[0]
        fc1_key = f"encoder.layers.encoder_layer_0.mlp.{fc1}.weight"
    else:
        cls_key, pattern, fc1_key = "cls_token", r"blocks\.(\d+)\.", "blocks.0.mlp.fc1.weight"
    for needed in (cls_key, fc1_key):
        if prefix + needed not in state:
            raise ConversionError(f"{path}: no {prefix + needed}; is this a {naming} ViT?")
    width = state[prefix + cls_key].shape[-1]
    mlp_dim = state[prefix + fc1_key].shape[0]
    depth = count_blocks(state, re.escape(prefix) + pattern)
    grid = image_size // patch_size
    module = ViTEncoder(patch_size, image_size, width, depth, 1, mlp_dim, pos_embed=pos_embed)
    abstract = jax.eval_shape(
        module.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1, grid * grid), jnp.int32),
    )
    rules = vit_rules(
        naming,
        depth,
        grid,
        prefix=prefix,
        state=state,
        resample=resample,
        learned_pos_embed=pos_embed == "learned",
    )
    ignored = tuple(prefix + p for p in VIT_IGNORED[naming])
    tree, report = fill(template(abstract), state, rules, ignored)
    return materialize(tree), report


def flat_paths(tree) -> dict[str, np.ndarray]:
    """{"params/a/b": leaf} view of a variables tree (handy for checks and reports)."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
