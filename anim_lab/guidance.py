"""Classifier-free guidance, the training-time condition dropout behind it, and the official DDIM sampler.

Classifier-free guidance (CFG) runs the denoising UNet on two copies of the batch and extrapolates:

    noise_pred = uncond + s * (cond - uncond)          = s * cond + (1 - s) * uncond

- **The CFG batch** (:func:`cfg_batch`, :func:`cfg_encoder_hidden_states`): rows ``[0, B)`` are the
  unconditional copy and rows ``[B, 2B)`` the conditional one, in that order, as in the reference pipelines
  (``torch.cat([uncond, cond])``). The uncond rows get zero CLIP tokens and, in the denoising UNet, **no
  reference attention** (``anim_lab.reference`` splits the rows at B); the cond rows get the CLIP token and
  the ReferenceNet's bank. One UNet call on 2B rows: twice the work of a call without CFG.
- **The combine** (:func:`cfg_combine`) with an optional guidance rescale (Lin et al. 2023, "Common Diffusion
  Noise Schedules and Sample Steps are Flawed", §3.4), done by diffusers' ``rescale_noise_cfg``.
- **Guidance on or off** (:func:`do_classifier_free_guidance`): the reference runs CFG only when
  ``guidance_scale > 1``; a scale in [0, 1] means a single conditional pass. A negative scale is an error.

**Condition dropout at training time is not what inference feeds.** The unconditional branch must be trained
for CFG to mean anything, so each training step is, with probability ``uncond_ratio``, unconditional:

- Moore-AnimateAnyone / AniPortrait (``uncond_ratio = 0.1``, one coin per step for the whole batch,
  :func:`draw_uncond`): the **CLIP input pixels** are replaced by zeros *before* the image encoder, and the
  ReferenceNet is not run (the bank stays empty). The model thus learned ``image_encoder(zero pixels)`` -- a
  nonzero embedding -- as its unconditional token, yet inference feeds **zero embeddings**
  (``torch.zeros_like(tokens)``). Both are provided: :func:`drop_condition` on the pixels for training,
  :func:`cfg_encoder_hidden_states` (zeros) for inference.
- Hallo: stage 1 zeroes the ArcFace embedding before ``image_proj`` (and skips the ReferenceNet), so its
  uncond token is ``image_proj(0)`` -- a projection of zeros, not zero tokens -- and inference feeds exactly
  that (:func:`hallo_uncond_tokens`). Stage 2 draws the image and the audio condition apart
  (:func:`draw_hallo_uncond`): "image" skips only the ReferenceNet (the face embedding is kept), "audio"
  zeroes the audio tokens after ``audio_proj``.

**The sampler** (:func:`build_scheduler`) is diffusers' ``DDIMScheduler`` built exactly as the official
inference configs build it (Moore-AnimateAnyone ``inference_v2.yaml``, AniPortrait, Hallo): linear betas
0.00085-0.012 over 1000 steps, rescaled to zero terminal SNR, v-prediction, trailing timesteps,
steps_offset 1, no clipping, ``set_alpha_to_one`` (the default), and ``eta = 0`` at each step. Their training
scripts force ``beta_schedule="scaled_linear"``; that is an explicit option here, since using it at inference
is the fix EchoMimic found for background noise. :func:`set_timesteps` and :func:`convert_prediction` check
their input.
"""

from __future__ import annotations

import inspect
import math
import operator
import random
from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg
from einops import repeat

from .errors import InputError

__all__ = [
    "DDIM_OFFICIAL",
    "DDIM_INFERENCE_V1",
    "DDIM_ETA",
    "PREDICTION_TYPES",
    "do_classifier_free_guidance",
    "cfg_batch",
    "cfg_encoder_hidden_states",
    "cfg_combine",
    "draw_uncond",
    "draw_hallo_uncond",
    "drop_condition",
    "hallo_uncond_tokens",
    "build_scheduler",
    "set_timesteps",
    "check_prediction_type",
    "convert_prediction",
]


