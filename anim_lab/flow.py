"""Flow matching and image-to-video the HunyuanVideo way, on causal-VAE latents.

**Rectified flow.** A straight line joins a clean latent video x0 to Gaussian noise eps:

    x_t = (1 - t) x0 + t eps,     t in [0, 1]          (t = 1: pure noise, t = 0: data)
    v   = d x_t / d t = eps - x0                       (constant along the line: the velocity target)

The transformer predicts v from (x_t, t); sampling integrates dx/dt = v from t = 1 down to 0 with Euler steps,
x_{t'} = x_t + (t' - t) v, which is ``FlowMatchEulerDiscreteScheduler.step``. The diffusers convention calls t
``sigma`` and passes ``timestep = 1000 * sigma`` to the transformer.

**Shift.** HunyuanVideo (like SD3) bends the *time grid*, not the path: sigma -> s sigma / (1 + (s - 1) sigma)
with s > 1 (``flow_shift``, 7 for 720p HunyuanVideo) puts more of the steps at high noise, where the
coarse layout of the video is decided. We train with the same shift on uniformly drawn t.

**Image-to-video, two ways** (``HunyuanVideoTransformer3DModel(image_condition_type=...)``):

- ``"latent_concat"`` (HunyuanVideo-I2V): the condition image's latent (one latent frame, the causal VAE
  encodes a lone image as a 1-frame video) is zero-padded to all latent frames, a mask channel marks frame 0,
  and both are concatenated to the noisy latents on the *channel* axis: 16 + 16 + 1 = 33 input channels. No
  extra tokens: the condition sits at every latent position it is aligned with.
- ``"token_replace"``: latent frame 0 *is* the clean image latent at every step (its tokens are replaced),
  and the transformer is told so: its first-frame tokens get the modulation of timestep 0
  (``token_replace_emb``). The Euler step only moves frames 1.. .

Text tokens: the toy CLIP's text tower (its last hidden states as ``encoder_hidden_states``, its projected
embedding as ``pooled_projections``). Classifier-free guidance mixes a conditional and an unconditional
(empty caption) prediction: v = v_u + w (v_c - v_u), as the pipeline's ``true_cfg_scale`` does.

Everything model-side is diffusers' own: ``HunyuanVideoTransformer3DModel`` and
``FlowMatchEulerDiscreteScheduler``; this module only builds their inputs and writes the loop out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
from einops import repeat

from .causal_vae import CausalVAE, check_num_frames
from .errors import InputError

__all__ = [
    "IMAGE_CONDITION_TYPES",
    "TINY_I2V",
    "TOY_I2V",
    "TOY_I2V_DIR",
    "build_transformer",
    "check_image_condition_type",
    "check_shift",
    "decode_latents",
    "encode_condition_image",
    "flow_loss",
    "i2v_model_input",
    "interpolate",
    "latent_concat_input",
    "latent_frames_for",
    "load_toy_i2v",
    "make_scheduler",
    "sample_i2v",
    "shift_sigmas",
    "token_replace_input",
    "toy_caption",
    "toy_text_tokens",
    "velocity_target",
]

IMAGE_CONDITION_TYPES = ("latent_concat", "token_replace")
TOY_I2V_DIR = Path(__file__).resolve().parent / "assets" / "toy_i2v"

# HunyuanVideoTransformer3DModel kwargs without in_channels / image_condition_type (set by build_transformer).
# TOY_I2V: the model trained on the toy world (16-channel 8x8x5 latents of 17-frame 64-px clips; text from the
# toy CLIP: 128-wide hidden states, 64-wide projection). rope_axes_dim sums to attention_head_dim.
TOY_I2V = dict(
    out_channels=16,
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=4.0,
    patch_size=2,  # 8x8 latents -> 4x4 tokens per latent frame, 80 video tokens
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=False,
    text_embed_dim=128,
    pooled_projection_dim=64,
    rope_theta=256.0,
    rope_axes_dim=(8, 12, 12),
)
# TINY_I2V: unit tests (4-channel latents, milliseconds per forward).
TINY_I2V = dict(
    TOY_I2V,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=1,
    num_single_layers=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 2, 4),
)


# --- checks -------------------------------------------------------------------------------------------------
def check_image_condition_type(image_condition_type: str) -> str:
    if image_condition_type not in IMAGE_CONDITION_TYPES:
        raise InputError(
            f"image_condition_type must be one of {IMAGE_CONDITION_TYPES}, got {image_condition_type!r}"
        )
    return image_condition_type


def check_shift(shift: float) -> float:
    if not (math.isfinite(shift) and shift > 0):
        raise InputError(
            f"shift must be a finite number > 0 (1 = no shift, > 1 = more steps at high noise), got {shift!r}"
        )
    return float(shift)


def latent_frames_for(num_frames: int) -> int:
    """Pixel frames (4k + 1) -> latent frames (k + 1) of the causal VAE; a clear error for other counts."""
    check_num_frames(num_frames)
    return (num_frames - 1) // 4 + 1


def _check_latents(latents: torch.Tensor, what: str = "latents") -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise InputError(f"{what} must be a (B, C, F, H, W) tensor, got {shape}")


def _check_condition(latents: torch.Tensor, image_latents: torch.Tensor) -> None:
    """image_latents (B, C, 1, h, w): the same batch, channels and latent size as the video latents."""
    _check_latents(latents)
    _check_latents(image_latents, "image_latents")
    b, c, _, h, w = latents.shape
    if image_latents.shape[2] != 1 or image_latents.shape[:2] != (b, c) or image_latents.shape[-2:] != (h, w):
        raise InputError(
            f"image_latents must be (B, C, 1, h, w) = {(b, c, 1, h, w)} to condition latents of shape "
            f"{tuple(latents.shape)}, got {tuple(image_latents.shape)}; encode the condition image at the "
            f"video's frame size (one latent frame)"
        )


# --- the model and the scheduler ----------------------------------------------------------------------------
def build_transformer(
    image_condition_type: str, config: dict | None = None, latent_channels: int | None = None
) -> HunyuanVideoTransformer3DModel:
    """diffusers' ``HunyuanVideoTransformer3DModel`` for i2v: in_channels = 2C + 1 for latent_concat, C for
    token_replace (C = ``config["out_channels"]``, the latent channels)."""
    check_image_condition_type(image_condition_type)
    cfg = dict(TOY_I2V if config is None else config)
    c = cfg["out_channels"] if latent_channels is None else latent_channels
    cfg["out_channels"] = c
    in_channels = 2 * c + 1 if image_condition_type == "latent_concat" else c
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels, image_condition_type=image_condition_type, **cfg
    )


def shift_sigmas(sigmas: torch.Tensor | np.ndarray | float, shift: float):
    """The time shift: sigma -> s sigma / (1 + (s - 1) sigma). Fixes 0 and 1; s > 1 pushes every sigma up
    (more time at high noise)."""
    shift = check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The HunyuanVideo scheduler: flow-match Euler with a static shift (no resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=check_shift(shift))


# --- the rectified-flow path --------------------------------------------------------------------------------
def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps; t (B,) in [0, 1] broadcast over (B, C, F, H, W)."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B,) -> (B, 1, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0: d x_t / d t along the straight path (the same for every t)."""
    return noise - x0


