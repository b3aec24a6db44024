"""Named presets: the same structures at three sizes.

- ``SD15``: the real Stable Diffusion 1.5 / AnimateAnyone sizes. Build them on the ``meta`` device to see
  shapes, parameter counts and FLOPs with no weights, or load published weights into them
  (``anim_lab.weights``).
- ``TINY``: the same structures, small enough that a forward pass takes milliseconds on a CPU (unit tests).
- ``TOY``: the sizes of the tiny models this project trains on the toy portrait world (filled in by the issues
  that train them).

Each component config is a plain dict of constructor keyword arguments, so ``UNet2DConditionModel(**cfg)``,
``AutoencoderKL(**cfg)`` and ``CLIPVisionConfig(**cfg)`` take it as it is and a reader sees every number.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .errors import InputError

__all__ = ["Preset", "SD15", "TINY", "TOY", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """One size of the whole AnimateAnyone-style system.

    ``unet``: diffusers ``UNet2DConditionModel`` kwargs (the 2D backbone of both the reference and
    denoising UNet).
    ``vae``: diffusers ``AutoencoderKL`` kwargs; its ``scaling_factor`` (the one place it is stored; also
    read as :attr:`vae_scaling_factor`) multiplies latents before the UNet.
    ``image_encoder``: transformers ``CLIPVisionConfig`` kwargs (with ``projection_dim``) for
    ``CLIPVisionModelWithProjection``: its projected embedding is the single cross-attention token.
    ``pose_guider``: ``anim_lab.pose_guider.PoseGuider`` kwargs (AnimateAnyone, single scale).
    ``motion``: ``anim_lab.motion.MotionModule`` kwargs plus where the modules go in the UNet.
    ``height``/``width``/``num_frames``: the default request at this size.
    ``extra``: further components by name (e.g. ``causal_vae``), read with :meth:`get` like the others.
    """

    name: str
    unet: dict
    vae: dict
    image_encoder: dict
    pose_guider: dict
    motion: dict
    height: int
    width: int
    num_frames: int
    extra: dict = field(default_factory=dict)

    COMPONENTS = ("unet", "vae", "image_encoder", "pose_guider", "motion")

    def __post_init__(self):
        clash = set(self.extra) & set(self.COMPONENTS)
        if clash:
            raise InputError(f"preset {self.name!r}: {sorted(clash)} are Preset fields, not extra entries")

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def vae_scaling_factor(self) -> float:
        """The VAE's latent scaling factor, read from ``vae["scaling_factor"]`` (stored only there)."""
        return self.vae["scaling_factor"]

    def get(self, component: str) -> dict:
        """A deep copy of one component's kwargs, safe to modify."""
        if component in self.COMPONENTS:
            return copy.deepcopy(getattr(self, component))
        if component in self.extra:
            return copy.deepcopy(self.extra[component])
        known = [*self.COMPONENTS, *self.extra]
        raise KeyError(f"preset {self.name!r} has no component {component!r}; known: {known}")


# --- Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json, vae/config.json) ----------------
_SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,  # read by diffusers as 8 heads (head dim C/8), a historical naming quirk
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    act_fn="silu",
)

_SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
    scaling_factor=0.18215,
)

# CLIP ViT-L/14 vision tower + visual projection: the image encoder of sd-image-variations / AnimateAnyone.
_SD15_IMAGE_ENCODER = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    num_channels=3,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# AnimateAnyone PoseGuider as used at inference: 3 stride-2 convs (8x down), output 320 channels = UNet
# conv_in width.
_SD15_POSE_GUIDER = dict(
    conditioning_channels=3, block_out_channels=(16, 32, 96, 256), conditioning_embedding_channels=320
)

# Motion modules (AnimateDiff "Vanilla", inference_v2.yaml of Moore-AnimateAnyone / AniPortrait): kwargs of
# one anim_lab.motion.MotionModule plus where they go. resolutions (1, 2, 4, 8) + mid block = 21 modules in
# SD1.5's UNet.
_SD15_MOTION = dict(
    num_attention_heads=8,
    num_transformer_block=1,
    attention_block_types=("Temporal_Self", "Temporal_Self"),
    temporal_position_encoding=True,
    temporal_position_encoding_max_len=32,
    norm_num_groups=32,  # the GroupNorm before proj_in, computed per frame
    zero_initialize=True,  # proj_out = 0: a new motion module leaves the UNet unchanged
    motion_module_resolutions=(1, 2, 4, 8),
    motion_module_mid_block=True,
)

# HunyuanVideo's causal 3D VAE ("884-16c-hy": 8x space, 4x time, 16 latent channels); the same kwargs build
# anim_lab.causal_vae.CausalVAE and diffusers' AutoencoderKLHunyuanVideo. Not part of SD1.5, but the real
# size.
_HUNYUAN_CAUSAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)

