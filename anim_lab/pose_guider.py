"""Pose guiders: turn pose images into features added to the denoising UNet.

**AnimateAnyone's PoseGuider** (single scale, Moore-AnimateAnyone):

    conv_in(3 -> c0) . SiLU . [conv(ci -> ci) . SiLU . conv(ci -> ci+1, stride 2) . SiLU] x 3
    . conv_out(-> 320, zero init)

Three stride-2 convolutions bring the pose image to the latent grid (1/8), and ``conv_out`` widens it to the
320 channels of the UNet's ``conv_in``, where it is *added once*: ``sample = conv_in(latents) + pose_fea``.
``conv_out`` starts at zero, so an untrained guider leaves the UNet exactly as it was. The 2D convolutions run
per frame, so the official ``pose_guider.pth`` (4-D conv weights, 16 keys) loads by name. **Hallo's
FaceLocator** is the same class with (16, 32, 64, 128) channels (``configs.FACE_LOCATOR_SD15``), fed the
face-region box mask of :func:`face_region_mask` instead of a pose image.

**AniPortrait's PoseGuider** (:class:`PoseGuiderMultiScale`, as released, 167.5M parameters):

    trunk   conv_layers: [conv k3, conv k4 s2] x 3, conv k3, conv k3 (-> 128); each conv . BN . ReLU
    fea[0]  final_proj (1x1, zero init) * scale (learnable, 2.0)           (B*F, 320,  H/8,  W/8)
    fea[1]  conv_layers_1 (k3, k3 s2) . cross_attn1                          (B*F, 320,  H/16, W/16)
    fea[2]  conv_layers_2 (k3, k3 s2) . cross_attn2                          (B*F, 640,  H/32, W/32)
    fea[3]  conv_layers_3 (k3, k3 s2) . cross_attn3                          (B*F, 1280, H/64, W/64)
    fea[4]  conv_layers_4 (k3)        . cross_attn4                          (B*F, 1280, H/64, W/64)

fea[0] is added after the UNet's ``conv_in`` and fea[k] to the main path after down block k. Only fea[0] is
zero at initialisation: fea[1..4] come out of convolutions with He-initialised weights and transformers. As
their input is fea[0] = 0, at initialisation they are constants, the same for every pose: a fresh guider
shifts the UNet without telling it anything yet. BatchNorm makes a frame's features depend on the other frames
of its batch in training mode (and rewrites the running statistics): keep the guider in eval mode when
fine-tuning around it.

The released ``cross_attnK`` blocks are **not cross-attention**. Each is a ``Transformer2DModel`` (16 heads
x 88) built without ``cross_attention_dim``: GroupNorm, 1x1 ``proj_in``, self-attention, feed-forward,
``proj_out``, residual. The reference pose is encoded by the same convolutions and passed as
``encoder_hidden_states``, which a block without ``attn2`` ignores (the author: the released code is "not the
complete version", AniPortrait #170).
Here the reference pose is therefore optional and, in eval mode, not even computed. In training mode it is
run through the convolutions as the reference does, because that updates the BatchNorm running statistics.
``reference_attention=True`` is anim_lab's extension (off by default): each block gets a real cross-attention
(``attn2``/``norm2``, new keys) from the target pose tokens to the reference pose tokens of the same level, as
the paper describes, with a zero-initialised output so that it starts as the released guider.

**Input range.** Both guiders take pose images in [0, 1] (float, (B, 3, F, H, W) or (B, 3, H, W)).
AnimateAnyone trained and runs on [0, 1]. AniPortrait trained on [-1, 1], so the multi-scale guider maps
[0, 1] -> [-1, 1] itself. AniPortrait's *inference* fed [-1, 509] instead (uint8 arrays went through
``2x - 1`` without ``/ 255``); :func:`prepare_pose_images` with ``faithful=True`` builds that tensor and
``forward(..., faithful=True)`` takes it as it is, to reproduce the official outputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from einops import rearrange, repeat
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .landmarks import FACE_OVAL, FaceLandmarks
from .weights import load_into

__all__ = [
    "PoseGuider",
    "PoseGuiderMultiScale",
    "check_pose",
    "prepare_pose_images",
    "FACE_EXPAND_RATIO",
    "face_region_bbox",
    "face_region_mask",
]


# --- input checks and the input range -------------------------------------------------------------
def check_pose(
    pose: torch.Tensor, *, channels: int, multiple: int, faithful: bool = False, name: str = "pose"
) -> None:
    """Raise a clear error unless ``pose`` is a float (B, C, H, W) / (B, C, F, H, W) tensor with ``channels``
    channels, H and W multiples of ``multiple``, and values in [0, 1] (any range with ``faithful=True``)."""
    if not isinstance(pose, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(pose).__name__}; see prepare_pose_images")
    if not pose.is_floating_point():
        raise TypeError(
            f"{name} has dtype {pose.dtype}; the pose guiders take float pose images in [0, 1]: convert "
            "uint8 frames with prepare_pose_images(frames) (or pose.float() / 255)"
        )
    if pose.ndim not in (4, 5):
        raise InputError(f"{name} must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(pose.shape)}")
    if pose.shape[1] != channels:
        raise InputError(
            f"{name} has {pose.shape[1]} channels, the guider expects {channels} (RGB pose images, channels "
            "second): repeat a 1-channel mask to 3 channels, drop an alpha channel"
        )
    h, w = pose.shape[-2:]
    if h % multiple or w % multiple:
        raise InputError(
            f"{name} height and width must be multiples of {multiple} (the guider's deepest feature map is "
            f"1/{multiple} of the image), got {h}x{w}; resize or pad the pose images"
        )
    if not faithful and pose.device.type != "meta":  # a meta tensor has shapes but no values to check
        lo, hi = torch.aminmax(pose.detach())
        if lo < 0 or hi > 1:
            raise InputError(
                f"{name} values must lie in [0, 1], found [{lo.item():.4g}, {hi.item():.4g}]: divide uint8 "
                "images by 255 (prepare_pose_images does), map [-1, 1] images with (x + 1) / 2; "
                "AniPortrait's [-1, 509] inference tensors need faithful=True"
            )


def prepare_pose_images(frames, *, faithful: bool = False) -> torch.Tensor:
    """uint8 pose frames (F, H, W, 3) or one (H, W, 3) image -> a float32 guider input (1, 3, F, H, W).

    ``faithful=False``: ``/ 255`` -> [0, 1], what both guiders take.
    ``faithful=True``: AniPortrait's inference tensor. Its ``VaeImageProcessor(do_normalize=True)`` received
    uint8 numpy arrays, which diffusers does not divide by 255, and applied ``2x - 1``: a drawn value of 200
    becomes 399, black stays -1, the range is [-1, 509]. Feed it with ``forward(..., faithful=True)``.

    Channel order: pass the arrays :func:`anim_lab.landmarks.draw_pose_image` returns, unchanged (the
    drawer's order is the one AniPortrait's guider saw in training and inference).
    """
    arr = torch.as_tensor(np.asarray(frames))
    if arr.dtype != torch.uint8:
        raise TypeError(
            f"pose frames must be uint8 (0-255), got {arr.dtype}; a [0, 1] float tensor needs no prep"
        )
    if arr.ndim == 3:
        arr = arr[None]  # (H, W, 3) -> (1, H, W, 3)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InputError(f"pose frames must be (F, H, W, 3) or (H, W, 3), got shape {tuple(arr.shape)}")
    x = rearrange(arr.float(), "f h w c -> 1 c f h w")  # (F, H, W, 3) -> (1, 3, F, H, W)
    return x * 2 - 1 if faithful else x / 255


# --- AnimateAnyone (and Hallo's FaceLocator) ------------------------------------------------------
class PoseGuider(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """AnimateAnyone's single-scale guider; with ``configs.FACE_LOCATOR_SD15`` Hallo's FaceLocator."""

    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 3,
        block_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        conditioning_embedding_channels: int = 320,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(
            block_out_channels[-1], conditioning_embedding_channels, kernel_size=3, padding=1
        )
        nn.init.zeros_(self.conv_out.weight)  # zero init: the UNet starts unchanged
        nn.init.zeros_(self.conv_out.bias)
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        """pose: (B, 3, F, H, W) video or (B, 3, H, W) image in [0, 1] -> (B, 320, F, H/8, W/8) or
        (B, 320, H/8, W/8)."""
        check_pose(pose, channels=self.config.conditioning_channels, multiple=self.downsample_factor)
        video = pose.ndim == 5
        if video:
            num_frames = pose.shape[2]
            pose = rearrange(pose, "b c f h w -> (b f) c h w")  # (B, 3, F, H, W) -> (B*F, 3, H, W)
        x = F.silu(self.conv_in(pose))
        for conv in self.blocks:
            x = F.silu(conv(x))  # every second conv halves H and W
        x = self.conv_out(x)  # (B*F, 320, H/8, W/8)
        if video:
            x = rearrange(x, "(b f) c h w -> b c f h w", f=num_frames)
        return x


# --- AniPortrait ----------------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=kernel_size, stride=stride, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class PoseGuiderMultiScale(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """AniPortrait's multi-scale PoseGuider as released (its ``pose_guider.pth`` keys: 184 with BN buffers).

    Args:
        conditioning_channels: channels of the pose image (3).
        trunk_channels: the trunk's widths (16, 32, 64, 128): three k4/s2 downsamplings, a k3 to the last.
        block_out_channels: the denoising UNet's ``block_out_channels``; the features have channels
            (c0, c0, c1, c2, c3), the widths of the UNet after ``conv_in`` and after each down block.
        num_attention_heads, attention_head_dim, norm_num_groups: of the four ``Transformer2DModel`` blocks
            (16, 88, 32 as released: ``proj_in`` widens every level to 1408 channels).
        reference_attention: anim_lab's extension, a real cross-attention to the reference pose (off: as
            released).
    """

    num_levels = 5

    @register_to_config
    def __init__(
        self,
        conditioning_channels: int = 3,
        trunk_channels: tuple[int, ...] = (16, 32, 64, 128),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        norm_num_groups: int = 32,
        reference_attention: bool = False,
    ):
        super().__init__()
        if len(trunk_channels) != 4 or len(block_out_channels) != 4:
            raise InputError(
                "AniPortrait's guider has 4 trunk widths and serves a UNet with 4 down blocks; got "
                f"trunk_channels={trunk_channels}, block_out_channels={block_out_channels}"
            )
        self.conditioning_channels = conditioning_channels
        self.reference_attention = reference_attention
        c = (conditioning_channels, *trunk_channels)
        trunk = []
        for i in range(3):  # 8x down: k3 at the current width, then k4/s2 to the next
            trunk += _conv_bn_relu(c[i], c[i]) + _conv_bn_relu(c[i], c[i + 1], kernel_size=4, stride=2)
        trunk += _conv_bn_relu(c[3], c[3]) + _conv_bn_relu(c[3], c[4])
        self.conv_layers = nn.Sequential(*trunk)  # convs at 0, 3, ..., 21; BNs at 1, 4, ..., 22
        b = block_out_channels
        self.final_proj = nn.Conv2d(c[4], b[0], kernel_size=1)
        self.conv_layers_1 = nn.Sequential(*_conv_bn_relu(b[0], b[0]), *_conv_bn_relu(b[0], b[0], stride=2))
        self.conv_layers_2 = nn.Sequential(*_conv_bn_relu(b[0], b[0]), *_conv_bn_relu(b[0], b[1], stride=2))
        self.conv_layers_3 = nn.Sequential(*_conv_bn_relu(b[1], b[1]), *_conv_bn_relu(b[1], b[2], stride=2))
        self.conv_layers_4 = nn.Sequential(*_conv_bn_relu(b[2], b[3]))
        self.feature_channels = (b[0], b[0], b[1], b[2], b[3])
        for k, ch in enumerate(self.feature_channels[1:], start=1):
            attn = Transformer2DModel(
                num_attention_heads=num_attention_heads,
                attention_head_dim=attention_head_dim,
                in_channels=ch,
                norm_num_groups=norm_num_groups,
                cross_attention_dim=ch if reference_attention else None,  # None: no attn2, as released
            )
            setattr(self, f"cross_attn{k}", attn)
        self._init_weights()
        self.scale = nn.Parameter(torch.tensor([2.0]))  # multiplies fea[0]
        self.downsample_factor = 64

    def _init_weights(self) -> None:
        """As the reference: He-normal convolutions with zero biases, a zero ``final_proj``; with the
        extension, a zero cross-attention output (so it starts as the released guider)."""
        for seq in self._level_convs(with_trunk=True):
            for m in seq:
                if isinstance(m, nn.Conv2d):
                    fan_in = m.kernel_size[0] * m.kernel_size[1] * m.in_channels
                    nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)
        if self.reference_attention:
            for attn in self._attentions():
                out = attn.transformer_blocks[0].attn2.to_out[0]
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def _level_convs(self, with_trunk: bool = False) -> list[nn.Sequential]:
        convs = [self.conv_layers_1, self.conv_layers_2, self.conv_layers_3, self.conv_layers_4]
        return [self.conv_layers, *convs] if with_trunk else convs

    def _attentions(self) -> list[Transformer2DModel]:
        return [self.cross_attn1, self.cross_attn2, self.cross_attn3, self.cross_attn4]

    def forward(
        self, pose: torch.Tensor, ref_pose: torch.Tensor | None = None, *, faithful: bool = False
    ) -> list[torch.Tensor]:
        """pose (B, 3, F, H, W) or (B, 3, H, W) in [0, 1]; ref_pose (B or 1, 3, H, W) in [0, 1] or None.

        Returns five features, (B, C_k, F, H/s_k, W/s_k) (no F for image input) with C =
        ``feature_channels`` and s = (8, 16, 32, 64, 64). ``faithful=True``: pose and ref_pose are
        AniPortrait's [-1, 509] inference tensors (:func:`prepare_pose_images` with ``faithful=True``), used
        as they are.
        """
        check_pose(
            pose, channels=self.conditioning_channels, multiple=self.downsample_factor, faithful=faithful
        )
        video = pose.ndim == 5
        batch = pose.shape[0]
        num_frames = pose.shape[2] if video else 1
        if ref_pose is not None:
            check_pose(
                ref_pose, channels=self.conditioning_channels, multiple=1, faithful=faithful, name="ref_pose"
            )
            if (
                ref_pose.ndim != 4
                or ref_pose.shape[0] not in (1, batch)
                or ref_pose.shape[-2:] != pose.shape[-2:]
            ):
                raise InputError(
                    f"ref_pose must be one pose image per video, (B or 1, 3, H, W) = ({batch} or 1, 3, "
                    f"{pose.shape[-2]}, {pose.shape[-1]}) like the target poses, got "
                    f"{tuple(ref_pose.shape)}; "
                    "draw the reference landmarks at the size of the pose video"
                )
        elif self.reference_attention:
            raise InputError("reference_attention=True attends to the reference pose: pass ref_pose")

        x = rearrange(pose, "b c f h w -> (b f) c h w") if video else pose  # -> (B*F, 3, H, W)
        # The reference computes the reference pose's features only to ignore them; they matter only for the
        # extension, or in training mode, where they move the BatchNorm running statistics.
        ref = ref_pose if ref_pose is not None and (self.reference_attention or self.training) else None
        if not faithful:  # [0, 1] -> [-1, 1], the range AniPortrait trained with
            x = x * 2 - 1
            ref = None if ref is None else ref * 2 - 1

        x = self.final_proj(self.conv_layers(x)) * self.scale  # (B*F, 3, H, W) -> (B*F, C0, H/8, W/8)
        features = [x]
        if ref is not None:
            ref = self.final_proj(self.conv_layers(ref)) * self.scale  # (B_ref, 3, H, W) -> (B_ref, C0, ...)
        for convs, attn in zip(self._level_convs(), self._attentions(), strict=True):
            x = convs(x)  # (B*F, C_in, h, w) -> (B*F, C, h/2, w/2) (level 4: same size)
            context = None
            if ref is not None:
                ref = convs(ref)  # the same convolutions (and BatchNorm layers) on the reference pose
                if self.reference_attention:
                    tokens = rearrange(ref, "b c h w -> b (h w) c").expand(batch, -1, -1)  # (B, h*w, C)
                    context = repeat(tokens, "b n c -> (b f) n c", f=num_frames)  # -> (B*F, h*w, C)
            x = attn(x, encoder_hidden_states=context, return_dict=False)[
                0
            ]  # (B*F, C, h, w), residual inside
            features.append(x)
        if video:
            features = [rearrange(f, "(b f) c h w -> b c f h w", b=batch) for f in features]
        return features

    def load_weights(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """AniPortrait's ``pose_guider.pth`` (184 keys), strictly. With ``reference_attention`` the
        extension's ``attn2``/``norm2`` keys may be absent; they keep their initialisation (a zero output)."""
        extension = (".attn2.", ".norm2.") if self.reference_attention else ()
        load_into(self, state_dict, ignore_missing=extension, assign=assign, what="pose guider checkpoint")


