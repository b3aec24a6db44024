"""Hallo's parts: audio and identity tokens, the audio modules of the denoising UNet, face-region masks,
motion frames, and the ``net.pth`` container.

Hallo (fudan-generative-vision/hallo) is AnimateAnyone driven by speech instead of poses. What it adds:

    wav2vec2 window (B, F, 5, 12, 768) --AudioProjModel--> 32 audio tokens per frame (B, F, 32, 768)
    ArcFace embedding (B, 512)        --ImageProjModel--> 4 identity tokens (B, 4, 768): the attn2 tokens
    face-box mask image               --FaceLocator (a PoseGuider)--> added after conv_in
    landmarks --face_region_masks--> full / face / lip maps at every UNet level (latent/1, /2, /4, /8)
    in every cross-attention place of the denoising UNet, after the spatial transformer and before the
    motion module, an audio module:
        x = x + attn1(norm1(x))                                      self-attention
        n = norm2(x)
        x = x + s_full * conv_full(attn2_0(n, audio) * m_full)      three cross-attentions to the audio
              + s_face * conv_face(attn2_1(n, audio) * m_face)      tokens of the frame, each masked by its
              + s_lip  * conv_lip (attn2_2(n, audio) * m_lip)       region and sent through a zero-init 1x1
        x = x + ff(norm3(x))                                         conv; s = motion_scale
    motion frames: the ReferenceNet encodes [reference, motion_1, motion_2] per video; the motion frames'
        attn1 inputs are prepended along time before each motion module, then sliced off.

The UNet side lives in ``anim_lab.unet`` (``VideoUNet(..., audio_kwargs=AUDIO_MODULES_SD15)`` builds the
``audio_modules`` lists; its forward takes ``audio_tokens``, ``audio_masks``, ``motion_scale`` and
``motion_frame_features``). Key names follow ``net.pth`` so it loads strictly
(``anim_lab.weights.load_official_hallo``).

How the audio modules hook into the UNet: they are modules of the UNet (``down_blocks.k.audio_modules.j``
etc., the names of ``net.pth``), called by ``VideoUNet``'s explicit walk between the spatial transformer and
the motion module; their attentions are diffusers ``Attention`` modules with processors (listed in
``attn_processors``, replaceable by name). No forward is patched; without ``audio_kwargs`` they do not exist.

``faithful=True`` (everywhere: False by default) reproduces two deviations of the reference code:
- the token-repeat quirk (``reference_unet_tokens``): the ReferenceNet's cross-attention tokens are tiled
  (``tokens.repeat(S, 1, 1)``) over the [reference, motion frames] images instead of repeated per video, so
  under CFG the images ``[r, m1, m2, r, m1, m2]`` get ``[u, c, u, c, u, c]``;
- in ``VideoUNet.forward(..., faithful=True)``: the motion modules of the blocks without spatial attention
  (down block 3, up block 0) are skipped. Hallo's inference enables gradient checkpointing and keeps the
  model in training mode (``scripts/inference.py``); the checkpointed branch of ``DownBlock3D`` /
  ``UpBlock3D`` runs the resnets only (hallo#99, hallo#140). The same branch is what makes its cross-attention
  blocks use the motion frames and ``motion_scale`` at all (the other branch drops both), so the default here
  is that branch with every motion module run. The ReferenceNet's checkpointed 2D blocks compute the same
  as their plain branch.

Other differences, not switchable: Hallo assumes square latents (``int(sz ** 0.5)`` in the audio block,
``d1=hidden_states.size(-1)`` for the motion frames) and crashes otherwise; here any H x W works (equal
for squares). Hallo's fallback of 4 zero motion frames when the bank is empty (dead code at inference,
hallo#99) is not reproduced: without ``motion_frame_features`` the motion modules see the clip only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from einops import rearrange, repeat
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .pose_guider import SILHOUETTE_IDS, face_region_bbox

__all__ = [
    "AUDIO_MODULES_SD15",
    "AUDIO_PROJ_SD15",
    "IMAGE_PROJ_SD15",
    "REGIONS",
    "LIP_IDS",
    "SILHOUETTE_IDS",
    "AudioProjModel",
    "ImageProjModel",
    "AudioTransformerBlock",
    "AudioModule",
    "audio_module_places",
    "FaceRegionMasks",
    "region_box",
    "gaussian_blur",
    "face_region_masks",
    "reference_unet_tokens",
    "split_motion_bank",
    "Segment",
    "segments",
    "HalloNet",
]

# Hallo's released sizes (configs/inference/default.yaml, scripts/inference.py).
AUDIO_MODULES_SD15 = dict(audio_attention_dim=768, zero_initialize=True)
AUDIO_PROJ_SD15 = dict(
    seq_len=5, blocks=12, channels=768, intermediate_dim=512, output_dim=768, context_tokens=32
)
IMAGE_PROJ_SD15 = dict(cross_attention_dim=768, clip_embeddings_dim=512, clip_extra_context_tokens=4)

REGIONS = ("full", "face", "lip")  # attn2_0 / attn2_1 / attn2_2, zero_conv_full / _face / _lip

# mediapipe face-mesh ids Hallo takes its boxes from (hallo/utils/util.py).
LIP_IDS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375)


# ------------------------------------------------------------------------------------------------------------
# 1. Tokens: audio and identity.
# ------------------------------------------------------------------------------------------------------------


class AudioProjModel(ModelMixin, ConfigMixin):
    """A frame's audio window -> its cross-attention tokens (Hallo's ``AudioProjModel``).

    forward(window (B, F, seq_len, blocks, channels)) -> (B, F, context_tokens, output_dim):
        flatten seq_len*blocks*channels (5*12*768 = 46080) -> Linear 512 -> ReLU -> Linear 512 -> ReLU
        -> Linear context_tokens*output_dim -> (context_tokens, output_dim) -> LayerNorm.
    The window is ``anim_lab.audio.hallo_window(hallo_audio_features(...)[0])`` (frames i-2..i+2, clamped).

    **Unconditional audio** (CFG, and Hallo's audio dropout in training) is zeros *after* this projection
    (``uncond``), not the projection of zeros: the pipeline does ``torch.zeros_like(audio_tokens)``.
    """

    @register_to_config
    def __init__(
        self,
        seq_len: int = 5,
        blocks: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
    ):
        super().__init__()
        self.proj1 = nn.Linear(seq_len * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, audio_window: torch.Tensor) -> torch.Tensor:
        c = self.config
        want = (c.seq_len, c.blocks, c.channels)
        if audio_window.ndim != 5 or tuple(audio_window.shape[2:]) != want:
            raise InputError(
                f"AudioProjModel takes audio windows (B, F, {', '.join(map(str, want))}); "
                f"got {tuple(audio_window.shape)}"
            )
        frames = audio_window.shape[1]
        x = rearrange(audio_window, "b f w l c -> (b f) (w l c)")  # (B, F, 5, 12, 768) -> (B*F, 46080)
        x = torch.relu(self.proj1(x))  # (B*F, 512)
        x = torch.relu(self.proj2(x))  # (B*F, 512)
        x = rearrange(self.proj3(x), "n (t d) -> n t d", t=c.context_tokens)  # (B*F, 32, 768)
        return rearrange(self.norm(x), "(b f) t d -> b f t d", f=frames)  # (B, F, 32, 768)

    @staticmethod
    def uncond(audio_tokens: torch.Tensor) -> torch.Tensor:
        """The unconditional audio tokens: zeros of the projected tokens' shape (Hallo's pipeline)."""
        return torch.zeros_like(audio_tokens)


class ImageProjModel(ModelMixin, ConfigMixin):
    """An identity embedding -> ``clip_extra_context_tokens`` cross-attention tokens (IP-Adapter's projection,
    Hallo's ``ImageProjModel``): Linear(E -> K*D) -> (K, D) -> LayerNorm(D).

    forward(embeds (B, E)) -> (B, K, D); Hallo: E = 512, K = 4, D = 768.

    Hallo feeds InsightFace's ArcFace embedding (glintr100, 512-d) of the largest face, a zero embedding when
    no face is found. InsightFace and its weights are not available here: the toy models feed their frozen
    image encoder's embedding instead (``clip_embeddings_dim`` = its width), while this 512-d path stays
    buildable and loadable from ``net.pth``.

    **Unconditional tokens** are the projection of a zero embedding (``uncond``), not zero tokens: the bias
    and the LayerNorm make them nonzero.
    """

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int = 768,
        clip_embeddings_dim: int = 512,
        clip_extra_context_tokens: int = 4,
    ):
        super().__init__()
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        c = self.config
        if embeds.ndim != 2 or embeds.shape[1] != c.clip_embeddings_dim:
            raise InputError(
                f"ImageProjModel takes embeddings (B, {c.clip_embeddings_dim}); got {tuple(embeds.shape)}"
            )
        x = rearrange(self.proj(embeds), "b (k d) -> b k d", k=c.clip_extra_context_tokens)  # (B, 4, 768)
        return self.norm(x)

    def uncond(self, batch: int = 1) -> torch.Tensor:
        """The unconditional identity tokens (batch, K, D): the projected zero embedding."""
        p = self.proj.weight
        return self(torch.zeros(batch, self.config.clip_embeddings_dim, device=p.device, dtype=p.dtype))


# ------------------------------------------------------------------------------------------------------------
# 2. The audio modules of the denoising UNet.
# ------------------------------------------------------------------------------------------------------------


class AudioTransformerBlock(nn.Module):
    """Hallo's ``AudioTemporalBasicTransformerBlock``: self-attention, three masked cross-attentions to the
    audio tokens, feed-forward. Its attentions are diffusers ``Attention`` modules, so they show in
    ``attn_processors`` and take any processor (e.g. LoRA) like the UNet's own.

    forward(x (N, HW, C), audio_tokens (N, T, D), masks: 3 x (N, HW, 1) in ``REGIONS`` order, size (h, w),
    motion_scale: 3 weights) -> (N, HW, C), N = videos*frames.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int,
        zero_initialize: bool = True,
    ):
        super().__init__()

        def attention(cross: int | None) -> Attention:
            return Attention(
                query_dim=dim,
                cross_attention_dim=cross,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                bias=False,
            )

        # state-dict order of net.pth: zero convs, attn1, norm1, attn2_{0,1,2}, norm2, ff, norm3
        self.zero_conv_full = nn.Conv2d(dim, dim, kernel_size=1)
        self.zero_conv_face = nn.Conv2d(dim, dim, kernel_size=1)
        self.zero_conv_lip = nn.Conv2d(dim, dim, kernel_size=1)
        if zero_initialize:  # a new audio module leaves the UNet's output as it was
            for conv in self.zero_convs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.attn1 = attention(None)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2_0 = attention(cross_attention_dim)  # full (the background outside the face)
        self.attn2_1 = attention(cross_attention_dim)  # face without the lips
        self.attn2_2 = attention(cross_attention_dim)  # lips
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    @property
    def zero_convs(self) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
        return self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        size: tuple[int, int],
        motion_scale=(1.0, 1.0, 1.0),
    ) -> torch.Tensor:
        height, width = size
        x = self.attn1(self.norm1(hidden_states)) + hidden_states  # (N, HW, C) self-attention
        n = self.norm2(x)
        added = 0
        for attn, conv, mask, scale in zip(
            (self.attn2_0, self.attn2_1, self.attn2_2), self.zero_convs, masks, motion_scale, strict=True
        ):
            y = attn(n, encoder_hidden_states=audio_tokens) * mask  # (N, HW, C) * (N, HW, 1)
            y = rearrange(y, "n (h w) c -> n c h w", h=height, w=width)  # a 1x1 conv over the map
            y = rearrange(conv(y), "n c h w -> n (h w) c")
            added = added + scale * y
        x = added + x  # Hallo: s0*full + s1*face + s2*lip + x
        return self.ff(self.norm3(x)) + x  # feed-forward


