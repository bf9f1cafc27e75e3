"""Backbone converters against hand-written PyTorch references that use the real key names.

The references (an EfficientNet-B0 named like timm and like efficientnet_pytorch, a small ViT
named like timm and like torchvision) get random weights and data-derived BatchNorm running
statistics, are saved with torch.save and safetensors, converted, and must give the same
outputs as our Flax modules. PyTorch is a test-only dependency: `pip install torch==2.13.0`
(the tests fail, not skip, without it). No timm/torchvision: the references are written here.
"""

import collections
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfrec_jax.models.efficientnet import B0_STAGES, EfficientNetB0
from dfrec_jax.models.vit import ViTEncoder
from dfrec_jax.pretrained import convert_backbones as cb
from dfrec_jax.pretrained.checkpoint import ConversionError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:  # every test fails below with the install line
    torch = None
    nn = None

_Module = nn.Module if nn is not None else object
# Our float32 outputs vs the reference run in float64: max error <= TOL * max(1, max|ref|).
# (float32 roundoff alone reaches ~3e-4 where the B0 activations are ~30; PyTorch's own float32
# run is as far from float64 as ours.)
TOL = 1e-4


@pytest.fixture(autouse=True)
def _torch_required():
    if torch is None:
        pytest.fail(
            "the converter parity tests need PyTorch (test-only): pip install torch==2.13.0",
            pytrace=False,
        )
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared; JAX uses the other core


# ----------------------------------------------------------------------------- references


def conv2d(x, conv, tf_same=False):
    """Symmetric PyTorch padding (timm), or TF "SAME" (efficientnet_pytorch) when asked."""
    if not tf_same or conv.stride[0] == 1:
        return conv(x)
    k, s, d = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    size = x.shape[-1]
    pad = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return F.conv2d(x, conv.weight, conv.bias, s, 0, d, conv.groups)


def _conv(cin, cout, k=1, s=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=bias)


class TimmSE(_Module):
    def __init__(self, ch, reduced):
        super().__init__()
        self.conv_reduce = _conv(ch, reduced, bias=True)
        self.conv_expand = _conv(reduced, ch, bias=True)

    def forward(self, x):
        s = self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class TimmBlock(_Module):
    """timm DepthwiseSeparableConv (expand 1) or InvertedResidual, with timm's names."""

    def __init__(self, cin, cout, expand, k, s, eps):
        super().__init__()
        self.expand, self.skip = expand, s == 1 and cin == cout
        mid = cin * expand
        if expand != 1:
            self.conv_pw = _conv(cin, mid)
            self.bn1 = nn.BatchNorm2d(mid, eps=eps)
        self.conv_dw = _conv(mid, mid, k, s, groups=mid)
        self.se = TimmSE(mid, int(cin * 0.25))
        if expand == 1:
            self.bn1 = nn.BatchNorm2d(mid, eps=eps)
            self.conv_pw = _conv(mid, cout)
            self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        else:
            self.bn2 = nn.BatchNorm2d(mid, eps=eps)
            self.conv_pwl = _conv(mid, cout)
            self.bn3 = nn.BatchNorm2d(cout, eps=eps)

    def forward(self, x):
        if self.expand == 1:
            h = self.se(F.silu(self.bn1(self.conv_dw(x))))
            h = self.bn2(self.conv_pw(h))
        else:
            h = F.silu(self.bn1(self.conv_pw(x)))
            h = self.se(F.silu(self.bn2(self.conv_dw(h))))
            h = self.bn3(self.conv_pwl(h))
        return h + x if self.skip else h


