"""Pose guiders: turn pose images into features added to the denoising UNet's first feature map.

AnimateAnyone's PoseGuider (single scale), as in Moore-AnimateAnyone:

    conv_in(3 -> c0) . SiLU . [conv(ci -> ci) . SiLU . conv(ci -> ci+1, stride 2) . SiLU] x 3
    . conv_out(-> 320, zero init)

Three stride-2 convolutions bring the pose image to the latent grid (1/8), and ``conv_out`` widens it to the
320 channels of the UNet's ``conv_in``, where it is *added once*: ``sample = conv_in(latents) + pose_fea``.
``conv_out`` starts at zero, so an untrained guider leaves the UNet exactly as it was. The 2D convolutions run
per frame, so the official ``pose_guider.pth`` (4-D conv weights, 16 keys) loads by name.

Input range: [0, 1] pose images (the reference pipeline does not normalise them to [-1, 1]).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

__all__ = ["PoseGuider"]


class PoseGuider(nn.Module):
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
        if pose.ndim not in (4, 5):
            raise ValueError(f"pose must be (B, C, H, W) or (B, C, F, H, W), got shape {tuple(pose.shape)}")
        if pose.shape[1] != self.conv_in.in_channels:
            raise ValueError(
                f"pose has {pose.shape[1]} channels, "
                f"the guider expects {self.conv_in.in_channels} (RGB pose images)"
            )
        h, w = pose.shape[-2:]
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(
                f"pose height and width must be multiples of {self.downsample_factor} "
                f"to land on the latent grid, got {h}x{w}; resize the pose images"
            )
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