class AudioModule(nn.Module):
    """One audio module (Hallo's ``Transformer3DModel(use_audio_module=True)``): GroupNorm -> 1x1 proj_in ->
    :class:`AudioTransformerBlock` -> 1x1 proj_out, plus the residual.

    forward(h (N, C, H, W), audio_tokens (N, T, D), masks 3 x (N, H*W, 1), motion_scale) -> (N, C, H, W).
    ``inner_dim`` may differ from ``in_channels``: Hallo builds the first audio module of a widening down
    block (and those of the up blocks) with the block's *input* width (``net.pth``:
    ``down_blocks.1.audio_modules.0.proj_in.weight (320, 640, 1, 1)``).
    """

    def __init__(
        self,
        in_channels: int,
        inner_dim: int,
        num_attention_heads: int,
        cross_attention_dim: int,
        norm_num_groups: int = 32,
        zero_initialize: bool = True,
    ):
        super().__init__()
        if inner_dim % num_attention_heads:
            raise InputError(f"inner_dim {inner_dim} is not a multiple of {num_attention_heads} heads")
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                AudioTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    inner_dim // num_attention_heads,
                    cross_attention_dim,
                    zero_initialize,
                )
            ]
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio_tokens: torch.Tensor,
        masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        motion_scale=(1.0, 1.0, 1.0),
    ) -> torch.Tensor:
        height, width = hidden_states.shape[-2:]
        x = self.proj_in(self.norm(hidden_states))  # (N, C, H, W) -> (N, C_inner, H, W), per frame
        x = rearrange(x, "n c h w -> n (h w) c")  # (N, HW, C_inner)
        for block in self.transformer_blocks:
            x = block(x, audio_tokens, masks, (height, width), motion_scale)
        x = rearrange(x, "n (h w) c -> n c h w", h=height, w=width)
        return self.proj_out(x) + hidden_states  # (N, C, H, W)