# --- classifier-free guidance -------------------------------------------------------------------------------
def do_classifier_free_guidance(guidance_scale: float) -> bool:
    """True when the pipeline should run the CFG batch: ``guidance_scale > 1``, as the reference decides.

    A scale in [0, 1] is legal and means one conditional pass; a negative or non-finite scale is an error.
    """
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InputError(
            f"guidance_scale must be a finite number >= 0 (1 or less turns guidance off; the official "
            f"configs use 3.5), got {guidance_scale}"
        )
    return guidance_scale > 1.0


def cfg_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (2B, ...): the same rows twice, the unconditional copy first (``[x; x]``)."""
    return repeat(x, "b ... -> (two b) ...", two=2)  # (B, ...) -> (2B, ...)


def cfg_encoder_hidden_states(
    encoder_hidden_states: torch.Tensor, uncond: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-attention context of the CFG batch: ``cat([uncond, cond])``, (B, N, D) -> (2B, N, D).

    ``uncond`` defaults to zeros of the same shape: the zero CLIP tokens of Moore-AnimateAnyone/AniPortrait.
    For Hallo pass :func:`hallo_uncond_tokens` (the projection of a zero face embedding).
    """
    if uncond is None:
        uncond = torch.zeros_like(encoder_hidden_states)
    if uncond.shape != encoder_hidden_states.shape:
        raise InputError(
            f"uncond tokens {tuple(uncond.shape)} must have the shape of the cond tokens "
            f"{tuple(encoder_hidden_states.shape)}"
        )
    return torch.cat([uncond, encoder_hidden_states])  # 2 x (B, N, D) -> (2B, N, D)


def cfg_combine(
    noise_pred: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """(2B, ...) predictions of the CFG batch -> (B, ...): ``uncond + s * (cond - uncond)``.

    ``guidance_rescale`` in [0, 1] (0 = off, the official configs) mixes in the guided prediction rescaled to
    the per-sample standard deviation of the conditional one (Lin et al., §3.4; diffusers'
    ``rescale_noise_cfg``), which counters the over-exposure strong guidance gives zero-terminal-SNR models.
    """
    do_classifier_free_guidance(guidance_scale)  # validates the scale
    if not 0.0 <= guidance_rescale <= 1.0:
        raise InputError(f"guidance_rescale must be in [0, 1] (0 turns it off), got {guidance_rescale}")
    if noise_pred.shape[0] % 2:
        raise InputError(
            f"the CFG batch has an even number of rows (uncond rows first, then cond rows); got "
            f"{noise_pred.shape[0]}"
        )
    noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
    guided = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, noise_pred_cond, guidance_rescale=guidance_rescale)
    return guided


# --- condition dropout (training) and unconditional inputs (inference) --------------------------------------
def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} is a probability and must be in [0, 1], got {value}")


def draw_uncond(rng: random.Random, uncond_ratio: float = 0.1) -> bool:
    """One training step's coin: True (unconditional step) with probability ``uncond_ratio``.

    As Moore-AnimateAnyone's and Hallo's stage-1 training: ``rng.random() < uncond_ratio``, once per step, for
    the whole batch. On an unconditional step the caller zeroes the condition *before* its encoder
    (:func:`drop_condition` on the CLIP pixels, or on Hallo's face embedding) and skips the ReferenceNet.
    """
    _check_ratio("uncond_ratio", uncond_ratio)
    return rng.random() < uncond_ratio


def draw_hallo_uncond(
    rng: random.Random,
    uncond_img_ratio: float = 0.05,
    uncond_audio_ratio: float = 0.05,
    uncond_ia_ratio: float = 0.05,
    faithful: bool = False,
) -> tuple[bool, bool]:
    """Hallo stage 2's dropout for one step -> ``(drop_image, drop_audio)``.

    ``drop_image`` skips the ReferenceNet (the face embedding is kept); ``drop_audio`` zeroes the audio tokens
    after ``audio_proj``.

    - ``faithful=False`` (default), what the three config names describe: one draw, exclusive events --
      image only with probability ``uncond_img_ratio``, audio only with ``uncond_audio_ratio``, both with
      ``uncond_ia_ratio``.
    - ``faithful=True`` reproduces what Hallo's ``train_stage2.py`` does instead (``faithful`` means that
      everywhere in anim_lab: the reference code's known deviations, kept): two independent coins,
      ``rng.random() < uncond_img_ratio`` then ``rng.random() < uncond_audio_ratio``. Both are dropped
      together with probability ``uncond_img_ratio * uncond_audio_ratio`` (0.0025); the config's
      ``uncond_ia_ratio`` is never read.
    """
    for name, value in (
        ("uncond_img_ratio", uncond_img_ratio),
        ("uncond_audio_ratio", uncond_audio_ratio),
        ("uncond_ia_ratio", uncond_ia_ratio),
    ):
        _check_ratio(name, value)
    if faithful:
        drop_image = rng.random() < uncond_img_ratio
        drop_audio = rng.random() < uncond_audio_ratio
        return drop_image, drop_audio
    total = uncond_img_ratio + uncond_audio_ratio + uncond_ia_ratio
    if total > 1.0:
        raise InputError(f"the three exclusive dropout ratios sum to {total} > 1")
    u = rng.random()
    if u < uncond_img_ratio:
        return True, False
    if u < uncond_img_ratio + uncond_audio_ratio:
        return False, True
    if u < total:
        return True, True
    return False, False


