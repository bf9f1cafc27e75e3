"""The authors' released DFREC run exactly: a PyTorch reference of the WHOLE released model
(smp DeepLabV3Plus on efficientnet_pytorch B0 names, SourceRecoverNet_Attention2, the
lightly-style MAE on a torchvision ViT, models/mae.py's masking and forward), random weights
saved in the released layout, converted with configs/official.py `exact=released`, both run on
the same real faces with the same masking: seg, source and target equal to 1e-4 (fp32 JAX vs
float64 PyTorch). Then each released behaviour turned off alone must break the equality.

Small widths (64 px, patch 8, narrow UNet and ViTs: tests/test_convert_released.py); the ISM
keeps the full EfficientNet-B0 and smp's decoder layout. The masking thresholds scale with the
patch area (masking.py), so at patch 8 the reference uses 250 * 64 / 256 and 50 * 64 / 256;
at patch 16 they are the release's 250 and 50. A slow variant runs the full official widths
(224 px, ViT-L/16, UNet 32..1024, decoder 512): configs/official.py:exact=released itself.

Same masking: the tie-break noise is JAX's (drawn inside the model from its "masking" key);
the reference is given noise that ranks the patches in JAX's chosen order (rank / N, all < 1),
which decides only among the patches the reference itself decides to noise (sum <= the low
threshold, or every patch when the mean reaches the all-random threshold). So the reference's
kept and masked indices equal JAX's only if it takes the same decisions from its own map.
"""

import copy

import jax
import numpy as np
import pytest

from configs import official
from dfrec_jax.models import DFREC
from dfrec_jax.models.dfrec import identity_tokens
from dfrec_jax.pretrained import convert_released as cr
from tests.lfw import real_faces
from tests.test_convert_backbones import EPEfficientNetB0
from tests.test_convert_backbones import randomize as calibrate
from tests.test_convert_released import (
    DECODER_CHANNELS,
    KEPT,
    MAE,
    PATCH,
    SIZE,
    SourceRecoverNetAttention2,
    randomize,
    small_config,
    to_state,
)

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # every test fails below with the install line
    torch = F = nn = None

_Module = nn.Module if nn is not None else object
TOL = 1e-4


def thresholds(patch):
    """(low, all-random) sums of masking.py's official rule at this patch size."""
    return 50.0 * patch**2 / 256, 250.0 * patch**2 / 256


LOW, ALL_RANDOM = thresholds(PATCH)


# ----------------------------------------------------------------------------- ISM (smp)


def _separable(cin, cout, dilation=1):  # smp SeparableConv2d: depthwise, then pointwise
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
    )


def _cbr(conv, channels):
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class ASPPPooling(nn.Sequential if nn is not None else object):
    def __init__(self, cin, c):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, c, 1, bias=False),
                         nn.BatchNorm2d(c), nn.ReLU())  # fmt: skip

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(_Module):
    def __init__(self, cin, c, rates=(12, 24, 36)):
        super().__init__()
        self.convs = nn.ModuleList(
            [_cbr(nn.Conv2d(cin, c, 1, bias=False), c)]
            + [_cbr(_separable(cin, c, r), c) for r in rates]
            + [ASPPPooling(cin, c)]
        )
        self.project = nn.Sequential(nn.Conv2d(5 * c, c, 1, bias=False), nn.BatchNorm2d(c),
                                     nn.ReLU(), nn.Dropout(0.5))  # fmt: skip

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], 1))


class DeepLabV3PlusDecoder(_Module):
    def __init__(self, c, low=24, high=320):
        super().__init__()
        self.aspp = nn.Sequential(ASPP(high, c), _separable(c, c), nn.BatchNorm2d(c), nn.ReLU())
        self.up = nn.UpsamplingBilinear2d(scale_factor=4)  # align_corners=True
        self.block1 = _cbr(nn.Conv2d(low, 48, 1, bias=False), 48)
        self.block2 = _cbr(_separable(c + 48, c), c)

    def forward(self, low, high):
        return self.block2(torch.cat([self.up(self.aspp(high)), self.block1(low)], 1))