def audio_module_places(unet: nn.Module) -> dict[str, list[tuple[int, int, int, int]]]:
    """Where Hallo puts its audio modules in a (Video/Reference) UNet and their sizes:
    ``{"down_blocks.k" | "mid_block" | "up_blocks.k": [(in_channels, inner_dim, heads, norm groups), ...]}``,
    one entry per spatial transformer (every block with cross-attention).

    Hallo's widths (``unet_3d_blocks.py``): down block k builds module j with its loop's ``in_channels``,
    i.e. the input width of resnet j (the block's input width for j = 0, its output width after); the mid
    block with its width; up block k with the block's ``in_channels`` argument (the skip width of its last
    layer, ``block_out_channels[::-1][min(k + 1, n - 1)]``). Heads and groups are the sibling spatial
    transformer's (``attention_head_dim`` heads, ``norm_num_groups``). The SD1.5 layout gives the 16
    modules of ``net.pth``."""
    out_channels = list(unet.unet_kwargs["block_out_channels"])
    reversed_out = out_channels[::-1]
    n = len(out_channels)

    def spec(attn, channels: int, inner: int) -> tuple[int, int, int, int]:
        return (channels, inner, attn.transformer_blocks[0].attn1.heads, attn.norm.num_groups)

    places: dict[str, list[tuple[int, int, int, int]]] = {}
    for k, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None) is not None:
            places[f"down_blocks.{k}"] = [
                spec(a, r.out_channels, r.in_channels)
                for a, r in zip(block.attentions, block.resnets, strict=True)
            ]
    mid = unet.mid_block
    width = mid.resnets[0].out_channels
    places["mid_block"] = [spec(a, width, width) for a in mid.attentions]
    for k, block in enumerate(unet.up_blocks):
        if getattr(block, "attentions", None) is not None:
            skip_in = reversed_out[min(k + 1, n - 1)]
            places[f"up_blocks.{k}"] = [
                spec(a, r.out_channels, skip_in) for a, r in zip(block.attentions, block.resnets, strict=True)
            ]
    return places