# --- the image condition ------------------------------------------------------------------------------------
def latent_concat_input(latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) noisy latents + (B, C, 1, h, w) image latent -> (B, 2C + 1, F, h, w):
    [latents | image latent in frame 0, zeros after | mask: 1 in frame 0, 0 after] on channels."""
    _check_condition(latents, image_latents)
    b, _, f, h, w = latents.shape
    padded = torch.zeros_like(latents)  # (B, C, F, h, w)
    padded[:, :, :1] = image_latents
    mask = latents.new_zeros(b, 1, f, h, w)  # (B, 1, F, h, w)
    mask[:, :, :1] = 1
    return torch.cat([latents, padded, mask], dim=1)  # (B, 2C + 1, F, h, w)


def token_replace_input(latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> the same with latent frame 0 replaced by the clean image latent."""
    _check_condition(latents, image_latents)
    return torch.cat([image_latents, latents[:, :, 1:]], dim=2)  # (B, C, 1 + (F - 1), h, w)


def i2v_model_input(image_condition_type: str, latents: torch.Tensor, image_latents: torch.Tensor):
    """What the transformer reads for ``image_condition_type``: (B, 2C + 1, F, h, w) or (B, C, F, h, w)."""
    check_image_condition_type(image_condition_type)
    if image_condition_type == "latent_concat":
        return latent_concat_input(latents, image_latents)
    return token_replace_input(latents, image_latents)


