"""The motion module: temporal self-attention across the frames of a video, at every spatial position.

AnimateDiff's "Vanilla" temporal module, as AnimateAnyone / AniPortrait / Hallo use it (21 of them in SD1.5's
UNet, one after each resnet/attention pair). For a feature map of C channels and F frames:

    x                               (B*F, C, H, W)    the per-frame layout the 2D UNet works in
    h = GroupNorm(x)                per frame: statistics over (C/G, H, W) of one frame, never across frames
    h = proj_in(h)                  (B*F, H*W, C)
    for i in 0, 1:                  two temporal self-attentions
        n = LayerNorm_i(h) + PE     (B*H*W, F, C): each spatial position is a sequence of F frames; the
                                    sinusoidal position encoding is added *after* the LayerNorm, so Q, K
                                    and V carry it but the residual stream does not
        h = h + Attention_i(n)
    h = h + FF(LayerNorm(h))        GEGLU feed-forward, inner width 4C
    out = x + proj_out(h)           proj_out starts at zero: a fresh module is the identity

Key names equal the official checkpoints' (``motion_module.pth``, AnimateDiff ``mm_sd_v15_v2.ckpt``):
``temporal_transformer.{norm, proj_in, proj_out, transformer_blocks.0.{attention_blocks.{0,1}.{to_q, to_k,
to_v, to_out.0, pos_encoder.pe}, norms.{0,1}, ff.net.0.proj, ff.net.2, ff_norm}}``: 28 keys per module.

Each temporal attention is a plain diffusers ``Attention``; its processor, ``TemporalAttnProcessor``, does
the frame-axis rearrangement and the position encoding; the UNets select processors by module name
(``VideoUNet.set_attn_processor``), so the motion modules' attentions are never mistaken for spatial ones.

Position-encoding buffers: kept, as persistent buffers ``pos_encoder.pe`` of shape (1, max_len, C), because
the official checkpoints contain them and a strict load should then pass. They are a fixed formula, not
learned; a checkpoint converted to diffusers' layout drops them, and
``anim_lab.weights.fill_position_encodings`` recomputes them (the values are identical).

Differs from diffusers' ``AnimateDiffTransformer3D`` in one place: diffusers reshapes to (B, C, F, H, W)
before its GroupNorm, so its statistics span all frames. That changes the output on the same weights (and
makes it depend on the window length); the per-frame norm here is what the checkpoints were trained with.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from einops import rearrange
from torch import nn

from .configs import SD15, TINY
from .errors import InputError

__all__ = [
    "MOTION_SD15",
    "MOTION_TINY",
    "sinusoidal_position_encoding",
    "PositionalEncoding",
    "TemporalAttnProcessor",
    "temporal_attention",
    "TemporalTransformerBlock",
    "TemporalTransformer",
    "MotionModule",
    "motion_module_kwargs",
]

# Placement + module kwargs live in the presets (anim_lab.configs, ``extra["motion"]``):
# ``motion_module_resolutions`` -- a block at downsampling factor r (1, 2, 4, 8 for the four levels of SD1.5)
# gets motion modules if r is listed; ``motion_module_mid_block`` -- one more in the mid block. SD1.5 layout:
# 4 down blocks x 2 + 1 mid + 4 up blocks x 3 = 21 modules (inference_v2.yaml of Moore-AA/AniPortrait). TINY:
# the same structure for channels 32/64/64/64.
MOTION_SD15 = SD15.get("motion")
MOTION_TINY = TINY.get("motion")

# Keys of a motion dict that place modules in the UNet rather than configure one module.
_PLACEMENT_KEYS = ("motion_module_resolutions", "motion_module_mid_block")


def motion_module_kwargs(motion: dict) -> dict:
    """The kwargs of one ``MotionModule`` from a MOTION_* dict (drops the placement keys)."""
    return {k: v for k, v in motion.items() if k not in _PLACEMENT_KEYS}


def sinusoidal_position_encoding(max_len: int, dim: int) -> torch.Tensor:
    """pe[pos, 2i] = sin(pos / 10000^(2i/dim)), pe[pos, 2i+1] = cos(same); shape (1, max_len, dim)."""
    if dim % 2:
        raise InputError(f"the sinusoidal position encoding needs an even channel count, got {dim}")
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )  # (dim/2,)
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * inv_freq)
    pe[0, :, 1::2] = torch.cos(position * inv_freq)
    return pe


class PositionalEncoding(nn.Module):
    """Adds pe[:F] to a sequence of F frames; ``pe`` is a persistent buffer (it is in the checkpoints)."""

    def __init__(self, dim: int, max_len: int = 32):
        super().__init__()
        self.max_len = max_len
        self.register_buffer("pe", sinusoidal_position_encoding(max_len, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_frames = x.shape[1]
        if num_frames > self.max_len:
            raise InputError(
                f"{num_frames} frames exceed the motion module's position encoding (max_len={self.max_len}); "
                "run longer videos in context windows of at most max_len frames (anim_lab.context)"
            )
        return x + self.pe[:, :num_frames].to(x.dtype)  # (B*HW, F, C) + (1, F, C)


class TemporalAttnProcessor:
    """The attention processor of a motion module's ``Attention``: self-attention along the frame axis.

    ``attn(hidden_states (B*F, HW, C), num_frames=F)``: every spatial position becomes a sequence of F frames,
    gets the sinusoidal position encoding (``attn.pos_encoder``, when present) and runs diffusers'
    ``AttnProcessor2_0`` (torch's scaled_dot_product_attention). ``num_frames`` is an argument of this call,
    not a ``cross_attention_kwargs`` entry of the UNet, so the spatial attentions never see it.
    """

    def __init__(self):
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        if num_frames is None or encoder_hidden_states is not None or attention_mask is not None:
            raise InputError(
                "a temporal attention is self-attention over frames: call it as attn(hidden_states, "
                "num_frames=F), without encoder_hidden_states or attention_mask"
            )
        hw = hidden_states.shape[1]
        # (B*F, HW, C) -> (B*HW, F, C): every spatial position becomes a sequence over frames
        x = rearrange(hidden_states, "(b f) d c -> (b d) f c", f=num_frames)
        if getattr(attn, "pos_encoder", None) is not None:
            x = attn.pos_encoder(x)  # + pe[:F]: queries, keys and values carry the frame index
        x = self.attention(attn, x)  # self-attention over F tokens, (B*HW, F, C)
        return rearrange(x, "(b d) f c -> (b f) d c", d=hw)  # (B*HW, F, C) -> (B*F, HW, C)


def temporal_attention(dim: int, num_attention_heads: int, max_len: int | None) -> Attention:
    """A plain diffusers ``Attention`` (to_q/to_k/to_v without bias, to_out.0), ``TemporalAttnProcessor``
    and, when ``max_len`` is given, a ``pos_encoder`` child: the keys stay ``attention_blocks.i.to_q`` ...
    ``attention_blocks.i.pos_encoder.pe``, as in the official checkpoints."""
    attn = Attention(
        query_dim=dim,
        heads=num_attention_heads,
        dim_head=dim // num_attention_heads,
        bias=False,
        processor=TemporalAttnProcessor(),
    )
    attn.pos_encoder = PositionalEncoding(dim, max_len) if max_len else None
    return attn


class TemporalTransformerBlock(nn.Module):
    """h = h + temporal attention_i(LayerNorm_i(h)) for each attention block, then h += FF(LayerNorm(h))."""

    def __init__(
        self, dim: int, num_attention_heads: int, attention_block_types: tuple[str, ...], max_len: int | None
    ):
        super().__init__()
        for t in attention_block_types:
            if t != "Temporal_Self":
                raise InputError(
                    f"only 'Temporal_Self' attention blocks are supported (as in all AA configs), got {t!r}"
                )
        self.attention_blocks = nn.ModuleList(
            [temporal_attention(dim, num_attention_heads, max_len) for _ in attention_block_types]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in attention_block_types])
        self.ff = FeedForward(dim, activation_fn="geglu")  # net.0.proj: C -> 2*4C, net.2: 4C -> C
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            hidden_states = (
                attention(norm(hidden_states), num_frames=num_frames) + hidden_states
            )  # (B*F, HW, C)
        return self.ff(self.ff_norm(hidden_states)) + hidden_states  # (B*F, HW, C)


class TemporalTransformer(nn.Module):
    """GroupNorm (per frame) -> proj_in -> transformer blocks -> proj_out -> + residual."""

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int,
        num_transformer_block: int,
        attention_block_types: tuple[str, ...],
        max_len: int | None,
        norm_num_groups: int,
    ):
        super().__init__()
        if in_channels % num_attention_heads:
            raise InputError(f"{in_channels} channels do not split into {num_attention_heads} heads")
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, in_channels)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(in_channels, num_attention_heads, attention_block_types, max_len)
                for _ in range(num_transformer_block)
            ]
        )
        self.proj_out = nn.Linear(in_channels, in_channels)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        residual = hidden_states  # (B*F, C, H, W)
        height, width = hidden_states.shape[-2:]
        h = self.norm(hidden_states)  # GroupNorm on (B*F, C, H, W): statistics of each frame alone
        h = rearrange(h, "bf c h w -> bf (h w) c")  # (B*F, C, H, W) -> (B*F, HW, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, num_frames)  # (B*F, HW, C)
        h = self.proj_out(h)
        # (B*F, HW, C) -> (B*F, C, H, W); made contiguous so the convolutions after this module see the usual
        # memory layout (a channels-last view would switch them to other kernels and change the last bits).
        h = rearrange(h, "bf (h w) c -> bf c h w", h=height, w=width).contiguous()
        return h + residual


class MotionModule(nn.Module):
    """One motion module (``VanillaTemporalModule``), holding ``temporal_transformer`` as the checkpoints do.

    forward(hidden_states (B*F, C, H, W), num_frames=F) -> (B*F, C, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 1,
        attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self"),
        temporal_position_encoding: bool = True,
        temporal_position_encoding_max_len: int = 32,
        norm_num_groups: int = 32,
        zero_initialize: bool = True,
    ):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(
            in_channels,
            num_attention_heads,
            num_transformer_block,
            tuple(attention_block_types),
            temporal_position_encoding_max_len if temporal_position_encoding else None,
            norm_num_groups,
        )
        if zero_initialize:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        if hidden_states.ndim != 4 or hidden_states.shape[0] % num_frames:
            raise InputError(
                f"the motion module takes per-frame features (B*F, C, H, W) with B*F a multiple of "
                f"num_frames={num_frames}; got shape {tuple(hidden_states.shape)}"
            )
        return self.temporal_transformer(hidden_states, num_frames)