class TimmEfficientNetB0(_Module):
    def __init__(self, eps=1e-5):
        super().__init__()
        self.conv_stem = _conv(3, 32, 3, 2)
        self.bn1 = nn.BatchNorm2d(32, eps=eps)
        stages, cin = [], 32
        for expand, k, s, cout, repeats in B0_STAGES:
            blocks = []
            for i in range(repeats):
                blocks.append(TimmBlock(cin, cout, expand, k, s if i == 0 else 1, eps))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(320, 1280)
        self.bn2 = nn.BatchNorm2d(1280, eps=eps)
        self.classifier = nn.Linear(1280, 1000)

    def forward(self, x):
        """The last output at reduction levels 2, 4, 8, 16, 32 (our `features`)."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        feats = []
        for s, stage in enumerate(self.blocks):
            x = stage(x)
            if s in (0, 1, 2, 4, 6):
                feats.append(x)
        return feats


class EPBlock(_Module):
    """efficientnet_pytorch MBConvBlock names (flat `_blocks.N`)."""

    def __init__(self, cin, cout, expand, k, s, eps, tf_same):
        super().__init__()
        self.expand, self.skip, self.tf_same = expand, s == 1 and cin == cout, tf_same
        mid = cin * expand
        if expand != 1:
            self._expand_conv = _conv(cin, mid)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps, momentum=0.01)
        self._depthwise_conv = _conv(mid, mid, k, s, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps, momentum=0.01)
        self._se_reduce = _conv(mid, int(cin * 0.25), bias=True)
        self._se_expand = _conv(int(cin * 0.25), mid, bias=True)
        self._project_conv = _conv(mid, cout)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps, momentum=0.01)

    def forward(self, x):
        h = F.silu(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.silu(self._bn1(conv2d(h, self._depthwise_conv, self.tf_same)))
        s = self._se_expand(F.silu(self._se_reduce(h.mean((2, 3), keepdim=True))))
        h = self._bn2(self._project_conv(h * torch.sigmoid(s)))
        return h + x if self.skip else h


class EPEfficientNetB0(_Module):
    def __init__(self, eps=1e-3, tf_same=False):
        super().__init__()
        self.tf_same = tf_same
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=eps, momentum=0.01)
        blocks, cin, self.ends = [], 32, []
        for expand, k, s, cout, repeats in B0_STAGES:
            for i in range(repeats):
                blocks.append(EPBlock(cin, cout, expand, k, s if i == 0 else 1, eps, tf_same))
                cin = cout
            self.ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _conv(320, 1280)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps, momentum=0.01)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.silu(self._bn0(conv2d(x, self._conv_stem, self.tf_same)))
        feats, keep = [], {self.ends[s] for s in (0, 1, 2, 4, 6)}
        for n, block in enumerate(self._blocks):
            x = block(x)
            if n in keep:
                feats.append(x)
        return feats


class TimmAttention(_Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmMlp(_Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TimmViTBlock(_Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(_Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class TimmViT(_Module):
    def __init__(self, image=64, patch=16, dim=64, depth=2, heads=4, hidden=256):
        super().__init__()
        n = (image // patch) ** 2
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + n, dim))
        self.blocks = nn.Sequential(*[TimmViTBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))


class TorchvisionBlock(_Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim)
        )

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchvisionEncoder(_Module):
    def __init__(self, n, dim, depth, heads, hidden):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim))
        layers = [
            (f"encoder_layer_{i}", TorchvisionBlock(dim, heads, hidden)) for i in range(depth)
        ]
        self.layers = nn.Sequential(collections.OrderedDict(layers))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(_Module):
    def __init__(self, image=64, patch=16, dim=64, depth=2, heads=4, hidden=256):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = TorchvisionEncoder((image // patch) ** 2 + 1, dim, depth, heads, hidden)
        self.heads = nn.Sequential(collections.OrderedDict(head=nn.Linear(dim, 10)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        return self.encoder(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1))


# ----------------------------------------------------------------------------- helpers


def randomize(model, images):
    """Random affine/LayerNorm weights and running stats taken from one batch, so activations
    stay O(1) through 16 blocks and the running means/vars are far from 0/1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0  # running stats := this batch's
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
        model.train()
        model(images)
        model.eval()
    return model