# --- Hallo's face locator input -------------------------------------------------------------------
FACE_EXPAND_RATIO = 1.2  # Hallo's face_expand_ratio (configs/inference/default.yaml)
SILHOUETTE_IDS = FACE_OVAL[:-1]  # Hallo's silhouette_ids: the 36 points of the face oval


def _expand(lo: float, hi: float, ratio: float, size: int) -> tuple[int, int]:
    """Hallo's ``expand_region`` on one axis: grow [lo, hi] about its floored centre, shift it inside."""
    mid = (lo + hi) // 2
    half = ((hi - lo) * ratio) // 2
    lo, hi = mid - half, mid + half
    if lo < 0:
        hi, lo = hi - lo, 0.0
    if hi > size:
        lo, hi = lo - (hi - size), float(size)
    # A box wider than the image ends with lo < 0; Hallo's slice would then wrap around. Clamp instead.
    return max(round(lo), 0), round(hi)


def face_region_bbox(
    landmarks, height: int, width: int, expand_ratio: float = FACE_EXPAND_RATIO, ids=SILHOUETTE_IDS
) -> tuple[int, int, int, int]:
    """Hallo's face box ``(x0, x1, y0, y1)`` (pixel slices ``[y0:y1, x0:x1]``): the bounding box of the
    face-oval landmarks (or of the landmarks ``ids``: Hallo's lip box, ``anim_lab.hallo``), rounded, grown
    ``expand_ratio`` times about its centre and shifted into the image (Hallo's ``expand_region``).

    ``landmarks``: a :class:`~anim_lab.landmarks.FaceLandmarks` or (478, 2) pixel coordinates with integer
    values at pixel centres (anim_lab's convention; Hallo's ``x * width`` is 0.5 more).
    """
    if isinstance(landmarks, FaceLandmarks):
        landmarks = landmarks.pixels
    xy = np.asarray(landmarks, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] < 468 or xy.shape[1] < 2:
        raise InputError(f"landmarks must be (478, 2) face-mesh pixel coordinates, got shape {xy.shape}")
    if expand_ratio <= 0:
        raise InputError(f"expand_ratio must be positive, got {expand_ratio}")
    oval = xy[list(ids), :2] + 0.5  # (36, 2) pixel centres -> Hallo's x * width coordinates
    lo, hi = np.round(oval.min(0)), np.round(oval.max(0))  # (2,) each, x then y
    x0, x1 = _expand(lo[0], hi[0], expand_ratio, width)
    y0, y1 = _expand(lo[1], hi[1], expand_ratio, height)
    return x0, x1, y0, y1


def face_region_mask(
    landmarks, height: int, width: int, expand_ratio: float = FACE_EXPAND_RATIO
) -> torch.Tensor:
    """Hallo's face-locator input: (3, H, W) float32, 1 inside :func:`face_region_bbox`, 0 outside.

    Hallo saves the box as a grey PNG, reads it back as RGB and ``ToTensor``s it: three equal channels in
    {0, 1}. Repeat it over the frames for the guider: ``repeat(mask, "c h w -> b c f h w", b=1, f=F)``.
    """
    x0, x1, y0, y1 = face_region_bbox(landmarks, height, width, expand_ratio)
    mask = torch.zeros(3, height, width)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask
