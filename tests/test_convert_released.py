"""Converter for the authors' released checkpoint, on a fake checkpoint with the real layout.

The fake file has the released key names and shapes for a small DFREC (64x64 input, patch 8,
narrow UNet and ViTs; the ISM keeps the full EfficientNet-B0): the ISM keys are written out
from segmentation_models_pytorch 0.3.3 / efficientnet_pytorch 0.7.1, the SIRM and MAE keys come
from PyTorch modules that mirror models/unet.py (SourceRecoverNet_Attention2) and lightly's
MAEBackbone/MAEDecoder over a torchvision ViT. The SIRM mirror also runs, for a parity check.
PyTorch is test-only: `pip install torch==2.13.0` (the tests fail, not skip, without it).
"""

import collections
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import official
from dfrec_jax.models import DFREC
from dfrec_jax.models.efficientnet import B0_STAGES
from dfrec_jax.models.sirm import SIRM
from dfrec_jax.pretrained import convert_released as cr
from dfrec_jax.pretrained.checkpoint import ConversionError
from dfrec_jax.pretrained.convert_backbones import flat_paths
from tests.test_convert_backbones import TorchvisionEncoder

try:
    import torch
    from torch import nn
except ImportError:  # every test fails below with the install line
    torch = None
    nn = None

_Module = nn.Module if nn is not None else object

SIZE, PATCH = 64, 8
GRID = SIZE // PATCH
KEPT = GRID * GRID // 2
CHANNELS, SPLIT = (8, 16, 32, 64, 128), 64
IDENTITY_FEATURES = (SIZE // 16) ** 2  # the SIRM bottleneck's h*w
ENC, DEC = dict(width=32, depth=2, mlp=64), dict(width=32, depth=1, mlp=128)
HEADS = 4  # encoder and decoder (small_config)
DECODER_CHANNELS = 32


@pytest.fixture(autouse=True)
def _torch_required():
    if torch is None:
        pytest.fail(
            "the converter tests need PyTorch (test-only): pip install torch==2.13.0",
            pytrace=False,
        )
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; JAX uses the other core


def small_config():
    config = official.get_config()
    model = config.model
    model.image_size, model.patch_size = SIZE, PATCH
    model.ism.decoder_channels = DECODER_CHANNELS
    model.sirm.update(channels=CHANNELS, source_channels=SPLIT, identity_tokens=KEPT)
    model.tirm.update(
        encoder_width=ENC["width"],
        encoder_depth=ENC["depth"],
        encoder_heads=4,
        encoder_mlp_dim=ENC["mlp"],
        decoder_width=DEC["width"],
        decoder_depth=DEC["depth"],
        decoder_heads=4,
        decoder_mlp_dim=DEC["mlp"],
    )
    return config


# ----------------------------------------------------------------------------- ISM key list


def _bn(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}  # fmt: skip


def ism_shapes(c=DECODER_CHANNELS) -> dict[str, tuple]:
    """smp DeepLabV3Plus(efficientnet-b0, classes=1) state_dict keys and shapes."""
    e = "encoder."
    shapes = {e + "_conv_stem.weight": (32, 3, 3, 3), **_bn(e + "_bn0", 32)}
    cin, n = 32, 0
    for expand, k, _, cout, repeats in B0_STAGES:
        for _ in range(repeats):
            mid, se, b = cin * expand, max(1, int(cin * 0.25)), f"{e}_blocks.{n}."
            if expand != 1:
                shapes[b + "_expand_conv.weight"] = (mid, cin, 1, 1)
                shapes.update(_bn(b + "_bn0", mid))
            shapes[b + "_depthwise_conv.weight"] = (mid, 1, k, k)
            shapes.update(_bn(b + "_bn1", mid))
            shapes.update({b + "_se_reduce.weight": (se, mid, 1, 1), b + "_se_reduce.bias": (se,)})
            shapes.update({b + "_se_expand.weight": (mid, se, 1, 1), b + "_se_expand.bias": (mid,)})
            shapes[b + "_project_conv.weight"] = (cout, mid, 1, 1)
            shapes.update(_bn(b + "_bn2", cout))
            cin, n = cout, n + 1
    shapes[e + "_conv_head.weight"] = (1280, 320, 1, 1)
    shapes.update(_bn(e + "_bn1", 1280))
    a = "decoder.aspp.0."
    shapes[a + "convs.0.0.weight"] = (c, 320, 1, 1)
    shapes.update(_bn(a + "convs.0.1", c))
    for i in (1, 2, 3):
        shapes[f"{a}convs.{i}.0.0.weight"] = (320, 1, 3, 3)
        shapes[f"{a}convs.{i}.0.1.weight"] = (c, 320, 1, 1)
        shapes.update(_bn(f"{a}convs.{i}.1", c))
    shapes[a + "convs.4.1.weight"] = (c, 320, 1, 1)
    shapes.update(_bn(a + "convs.4.2", c))
    shapes[a + "project.0.weight"] = (c, 5 * c, 1, 1)
    shapes.update(_bn(a + "project.1", c))
    shapes["decoder.aspp.1.0.weight"] = (c, 1, 3, 3)
    shapes["decoder.aspp.1.1.weight"] = (c, c, 1, 1)
    shapes.update(_bn("decoder.aspp.2", c))
    shapes["decoder.block1.0.weight"] = (48, 24, 1, 1)
    shapes.update(_bn("decoder.block1.1", 48))
    shapes["decoder.block2.0.0.weight"] = (c + 48, 1, 3, 3)
    shapes["decoder.block2.0.1.weight"] = (c, c + 48, 1, 1)
    shapes.update(_bn("decoder.block2.1", c))
    shapes.update({"segmentation_head.0.weight": (1, c, 1, 1), "segmentation_head.0.bias": (1,)})
    return shapes


def random_state(shapes, rng):
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.from_numpy(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            state[name] = torch.from_numpy(rng.normal(0, 0.1, shape).astype(np.float32))
    return state


# ----------------------------------------------------------------------------- SIRM mirror


class ConvBlock(_Module):  # unet.py conv_block
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        return self.conv(x)


class UpConv(_Module):  # unet.py up_conv
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout),
            nn.ReLU(),
        )  # fmt: skip

    def forward(self, x):
        return self.up(x)