SD15 = Preset(
    name="SD15",
    unet=_SD15_UNET,
    vae=_SD15_VAE,
    image_encoder=_SD15_IMAGE_ENCODER,
    pose_guider=_SD15_POSE_GUIDER,
    motion=_SD15_MOTION,
    height=512,
    width=512,
    num_frames=24,
    extra=dict(causal_vae=_HUNYUAN_CAUSAL_VAE),
)

# --- TINY: the same structures, milliseconds on a CPU -------------------------------------------------------
TINY = Preset(
    name="TINY",
    unet=dict(
        _SD15_UNET,
        sample_size=8,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        attention_head_dim=4,  # 4 heads of C/4
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    vae=dict(
        _SD15_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64
    ),
    image_encoder=dict(
        _SD15_IMAGE_ENCODER,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ),
    pose_guider=dict(
        conditioning_channels=3, block_out_channels=(4, 8, 8, 16), conditioning_embedding_channels=32
    ),
    motion=dict(_SD15_MOTION, num_attention_heads=4, norm_num_groups=8),
    height=64,
    width=64,
    num_frames=4,
    extra=dict(
        causal_vae=dict(
            _HUNYUAN_CAUSAL_VAE,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=1.0,
        ),
    ),
)

# --- TOY: the tiny models trained on the toy portrait world (sizes set by the training issues) --------------
TOY = Preset(
    name="TOY",
    unet=dict(
        _SD15_UNET,
        sample_size=16,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=64,
        norm_num_groups=16,
    ),
    # trained by scripts/train_toy_vae.py; 0.82084 = 1 / std of its latents (assets/toy_vae/config.json)
    vae=dict(
        _SD15_VAE,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.82084,  # v2; v1 (kept in the toy animator's folder) had 0.93411
    ),
    # trained by scripts/train_toy_clip.py on 96-px face crops (resize 160, centre crop 96), 8x8 patches of 12
    # px
    image_encoder=dict(
        _SD15_IMAGE_ENCODER,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=96,
        patch_size=12,
        projection_dim=64,
    ),
    pose_guider=dict(
        conditioning_channels=3, block_out_channels=(16, 32, 64, 128), conditioning_embedding_channels=32
    ),
    motion=dict(_SD15_MOTION, num_attention_heads=4, norm_num_groups=16),
    height=128,
    width=128,
    num_frames=16,
    extra=dict(
        # trained by scripts/train_causal_vae.py; assets/toy_causal_vae/config.json holds the measured scaling
        # factor
        causal_vae=dict(
            _HUNYUAN_CAUSAL_VAE,
            block_out_channels=(16, 32, 64, 64),
            layers_per_block=1,
            norm_num_groups=8,
            scaling_factor=1.0,
        ),
    ),
)

PRESETS = {p.name: p for p in (SD15, TINY, TOY)}


def get_preset(name: str | Preset) -> Preset:
    """``get_preset("SD15")`` -> the preset; a Preset passes through."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# --- Pose guiders beyond AnimateAnyone's (kwargs; not Preset fields) ---------------------------------------
# AniPortrait's multi-scale PoseGuider (anim_lab.pose_guider.PoseGuiderMultiScale), as released: 167.5M
# parameters. Its features have the widths of the UNet after conv_in and after each down block, so
# block_out_channels is the UNet's.
POSE_GUIDER_MULTISCALE_SD15 = dict(
    conditioning_channels=3,
    trunk_channels=(16, 32, 64, 128),
    block_out_channels=_SD15_UNET["block_out_channels"],
    num_attention_heads=16,
    attention_head_dim=88,  # Transformer2DModel's defaults: proj_in widens every level to 1408 channels
    norm_num_groups=32,
)
POSE_GUIDER_MULTISCALE_TINY = dict(
    POSE_GUIDER_MULTISCALE_SD15,
    trunk_channels=(4, 8, 8, 16),
    block_out_channels=TINY.unet["block_out_channels"],
    num_attention_heads=2,
    attention_head_dim=8,
    norm_num_groups=TINY.unet["norm_num_groups"],
)
# Hallo's FaceLocator: AnimateAnyone's PoseGuider class with the class-default widths, on a face-box mask.
FACE_LOCATOR_SD15 = dict(
    conditioning_channels=3, block_out_channels=(16, 32, 64, 128), conditioning_embedding_channels=320
)
__all__ += ["POSE_GUIDER_MULTISCALE_SD15", "POSE_GUIDER_MULTISCALE_TINY", "FACE_LOCATOR_SD15"]