# ------------------------------------------------------------------------------------------------------------
# 3. Face-region masks (Hallo's ``get_mask``).
# ------------------------------------------------------------------------------------------------------------


@dataclass
class FaceRegionMasks:
    """Hallo's three region maps at every UNet level: ``full[l]``, ``face[l]``, ``lip[l]`` are (h_l, w_l)
    float32 in [0, 1], level l at 1/2**l of the latent (64, 32, 16, 8 for a 512x512 image).

    - ``lip``: the blurred lip box (x2.0), min-max normalised;
    - ``face``: the blurred face box (x1.2) minus the lip map, clipped at 0 (the face *without* the lips);
    - ``full``: 1 - the blurred face box: the background outside the face (Hallo's "pose" region).
    ``box``: the unblurred face box at image size (H, W), the FaceLocator's input (Hallo's
    ``*_face_mask.png``)."""

    full: list[torch.Tensor]
    face: list[torch.Tensor]
    lip: list[torch.Tensor]
    box: torch.Tensor

    def level(self, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(full, face, lip) at one level, in ``REGIONS`` order."""
        return self.full[level], self.face[level], self.lip[level]

    @property
    def num_levels(self) -> int:
        return len(self.full)


def region_box(landmarks, ids, expand_ratio: float, height: int, width: int) -> torch.Tensor:
    """(H, W) float32: 1 inside the bounding box of ``landmarks[ids]`` expanded by ``expand_ratio`` (Hallo's
    ``get_lip_mask`` / ``get_face_mask``), 0 outside. ``landmarks``: (>= 468, 2) pixel (x, y) with integer
    values at pixel centres (``FaceLandmarks.pixels``, ``toy.render``); Hallo's are ``x * width`` of
    mediapipe's normalised coordinates, i.e. pixel edges, so 0.5 is added first."""
    x0, x1, y0, y1 = face_region_bbox(landmarks, height, width, expand_ratio, ids=ids)
    box = torch.zeros(height, width)
    box[y0:y1, x0:x1] = 1.0  # the box is shifted inside the image and clamped at 0 (no wrap-around)
    return box


def _odd_kernel(kernel_64: int, size: int) -> int:
    """Hallo's kernel size (given for a 64-pixel map) scaled to a map of ``size`` pixels, odd, >= 1."""
    k = max(1, round(kernel_64 * size / 64))
    return k if k % 2 else k + 1  # 51 and 31 at 64 pixels


_SMALL_GAUSSIAN = {
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def gaussian_blur(image: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> (H, W): OpenCV's ``GaussianBlur(image, (kx, ky), 0)`` (kx along the width): sigma from the
    kernel size (0.3*((k-1)/2 - 1) + 0.8; OpenCV 4's fixed kernels for k = 3, 5, 7 -- OpenCV 5 also
    tabulates 9), a separable normalised kernel, borders reflected without repeating the edge pixel
    (``BORDER_REFLECT_101``, torch's ``reflect``)."""
    kx, ky = kernel_size
    out = image[None, None]  # (1, 1, H, W)
    for k, dim in ((kx, -1), (ky, -2)):
        if k % 2 == 0 or k < 1:
            raise InputError(f"Gaussian kernel sizes must be odd and positive; got {kernel_size}")
        if k == 1:
            continue
        if k in _SMALL_GAUSSIAN:  # OpenCV's fixed kernels for k <= 7 (getGaussianKernel, sigma <= 0)
            w = torch.tensor(_SMALL_GAUSSIAN[k], dtype=torch.float64)
        else:
            sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
            t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
            w = torch.exp(-(t**2) / (2 * sigma**2))
        w = (w / w.sum()).to(image.dtype)
        pad = k // 2
        if dim == -1:
            out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="reflect"), w.view(1, 1, 1, k))
        else:
            out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="reflect"), w.view(1, 1, k, 1))
    return out[0, 0]