class DeepLabV3PlusB0(_Module):
    """smp DeepLabV3Plus(encoder_name="efficientnet-b0", classes=1, activation="sigmoid")."""

    def __init__(self, c=DECODER_CHANNELS):
        super().__init__()
        self.encoder = EPEfficientNetB0(tf_same=True)  # efficientnet_pytorch's static "SAME"
        del self.encoder._fc  # smp drops the classifier
        # smp make_dilated(output_stride=16): its last stage, _blocks[9:], every conv stride 1,
        # dilation 2, symmetric padding (static padding replaced by nn.Identity).
        for block in self.encoder._blocks[9:]:
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    k = m.kernel_size[0]
                    m.stride, m.dilation, m.padding = (1, 1), (2, 2), ((k // 2) * 2,) * 2
        self.decoder = DeepLabV3PlusDecoder(c)
        self.segmentation_head = nn.Sequential(
            nn.Conv2d(c, 1, 1), nn.UpsamplingBilinear2d(scale_factor=4), nn.Sigmoid()
        )

    def forward(self, x):
        features = self.encoder(x)  # levels 2, 4, 8, 16, 32 (the last dilated: stride 16)
        return self.segmentation_head(self.decoder(features[1], features[-1]))


# ----------------------------------------------------------------------------- MAE (mae.py)


def patchify(x, p):  # lightly utils.patchify: [B,C,H,W] -> [B, N, p*p*C], (py, px, c)
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, size):
    b, n, d = x.shape
    g, c = size // p, d // (p * p)
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(b, g, g, p, p, c))
    return x.reshape(b, c, size, size)


def _take(x, idx):  # lightly utils.get_at_index
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _put(x, idx, values):  # lightly utils.set_at_index
    return torch.scatter(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]), values)


def calcmask(mae, seg, noise, mask_ratio=0.5):
    """mae.py MAE.calcmask with the given noise: (weights it sorts, idx_keep, idx_mask)."""
    patch = mae.backbone.conv_proj.kernel_size[0]
    low, all_random = thresholds(patch)
    weight = patchify(seg, patch).sum(2)
    mean = weight.mean(1, keepdim=True)
    if hasattr(mae, "threshold"):  # MAE(para=True)
        all_random = torch.sigmoid(mae.threshold) * patch**2
    weight = torch.where((mean >= all_random) | (weight <= low), noise, weight)
    keep = int((weight.shape[1] + 1) * (1 - mask_ratio))  # sequence_length counts the cls
    order = torch.argsort(weight, dim=1, stable=True)
    return weight, order[:, :keep], order[:, keep:]


def mae_forward(mae, images, idx_keep, idx_mask, identity):
    """mae.py MAE.forward: the kept indices index the class-token-prefixed sequence."""
    backbone, decoder = mae.backbone, mae.decoder
    patch = backbone.conv_proj.kernel_size[0]
    x = backbone.conv_proj(images).flatten(2).transpose(1, 2)
    cls = backbone.class_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + backbone.encoder.pos_embedding
    x = backbone.encoder.ln(backbone.encoder.layers(_take(x, idx_keep)))
    x = decoder.decoder_embed(torch.cat([x, identity], 2))
    tokens = mae.mask_token.expand(x.shape[0], decoder.pos_embedding.shape[1], -1)
    tokens = _put(tokens, idx_keep, x)
    tokens = decoder.ln(decoder.layers(tokens + decoder.pos_embedding))
    pred = torch.sigmoid(decoder.prediction_head(_take(tokens, idx_mask)))
    return unpatchify(_put(patchify(images, patch), idx_mask, pred), patch, images.shape[-1])


def released_forward(ism, sirm, mae, images, noise, indices=None):
    """DFREC_eval.py idreceval, batched: dict of seg, source, target and the masking's
    weights, idx_keep, idx_mask. `indices` (keep, mask) replace the masking's own for the
    target (see `_compare`)."""
    seg = ism(images)
    source, identity = sirm(seg * images)
    weight, idx_keep, idx_mask = calcmask(mae, seg, noise)
    target = mae_forward(mae, images, *(indices or (idx_keep, idx_mask)), identity)
    return dict(seg=seg, source=source, target=target, weight=weight, keep_idx=idx_keep,
                mask_idx=idx_mask)  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


def _torch_required():
    if torch is None:
        pytest.fail("the parity tests need PyTorch (test-only): pip install torch==2.13.0",
                    pytrace=False)  # fmt: skip
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; JAX uses the other core