class AttentionBlock(_Module):  # unet.py Attention_block
    def __init__(self, f_g, f_l, f_int):
        super().__init__()
        self.W = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.BatchNorm2d(f_int))
        self.Conv1x1 = nn.Conv2d(f_int, 1, 1, bias=False)
        self.W_g = nn.Sequential(nn.Conv2d(f_g, f_int, 1), nn.BatchNorm2d(f_int))
        self.W_x = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.BatchNorm2d(f_int))
        self.psi = nn.Sequential(nn.Conv2d(f_int, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g, x):
        q = torch.sigmoid(self.Conv1x1(self.W(x)))
        psi = self.psi(torch.relu(self.W_g(g) + self.W_x(x)))
        return x * (psi + q)


class SourceRecoverNetAttention2(_Module):
    """unet.py SourceRecoverNet_Attention2 with its channels as parameters."""

    def __init__(self, ch=CHANNELS, split=SPLIT, idout=KEPT):
        super().__init__()
        self.split = split
        self.Maxpool = nn.MaxPool2d(2, 2)
        ins = (3,) + ch[:-1]
        for i in range(5):
            setattr(self, f"Conv{i + 1}", ConvBlock(ins[i], ch[i]))
        for j in (5, 4, 3, 2):
            c = ch[j - 2]
            setattr(self, f"Up{j}", UpConv(split if j == 5 else ch[j - 1], c))
            setattr(self, f"Up_conv{j}", ConvBlock(2 * c, c))
            setattr(self, f"Att{j}", AttentionBlock(c, c, c // 2))
        self.Conv_1x1 = nn.Conv2d(ch[0], 3, 1)
        self.tConv4 = ConvBlock(ch[-1] - split, idout)

    def forward(self, x):
        xs = [self.Conv1(x)]
        for i in (2, 3, 4, 5):
            xs.append(getattr(self, f"Conv{i}")(self.Maxpool(xs[-1])))
        d = xs[4][:, : self.split]
        for j in (5, 4, 3, 2):
            d = getattr(self, f"Up{j}")(d)
            skip = getattr(self, f"Att{j}")(g=d, x=xs[j - 2])
            d = getattr(self, f"Up_conv{j}")(torch.cat((skip, d), 1))
        f5 = self.tConv4(xs[4][:, self.split :])
        return torch.sigmoid(self.Conv_1x1(d)), f5.view(f5.shape[0], f5.shape[1], -1)


# ----------------------------------------------------------------------------- MAE mirror


class MAEBackbone(_Module):  # lightly MAEBackbone.from_vit(torchvision ViT)
    def __init__(self, patch, grid, width, depth, mlp, heads=HEADS):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, width, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, width))
        self.encoder = TorchvisionEncoder(grid * grid + 1, width, depth, heads, mlp)
        self.heads = nn.Sequential(collections.OrderedDict(head=nn.Linear(width, 1000)))


class MAEDecoder(TorchvisionEncoder):  # lightly MAEDecoder(seq_length=vit.seq_length, ...)
    def __init__(self, patch, grid, width, depth, mlp, embed_input_dim, heads=HEADS):
        super().__init__(grid * grid + 1, width, depth, heads, mlp)
        self.decoder_embed = nn.Linear(embed_input_dim, width)
        self.prediction_head = nn.Linear(width, patch * patch * 3)


class MAE(_Module):  # models/mae.py MAE (para=False: no threshold parameter; True: one)
    def __init__(self, patch=PATCH, grid=GRID, enc=ENC, dec=DEC, identity=IDENTITY_FEATURES,
                 para=False):  # fmt: skip
        super().__init__()
        if para:
            self.threshold = nn.Parameter(torch.tensor(250.0))
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec["width"]))
        self.backbone = MAEBackbone(patch, grid, enc["width"], enc["depth"], enc["mlp"],
                                    enc.get("heads", HEADS))  # fmt: skip
        self.decoder = MAEDecoder(patch, grid, dec["width"], dec["depth"], dec["mlp"],
                                  enc["width"] + identity, dec.get("heads", HEADS))  # fmt: skip


