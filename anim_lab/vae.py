"""The VAE: pixels <-> latents, for images and for videos frame by frame.

Every latent diffusion model in this project denoises in the latent space of an ``AutoencoderKL`` (diffusers):

    image (B, 3, H, W) in [-1, 1] --encoder--> N(mean, std^2) over (B, 4, H/8, W/8)
        --x scaling_factor--> latents
    latents / scaling_factor --decoder--> image (B, 3, H, W) in [-1, 1]

- The encoder outputs a *distribution* (a diagonal Gaussian). Training the UNet samples from it; the reference
  image of AnimateAnyone-style pipelines is encoded with the **mean** (no randomness in the condition).
- ``scaling_factor`` makes latents roughly unit variance, like the Gaussian noise the scheduler mixes them
  with. It is measured, not designed: ``1 / std(latents)`` over a dataset. The latent-diffusion authors
  measured it on a batch of images for SD's VAE and got 0.18215 (std ~ 5.49); our toy VAE gets its own factor
  by the same recipe (:func:`scaling_factor_from_latents`), stored as ``scaling_factor`` in its
  ``config.json``.
- Videos ``(B, C, F, H, W)`` go through the 2D VAE one chunk of frames at a time, so memory stays bounded for
  long clips (:func:`encode_video`, :func:`decode_video`).
- :class:`LatentPreview` is a 4 -> 3 linear map fitted by least squares, a cheap way to *look* at latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from einops import rearrange

from .errors import InputError
from .weights import DIFFUSERS_WEIGHTS, resolve_pretrained

__all__ = [
    "TOY_VAE_DIR",
    "build_vae",
    "load_vae",
    "load_toy_vae",
    "images_from_uint8",
    "images_to_uint8",
    "check_images",
    "check_finite",
    "check_video",
    "encode_latent_dist",
    "encode",
    "decode",
    "encode_video",
    "decode_video",
    "scaling_factor_from_latents",
    "LatentPreview",
]

TOY_VAE_DIR = Path(__file__).resolve().parent / "assets" / "toy_vae"


# --- building and loading -----------------------------------------------------------------------------------
def build_vae(config: dict, device: str | torch.device = "cpu") -> AutoencoderKL:
    """An ``AutoencoderKL`` from a kwargs dict (``configs.SD15.vae`` ...). ``device="meta"`` builds shapes
    only."""
    with torch.device(device):
        return AutoencoderKL(**config)


def load_vae(
    path_or_id: str | Path, subfolder: str | None = None, torch_dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a local diffusers folder or a hub id (e.g.
    ``"stabilityai/sd-vae-ft-mse"``).

    A local path that is missing or incomplete gets a FileNotFoundError naming what is missing. A string that
    is not a local path is passed to diffusers as a hub id (which downloads only if the user's machine allows
    it).
    """
    source, kwargs = resolve_pretrained(
        path_or_id, subfolder, "VAE", DIFFUSERS_WEIGHTS, "<stable-diffusion-v1-5>/vae"
    )
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype, **kwargs)
    return vae.eval().requires_grad_(False)


def load_toy_vae() -> AutoencoderKL:
    """The tiny VAE trained on the toy portrait world (``scripts/train_toy_vae.py``), shipped with the
    package."""
    return load_vae(TOY_VAE_DIR)


# --- pixel ranges -------------------------------------------------------------------------------------------
def images_from_uint8(images) -> torch.Tensor:
    """uint8 pictures (..., H, W, 3) (numpy or torch) -> float32 model input (..., 3, H, W) in [-1, 1].

    The one place the [0, 255] -> [-1, 1] map is written: x / 127.5 - 1."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim < 3 or x.shape[-1] != 3:
        raise InputError(
            f"images_from_uint8 takes uint8 pictures (..., H, W, 3), got {x.dtype} {tuple(x.shape)}; "
            "float images are already model input (check their range with check_images)"
        )
    x = rearrange(x, "... h w c -> ... c h w")  # (..., H, W, 3) -> (..., 3, H, W)
    return x.float() / 127.5 - 1.0


def images_to_uint8(images: torch.Tensor):
    """Model output (..., 3, H, W) in [-1, 1] -> uint8 numpy pictures (..., H, W, 3), clamped and rounded."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "... c h w -> ... h w c").cpu().numpy()  # (..., 3, H, W) -> (..., H, W, 3)