def drop_condition(condition: torch.Tensor, drop: bool) -> torch.Tensor:
    """Zeros of the same shape when ``drop``, else the condition itself: what the training scripts feed.

    Where it is applied is what matters: Moore-AnimateAnyone zeroes the CLIP *pixels* (so the network sees
    ``image_encoder(0)``), Hallo stage 1 the face *embedding* before ``image_proj`` (``image_proj(0)``),
    Hallo stage 2 the audio *tokens* after ``audio_proj`` (zeros).
    """
    return torch.zeros_like(condition) if drop else condition


def hallo_uncond_tokens(
    image_proj: Callable[[torch.Tensor], torch.Tensor], face_emb: torch.Tensor
) -> torch.Tensor:
    """Hallo's unconditional tokens: ``image_proj(zeros_like(face_emb))``, (B, 512) -> (B, 4, D).

    Not zero tokens: the projection's bias and LayerNorm make the projected zeros a fixed nonzero context,
    the same one its training saw on dropped steps.
    """
    return image_proj(torch.zeros_like(face_emb))


# --- the sampler: DDIM as the official inference configs build it -------------------------------------------
# inference_v2.yaml (Moore-AnimateAnyone), AniPortrait's and Hallo's inference configs; the rest are
# DDIMScheduler's defaults, which the reference relies on (``DDIMScheduler(**noise_scheduler_kwargs)``).
DDIM_OFFICIAL = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)
DDIM_ETA = 0.0  # the reference passes eta=0.0 to every scheduler.step: deterministic DDIM

# The legacy inference_v1.yaml (not used by default): epsilon prediction, no zero-SNR rescale, leading
# spacing.
DDIM_INFERENCE_V1 = {
    **DDIM_OFFICIAL,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
}

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_BETA_SCHEDULES = ("linear", "scaled_linear")
_DDIM_ARGUMENTS = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self", "beta_schedule"}


def build_scheduler(
    beta_schedule: Literal["linear", "scaled_linear"] = "linear", **overrides
) -> DDIMScheduler:
    """diffusers' ``DDIMScheduler`` with the official inference settings (:data:`DDIM_OFFICIAL`).

    ``beta_schedule="linear"`` reproduces the official outputs; ``"scaled_linear"`` is the schedule their
    training scripts actually used (``train_stage_*.py`` force it), so sampling with it removes the
    train/inference mismatch (EchoMimic PR #127). ``overrides`` change other DDIMScheduler arguments (e.g.
    :data:`DDIM_INFERENCE_V1`'s); epsilon prediction on a zero-terminal-SNR schedule is refused, since x0
    cannot be recovered from noise at SNR 0.
    """
    if beta_schedule not in _BETA_SCHEDULES:
        raise InputError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {beta_schedule!r}")
    unknown = sorted(set(overrides) - _DDIM_ARGUMENTS)
    if unknown:
        raise InputError(f"unknown DDIMScheduler arguments {unknown}; known: {sorted(_DDIM_ARGUMENTS)}")
    kwargs = {**DDIM_OFFICIAL, **overrides, "beta_schedule": beta_schedule}
    if kwargs["prediction_type"] not in PREDICTION_TYPES:
        raise InputError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {kwargs['prediction_type']!r}"
        )
    if kwargs["prediction_type"] == "epsilon" and kwargs["rescale_betas_zero_snr"]:
        raise InputError(
            "epsilon prediction cannot sample a zero-terminal-SNR schedule: at t = 999 the latent is pure "
            "noise and x0 = (x_t - sqrt(1 - a) * eps) / sqrt(a) divides by sqrt(a) = 0; use "
            "prediction_type='v_prediction' (the official configs) or rescale_betas_zero_snr=False"
        )
    return DDIMScheduler(**kwargs)


