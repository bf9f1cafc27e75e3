"""Converter for the DFREC authors' released checkpoint (botianzhe/DFREC, splitidentity_ftm.pth).

The file is a torch.save dict with `state_dict` (the ISM: segmentation_models_pytorch 0.3.x
`DeepLabV3Plus(encoder_name="efficientnet-b0", classes=1)`), `recover1_state_dict` (the SIRM:
`SourceRecoverNet_Attention2`), `recover2_state_dict` (the TIRM: `MAE` over lightly's
`MAEBackbone.from_vit(torchvision vit_l_16())` and `MAEDecoder`), `epoch` and `acc1`.
`convert_released_checkpoint` maps it onto `DFREC.from_config(configs/official.py)` (or any
config with the same structure, e.g. smaller widths) and returns (variables, Report).

Mapped exactly, by name (keys shown without their group):
  ISM  encoder._conv_stem, _bn0, _blocks.N.*   -> ism/encoder/...   (efficientnet_pytorch
       names, see convert_backbones; BN eps 1e-3 = our EfficientNetB0 default)
       decoder.aspp.0.convs.{0..4}, aspp.0.project, aspp.1/2, block1, block2
                                               -> ism/decoder/...   (table in models/ism.py)
       segmentation_head.0                     -> ism/decoder/segmentation_head
  SIRM Conv{i+1}.conv.{0,1,3,4}                -> sirm/enc_i/layer_{0,1}/{conv,bn}
       Up{i+2}.up.{1,2}                        -> sirm/up_i/layer_0/{conv,bn}
       Att{i+2}.{W_g,W_x,psi,W}.{0,1}          -> sirm/att_i/{w_g,w_x,psi,w_self}_{conv,bn}
       Att{i+2}.Conv1x1                        -> sirm/att_i/self_conv
       Up_conv{i+2}.conv.*                     -> sirm/dec_i/...
       tConv4.conv.*, Conv_1x1                 -> sirm/identity_head/..., sirm/out_conv
  TIRM backbone.{conv_proj, class_token, encoder.pos_embedding, encoder.layers.encoder_layer_i.*,
       encoder.ln}                             -> tirm/encoder/... (torchvision ViT names)
       decoder.decoder_embed                   -> tirm/decoder_embed  (input = [tokens, identity])
       decoder.layers.encoder_layer_i.*        -> tirm/decoder_blocks_i
       decoder.ln, decoder.prediction_head     -> tirm/decoder_norm, tirm/decoder_pred
       mask_token                              -> tirm/mask_token
Dropped as expected: the encoder head the release never runs (encoder._conv_head, encoder._bn1,
encoder._fc), the ViT classifier (backbone.heads), BatchNorm step counters.

Not mapped exactly (listed in Report.missing or described here, never silent):
  * ism/classifier (the paper's forgery head): the release has none (no smp `aux_params`), so
    it is in Report.missing and stays zero (logit 0), or keeps the values of `variables` when
    given. A checkpoint that has `classification_head.3` (smp aux head) fills it.
  * decoder.pos_embedding has 1 + 196 rows but our decoder has 196 tokens and no class token.
    The release writes the kept tokens and reads the predictions at decoder positions equal to
    the PATCH index (its masking indices are not shifted by the class token), so row j has
    been trained as the position of patch j: rows 0..N-1 are kept and the LAST row, which only
    ever sits on an extra always-masked token, is dropped (not the first). With
    tirm.token_indexing="released" the decoder has the release's 1 + N tokens: all rows kept.
  * `threshold` (MAE(para=True) only) fills params/masking_threshold when the model has one
    (masking_threshold="learned"); otherwise it is reported unexpected.
  * Model behaviour that differs from the released code whatever the weights, unless the
    config asks for it (configs/official.py `exact=released`, which sets all of them; then the
    outputs equal the release's, tests/test_released_parity.py):
      - efficientnet_pytorch pads the stride-2 convs before the dilated stage (stem, blocks
        1, 3, 5) TF-"SAME" for a 224 input (0/1 or 1/2 px); ours pads symmetrically;
      - smp's output-stride-16 dilation covers `_blocks[9:]`, i.e. also blocks 9-10 (the last
        two 112-ch blocks), where our EfficientNetB0 dilates from the 192-ch stage (block 11);
      - smp upsamples with align_corners=True (UpsamplingBilinear2d), ours with half-pixel
        centres (see models/ism.py);
      - the released MAE picks kept tokens from the class-token-prefixed sequence without a +1
        offset and encodes them without a separate class token, and its decoder runs 197
        tokens (one extra, always masked); ours encodes the right patches plus the class token
        and decodes exactly the 196 patch tokens (configs/official.py);
      - a learned masking `threshold` (MAE(para=True)): our official masking uses the fixed
        250 unless masking_threshold="learned".
A .safetensors file with keys "<group>.<name>" (e.g. "recover1_state_dict.Conv1.conv.0.weight")
is read as well.
"""