# --- input checks -------------------------------------------------------------------------------------------
def _downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise a ValueError if ``x`` holds NaN or infinite values (one of them spreads through the VAE's
    convolutions and GroupNorms to every output value)."""
    if x.device.type != "meta" and x.numel() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(
            f"{name} contain {bad} NaN or infinite values out of {x.numel()}; one of them makes every latent "
            f"(or pixel) NaN: find where they come from (a division by zero, a float16 overflow) or replace "
            f"them (torch.nan_to_num)"
        )


def check_images(images: torch.Tensor, vae: AutoencoderKL | None = None, name: str = "images") -> None:
    """Images must be a float tensor (B, 3, H, W) in [-1, 1], finite, with H, W multiples of the VAE's
    downsampling.

    The range is decided by the values alone, at any size: anything in [-1, 1] passes (a bright image, all
    0.5, is a valid image), anything beyond it by more than rounding raises. So an image in [0, 1] (which
    should have been mapped with 2 x - 1) passes too: no check can tell it from a valid image without dark
    pixels.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, 3, H, W) in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4:
        hint = "; for a video (B, C, F, H, W) use encode_video" if images.ndim == 5 else ""
        raise InputError(f"{name} must be (B, 3, H, W), got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != 3:
        raise InputError(f"{name} must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point in [-1, 1], got {images.dtype}; "
            f"convert uint8 pictures (..., H, W, 3) with images_from_uint8 (x / 127.5 - 1)"
        )
    check_finite(images, name)
    if images.device.type != "meta" and images.numel():
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.001 or hi > 1.001:
            hint = " (they look like [0, 255] pixels)" if hi > 2.0 and lo >= -0.001 else ""
            raise InputError(
                f"{name} must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}; "
                f"map [0, 255] with x / 127.5 - 1 (images_from_uint8) and [0, 1] with 2 * x - 1"
            )
    if vae is not None:
        f = _downsample_factor(vae)
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise InputError(
                f"{name} height and width must be multiples of {f} (the VAE downsamples {f}x), got {h}x{w}; "
                f"resize or crop them"
            )


def check_video(video: torch.Tensor, channels: int | None = None, name: str = "video") -> None:
    """Videos and video latents are (B, C, F, H, W)."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, C, F, H, W), got {type(video).__name__}")
    if video.ndim != 5:
        hint = "; for single images (B, C, H, W) use encode/decode" if video.ndim == 4 else ""
        raise InputError(f"{name} must be (B, C, F, H, W), got {video.ndim} dims: {tuple(video.shape)}{hint}")
    if channels is not None and video.shape[1] != channels:
        raise InputError(
            f"{name} must have {channels} channels in dim 1 (B, C, F, H, W), got shape {tuple(video.shape)}"
        )


# --- images -------------------------------------------------------------------------------------------------
def encode_latent_dist(vae: AutoencoderKL, images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> diffusers' DiagonalGaussianDistribution over (B, 4, H/8, W/8), *unscaled*.

    ``.mean``, ``.std`` and ``.sample(generator)`` are the encoder's Gaussian; nothing is scaled yet.
    """
    check_images(images, vae)
    return vae.encode(images.to(vae.dtype)).latent_dist


def encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), *scaled* (x ``vae.config.scaling_factor``).

    ``sample=False`` (default) returns the mean: the reference-image convention of AnimateAnyone-style
    pipelines. ``sample=True`` draws mean + std * eps with ``generator``: what UNet training uses.
    """
    dist = encode_latent_dist(vae, images)
    z = dist.sample(generator=generator) if sample else dist.mean  # (B, 4, h, w)
    s = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    return z * s


def decode(vae: AutoencoderKL, latents: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (clamped)."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InputError(f"latents must be (B, C, h, w), got {shape}; for video latents use decode_video")
    if latents.shape[1] != vae.config.latent_channels:
        raise InputError(
            f"latents have {latents.shape[1]} channels, "
            f"this VAE has {vae.config.latent_channels} latent channels"
        )
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    check_finite(latents, "latents")
    s = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    images = vae.decode(latents.to(vae.dtype) / s).sample  # (B, 3, H, W)
    return images.clamp(-1, 1)


# --- videos, frame by frame ---------------------------------------------------------------------------------
def encode_video(
    vae: AutoencoderKL,
    video: torch.Tensor,
    chunk_size: int = 8,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 4, F, H/8, W/8), ``chunk_size`` frames per VAE call.

    Frames are independent for a 2D VAE, so chunking changes memory, not the result (tested against one big
    call).
    """
    check_video(video, channels=3)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    b = video.shape[0]
    frames = rearrange(video, "b c f h w -> (b f) c h w")  # (B, 3, F, H, W) -> (B*F, 3, H, W)
    latents = torch.cat(
        [
            encode(vae, frames[i : i + chunk_size], sample, generator)
            for i in range(0, len(frames), chunk_size)
        ]
    )  # (B*F, 4, h, w)
    return rearrange(latents, "(b f) c h w -> b c f h w", b=b)  # -> (B, 4, F, h, w)