# ----------------------------------------------------------------------------- fixtures


def randomize(model):
    """Random fan-in-scaled weights (so the attention gates do not saturate), norm scales near
    1, BatchNorm running stats away from 0/1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                is_scale = name.endswith("weight")
                p.copy_(torch.randn_like(p) * 0.2 + float(is_scale))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def to_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(path, ckpt dict, SIRM mirror) of a fake small released checkpoint."""
    if torch is None:
        pytest.fail("the converter tests need PyTorch: pip install torch==2.13.0", pytrace=False)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; JAX uses the other core
    sirm = randomize(SourceRecoverNetAttention2())
    ckpt = {
        "state_dict": random_state(ism_shapes(), np.random.default_rng(0)),
        "recover1_state_dict": to_state(sirm),
        "recover2_state_dict": to_state(randomize(MAE())),
        "epoch": 12,
        "acc1": 0.5,
    }
    path = str(tmp_path_factory.mktemp("released") / "splitidentity_small.pth")
    torch.save(ckpt, path)
    return path, ckpt, sirm


def numpy_of(ckpt, group, key):
    return ckpt[group][key].numpy()


# ----------------------------------------------------------------------------- tests


def test_every_leaf_filled_except_documented(released):
    path, ckpt, _ = released
    variables, report = cr.convert_released_checkpoint(path, small_config())
    assert report.missing == list(cr.EXPECTED_MISSING)
    assert report.unexpected == []
    flat = flat_paths(variables)
    abstract = flat_paths(_abstract(small_config()))  # the model's init tree, shapes only
    assert flat.keys() == abstract.keys()
    for name, leaf in flat.items():
        assert leaf.shape == abstract[name].shape, name
        if name in cr.EXPECTED_MISSING:
            assert not leaf.any(), name
        else:  # random checkpoint values: a leaf left at the zero template was not filled
            assert leaf.any(), name
    weights = [f"{g}:{k}" for g in cr.GROUPS for k in ckpt[g]]
    weights = [k for k in weights if not k.endswith("num_batches_tracked")]
    used = [k for k in weights if not k.startswith(cr.IGNORED)]
    assert len(weights) - len(used) == 7  # _conv_head, _bn1 (4), heads.head (2)
    assert len(used) == len(flat) - len(cr.EXPECTED_MISSING)  # one tensor per leaf

    p, b = variables["params"], variables["batch_stats"]
    np.testing.assert_array_equal(
        p["ism"]["decoder"]["aspp"]["convs_2"]["conv_dw"]["kernel"],
        numpy_of(ckpt, "state_dict", "decoder.aspp.0.convs.2.0.0.weight").transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        b["ism"]["encoder"]["blocks_5_3"]["bn1"]["mean"],
        numpy_of(ckpt, "state_dict", "encoder._blocks.14._bn0.running_mean"),
    )
    np.testing.assert_array_equal(
        p["sirm"]["att_3"]["self_conv"]["kernel"][0, 0, :, 0],
        numpy_of(ckpt, "recover1_state_dict", "Att5.Conv1x1.weight")[0, :, 0, 0],
    )
    tirm = p["tirm"]
    mae = ckpt["recover2_state_dict"]
    np.testing.assert_array_equal(
        tirm["decoder_pos_embed"]["pos_embed"], mae["decoder.pos_embedding"].numpy()[:, :-1]
    )
    np.testing.assert_array_equal(
        tirm["encoder"]["pos_embed"]["pos_embed"], mae["backbone.encoder.pos_embedding"].numpy()
    )
    np.testing.assert_array_equal(
        tirm["decoder_embed"]["kernel"], mae["decoder.decoder_embed.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        tirm["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
        mae["backbone.encoder.layers.encoder_layer_1.self_attention.in_proj_weight"].numpy().T,
    )


def _abstract(config):
    from dfrec_jax import inference

    return inference.abstract_variables(DFREC.from_config(config.model))


def test_converted_small_model_runs(released):
    path, _, _ = released
    config = small_config()
    variables, _ = cr.convert_released_checkpoint(path, config)
    model = DFREC.from_config(config.model)
    images = jax.random.uniform(jax.random.key(0), (2, SIZE, SIZE, 3))
    out = jax.jit(lambda v, x: model.apply(v, x, rngs={"masking": jax.random.key(1)}))(
        variables, images
    )
    assert out["seg"].shape == (2, SIZE, SIZE, 1)
    assert out["source"].shape == out["target"].shape == (2, SIZE, SIZE, 3)
    assert out["mask"].shape == (2, GRID * GRID) and int(out["mask"][0].sum()) == KEPT
    for key in ("seg", "source", "target", "forgery_logit"):
        assert np.isfinite(np.asarray(out[key])).all(), key
    np.testing.assert_array_equal(np.asarray(out["forgery_logit"]), 0.0)  # zero classifier


def test_sirm_matches_released_unet(released):
    path, _, mirror = released
    config = small_config()
    variables, _ = cr.convert_released_checkpoint(path, config)
    sirm = SIRM(**dict(config.model.sirm))
    sub = {c: variables[c]["sirm"] for c in ("params", "batch_stats")}
    x = np.random.default_rng(3).uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    out = jax.jit(lambda v, x: sirm.apply(v, x, train=False))(sub, x)
    with torch.no_grad():
        src, ident = copy.deepcopy(mirror).double()(
            torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
        )
    want_src = src.numpy().transpose(0, 2, 3, 1)
    assert out["target_identity"].shape == ident.shape == (2, KEPT, IDENTITY_FEATURES)
    np.testing.assert_allclose(np.asarray(out["source"]), want_src, atol=1e-5)
    scale = max(1.0, float(np.abs(ident.numpy()).max()))
    assert np.abs(np.asarray(out["target_identity"]) - ident.numpy()).max() / scale < 1e-4
    assert float(np.std(want_src)) > 1e-3  # a non-constant image: the check means something


def test_classification_head_fills_classifier_and_variables_are_kept(released, tmp_path):
    _, ckpt, _ = released
    ckpt = dict(ckpt, state_dict=dict(ckpt["state_dict"]))
    ckpt["state_dict"]["classification_head.3.weight"] = torch.randn(1, 320)
    ckpt["state_dict"]["classification_head.3.bias"] = torch.randn(1)
    path = str(tmp_path / "with_head.pth")
    torch.save(ckpt, path)
    variables, report = cr.convert_released_checkpoint(path, small_config())
    assert report.missing == [] and report.unexpected == []
    np.testing.assert_array_equal(
        variables["params"]["ism"]["classifier"]["kernel"],
        ckpt["state_dict"]["classification_head.3.weight"].numpy().T,
    )

    # Given variables: the leaves the release lacks keep their given values.
    path, _, _ = released
    given = jax.tree.map(lambda s: jnp.full(s.shape, 0.25, s.dtype), _abstract(small_config()))
    variables, report = cr.convert_released_checkpoint(path, small_config(), variables=given)
    np.testing.assert_array_equal(variables["params"]["ism"]["classifier"]["bias"], [0.25])
    assert report.missing == list(cr.EXPECTED_MISSING)


def test_bad_checkpoints_give_one_line_errors(released, tmp_path):
    _, ckpt, _ = released
    partial = str(tmp_path / "partial.pth")
    torch.save({"state_dict": ckpt["state_dict"]}, partial)
    with pytest.raises(ConversionError, match="no recover1_state_dict, recover2_state_dict"):
        cr.convert_released_checkpoint(partial, small_config())

    wrong = dict(ckpt, recover1_state_dict=dict(ckpt["recover1_state_dict"]))
    wrong["recover1_state_dict"]["tConv4.conv.0.weight"] = torch.zeros(KEPT, 3, 3, 3)
    path = str(tmp_path / "wrong.pth")
    torch.save(wrong, path)
    with pytest.raises(ConversionError) as err:
        cr.convert_released_checkpoint(path, small_config())
    assert "recover1_state_dict:tConv4.conv.0.weight" in str(err.value)
    assert "\n" not in str(err.value)

    extra = dict(ckpt, recover2_state_dict=dict(ckpt["recover2_state_dict"]))
    extra["recover2_state_dict"]["threshold"] = torch.tensor(250.0)
    path = str(tmp_path / "extra.pth")
    torch.save(extra, path)
    _, report = cr.convert_released_checkpoint(path, small_config())
    assert report.unexpected == ["recover2_state_dict:threshold"]


def test_official_layout_maps_every_leaf_without_compute():
    """The full released shapes (ViT-L/16 at 224, UNet 32..1024, decoder width 512) against
    configs/official.py: shapes only (meta tensors, zero-strided arrays), nothing allocated."""
    with torch.device("meta"):
        sirm = SourceRecoverNetAttention2((32, 64, 128, 256, 1024), 512, 98)
        vit_l, decoder = dict(width=1024, depth=24, mlp=4096), dict(width=512, depth=1, mlp=2048)
        mae = MAE(16, 14, vit_l, decoder, identity=196)
    groups = {
        cr.ISM: ism_shapes(256),
        cr.SIRM: {k: tuple(v.shape) for k, v in sirm.state_dict().items()},
        cr.TIRM: {k: tuple(v.shape) for k, v in mae.state_dict().items()},
    }
    assert groups[cr.TIRM]["decoder.decoder_embed.weight"] == (512, 1024 + 196)
    state = {
        f"{group}:{name}": np.broadcast_to(np.zeros((), np.float32), shape)
        for group, shapes in groups.items()
        for name, shape in shapes.items()
        if not name.endswith("num_batches_tracked")
    }
    config = official.get_config()
    abstract = flat_paths(_abstract(config))
    targets, sources = set(), set()
    for rule in cr.released_rules(config.model, state):
        value = rule.transform(state[rule.source])
        assert value.shape == abstract[rule.target].shape, rule
        targets.add(rule.target)
        sources.add(rule.source)
    assert len(targets) == len(sources)  # one tensor per leaf
    assert sorted(set(abstract) - targets) == list(cr.EXPECTED_MISSING)
    assert [k for k in sorted(set(state) - sources) if not k.startswith(cr.IGNORED)] == []
    tokens = abstract["params/tirm/encoder/pos_embed/pos_embed"].shape
    assert tokens == (1, 197, 1024)
    vit_l = [t for t in targets if t.startswith("params/tirm/encoder/")]
    assert len(vit_l) == 6 + 24 * 12  # embed, cls, pos, final norm + 24 blocks of 12 leaves
