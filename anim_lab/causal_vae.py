"""HunyuanVideo's causal 3D VAE: a video autoencoder that compresses time (x4) as well as space (x8).

Built from one idea, the *causal* 3D convolution: pad k-1 frames in *front* of the clip
(copies of the first frame) and none behind, so output frame t only sees input frames <= t. Stacked with two
stride-2 time downsamplings it maps

    T = 4k + 1 frames  ->  k + 1 latent frames  ->  4k + 1 frames       T_lat = (T - 1) // 4 + 1

The first frame has nothing in front of it: it is encoded *alone* (its own latent, an image latent), and every
later latent summarises 4 new frames. That is why clip lengths are 4k + 1 and why a single image (T = 1) is a
valid video.

    encoder:  conv_in . [resnets . downsample(s_t, 2, 2)] x N . mid(resnet . causal attention . resnet)
              . GroupNorm . SiLU . conv_out -> (mean, logvar) . quant_conv (1x1x1)
    decoder:  post_quant_conv . conv_in . mid . [resnets . upsample(first frame: space only)] x N
              . GroupNorm . SiLU . conv_out

What "causal" does *not* guarantee: every GroupNorm (resnets, ``conv_norm_out``, the attention's
``group_norm``) normalises over all T*H*W positions of a group, so frame statistics leak backwards in time
(chapter 08 measures it).

State-dict keys are those of diffusers' ``AutoencoderKLHunyuanVideo`` (and of the original
``AutoencoderKLCausal3D``), so a checkpoint loads into :class:`CausalVAE` with ``strict=True`` and no
renaming. The config dicts below are plain constructor kwargs accepted by both classes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from .configs import SD15, TINY, TOY
from .errors import InputError
from .tiling import TileSettings, tiled_decode, tiled_encode
from .weights import DIFFUSERS_WEIGHTS, load_checkpoint, load_into

__all__ = [
    "CAUSAL_VAE_HUNYUAN",
    "CAUSAL_VAE_TINY",
    "CAUSAL_VAE_TOY",
    "TOY_ASSET_DIR",
    "CausalConv3d",
    "CausalSelfAttention",
    "CausalVAE",
    "DecoderCausal3D",
    "DownsampleCausal3D",
    "EncoderCausal3D",
    "LatentDistribution",
    "MidBlockCausal3D",
    "ResnetBlockCausal3D",
    "UpsampleCausal3D",
    "check_num_frames",
    "frame_causal_mask",
    "latent_num_frames",
    "sample_num_frames",
]

# --- configs (in anim_lab.configs): kwargs for CausalVAE(**cfg) and diffusers' AutoencoderKLHunyuanVideo
CAUSAL_VAE_HUNYUAN = SD15.get("causal_vae")  # full size: 246.5M parameters
CAUSAL_VAE_TINY = TINY.get("causal_vae")  # unit tests: milliseconds per forward on a CPU
# the toy model trained on toy-world clips (weights in assets/toy_causal_vae/)
CAUSAL_VAE_TOY = TOY.get("causal_vae")

TOY_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "toy_causal_vae"

WEIGHTS_NAME = DIFFUSERS_WEIGHTS[
    0
]  # diffusion_pytorch_model.safetensors (the names live in anim_lab.weights)
CONFIG_NAME = "config.json"


# --- frame counts -------------------------------------------------------------------------------------------
def latent_num_frames(num_frames: int, temporal_compression_ratio: int = 4) -> int:
    """T -> T_lat = (T - 1) // r + 1 (the first frame alone, then one latent per r frames)."""
    return (num_frames - 1) // temporal_compression_ratio + 1


def sample_num_frames(latent_frames: int, temporal_compression_ratio: int = 4) -> int:
    """T_lat -> T = r (T_lat - 1) + 1."""
    return temporal_compression_ratio * (latent_frames - 1) + 1