@torch.no_grad()
def encode_condition_image(vae: CausalVAE, image: torch.Tensor, size: tuple[int, int] | None = None):
    """Condition image (B, 3, H, W) in [-1, 1] -> scaled image latent (B, C, 1, H/8, W/8) (posterior mode, as
    the pipeline's ``retrieve_latents(..., "argmax")``). The causal VAE encodes a lone image as a 1-frame
    video, which is exactly the first latent frame of any clip that starts with it. ``size`` = the video's
    (H, W): the image must match it."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"the condition image must be a (B, 3, H, W) tensor in [-1, 1], got {shape}")
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        raise InputError(
            f"the condition image is {tuple(image.shape[-2:])} pixels but the video is {tuple(size)}; "
            f"resize the image to the video's frame size first"
        )
    video = image.unsqueeze(2)  # (B, 3, H, W) -> (B, 3, 1, H, W)
    return vae.encode(video).mode() * vae.scaling_factor  # (B, C, 1, H/8, W/8)


# --- training -----------------------------------------------------------------------------------------------
def flow_loss(
    transformer: HunyuanVideoTransformer3DModel,
    x0: torch.Tensor,
    image_latents: torch.Tensor,
    text: dict,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Rectified-flow MSE on velocity. x0 (B, C, F, h, w) clean scaled latents; image_latents (B, C, 1, h, w);
    t (B,) in [0, 1]; ``text`` = encoder_hidden_states / encoder_attention_mask / pooled_projections.
    token_replace: frame 0 is the clean image (its tokens carry timestep 0), so only frames 1.. are scored."""
    kind = check_image_condition_type(transformer.config.image_condition_type)
    x_t = interpolate(x0, noise, t)  # (B, C, F, h, w)
    pred = transformer(
        hidden_states=i2v_model_input(kind, x_t, image_latents),
        timestep=t * 1000,
        return_dict=False,
        **text,
    )[0]  # (B, C, F, h, w)
    target = velocity_target(x0, noise)
    if kind == "token_replace":
        pred, target = pred[:, :, 1:], target[:, :, 1:]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# --- sampling -----------------------------------------------------------------------------------------------
def _predict(transformer, kind, latents, image_latents, t, text, uncond_text, guidance_scale):
    model_input = i2v_model_input(kind, latents, image_latents)  # (B, C or 2C+1, F, h, w)
    timestep = t.expand(latents.shape[0]).to(latents.dtype)  # () -> (B,)
    v = transformer(hidden_states=model_input, timestep=timestep, return_dict=False, **text)[0]
    if uncond_text is not None and guidance_scale != 1.0:
        v_u = transformer(hidden_states=model_input, timestep=timestep, return_dict=False, **uncond_text)[0]
        v = v_u + guidance_scale * (v - v_u)  # classifier-free guidance
    return v  # (B, C, F, h, w)