def set_timesteps(
    scheduler: DDIMScheduler, num_inference_steps: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``scheduler.set_timesteps`` after checking ``1 <= num_inference_steps <= num_train_timesteps``;
    returns ``scheduler.timesteps`` (descending, e.g. 999, 966, 932, ... for 30 trailing steps)."""
    num_train = scheduler.config.num_train_timesteps
    try:
        steps = operator.index(num_inference_steps)
    except TypeError:
        raise InputError(f"num_inference_steps must be an integer, got {num_inference_steps!r}") from None
    if isinstance(num_inference_steps, bool) or not 1 <= steps <= num_train:
        raise InputError(
            f"num_inference_steps must be between 1 and the {num_train} training timesteps, got "
            f"{num_inference_steps!r} (the official configs use 20-40)"
        )
    scheduler.set_timesteps(steps, device=device)
    return scheduler.timesteps


def check_prediction_type(scheduler: DDIMScheduler, prediction_type: str) -> None:
    """Raise unless the scheduler was built for ``prediction_type`` (what the model outputs)."""
    built_for = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type != built_for:
        raise InputError(
            f"the scheduler was built for {built_for!r} but the model predicts {prediction_type!r}: its step "
            f"would read the output as the wrong quantity; build it with "
            f"build_scheduler(prediction_type={prediction_type!r}) (and check the schedule the model was "
            f"trained with)"
        )


def convert_prediction(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    timesteps: int | torch.Tensor,
    to: str,
) -> torch.Tensor:
    """Re-express a model output of the scheduler's prediction type as ``to`` (``epsilon``/``v_prediction``/
    ``sample``), given the noisy ``sample`` x_t at ``timesteps`` (an int, or one per row).

    With a = alphas_cumprod[t]:  x_t = sqrt(a) x0 + sqrt(1-a) eps,  v = sqrt(a) eps - sqrt(1-a) x0, so
    x0 = sqrt(a) x_t - sqrt(1-a) v  and  eps = sqrt(a) v + sqrt(1-a) x_t. From epsilon, x0 needs a division by
    sqrt(a): at zero SNR (a = 0) that is an error, not a NaN.
    """
    source = scheduler.config.prediction_type
    if to not in PREDICTION_TYPES:
        raise InputError(f"to must be one of {PREDICTION_TYPES}, got {to!r}")
    if source not in PREDICTION_TYPES:
        raise InputError(f"the scheduler's prediction_type {source!r} is not one of {PREDICTION_TYPES}")
    if model_output.shape != sample.shape:
        raise InputError(
            f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must have one shape"
        )
    timesteps = torch.as_tensor(timesteps, device=sample.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    a = alphas_cumprod[timesteps]  # () or (B,)
    if a.ndim == 1:
        a = a.reshape(-1, *([1] * (sample.ndim - 1)))  # (B,) -> (B, 1, ..., 1)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    if source == "v_prediction":
        x0 = sqrt_a * sample - sqrt_1ma * model_output
        eps = sqrt_a * model_output + sqrt_1ma * sample
    elif source == "epsilon":
        if to != "epsilon" and bool((a == 0).any()):
            raise InputError(
                "x0 cannot be recovered from an epsilon prediction at zero SNR (alphas_cumprod[t] = 0, e.g. "
                "t = 999 with rescale_betas_zero_snr): it divides by sqrt(alphas_cumprod) = 0"
            )
        eps = model_output
        x0 = (sample - sqrt_1ma * eps) / sqrt_a
    else:
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_1ma  # 1 - a > 0 for every t of these schedules
    return {"epsilon": eps, "sample": x0, "v_prediction": sqrt_a * eps - sqrt_1ma * x0}[to]