def decode_video(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Scaled latents (B, 4, F, h, w) -> video (B, 3, F, 8h, 8w) in [-1, 1], ``chunk_size`` frames per call.

    Moore-AnimateAnyone decodes one frame at a time (chunk_size=1); diffusers' AnimateDiff uses 16.
    """
    check_video(latents, channels=vae.config.latent_channels, name="latents")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    b = latents.shape[0]
    frames = rearrange(latents, "b c f h w -> (b f) c h w")  # (B, 4, F, h, w) -> (B*F, 4, h, w)
    images = torch.cat([decode(vae, frames[i : i + chunk_size]) for i in range(0, len(frames), chunk_size)])
    return rearrange(images, "(b f) c h w -> b c f h w", b=b)  # (B*F, 3, H, W) -> (B, 3, F, H, W)


# --- the scaling factor -------------------------------------------------------------------------------------
def scaling_factor_from_latents(latents: torch.Tensor) -> float:
    """``1 / std`` of unscaled latents over a dataset (all elements pooled), the latent-diffusion recipe.

    Multiplying by it gives latents of unit standard deviation, the scale of the noise the scheduler adds.
    """
    if latents.numel() < 2:
        raise InputError("need more than one latent value to measure a standard deviation")
    return float(1.0 / latents.float().flatten().std())


# --- looking at latents -------------------------------------------------------------------------------------
@dataclass
class LatentPreview:
    """A linear map latents (C) -> RGB (3) fitted by least squares: ``rgb = weight.T @ z + bias`` per pixel.

    Fit it on pairs (latents, images downsampled to the latent grid); then a latent can be looked at without
    decoding. For SD's VAE such a 4x3 matrix is the well-known "latent preview" of image UIs.
    """

    weight: torch.Tensor  # (C, 3)
    bias: torch.Tensor  # (3,)

    @classmethod
    def fit(cls, latents: torch.Tensor, images: torch.Tensor) -> LatentPreview:
        """latents (B, C, h, w) and images (B, 3, H, W) in [-1, 1] (H = k*h) -> the least-squares map."""
        if latents.ndim != 4 or images.ndim != 4 or latents.shape[0] != images.shape[0]:
            raise InputError(
                f"need latents (B, C, h, w) and images (B, 3, H, W) with the same B, got "
                f"{tuple(latents.shape)} and {tuple(images.shape)}"
            )
        h, w = latents.shape[-2:]
        small = torch.nn.functional.adaptive_avg_pool2d(
            images.float(), (h, w)
        )  # (B, 3, H, W) -> (B, 3, h, w)
        x = rearrange(latents.float(), "b c h w -> (b h w) c")  # (N, C), one row per latent pixel
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # (N, C+1): a column of ones for the bias
        y = rearrange(small, "b c h w -> (b h w) c")  # (N, 3)
        sol = torch.linalg.lstsq(x, y).solution  # (C+1, 3) minimising ||x @ sol - y||^2
        return cls(weight=sol[:-1], bias=sol[-1])

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> preview images (B, 3, h, w) in [-1, 1]."""
        rgb = torch.einsum("bchw,cd->bdhw", latents.float(), self.weight) + self.bias[None, :, None, None]
        return rgb.clamp(-1, 1)