def check_num_frames(num_frames: int, temporal_compression_ratio: int = 4) -> None:
    """Raise a ValueError unless ``num_frames`` is r*k + 1 (1, 5, 9, 13, 17, ... for r = 4)."""
    r = temporal_compression_ratio
    if num_frames < 1 or (num_frames - 1) % r != 0:
        lower = max(1, (num_frames - 1) // r * r + 1)
        raise InputError(
            f"the causal VAE needs {r}k+1 frames (1, {r + 1}, {2 * r + 1}, {4 * r + 1}, ...), "
            f"got {num_frames}: the first frame is encoded alone and each later latent covers {r} frames. "
            f"Trim the clip to {lower} frames or pad it to {lower + r} (e.g. repeat the last frame)."
        )


# --- building blocks ----------------------------------------------------------------------------------------
class CausalConv3d(nn.Module):
    """A 3D convolution that never looks at future frames.

    Pads (k_t - 1) copies of the first frame in front of the clip and none behind; space is padded
    symmetrically, also by replication (not zeros). ``stride`` in time then gives T_out = (T - 1) // s_t + 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        bias: bool = True,
    ):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, T, H, W) -> (B, C, T + k_t - 1, H + 2 (k_h // 2), W + 2 (k_w // 2)) -> (B, C', T', H', W')
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class DownsampleCausal3D(nn.Module):
    """A strided causal convolution: stride (s_t, 2, 2); T -> (T - 1) // s_t + 1, H -> H / 2.

    No special first-frame path is needed: the front padding repeats frame 0, so output frame 0 sees frame 0
    only. (The original HunyuanVideo class also had an optional ``norm`` applied through a 4-D ``permute``; it
    is off in every released config and would fail on a 5-D video tensor. Chapter 08 runs it.)
    """

    def __init__(self, channels: int, stride: tuple[int, int, int] = (2, 2, 2), kernel_size: int = 3):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, T, H, W) -> (B, C, (T - 1) // s_t + 1, H / s_h, W / s_w)
        return self.conv(x)


class UpsampleCausal3D(nn.Module):
    """Nearest-neighbour upsampling, then a causal convolution (no transposed convolution).

    The first frame is upsampled in space only; frames 1.. are upsampled in time too, so T -> 1 + s_t (T - 1),
    the inverse of the downsampler's frame count.
    """

    def __init__(
        self, channels: int, upsample_factor: tuple[int, int, int] = (2, 2, 2), kernel_size: int = 3
    ):
        super().__init__()
        self.upsample_factor = tuple(upsample_factor)
        self.conv = CausalConv3d(channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[2]
        first, rest = x[:, :, :1], x[:, :, 1:]
        # first frame, in space only:
        # (B, C, 1, H, W) -> (B, C, H, W) -> (B, C, s_h H, s_w W) -> (B, C, 1, s_h H, s_w W)
        first = F.interpolate(
            rearrange(first, "b c 1 h w -> b c h w"), scale_factor=self.upsample_factor[1:], mode="nearest"
        )
        first = rearrange(first, "b c h w -> b c 1 h w")
        if num_frames > 1:
            # other frames: (B, C, T-1, H, W) -> (B, C, s_t (T-1), s_h H, s_w W)
            rest = F.interpolate(rest.contiguous(), scale_factor=self.upsample_factor, mode="nearest")
            x = torch.cat([first, rest], dim=2)  # -> (B, C, 1 + s_t (T-1), s_h H, s_w W)
        else:
            x = first
        return self.conv(x)


class ResnetBlockCausal3D(nn.Module):
    """GroupNorm . SiLU . causal conv . GroupNorm . SiLU . dropout . causal conv, plus a (1x1x1) shortcut.

    The GroupNorms average over (channels of a group) x T x H x W: all frames together.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + residual


def frame_causal_mask(num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """(N, N) boolean mask, N = T * tokens_per_frame: a token of frame i may attend to every token of frames
    <= i."""
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)  # (N,)
    return frame[:, None] >= frame[None, :]  # (N query, N key)


class CausalSelfAttention(nn.Module):
    """Single-head self-attention over all T*H*W positions with a frame-causal mask (the VAE's mid-block
    attention).

    Keys as diffusers' ``Attention``: group_norm, to_q, to_k, to_v, to_out.0. Residual connection included.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        tokens = rearrange(self.group_norm(x), "b c t h w -> b (t h w) c")  # (B, C, T, H, W) -> (B, N, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)  # (B, N, C) each, one head of dim C
        # additive mask: 0 where allowed, -inf on future frames; (N, N) -> (B, 1, N, N) so SDPA takes the same
        # path as diffusers' Attention (a boolean mask gives the same result up to rounding)
        allowed = frame_causal_mask(t, h * w, device=x.device)  # (N, N)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        q, k, v = (rearrange(a, "b n c -> b 1 n c") for a in (q, k, v))  # one head: (B, N, C) -> (B, 1, N, C)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(b, 1, -1, -1))
        out = rearrange(out, "b 1 n c -> b n c")  # (B, 1, N, C) -> (B, N, C)
        out = self.to_out[1](self.to_out[0](out))
        out = rearrange(out, "b (t h w) c -> b c t h w", t=t, h=h, w=w)  # (B, N, C) -> (B, C, T, H, W)
        return x + out


class MidBlockCausal3D(nn.Module):
    """resnet . causal attention . resnet, at the lowest resolution."""

    def __init__(self, channels: int, groups: int = 32, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlockCausal3D(channels, channels, groups), ResnetBlockCausal3D(channels, channels, groups)]
        )
        self.attentions = nn.ModuleList([CausalSelfAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, stride):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(out_channels, stride)]) if stride else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class _UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, factor):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(out_channels, factor)]) if factor else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _block_factors(
    num_blocks: int, spatial_ratio: int, temporal_ratio: int
) -> list[tuple[int, int, int] | None]:
    """Per block: the (t, h, w) down/upsampling factor, or None. Space is halved in the first log2(s) blocks;
    time in the log2(r) blocks just before the last one (so time is compressed late, at low resolution)."""
    n_space, n_time = int(math.log2(spatial_ratio)), int(math.log2(temporal_ratio))
    if 2**n_space != spatial_ratio or 2**n_time != temporal_ratio:
        raise InputError(
            f"compression ratios must be powers of 2, got spatial {spatial_ratio}, temporal {temporal_ratio}"
        )
    if n_space > num_blocks or n_time > num_blocks - 1:
        raise InputError(
            f"{num_blocks} blocks cannot give spatial x{spatial_ratio} and temporal x{temporal_ratio}: "
            f"add entries to block_out_channels"
        )
    factors = []
    for i in range(num_blocks):
        s = 2 if i < n_space else 1
        t = 2 if num_blocks - 1 - n_time <= i < num_blocks - 1 else 1
        factors.append((t, s, s) if (s, t) != (1, 1) else None)
    return factors


class EncoderCausal3D(nn.Module):
    def __init__(
        self,
        in_channels=3,
        out_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
        double_z=True,
    ):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        factors = _block_factors(
            len(block_out_channels), spatial_compression_ratio, temporal_compression_ratio
        )
        chans = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nn.ModuleList(
            [
                _DownBlock(chans[i], chans[i + 1], layers_per_block, norm_num_groups, factors[i])
                for i in range(len(block_out_channels))
            ]
        )
        self.mid_block = MidBlockCausal3D(block_out_channels[-1], norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(
            block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, T, H, W) -> (B, C0, T, H, W)
        x = self.conv_in(x)
        for block in self.down_blocks:  # -> (B, C_last, (T-1)//4 + 1, H/8, W/8)
            x = block(x)
        x = self.mid_block(x)
        # -> (B, 2 * latent_channels, T_lat, H/8, W/8): mean and logvar
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class DecoderCausal3D(nn.Module):
    def __init__(
        self,
        in_channels=16,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(in_channels, rev[0], 3)
        self.mid_block = MidBlockCausal3D(rev[0], norm_num_groups, mid_block_add_attention)
        factors = _block_factors(
            len(block_out_channels), spatial_compression_ratio, temporal_compression_ratio
        )
        chans = [rev[0], *rev]
        self.up_blocks = nn.ModuleList(
            [
                _UpBlock(chans[i], chans[i + 1], layers_per_block + 1, norm_num_groups, factors[i])
                for i in range(len(block_out_channels))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(block_out_channels[0], out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (B, latent_channels, T_lat, h, w) -> (B, C_last, T_lat, h, w)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:  # -> (B, C0, 4 (T_lat - 1) + 1, 8h, 8w)
            x = block(x)
        # -> (B, 3, T, H, W)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


@dataclass
class LatentDistribution:
    """A diagonal Gaussian over latents, from the encoder's (mean, logvar) channels. logvar is clamped to
    [-30, 20]."""

    moments: torch.Tensor  # (B, 2 * C, T_lat, h, w)

    def __post_init__(self):
        self.mean, logvar = self.moments.chunk(2, dim=1)  # (B, C, T_lat, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape,
            generator=generator,
            dtype=self.mean.dtype,
            device=generator.device if generator is not None else self.mean.device,
        )
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over (C, T_lat, h, w): shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3, 4))


# --- the autoencoder ----------------------------------------------------------------------------------------
class CausalVAE(nn.Module):
    """The HunyuanVideo causal 3D VAE. Videos (B, 3, T, H, W) in [-1, 1] with T = 4k + 1 and H, W multiples of
    8.

    ``encode(x) -> LatentDistribution`` and ``decode(z) -> video``; ``scaling_factor`` multiplies latents
    before a diffusion model (and divides them before decoding). Pass ``tiling=TileSettings(...)``
    (``anim_lab.tiling``) to either to process overlapping tiles in space and time and blend them.
    """

    def __init__(
        self,
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
        **unused,
    ):
        super().__init__()
        if act_fn not in ("silu", "swish"):
            raise InputError(f"only act_fn='silu' is implemented, got {act_fn!r}")
        if any(c % norm_num_groups for c in block_out_channels):
            raise InputError(
                f"every block_out_channels entry {tuple(block_out_channels)} must be divisible by "
                f"norm_num_groups={norm_num_groups}"
            )
        extra = set(unused) - {"down_block_types", "up_block_types", "_class_name", "_diffusers_version"}
        if extra:
            raise TypeError(f"CausalVAE got unexpected config keys {sorted(extra)}")
        self.config = dict(
            in_channels=in_channels,
            out_channels=out_channels,
            latent_channels=latent_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            scaling_factor=scaling_factor,
            spatial_compression_ratio=spatial_compression_ratio,
            temporal_compression_ratio=temporal_compression_ratio,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.scaling_factor = scaling_factor
        self.spatial_compression_ratio = spatial_compression_ratio
        self.temporal_compression_ratio = temporal_compression_ratio
        common = dict(
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            spatial_compression_ratio=spatial_compression_ratio,
            temporal_compression_ratio=temporal_compression_ratio,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.encoder = EncoderCausal3D(in_channels, latent_channels, **common)
        self.decoder = DecoderCausal3D(latent_channels, out_channels, **common)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)

    # -- checks ----------------------------------------------------------------------------------------------
    def _check(self, x, channels: int, what: str, spatial_multiple: int, check_frames: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor of shape (B, C, F, H, W), got {type(x).__name__}")
        if x.ndim != 5:
            hint = " (a batch of images? add a frame axis: x.unsqueeze(2))" if x.ndim == 4 else ""
            raise InputError(
                f"{what} must have 5 dimensions (B, C, F, H, W), got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != channels:
            raise InputError(
                f"{what} must have {channels} channels in dim 1 (B, C, F, H, W), got shape "
                f"{tuple(x.shape)}; is the channel axis in the right place?"
            )
        if check_frames:
            check_num_frames(x.shape[2], self.temporal_compression_ratio)
        h, w = x.shape[-2:]
        if h % spatial_multiple or w % spatial_multiple:
            raise InputError(
                f"{what} height and width must be multiples of {spatial_multiple}, got {h}x{w}; "
                f"resize or crop the frames"
            )
        if not x.is_floating_point():
            hint = (
                "; uint8 frames (F, H, W, 3) become model input with anim_lab.vae.images_from_uint8 "
                "(x / 127.5 - 1), then rearrange to (B, 3, F, H, W)"
                if x.dtype == torch.uint8
                else ""
            )
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}{hint}")
        if x.device.type != "meta" and x.numel() and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(
                f"{what} contain {bad} NaN or infinite values; one such value spreads through every "
                f"convolution and normalisation to the whole output: find where they come from (a division "
                f"by zero, an overflow in float16) or replace them (torch.nan_to_num)"
            )

    def _check_video_range(self, x: torch.Tensor) -> None:
        """Videos are in [-1, 1]; values beyond it (by more than rounding) raise, naming [0, 255] data when
        they look like it. A clip in [0, 1] *cannot* be told apart from a legal [-1, 1] clip that has no dark
        pixels, so it passes: map [0, 1] data with 2 x - 1 yourself."""
        if x.device.type == "meta" or not x.numel():
            return
        lo, hi = x.min().item(), x.max().item()
        if lo < -1.001 or hi > 1.001:
            hint = (
                " (they look like [0, 255] pixels: use anim_lab.vae.images_from_uint8, i.e. x / 127.5 - 1)"
                if hi > 2.0 and lo >= -0.001
                else ""
            )
            raise InputError(
                f"video must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}; map [0, 1] data with "
                f"2 * x - 1"
            )

    @staticmethod
    def _check_tiling(tiling) -> None:
        if tiling is not None and not isinstance(tiling, TileSettings):
            raise TypeError(
                f"tiling must be None or an anim_lab.tiling.TileSettings, got {type(tiling).__name__}"
            )

    # -- raw passes (no checks), used by anim_lab.tiling on tiles --------------------------------------------
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, 2 * latent_channels, T_lat, H/8, W/8), no checks, no tiling."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, T_lat, h, w) -> (B, 3, 4 (T_lat - 1) + 1, 8h, 8w), no checks, no tiling."""
        return self.decoder(self.post_quant_conv(z))

    # -- public API ------------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor, tiling: TileSettings | None = None) -> LatentDistribution:
        """Video (B, 3, T, H, W) in [-1, 1] -> posterior over latents (B, C, (T - 1)//4 + 1, H/8, W/8).

        Checked first: shape, a floating-point dtype (float64 or float16 input is cast to the model's dtype;
        uint8 is refused with the conversion to use), finite values, and the range [-1, 1] (values above 1
        raise, naming [0, 255] data when they look like it). What no check can tell: a clip in [0, 1] is a
        legal, if bright, [-1, 1] clip, so it passes; map such data with ``2 * x - 1`` yourself.
        """
        self._check(x, self.config["in_channels"], "video", self.spatial_compression_ratio, True)
        self._check_video_range(x)
        self._check_tiling(tiling)
        x = x.to(self._dtype())
        if tiling is None:
            return LatentDistribution(self.encode_moments(x))
        return LatentDistribution(tiled_encode(self, x, tiling))

    def decode(self, z: torch.Tensor, tiling: TileSettings | None = None) -> torch.Tensor:
        """Latents (B, C, T_lat, h, w) (unscaled: divide by ``scaling_factor`` first) -> video (B, 3,
        4(T_lat-1)+1, 8h, 8w). Latents must be floating point (cast to the model's dtype) and finite."""
        self._check(z, self.config["latent_channels"], "latents", 1, False)
        self._check_tiling(tiling)
        z = z.to(self._dtype())
        if tiling is None:
            return self.decode_latents(z)
        return tiled_decode(self, z, tiling)

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        tiling=None,
    ) -> torch.Tensor:
        posterior = self.encode(x, tiling=tiling)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, tiling=tiling)

    # -- files (diffusers folder layout: config.json + diffusion_pytorch_model.safetensors) ------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "_class_name": "AutoencoderKLHunyuanVideo",
            **self.config,
            "block_out_channels": list(self.config["block_out_channels"]),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_w, tmp_c = folder / (WEIGHTS_NAME + ".tmp"), folder / (CONFIG_NAME + ".tmp")
        save_file(state, str(tmp_w))
        tmp_w.chmod(0o644)  # safetensors creates the file readable by its owner only
        tmp_c.write_text(json.dumps(cfg, indent=2) + "\n")
        tmp_w.replace(folder / WEIGHTS_NAME)
        tmp_c.replace(folder / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path = TOY_ASSET_DIR) -> CausalVAE:
        """Load a diffusers-layout folder (ours, or a converted HunyuanVideo ``vae/`` folder) strictly.

        The weights are read by ``weights.load_checkpoint`` (any of its weight-file names, sharded or not; a
        truncated file raises ``CorruptWeightsError`` naming it) and loaded by ``weights.load_into``, which
        checks every key and shape before touching the model (``KeyMismatchError``). Keys may carry a
        ``vae.`` prefix (a whole-pipeline file)."""
        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not folder.is_dir() or not cfg_path.is_file():
            raise FileNotFoundError(
                f"{folder} must be a folder holding {CONFIG_NAME} and {WEIGHTS_NAME} (diffusers layout); "
                f"for the toy model run scripts/train_causal_vae.py or use the committed "
                f"anim_lab/assets/toy_causal_vae"
            )
        model = cls(**json.loads(cfg_path.read_text()))
        state = load_checkpoint(folder)  # FileNotFoundError naming the expected files when there are none
        state = {k.removeprefix("vae."): v for k, v in state.items()}
        return load_into(model, state, what=f"weight file in {folder}").eval()