from typing import Any, Mapping

import numpy as np

from dfrec_jax import inference
from dfrec_jax.models import DFREC
from dfrec_jax.pretrained import torch_zip
from dfrec_jax.pretrained.checkpoint import (
    ConversionError,
    Report,
    Rule,
    fill,
    read_state_dict,
)
from dfrec_jax.pretrained.convert_backbones import (
    EFFICIENTNET_IGNORED,
    bn_rules,
    conv_rules,
    dense_rules,
    drop_step_counters,
    efficientnet_b0_rules,
    layer_norm_rules,
    materialize,
    resample_pos_embed,
    template,
    torchvision_mlp_keys,
    transformer_block_rules,
    vit_rules,
)

ISM, SIRM, TIRM = "state_dict", "recover1_state_dict", "recover2_state_dict"
GROUPS = (ISM, SIRM, TIRM)
# Flax leaves the release cannot fill (documented above); the tests hold this list exact.
EXPECTED_MISSING = ("params/ism/classifier/bias", "params/ism/classifier/kernel")
IGNORED = tuple(f"{ISM}:encoder.{p}" for p in EFFICIENTNET_IGNORED["efficientnet_pytorch"]) + (
    f"{TIRM}:backbone.heads.",
)


def read_released(path: str) -> dict[str, np.ndarray]:
    """Flat {"<group>:<name>": array} for the three state dicts (one read of the file)."""
    if path.endswith(".safetensors"):
        flat = {}
        for name, value in read_state_dict(path).items():
            group, _, rest = name.partition(".")
            flat[f"{group}:{rest.removeprefix('module.')}" if group in GROUPS else name] = value
        present = {k.partition(":")[0] for k in flat}
    else:
        ckpt = torch_zip.load(path)
        if not isinstance(ckpt, Mapping):
            raise ConversionError(f"{path}: expected the released checkpoint dict")
        flat, present = {}, set()
        for group in GROUPS:
            if isinstance(ckpt.get(group), Mapping):
                present.add(group)
                for name, value in ckpt[group].items():
                    # 0-d tensors come back from torch_zip as numpy scalars: keep them too.
                    if isinstance(value, (np.ndarray, np.generic)):
                        flat[f"{group}:{name.removeprefix('module.')}"] = np.asarray(value)
    absent = [g for g in GROUPS if g not in present]
    if absent:
        raise ConversionError(f"{path}: not a released DFREC checkpoint (no {', '.join(absent)})")
    return drop_step_counters(flat)


def _conv_block_rules(target: str, source: str) -> list[Rule]:
    """The release's conv_block: Sequential(conv, bn, relu, conv, bn, relu)."""
    return (
        conv_rules(f"{target}/layer_0/conv", f"{source}.conv.0", bias=True)
        + bn_rules(f"{target}/layer_0/bn", f"{source}.conv.1")
        + conv_rules(f"{target}/layer_1/conv", f"{source}.conv.3", bias=True)
        + bn_rules(f"{target}/layer_1/bn", f"{source}.conv.4")
    )


def ism_rules(cfg, state) -> list[Rule]:
    p, d = f"{ISM}:", f"{ISM}:decoder."
    rules = efficientnet_b0_rules("efficientnet_pytorch", prefix=p + "encoder.", root="ism/encoder")

    def cbr(target, conv, bn, separable):
        target = f"ism/decoder/{target}"
        if separable:  # smp SeparableConv2d = Sequential(depthwise, pointwise)
            convs = conv_rules(f"{target}/conv_dw", f"{conv}.0") + conv_rules(
                f"{target}/conv_pw", f"{conv}.1"
            )
        else:
            convs = conv_rules(f"{target}/conv", conv)
        return convs + bn_rules(f"{target}/bn", bn)

    separable = cfg.get("separable", True)
    rates = len(cfg.get("atrous_rates", (12, 24, 36)))
    aspp = d + "aspp.0."
    rules += cbr("aspp/convs_0", aspp + "convs.0.0", aspp + "convs.0.1", False)
    for i in range(1, rates + 1):
        rules += cbr(f"aspp/convs_{i}", f"{aspp}convs.{i}.0", f"{aspp}convs.{i}.1", separable)
    pool = f"{aspp}convs.{rates + 1}"
    rules += cbr(f"aspp/convs_{rates + 1}", f"{pool}.1", f"{pool}.2", False)
    rules += cbr("aspp/project", aspp + "project.0", aspp + "project.1", False)
    rules += cbr("aspp_conv", d + "aspp.1", d + "aspp.2", True)
    rules += cbr("block1", d + "block1.0", d + "block1.1", False)
    rules += cbr("block2", d + "block2.0", d + "block2.1", True)
    rules += conv_rules("ism/decoder/segmentation_head", p + "segmentation_head.0", bias=True)
    if p + "classification_head.3.weight" in state:
        rules += dense_rules("ism/classifier", p + "classification_head.3")
    return rules