@torch.no_grad()
def sample_i2v(
    transformer: HunyuanVideoTransformer3DModel,
    image_latents: torch.Tensor,
    text: dict,
    num_frames: int = 17,
    num_inference_steps: int = 20,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    uncond_text: dict | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    faithful: bool = False,
    return_trajectory: bool = False,
):
    """Image-to-video sampling: Euler steps of ``FlowMatchEulerDiscreteScheduler`` from noise (sigma 1) to
    data (sigma 0), on ``num_inference_steps`` uniform sigmas shifted by ``shift`` (the pipeline's grid
    ``linspace(1, 0, N + 1)[:-1]``). Returns scaled latents (B, C, (num_frames - 1)//4 + 1, h, w).

    ``faithful=False`` (default) starts from pure noise, as flow matching is defined; ``faithful=True`` keeps
    the reference's deviation: the diffusers HunyuanVideo-I2V pipeline starts from 0.999 noise + 0.001 image
    latent (repeated over frames). With token_replace, frame 0 is the image
    latent throughout and only frames 1.. are stepped. ``return_trajectory``: also the list of latents after
    each step.
    """
    kind = check_image_condition_type(transformer.config.image_condition_type)
    f = latent_frames_for(num_frames)
    check_shift(shift)
    if num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    _check_latents(image_latents, "image_latents")
    b, c, _, h, w = image_latents.shape
    if latents is None:
        latents = torch.randn((b, c, f, h, w), generator=generator, dtype=image_latents.dtype)
    _check_latents(latents)
    if latents.shape[2] != f:
        raise InputError(
            f"latents have {latents.shape[2]} latent frames but num_frames={num_frames} needs {f} "
            f"((num_frames - 1) // 4 + 1); pass num_frames = 4 * (latent frames - 1) + 1"
        )
    _check_condition(latents, image_latents)
    if faithful:
        latents = 0.999 * latents + 0.001 * repeat(image_latents, "b c 1 h w -> b c f h w", f=f)
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1])
    if kind == "token_replace":
        latents = token_replace_input(latents, image_latents)
    trajectory = []
    for t in scheduler.timesteps:
        v = _predict(transformer, kind, latents, image_latents, t, text, uncond_text, guidance_scale)
        if kind == "latent_concat":
            latents = scheduler.step(v, t, latents, return_dict=False)[0]  # x + (sigma_next - sigma) v
        else:  # step frames 1.. only; frame 0 stays the clean image latent
            moved = scheduler.step(v[:, :, 1:], t, latents[:, :, 1:], return_dict=False)[0]
            latents = torch.cat([image_latents, moved], dim=2)  # (B, C, 1 + (F - 1), h, w)
        if return_trajectory:
            trajectory.append(latents)
    return (latents, trajectory) if return_trajectory else latents


@torch.no_grad()
def decode_latents(vae: CausalVAE, latents: torch.Tensor, tiling=None) -> torch.Tensor:
    """Scaled latents (B, C, F, h, w) -> video (B, 3, 4(F-1)+1, 8h, 8w) in [-1, 1] through the causal VAE,
    optionally tiled (``anim_lab.tiling.TileSettings``)."""
    _check_latents(latents)
    return vae.decode(latents / vae.scaling_factor, tiling=tiling).clamp(-1, 1)


# --- the toy world's text condition ------------------------------------------------------------------------
TOY_CAPTION_ATTRIBUTES = ("hair", "hairstyle", "skin", "background", "shirt")


def toy_caption(identity) -> str:
    """A toy identity's caption, its colour/style phrases joined by commas ("brown hair , short hair , light
    skin , blue background , navy shirt"): 16 tokens with <bos>/<eos>, within the toy tokenizer's 24."""
    from .clip import toy_phrase

    return " , ".join(toy_phrase(a, getattr(identity, a)) for a in TOY_CAPTION_ATTRIBUTES)


@torch.no_grad()
def toy_text_tokens(captions: list[str]) -> dict:
    """Captions -> the transformer's text inputs from the toy CLIP's text tower: ``encoder_hidden_states``
    (N, 24, 128) (last hidden states, padded to the tokenizer's 24), ``encoder_attention_mask`` (N, 24),
    ``pooled_projections`` (N, 64)
    (the projected text embedding). The empty caption "" is the unconditional input for CFG.

    The text tower is the frozen toy CLIP the committed i2v models were trained with, kept beside them in
    ``toy_i2v/clip`` (as HunyuanVideo ships its text encoders with the transformer)."""
    from .clip import load_clip

    model, tokenizer = load_clip(TOY_I2V_DIR / "clip")
    batch = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    out = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return dict(
        encoder_hidden_states=out.last_hidden_state,  # (N, 24, 128)
        encoder_attention_mask=batch["attention_mask"],  # (N, 24)
        pooled_projections=model.text_projection(out.pooler_output),  # (N, 128) -> (N, 64)
    )


# --- the committed toy model --------------------------------------------------------------------------------
def load_toy_i2v(
    image_condition_type: str, folder: str | Path = TOY_I2V_DIR
) -> HunyuanVideoTransformer3DModel:
    """The tiny i2v transformer trained on the toy world (``scripts/train_toy_i2v.py``), one per condition
    type: ``anim_lab/assets/toy_i2v/<image_condition_type>/``."""
    check_image_condition_type(image_condition_type)
    sub = Path(folder) / image_condition_type
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"no trained model in {sub}; run scripts/train_toy_i2v.py")
    return HunyuanVideoTransformer3DModel.from_pretrained(sub).eval()