def state_of(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save(state, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file  # needs torch, so imported here

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def jitted(module):
    if isinstance(module, EfficientNetB0):
        return jax.jit(lambda v, x: module.apply(v, x, train=False)["features"])
    return jax.jit(module.apply)


def reference(model, images: np.ndarray):
    """The reference model's outputs in float64 (NHWC for feature maps)."""
    with torch.no_grad():
        out = copy.deepcopy(model).double()(nchw(images).double())
    if isinstance(out, list):
        return [to_nhwc(f) for f in out]
    return out.numpy()


def parity_error(got, want) -> float:
    """Max abs error scaled by max(1, max|want|); asserts shapes match."""
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(want).max()) > 0.1  # non-trivial activations
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def assert_same_tree(a, b):
    fa, fb = cb.flat_paths(a), cb.flat_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


IMAGES = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- EfficientNet


def test_efficientnet_b0_timm_parity(tmp_path):
    ref = randomize(TimmEfficientNetB0(eps=cb.BN_EPSILON["timm"]), nchw(IMAGES))
    state = state_of(ref)
    zipped = save(state, tmp_path / "b0.pth")
    variables, report = cb.convert_efficientnet_b0(zipped, "timm")
    assert report.missing == [] and report.unexpected == [], report
    other, _ = cb.convert_efficientnet_b0(save(state, tmp_path / "b0.safetensors"), "timm")
    assert_same_tree(variables, other)
    np.testing.assert_array_equal(
        variables["params"]["blocks_3_1"]["conv_dw"]["kernel"],
        state["blocks.3.1.conv_dw.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["blocks_3_1"]["bn2"]["var"],
        state["blocks.3.1.bn2.running_var"].numpy(),
    )

    want = reference(ref, IMAGES)
    got = jitted(EfficientNetB0(bn_epsilon=cb.BN_EPSILON["timm"]))(variables, IMAGES)
    errors = [parity_error(g, w) for g, w in zip(got, want)]
    assert len(errors) == 5 and max(errors) < TOL, errors


def test_efficientnet_b0_efficientnet_pytorch_naming_parity(tmp_path):
    ref = randomize(EPEfficientNetB0(), nchw(IMAGES))
    # As inside a segmentation_models_pytorch checkpoint: nested and prefixed.
    state = {"state_dict": {"encoder." + k: v for k, v in state_of(ref).items()}, "epoch": 3}
    path = save(state, tmp_path / "smp.pth")
    variables, report = cb.convert_efficientnet_b0(
        path, "efficientnet_pytorch", prefix="encoder.", key="state_dict"
    )
    assert report.missing == [] and report.unexpected == [], report
    np.testing.assert_array_equal(
        variables["params"]["blocks_1_0"]["conv_pw"]["kernel"][0, 0],
        state["state_dict"]["encoder._blocks.1._expand_conv.weight"].numpy()[:, :, 0, 0].T,
    )
    want = reference(ref, IMAGES)
    got = jitted(EfficientNetB0(bn_epsilon=cb.BN_EPSILON["efficientnet_pytorch"]))(
        variables, IMAGES
    )
    errors = [parity_error(g, w) for g, w in zip(got, want)]
    assert len(errors) == 5 and max(errors) < TOL, errors


# ----------------------------------------------------------------------------- ViT


VIT = dict(image=64, patch=16, dim=64, depth=2, heads=4, hidden=256)


def vit_forward(variables, images):
    """Our ViTEncoder (patch 16, width 64, depth 2, 4 heads) on all patches."""
    image_size = images.shape[1]
    n = (image_size // 16) ** 2
    keep = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (images.shape[0], n))
    module = ViTEncoder(16, image_size, 64, 2, 4, 256)
    return np.asarray(jitted(module)(variables, images, keep))


@pytest.mark.parametrize(
    "naming,ref_class,suffix",
    [("timm", TimmViT, ".safetensors"), ("torchvision", TorchvisionViT, ".pth")],
)
def test_vit_parity(tmp_path, naming, ref_class, suffix):
    ref = randomize(ref_class(**VIT), nchw(IMAGES))
    state = state_of(ref)
    variables, report = cb.convert_vit(save(state, tmp_path / f"vit{suffix}"), naming, 64, 16)
    assert report.missing == [] and report.unexpected == [], report
    got = vit_forward(variables, IMAGES)
    assert got.shape == (2, 17, 64)
    assert parity_error(got, reference(ref, IMAGES)) < TOL


def test_vit_mae_checkpoint_matches_timm_and_ignores_decoder(tmp_path):
    state = state_of(randomize(TimmViT(**VIT), nchw(IMAGES)))
    timm_vars, _ = cb.convert_vit(save(state, tmp_path / "timm.pth"), "timm", 64, 16)
    mae = {k: v for k, v in state.items() if not k.startswith("head.")}
    mae.update(
        mask_token=torch.zeros(1, 1, 32),
        **{
            "decoder_embed.weight": torch.zeros(32, 64),
            "decoder_pos_embed": torch.zeros(1, 17, 32),
        },
    )
    path = save({"model": mae, "epoch": 799}, tmp_path / "mae.pth")
    mae_vars, report = cb.convert_vit(path, "mae", 64, 16)
    assert report.missing == [] and report.unexpected == [], report
    assert_same_tree(mae_vars, timm_vars)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("grid", [2, 8])
def test_resample_pos_embed(method, grid):
    rng = np.random.default_rng(1)
    pos = rng.normal(size=(1, 17, 8)).astype(np.float32)
    out = cb.resample_pos_embed(pos, grid, method=method)
    assert out.shape == (1, 1 + grid * grid, 8)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # class row kept as is
    constant = np.concatenate([pos[:, :1], np.broadcast_to(pos[:, 1:2], (1, 16, 8))], 1)
    resized = cb.resample_pos_embed(constant, grid, method=method)
    np.testing.assert_allclose(resized[0, 1:], np.broadcast_to(pos[0, 1], (grid * grid, 8)), 1e-6)
    assert cb.resample_pos_embed(pos, 4, method=method) is pos  # same grid: untouched


def test_bilinear_enlarging_matches_pytorch():
    pos = np.random.default_rng(2).normal(size=(1, 17, 8)).astype(np.float32)
    ours = cb.resample_pos_embed(pos, 8, method="bilinear")[0, 1:].reshape(8, 8, 8)
    grid = torch.from_numpy(pos[0, 1:].reshape(1, 4, 4, 8)).permute(0, 3, 1, 2)
    theirs = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).numpy(), atol=1e-6)