def sirm_rules(cfg, state) -> list[Rule]:
    del state
    p = f"{SIRM}:"
    levels = len(cfg["channels"])
    rules = []
    for i in range(levels):
        rules += _conv_block_rules(f"sirm/enc_{i}", f"{p}Conv{i + 1}")
    gates = [("w_g", "W_g"), ("w_x", "W_x"), ("psi", "psi")]
    if cfg.get("gate", "official") == "official":
        gates.append(("w_self", "W"))
    for i in range(levels - 1):
        rules += conv_rules(f"sirm/up_{i}/layer_0/conv", f"{p}Up{i + 2}.up.1", bias=True)
        rules += bn_rules(f"sirm/up_{i}/layer_0/bn", f"{p}Up{i + 2}.up.2")
        att = f"{p}Att{i + 2}"
        for ours, theirs in gates:
            rules += conv_rules(f"sirm/att_{i}/{ours}_conv", f"{att}.{theirs}.0", bias=True)
            rules += bn_rules(f"sirm/att_{i}/{ours}_bn", f"{att}.{theirs}.1")
        if cfg.get("gate", "official") == "official":
            rules += conv_rules(f"sirm/att_{i}/self_conv", f"{att}.Conv1x1")
        rules += _conv_block_rules(f"sirm/dec_{i}", f"{p}Up_conv{i + 2}")
    rules += _conv_block_rules("sirm/identity_head", f"{p}tConv4")
    rules += conv_rules("sirm/out_conv", f"{p}Conv_1x1", bias=True)
    return rules


def decoder_pos_embed(pos: np.ndarray, grid: int) -> np.ndarray:
    """The release's [1, 1 + N, D] decoder position embedding -> our [1, grid*grid, D].

    Row j belongs to patch j (see the module docstring); the last row is dropped.
    """
    return resample_pos_embed(np.asarray(pos)[:, :-1], grid, num_prefix=0)


def tirm_rules(cfg, state, grid: int) -> list[Rule]:
    p = f"{TIRM}:"
    rules = vit_rules(
        "torchvision",
        cfg["encoder_depth"],
        grid,
        prefix=p + "backbone.",
        root="tirm/encoder",
        state=state,
        learned_pos_embed=cfg.get("pos_embed", "learned") == "learned",
    )
    rules += dense_rules("tirm/decoder_embed", p + "decoder.decoder_embed")
    for i in range(cfg["decoder_depth"]):
        source = f"{p}decoder.layers.encoder_layer_{i}"
        mlp = torchvision_mlp_keys(state, source)
        rules += transformer_block_rules(f"tirm/decoder_blocks_{i}", source, "torchvision", mlp)
    rules += layer_norm_rules("tirm/decoder_norm", p + "decoder.ln")
    rules += dense_rules("tirm/decoder_pred", p + "decoder.prediction_head")
    rules.append(Rule("params/tirm/mask_token", p + "mask_token"))
    if cfg.get("decoder_pos_embed", "learned") == "learned":
        released = cfg.get("token_indexing", "patch") == "released"
        rules.append(
            Rule(
                "params/tirm/decoder_pos_embed/pos_embed",
                p + "decoder.pos_embedding",
                np.asarray if released else lambda pos: decoder_pos_embed(pos, grid),
            )
        )
    return rules


def released_rules(model_cfg, state) -> list[Rule]:
    """Every rule for a DFREC built from `model_cfg` (a `config.model` ConfigDict)."""
    grid = model_cfg["image_size"] // model_cfg["patch_size"]
    rules = (
        ism_rules(model_cfg["ism"], state)
        + sirm_rules(model_cfg["sirm"], state)
        + tirm_rules(model_cfg["tirm"], state, grid)
    )
    if model_cfg.get("masking_threshold", "fixed") == "learned":
        rules.append(Rule("params/masking_threshold", f"{TIRM}:threshold"))
    return rules


def convert_released_checkpoint(
    path: str, config: Any, variables: Any = None
) -> tuple[dict, Report]:
    """(variables {"params", "batch_stats"} for `DFREC.from_config(config.model)`, Report).

    `config`: a full config or its `model` part (the release's own: configs/official.py,
    which the `convert` command loads). `variables`: an initialised tree for that model
    whose leaves the release cannot fill are kept; by default those leaves are zeros. Report
    keys are "<group>:<name>" with group state_dict / recover1_state_dict / recover2_state_dict.
    """
    return convert_released_state(read_released(path), config, variables)


def convert_released_state(
    state: Mapping[str, np.ndarray], config: Any, variables: Any = None
) -> tuple[dict, Report]:
    """`convert_released_checkpoint` of a `read_released` result (the file read once)."""
    model_cfg = config["model"] if "model" in config else config
    base = variables
    if base is None:
        base = template(inference.abstract_variables(DFREC.from_config(model_cfg)))
    tree, report = fill(base, state, released_rules(model_cfg, state), IGNORED)
    return materialize(tree) if variables is None else tree, report