def _save(ism, sirm, mae, folder):
    ckpt = {cr.ISM: to_state(ism), cr.SIRM: to_state(sirm), cr.TIRM: to_state(mae),
            "epoch": 1, "acc1": 0.0}  # fmt: skip
    path = str(folder / "splitidentity.pth")
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small random released-layout checkpoint whose MAE has a learned threshold set so that
    one of three faces is masked fully at random by it (and none by the fixed 250 rule)."""
    _torch_required()
    faces = real_faces(3, SIZE)
    x = torch.from_numpy(faces.transpose(0, 3, 1, 2).copy())
    ism = calibrate(DeepLabV3PlusB0(), x)
    sirm = randomize(SourceRecoverNetAttention2())
    mae = randomize(MAE(para=True))
    with torch.no_grad():
        ism.segmentation_head[0].bias -= 1.45  # a darker map: some patches at or below LOW
        means = patchify(ism(x), PATCH).sum(2).mean(1)
        *_, lo, hi = sorted(means.tolist())
        assert hi < ALL_RANDOM and hi - lo > 0.5, means  # the fixed rule: none all-random
        mae.threshold.copy_(torch.logit(torch.tensor((lo + hi) / 2 / PATCH**2)))
    path = _save(ism, sirm, mae, tmp_path_factory.mktemp("released_parity"))
    return path, (ism, sirm, mae), faces


def _config(**off):
    """The small config with every released behaviour, then `off`'s options reverted."""
    config = small_config()
    official.released_behaviour(config.model, learned_threshold=True)
    for key, value in off.items():
        block, _, name = key.rpartition(".")
        (config.model[block] if block else config.model)[name] = value
    return config


def _run_jax(path, config, faces):
    variables, report = cr.convert_released_checkpoint(path, config)
    model = DFREC.from_config(config.model)
    out = jax.jit(lambda v, x: model.apply(v, x, rngs={"masking": jax.random.key(7)}))(
        variables, faces
    )
    return {k: np.asarray(v) for k, v in out.items()}, report


def _compare(path, modules, faces, config):
    """(ours, theirs): JAX on the converted file; the reference with JAX's masking noise.

    The reference's target is made with JAX's masked / kept indices, and `_errors` checks that
    those indices sort the reference's own masking weights: patch sums of float32 JAX and
    float64 PyTorch maps differ by ~1e-4, so two patches whose sums are closer than that may
    swap (seen at the official widths: 141.25885 vs 141.2591), which is rounding, not a
    different rule."""
    ism, sirm, mae = modules
    ours, report = _run_jax(path, config, faces)
    assert report.missing == list(cr.EXPECTED_MISSING) and report.unexpected == [], report
    order = np.concatenate([ours["keep_idx"], ours["mask_idx"]], axis=1)  # ascending weight
    noise = np.empty(order.shape)
    np.put_along_axis(noise, order, np.arange(order.shape[1]) / order.shape[1], axis=1)
    with torch.no_grad():
        x = torch.from_numpy(faces.transpose(0, 3, 1, 2).astype(np.float64))
        indices = tuple(torch.from_numpy(ours[k]).long() for k in ("keep_idx", "mask_idx"))
        out = released_forward(*(copy.deepcopy(m).double() for m in (ism, sirm, mae)), x,
                               torch.from_numpy(noise), indices)  # fmt: skip
    theirs = {k: v.numpy() for k, v in out.items()}
    for k in ("seg", "source", "target"):
        theirs[k] = theirs[k].transpose(0, 2, 3, 1)
    if hasattr(mae, "threshold"):
        patch = mae.backbone.conv_proj.kernel_size[0]
        theirs["threshold"] = float(torch.sigmoid(mae.threshold)) * patch**2
    return ours, theirs


def _errors(ours, theirs):
    """Max |ours - theirs| of seg, source, target; asserts JAX's masking order sorts the
    reference's own weights (to 1e-3 of a patch sum) and that the outputs are not constant."""
    order = np.concatenate([ours["keep_idx"], ours["mask_idx"]], axis=1)
    sorted_weights = np.take_along_axis(theirs["weight"], order, axis=1)
    assert np.all(np.diff(sorted_weights, axis=1) >= -1e-3), "a different masking order"
    for k in ("seg", "source", "target"):  # real, non-constant outputs
        assert float(np.std(theirs[k])) > 1e-2, k
    return {k: float(np.abs(ours[k] - theirs[k]).max()) for k in ("seg", "source", "target")}