@pytest.mark.parametrize("image_size", [32, 128])
def test_convert_vit_resamples_to_target_grid(tmp_path, image_size):
    state = state_of(randomize(TorchvisionViT(**VIT), nchw(IMAGES)))
    path = save(state, tmp_path / "vit.pth")
    variables, report = cb.convert_vit(path, "torchvision", image_size, 16)
    pos = variables["params"]["pos_embed"]["pos_embed"]
    grid = image_size // 16
    assert pos.shape == (1, 1 + grid * grid, 64) and report.missing == []
    np.testing.assert_array_equal(pos[:, 0], state["encoder.pos_embedding"].numpy()[:, 0])
    images = IMAGES[:1, :32, :32] if image_size == 32 else np.tile(IMAGES[:1], (1, 2, 2, 1))
    out = vit_forward(variables, images)
    assert out.shape == (1, 1 + grid * grid, 64) and np.isfinite(out).all()


# ----------------------------------------------------------------------------- errors


def test_shape_mismatch_is_one_line_conversion_error(tmp_path):
    state = state_of(TimmViT(**VIT))
    path = save(state, tmp_path / "vit.safetensors")
    with pytest.raises(ConversionError) as err:
        cb.convert_vit(path, "timm", 64, patch_size=8)  # a patch-16 checkpoint
    message = str(err.value)
    assert (
        "\n" not in message and "patch_embed.proj.weight" in message and "(8, 8, 3, 64)" in message
    )

    bad = state_of(TimmEfficientNetB0())
    bad["blocks.2.1.conv_dw.weight"] = torch.zeros(240, 1, 3, 3)  # a 3x3 kernel where B0 has 5x5
    with pytest.raises(ConversionError, match=r"blocks\.2\.1\.conv_dw\.weight") as err:
        cb.convert_efficientnet_b0(save(bad, tmp_path / "bad.pth"), "timm")
    assert "\n" not in str(err.value)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    state = state_of(TimmEfficientNetB0())
    state["extra.thing"] = torch.zeros(3)
    variables, report = cb.convert_efficientnet_b0(save(state, tmp_path / "x.pth"), "timm")
    assert report.unexpected == ["extra.thing"]  # classifier/conv_head/bn2 are expected extras
    assert report.missing == []

    del state["blocks.5.3.se.conv_expand.bias"]
    with pytest.raises(ConversionError, match=r"no blocks\.5\.3\.se\.conv_expand\.bias"):
        cb.convert_efficientnet_b0(save(state, tmp_path / "y.pth"), "timm")

    with pytest.raises(ValueError, match="unknown naming"):
        cb.convert_vit(str(tmp_path / "x.pth"), "keras")
    with pytest.raises(ConversionError, match="is this a torchvision ViT"):
        cb.convert_vit(save(state_of(TimmViT(**VIT)), tmp_path / "v.pth"), "torchvision", 64)


# ----------------------------------------------------------------------------- legacy files


class _RunsCode:
    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


def test_legacy_torch_save_reads_like_the_zip_format(tmp_path):
    """Pre-1.6 (non-zip) torch.save files, e.g. efficientnet_pytorch's released weights."""
    from dfrec_jax.pretrained import torch_zip
    from dfrec_jax.pretrained.checkpoint import read_state_dict

    state = state_of(EPEfficientNetB0())
    state["double"] = torch.rand(8, dtype=torch.float64)
    state["view"] = torch.arange(10, dtype=torch.int64)[3:7]  # an offset into a storage
    legacy = str(tmp_path / "legacy.pth")
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    got, want = read_state_dict(legacy), read_state_dict(save(state, tmp_path / "zip.pth"))
    assert got.keys() == want.keys() and len(got) == len(state)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(got["view"], [3, 4, 5, 6])
    variables, report = cb.convert_efficientnet_b0(legacy, "efficientnet_pytorch")
    assert report.missing == [] and report.unexpected == ["double", "view"]

    bad = str(tmp_path / "code.pth")
    torch.save({"x": _RunsCode()}, bad, _use_new_zipfile_serialization=False)
    with pytest.raises(torch_zip.UnsafePickleError, match=r"print, refused"):
        torch_zip.load(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="neither a PyTorch zip checkpoint nor a legacy"):
        torch_zip.load(str(tmp_path / "junk.pth"))