def _min_max(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def face_region_masks(
    landmarks,
    height: int,
    width: int,
    *,
    num_levels: int = 4,
    latent_factor: int = 8,
    face_expand_ratio: float = 1.2,
    lip_expand_ratio: float = 2.0,
    face_kernel: int = 51,
    lip_kernel: int = 31,
) -> FaceRegionMasks:
    """Hallo's ``get_mask`` + ``ImageProcessor.preprocess`` on one image's landmarks -> ``FaceRegionMasks``.

    1. boxes at image size: lips (``LIP_IDS``) x ``lip_expand_ratio``, face silhouette (``SILHOUETTE_IDS``)
       x ``face_expand_ratio``;
    2. each resized (bilinear, OpenCV's ``INTER_LINEAR``: no antialiasing) to the latent size
       (H/8, W/8), blurred (Gaussian, kernels 51 / 31 for a 64-pixel map, scaled with the map), min-max
       normalised to [0, 1];
    3. lip = blurred lips; face = blurred face - lip, clipped at 0; full = 1 - blurred face;
    4. each map resized (bilinear with antialiasing, as PIL does) to every level (h_l, w_l), h_{l+1} =
       ceil(h_l / 2) -- the UNet's sizes.

    Differences from the reference code, on purpose: Hallo writes every step to a uint8 PNG (rounding to
    1/255, ``astype(uint8)`` truncation of the background), always resizes to a 64x64 square and its levels to
    squares of the image *height* / 8, 16, 32, 64 (non-square images are squeezed); here the maps stay float
    and follow the image's aspect ratio. For a 512x512 image the sizes and kernels are Hallo's.
    """
    if height % latent_factor or width % latent_factor:
        raise InputError(f"height and width must be multiples of {latent_factor}; got {height}x{width}")
    box_face = region_box(landmarks, SILHOUETTE_IDS, face_expand_ratio, height, width)
    box_lip = region_box(landmarks, LIP_IDS, lip_expand_ratio, height, width)
    h, w = height // latent_factor, width // latent_factor

    def blurred(box: torch.Tensor, kernel_64: int) -> torch.Tensor:
        small = F.interpolate(box[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        kernel = (_odd_kernel(kernel_64, w), _odd_kernel(kernel_64, h))
        return _min_max(gaussian_blur(small, kernel))  # (h, w) in [0, 1]

    face_blur, lip = blurred(box_face, face_kernel), blurred(box_lip, lip_kernel)
    maps = {"full": 1.0 - face_blur, "face": (face_blur - lip).clamp(min=0.0), "lip": lip}
    levels: dict[str, list[torch.Tensor]] = {name: [] for name in REGIONS}
    size = (h, w)
    for _ in range(num_levels):
        for name in REGIONS:
            m = maps[name]
            if tuple(m.shape) != size:
                m = F.interpolate(m[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
            levels[name].append(m)
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    return FaceRegionMasks(levels["full"], levels["face"], levels["lip"], box_face)


# ------------------------------------------------------------------------------------------------------------
# 4. Motion frames.
# ------------------------------------------------------------------------------------------------------------


def reference_unet_tokens(
    tokens: torch.Tensor, images_per_video: int, faithful: bool = False
) -> torch.Tensor:
    """The ReferenceNet's cross-attention tokens for ``images_per_video`` images per video.

    The ReferenceNet runs on V videos x S images ``[ref, motion_1, motion_2]`` laid out video by video
    (``(v s)``); ``tokens`` (V, N, D) holds one set per video (under CFG: ``[uncond ; cond]``).
    Correct: each video's images get its tokens, ``(v s)`` -> [u, u, u, c, c, c].
    ``faithful=True``: the reference code's ``encoder_hidden_states.repeat(S, 1, 1)`` (its TODO "this
    repeat needs more thought") tiles them, ``(s v)`` -> [u, c, u, c, u, c]: under CFG the unconditional
    video's first motion frame is encoded with the conditional tokens and the reverse. Without CFG and
    with one video both agree.
    """
    if tokens.ndim != 3:
        raise InputError(f"tokens must be (V, N, D); got {tuple(tokens.shape)}")
    if faithful:
        return repeat(tokens, "v n d -> (s v) n d", s=images_per_video)  # tokens.repeat(S, 1, 1)
    return repeat(tokens, "v n d -> (v s) n d", s=images_per_video)


def split_motion_bank(
    entries: dict[str, torch.Tensor], images_per_video: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A bank written from V videos x S images ``[ref, motion_1, ..]`` -> (reference entries, motion frames).

    entries: {attn1 name: (V*S, HW, C)} (``ReferenceBank.entries`` after ``bank.write``).
    Returns ({name: (V, HW, C)}: image 0 of each video, to ``bank.load`` for reference attention;
    {name: (V, S-1, HW, C)}: the motion frames' attn1 inputs, the ``motion_frame_features`` of
    ``VideoUNet.forward``). Hallo reads them the same way: ``"(b s) l c -> b s l c"``, [:, 0] and [:, 1:]."""
    reference, motion = {}, {}
    for name, value in entries.items():
        if value.shape[0] % images_per_video:
            raise InputError(
                f"{name}: the bank holds {value.shape[0]} rows, not a multiple of {images_per_video} images "
                "per video"
            )
        per_video = rearrange(value, "(v s) l c -> v s l c", s=images_per_video)
        reference[name] = per_video[:, 0]
        motion[name] = per_video[:, 1:]
    return reference, motion


@dataclass(frozen=True)
class Segment:
    """One clip of Hallo's clip-by-clip generation: ``frames`` (its frame indices in the whole video) and
    ``motion_frames``: for each motion frame, the index of the generated frame it copies, or -1 for the
    reference image."""

    index: int
    frames: range
    motion_frames: tuple[int, ...]


def segments(num_frames: int, clip_length: int = 16, n_motion_frames: int = 2) -> list[Segment]:
    """Hallo's generation bookkeeping (``scripts/inference.py``): ``num_frames // clip_length`` clips (the
    audio is padded to a multiple of ``clip_length`` beforehand, and the video cut back to the audio's true
    length after), no overlap; clip 0's motion frames are copies of the reference, clip k's the last
    ``n_motion_frames`` generated frames of clip k-1 (in pixels, ``* 2 - 1`` back to [-1, 1])."""
    if clip_length < 1 or n_motion_frames < 0 or n_motion_frames > clip_length:
        raise InputError(
            f"need clip_length >= 1 and 0 <= n_motion_frames <= clip_length; got {clip_length}, "
            f"{n_motion_frames}"
        )
    out = []
    for k in range(num_frames // clip_length):
        start = k * clip_length
        # clip 0: the reference (-1) n times; clip k: the last n frames generated
        motion = (-1,) * n_motion_frames if k == 0 else tuple(range(start - n_motion_frames, start))
        out.append(Segment(k, range(start, start + clip_length), motion))
    return out


# ------------------------------------------------------------------------------------------------------------
# 5. The checkpoint container.
# ------------------------------------------------------------------------------------------------------------


class HalloNet(nn.Module):
    """Hallo's ``Net``: the five trained networks under the names ``net.pth`` uses (``reference_unet.``,
    ``denoising_unet.``, ``face_locator.``, ``imageproj.``, ``audioproj.``). A container for loading and
    counting; it has no forward (the pipeline calls the parts)."""

    def __init__(
        self,
        unet_kwargs: dict,
        motion_kwargs: dict,
        audio_kwargs: dict = AUDIO_MODULES_SD15,
        face_locator_kwargs: dict | None = None,
        image_proj_kwargs: dict = IMAGE_PROJ_SD15,
        audio_proj_kwargs: dict = AUDIO_PROJ_SD15,
    ):
        super().__init__()
        from .configs import FACE_LOCATOR_SD15
        from .pose_guider import PoseGuider
        from .unet import ReferenceUNet, VideoUNet

        self.reference_unet = ReferenceUNet(unet_kwargs)
        self.denoising_unet = VideoUNet(unet_kwargs, motion_kwargs, audio_kwargs=audio_kwargs)
        self.face_locator = PoseGuider(**(face_locator_kwargs or FACE_LOCATOR_SD15))
        self.imageproj = ImageProjModel(**image_proj_kwargs)
        self.audioproj = AudioProjModel(**audio_proj_kwargs)