@pytest.fixture(scope="module")
def both(released):
    path, modules, faces = released
    return _compare(path, modules, faces, _config())


# ----------------------------------------------------------------------------- tests


def test_whole_released_model_equals_the_pytorch_release(both):
    ours, theirs = both
    errors = _errors(ours, theirs)
    np.testing.assert_array_equal(ours["keep_idx"], theirs["keep_idx"])  # no near-ties here:
    np.testing.assert_array_equal(ours["mask_idx"], theirs["mask_idx"])  # the very same order
    print(f"max |JAX - PyTorch| at exact=released (small widths): {errors}")
    assert max(errors.values()) < TOL, errors
    # Every masking branch is taken: one face reaches the learned threshold (masked fully at
    # random), the others keep their noised patches (sum <= LOW) and then their lowest sums.
    sums = patchify(torch.from_numpy(theirs["seg"].transpose(0, 3, 1, 2)), PATCH).sum(2)
    low = (sums <= LOW).sum(1).numpy()
    all_random = (sums.mean(1) >= theirs["threshold"]).numpy()
    assert all_random.tolist() == [True, False, False], (sums.mean(1), theirs["threshold"])
    assert all(0 < n < KEPT for n in low[1:]), low


@pytest.mark.parametrize(
    "off, output",
    [
        ({"ism.encoder_padding": "symmetric"}, "seg"),
        ({"ism.encoder_dilation_start": "stage"}, "seg"),
        ({"ism.align_corners": False}, "seg"),
        ({"tirm.token_indexing": "patch"}, "target"),
        ({"masking_threshold": "fixed"}, "target"),
    ],
    ids=["tf_same_padding", "smp_dilation", "align_corners", "token_indexing", "threshold"],
)
def test_each_released_behaviour_is_needed(released, both, off, output):
    """With one option off the outputs it shapes are no longer the release's."""
    path, _, faces = released
    ours, _ = _run_jax(path, _config(**off), faces)
    _, theirs = both
    error = float(np.abs(ours[output] - theirs[output]).max())
    print(f"{off}: max |JAX - PyTorch| of {output} = {error:.3g}")
    assert error > 100 * TOL, (off, error)




@pytest.mark.slow  # ViT-L/16 at 224 px in float64 PyTorch and a JAX compile: ~3 min
def test_official_widths_equal_the_pytorch_release(tmp_path):
    """configs/official.py:exact=released itself, with a random checkpoint of the released
    shapes (MAE(para=False), as the released eval script builds it: the fixed 250 rule)."""
    _torch_required()
    config = official.get_config("exact=released")
    model, tirm, sirm = config.model, config.model.tirm, config.model.sirm
    size, patch = model.image_size, model.patch_size
    faces = real_faces(2, size)
    x = torch.from_numpy(faces.transpose(0, 3, 1, 2).copy())
    ism = calibrate(DeepLabV3PlusB0(model.ism.decoder_channels), x)
    unet = randomize(SourceRecoverNetAttention2(tuple(sirm.channels), sirm.source_channels,
                                                identity_tokens(model)))  # fmt: skip
    encoder = dict(width=tirm.encoder_width, depth=tirm.encoder_depth, mlp=tirm.encoder_mlp_dim,
                   heads=tirm.encoder_heads)  # fmt: skip
    decoder = dict(width=tirm.decoder_width, depth=tirm.decoder_depth, mlp=tirm.decoder_mlp_dim,
                   heads=tirm.decoder_heads)  # fmt: skip
    identity = (size // 16) ** 2
    mae = randomize(MAE(patch, size // patch, encoder, decoder, identity=identity))
    path = _save(ism, unet, mae, tmp_path)
    ours, theirs = _compare(path, (ism, unet, mae), faces, config)
    errors = _errors(ours, theirs)
    print(f"max |JAX - PyTorch| at official widths, exact=released: {errors}")
    assert max(errors.values()) < TOL, errors
