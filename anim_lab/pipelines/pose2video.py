"""Pose2Video: a reference portrait and a driving pose sequence in, a video out (AnimateAnyone / AniPortrait).

The denoising loop follows Moore-AnimateAnyone's ``pipeline_pose2vid_long.py`` in order:

    CLIP tokens of the reference image (one token; the unconditional tokens are zeros)
    reference latents = VAE mean x scaling factor
    pose features for the whole sequence (the guider works per frame, so slicing them per window is exact)
    initial noise (1, 4, F, h, w) from the generator
    ReferenceNet once, at t = 0, on the reference latents -> the bank (its self-attention inputs)
    for each timestep t:
        for each batch of context windows (wrap-around, closed loop):
            latents of the windows -> CFG batch [uncond rows, cond rows]
            denoising UNet; its spatial self-attention reads the bank in the cond rows only
            add the prediction into noise_pred[:, :, window], count the frames
        noise_pred / counter (the average over overlapping windows), then guidance
        scheduler.step
    VAE decode, a chunk of frames per call

The pieces come from their own modules: reference attention from ``anim_lab.reference`` (the bank, read by
the cond rows only), the windows and their averaging from ``anim_lab.context``, CFG and the official DDIM
scheduler from ``anim_lab.guidance``. The pose guider is AnimateAnyone's ``PoseGuider`` (one feature map,
added after ``conv_in``) or AniPortrait's ``PoseGuiderMultiScale`` (five, added after ``conv_in`` and after
each down block; ``weights.load_official_pipeline(..., layout="aniportrait")``).

What differs from the reference, and why (the output is the same to float rounding unless noted):

- The ReferenceNet runs once on the *cond* row only. The reference runs it on ``[uncond, cond]``, but every
  uncond row of the denoiser attends to itself alone, so the uncond half of the bank is never read.
- The bank's keys and values are projected once per block for the whole request, not per step, window and
  frame; the uncond rows never compute attention over the reference.
- The pose features are computed once for the whole sequence with either guider. AniPortrait runs its
  guider per window at every step; its guider works frame by frame (BatchNorm in eval mode, spatial
  attention, the reference pose unused), so slicing the whole sequence's features gives the same numbers.
- Several windows go through the denoiser in one batch (``context_batch_size``), each with its own prediction
  (the reference adds the whole batch's prediction to every window of it: a bug, not reproduced).
- Frames are decoded ``decode_chunk_size`` at a time (a 2D VAE decodes frames independently).
- Without CFG the reference *sums* overlapping windows instead of averaging them, and it rounds the bank to
  fp16 even in fp32 runs. Both are bugs; ``faithful=True`` reproduces them.
- AniPortrait's inference feeds its guider uint8 pose arrays through ``2x - 1`` without ``/ 255``: a
  [-1, 509] tensor, against the [-1, 1] it was trained on. The pipeline gives both guiders [0, 1] poses (see
  ``anim_lab.pose_guider``); ``faithful=True`` with the multi-scale guider feeds it the [-1, 509] tensor.

Speed switches (none is a default: none helps at every size; ``benchmarks/bench_pose2video.py --means``):
:meth:`Pose2VideoPipeline.enable_compile` (torch.compile, the same output within 1e-5, a first call that
compiles for minutes), and bf16 autocast around the call (``torch.autocast("cpu", dtype=torch.bfloat16)``:
other numbers, faster only where convolutions are wide).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange
from transformers import CLIPVisionModelWithProjection

from ..clip import ClipPreprocess, image_embeds_to_tokens
from ..context import batch_windows, context_windows, gather_windows, predict_in_windows
from ..errors import AnimLabError, InputError
from ..guidance import (
    DDIM_ETA,
    cfg_batch,
    cfg_combine,
    cfg_encoder_hidden_states,
    do_classifier_free_guidance,
    set_timesteps,
)
from ..lora import Pose2VideoLoraLoaderMixin
from ..pose_guider import PoseGuider, PoseGuiderMultiScale, prepare_pose_images
from ..reference import reference_attention
from ..unet import ReferenceUNet, VideoUNet
from ..vae import decode_video
from ..vae import encode as vae_encode
from .saved import SavedPipelineMixin, saved_files

__all__ = [
    "Pose2VideoPipeline",
    "encode_reference",
    "Pose2VideoPipelineOutput",
    "NonFiniteError",
    "SAVED_FILES",
]

# every file save_pretrained may write (the vae / image encoder / scheduler as their libraries save them)
SAVED_FILES = saved_files(
    (
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "image_encoder/preprocessor_config.json",
        "scheduler/scheduler_config.json",
    ),
    ("reference_unet", "denoising_unet", "pose_guider"),
)


# --- output -------------------------------------------------------------------------------------------------
@dataclass
class Pose2VideoPipelineOutput(BaseOutput):
    """``frames``: "pil" a list (batch) of lists of PIL images; "np" (B, F, H, W, 3) float in [0, 1];
    "pt" (B, F, 3, H, W) float in [0, 1]; "latent" (B, 4, F, h, w). ``latents``: the final latents
    (B, 4, F, h, w) the frames were decoded from, whatever the output type (no copy: the same tensor)."""

    frames: list | np.ndarray | torch.Tensor
    latents: torch.Tensor | None = None


def encode_reference(
    vae: AutoencoderKL,
    image_encoder: CLIPVisionModelWithProjection,
    ref_image: PIL.Image.Image,
    height: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference image as the pipeline (and the toy animator's training) sees it: CLIP tokens (1, 1, D)
    of the image squashed to the encoder's square size, and the reference latents (1, 4, h, w) = the VAE's
    posterior mean x scaling factor, of the image resized to (height, width)."""
    processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
    size = image_encoder.config.image_size
    # squashed to the encoder's square (PIL's default bicubic, as the reference), then CLIP-normalised from
    # the uint8 pixels, as CLIPImageProcessor does (u / 255: bit for bit its pixel values)
    square = torch.from_numpy(np.asarray(ref_image.convert("RGB").resize((size, size))).copy())  # (S, S, 3)
    pixels = ClipPreprocess(size=size, crop_size=size).from_uint8(rearrange(square, "h w c -> 1 c h w"))
    embeds = image_encoder(pixel_values=pixels.to(device, image_encoder.dtype)).image_embeds  # (1, D)
    clip_tokens = image_embeds_to_tokens(embeds)  # (1, 1, D): one token
    ref = processor.preprocess(ref_image, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
    ref_latents = vae_encode(vae, ref.to(device))  # (1, 4, h, w): the posterior mean, scaled
    return clip_tokens, ref_latents.to(dtype)


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W, ...) array."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    return tuple(np.shape(image)[:2])


class NonFiniteError(AnimLabError, ValueError):
    """NaN or inf appeared while generating; the message names the first component whose weights hold
    them (or the step where they appeared)."""


def check_finite(tensor: torch.Tensor, where: str, components: dict) -> None:
    """Raise :class:`NonFiniteError` if ``tensor`` holds NaN or inf, naming the first of ``components``
    whose parameters or buffers are not finite (broken weights), else ``where`` (an overflow, e.g. fp16)."""
    if torch.isfinite(tensor).all():
        return
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            for key, value in [*module.named_parameters(), *module.named_buffers()]:
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise NonFiniteError(
                        f"{where}: the values are NaN or infinite because the weights of {name} hold "
                        f"NaN or inf ({name}.{key}); load intact weights"
                    )
    raise NonFiniteError(
        f"{where}: the values became NaN or infinite although every weight is finite (an overflow: try "
        "float32, or a smaller guidance scale)"
    )


# --- the pipeline -------------------------------------------------------------------------------------------
def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class Pose2VideoPipeline(SavedPipelineMixin, DiffusionPipeline, Pose2VideoLoraLoaderMixin):
    """Reference image + pose images -> video, with AnimateAnyone's ReferenceNet, PoseGuider and motion
    modules (see the module docstring for the order of the loop and what differs from the reference).

    Components: ``vae`` (AutoencoderKL), ``image_encoder`` (CLIPVisionModelWithProjection), ``reference_unet``
    (ReferenceUNet), ``denoising_unet`` (VideoUNet), ``pose_guider`` (PoseGuider, or AniPortrait's
    PoseGuiderMultiScale), ``scheduler`` (DDIM as the official inference config builds it).

    LoRA (``anim_lab.lora.Pose2VideoLoraLoaderMixin``): ``load_lora_weights`` / ``save_lora_weights`` in
    diffusers' format for the two UNets, ``fuse_lora`` / ``unfuse_lora``, ``set_adapters``.
    """

    model_cpu_offload_seq = "image_encoder->reference_unet->pose_guider->denoising_unet->vae"
    # saved folders (anim_lab.pipelines.saved: save_pretrained / from_pretrained check before they act)
    SAVED_FILES = SAVED_FILES
    LIBRARY_COMPONENTS = ("vae", "image_encoder", "scheduler")
    OWN_COMPONENTS = {
        "reference_unet": (ReferenceUNet,),
        "denoising_unet": (VideoUNet,),
        "pose_guider": (PoseGuider, PoseGuiderMultiScale),
    }
    NOT_SAVED_HINT = (
        "; for the official AnimateAnyone / AniPortrait weight folders use "
        "anim_lab.weights.load_official_pipeline(folder, layout=...)"
    )

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        reference_unet: ReferenceUNet,
        denoising_unet: VideoUNet,
        pose_guider: PoseGuider | PoseGuiderMultiScale,
        scheduler: DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            image_encoder=image_encoder,
            reference_unet=reference_unet,
            denoising_unet=denoising_unet,
            pose_guider=pose_guider,
            scheduler=scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # pose images stay in [0, 1] (VaeImageProcessor(do_normalize=False), as the reference)
        self.pose_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)

    # --- speed switches -----------------------------------------------------------------------------
    COMPILABLE = ("denoising_unet", "reference_unet", "pose_guider", "vae.decoder", "vae.encoder")

    def enable_compile(self, modules=("denoising_unet", "vae.decoder"), **compile_kwargs) -> None:
        """``torch.compile`` the named networks in place (``nn.Module.compile``: inductor by default, C++ and
        OpenMP on the CPU, Triton on CUDA). The first call of each shape pays the compilation (46.6 s for TINY
        on one core here; minutes at larger sizes), so this is a switch, never a default: measured speed-ups,
        first-call times and output differences are in ``results/bench_pose2video_means.json``
        (``benchmarks/bench_pose2video.py --means``). ``compile_kwargs`` go to ``torch.compile`` (``mode``,
        ``backend``, ``dynamic``...). :meth:`disable_compile` undoes it."""
        for name in self._compilable(modules):
            self._module_at(name).compile(**compile_kwargs)

    def disable_compile(self, modules=COMPILABLE) -> None:
        """Back to eager for the named networks (what :meth:`enable_compile` did is dropped)."""
        for name in self._compilable(modules):
            self._module_at(name)._compiled_call_impl = None

    def _compilable(self, modules) -> tuple[str, ...]:
        modules = (modules,) if isinstance(modules, str) else tuple(modules)
        unknown = [m for m in modules if m not in self.COMPILABLE]
        if unknown:
            raise InputError(f"cannot compile {unknown}: the compilable networks are {list(self.COMPILABLE)}")
        return modules

    def _module_at(self, name: str) -> torch.nn.Module:
        module = self
        for part in name.split("."):
            module = getattr(module, part)
        return module

    # --- inputs -------------------------------------------------------------------------------------
    @staticmethod
    def _as_pil(image, what: str) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(
                f"{what} must be a PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        return PIL.Image.fromarray(arr)

    def _check_inputs(
        self, pose_images, video_length, height, width, num_inference_steps, guidance_scale, generator=None
    ):
        if len(pose_images) == 0:
            raise InputError("pose_images is empty: give at least one driving pose image")
        if video_length < 1 or video_length > len(pose_images):
            raise InputError(
                f"video_length must be between 1 and the number of pose images ({len(pose_images)}), "
                f"got {video_length}"
            )
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise InputError(
                f"height and width must be positive multiples of {multiple}, got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not guidance_scale >= 0 or guidance_scale == float("inf"):
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        sizes = [_image_size(p) for p in pose_images[:video_length]]
        odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if odd is not None:  # one stretched frame would jump: the same size for all, as the CLI asks
            raise InputError(
                f"pose image {odd} is {sizes[odd][1]}x{sizes[odd][0]} but pose image 0 is "
                f"{sizes[0][1]}x{sizes[0][0]}; all pose images must have the same size"
            )
        if isinstance(generator, list) and len(generator) != 1:
            raise InputError(
                f"generator: a list of {len(generator)} generators for a batch of 1 video; pass one "
                "torch.Generator (or a list of exactly one)"
            )

    def _check_conditions(self, image_embeds, ref_latents, shape: tuple) -> None:
        """Precomputed conditions: float tensors of the shapes :meth:`encode_reference` returns."""
        dim = self.image_encoder.config.projection_dim  # the token encode_reference makes
        wanted = {
            "image_embeds": (image_embeds, (1, 1, dim), "(1, 1, D), the CLIP token"),
            "ref_latents": (ref_latents, (1, shape[1], *shape[3:]), "(1, C, h, w), the reference latents"),
        }
        for name, (value, size, what) in wanted.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.shape != size:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else value
                raise InputError(
                    f"{name} must be a float tensor of shape {size} {what}, as encode_reference returns it "
                    f"for this height and width; got {got}"
                )

    def encode_reference(self, ref_image: PIL.Image.Image, height: int, width: int, dtype, device):
        """CLIP tokens (1, 1, D) and reference latents (1, 4, h, w): :func:`encode_reference` with this
        pipeline's VAE and image encoder."""
        return encode_reference(self.vae, self.image_encoder, ref_image, height, width, dtype, device)

    def encode_poses(
        self,
        pose_images: Sequence,
        height: int,
        width: int,
        dtype,
        device,
        ref_pose_image=None,
        faithful: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Pose images -> pose features for the whole sequence: (1, C0, F, h, w), or AniPortrait's five
        multi-scale maps (1, C_k, F, h_k, w_k). Both guiders work frame by frame, so these are exactly the
        features of any window's frames. ``faithful=True`` with AniPortrait's guider feeds it the [-1, 509]
        tensor AniPortrait's inference builds (:func:`anim_lab.pose_guider.prepare_pose_images`)."""
        frames = [self._as_pil(p, f"pose image {i}") for i, p in enumerate(pose_images)]
        if faithful and isinstance(self.pose_guider, PoseGuiderMultiScale):
            guider_dtype = _dtype_of(self.pose_guider)
            pose = self._faithful_pose_tensor(frames, height, width).to(
                device, guider_dtype
            )  # (1, 3, F, H, W)
            ref_pose = None
            if ref_pose_image is not None:
                ref_pil = self._as_pil(ref_pose_image, "ref_pose_image")
                ref_pose = self._faithful_pose_tensor([ref_pil], height, width)[:, :, 0]  # (1, 3, H, W)
                ref_pose = ref_pose.to(device, guider_dtype)
            return [f.to(dtype) for f in self.pose_guider(pose, ref_pose, faithful=True)]
        pose = self.pose_image_processor.preprocess(frames, height=height, width=width)  # (F, 3, H, W) [0, 1]
        guider_dtype = _dtype_of(self.pose_guider)
        pose = rearrange(pose, "f c h w -> 1 c f h w").to(device, guider_dtype)  # (1, 3, F, H, W)
        if isinstance(self.pose_guider, PoseGuiderMultiScale):
            ref_pose = None
            if ref_pose_image is not None:  # (1, 3, H, W); read only by the guider's reference extension
                ref_pil = self._as_pil(ref_pose_image, "ref_pose_image")
                ref_pose = self.pose_image_processor.preprocess(ref_pil, height=height, width=width)
                ref_pose = ref_pose.to(device, guider_dtype)
            return [f.to(dtype) for f in self.pose_guider(pose, ref_pose)]
        return self.pose_guider(pose).to(dtype)

    @staticmethod
    def _faithful_pose_tensor(frames: list[PIL.Image.Image], height: int, width: int) -> torch.Tensor:
        """AniPortrait's inference pose tensor (1, 3, F, H, W) in [-1, 509]: the uint8 frames, not divided by
        255, through ``2x - 1``, resized as diffusers' VaeImageProcessor resizes a tensor (nearest)."""
        pose = prepare_pose_images(
            np.stack([np.asarray(f) for f in frames]), faithful=True
        )  # (1, 3, F, H0, W0)
        pose = rearrange(pose, "1 c f h w -> f c h w")
        if pose.shape[-2:] != (height, width):
            pose = torch.nn.functional.interpolate(pose, size=(height, width), mode="nearest")
        return rearrange(pose, "f c h w -> 1 c f h w")

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
        """(1, 4, F, h, w) -> video (1, 3, F, H, W) in [-1, 1], ``decode_chunk_size`` frames per VAE call."""
        return decode_video(self.vae, latents, decode_chunk_size).float()  # clamped to [-1, 1]

    # --- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        ref_image,
        pose_images: Sequence,
        height: int | None = None,
        width: int | None = None,
        video_length: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        context_frames: int = 24,
        context_overlap: int = 4,
        context_batch_size: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        decode_chunk_size: int = 8,
        ref_pose_image=None,
        faithful: bool = False,
        use_reference_attention: bool = True,
        use_pose_guider: bool = True,
        use_motion_modules: bool = True,
        reference_timestep: int = 0,
        fusion_blocks="full",
        latents: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        ref_latents: torch.Tensor | None = None,
    ):
        """Animate ``ref_image`` with ``pose_images`` (PIL images or (H, W, 3) uint8 arrays).

        ``video_length`` defaults to all pose images; longer requests than ``context_frames`` run in
        overlapping windows (``context_overlap`` frames shared, ``context_batch_size`` windows per UNet call).
        ``ref_pose_image``: the reference's own pose image, for AniPortrait's guider (the released guider
        ignores it). ``faithful=True`` reproduces three reference bugs: overlapping windows summed (not
        averaged) without CFG, the bank rounded to fp16, and (AniPortrait's guider) the [-1, 509] pose
        range. ``callback_on_step_end(pipe, i, t, {"latents": ...})`` may return new latents. Output types:
        "pil", "np", "pt", "latent".

        Ablations, each switching one component off for this call (the chapters' and ``eval_animator``'s
        experiments): ``use_reference_attention=False`` runs no ReferenceNet and every ``attn1`` is plain
        self-attention (the reference image still gives the CLIP token); ``use_pose_guider=False`` adds no
        pose features (as a guider whose output is zero); ``use_motion_modules=False`` skips the motion
        modules (the stage-1 image denoiser, frame by frame, with the same 2D weights). ``reference_timestep``
        (default 0, as the reference): the ReferenceNet sees the reference latent noised to this timestep
        (DDPM forward, noise from ``generator``) and is told that timestep; chapter 05 asks what that changes.
        ``fusion_blocks``: which self-attentions read the bank, as the reference's
        ``ReferenceAttentionControl`` takes it ("full", AnimateAnyone's; "midup"), or a collection of
        ``attn1`` names. ``latents``: the starting noise, (1, C, F, h, w) in the latent shape, as diffusers
        pipelines take it (scaled by the scheduler's ``init_noise_sigma`` as drawn noise is); by default it is
        drawn from ``generator``.

        Precomputed conditions, as diffusers' pipelines take ``ip_adapter_image_embeds``: ``image_embeds``
        (1, 1, D), the CLIP token, and ``ref_latents`` (1, 4, h, w), the reference latents, both as
        :meth:`encode_reference` returns them. Reuse them across calls, or feed known ones; when both are
        given, ``ref_image`` may be None (it is not read).
        """
        if ref_image is not None or image_embeds is None or ref_latents is None:
            ref_image = self._as_pil(ref_image, "ref_image")
        sample_size = self.denoising_unet.unet_kwargs.get("sample_size", 64)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        video_length = len(pose_images) if video_length is None else video_length
        self._check_inputs(
            pose_images, video_length, height, width, num_inference_steps, guidance_scale, generator
        )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if decode_chunk_size < 1:
            raise InputError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        channels = self.denoising_unet.conv_in.weight.shape[1]  # latent channels (LoRA-wrapped or not)
        shape = (1, channels, video_length, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and (
            not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.shape != shape
        ):
            got = f"{latents.dtype} {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) else latents
            raise InputError(f"latents must be a float tensor of shape {shape} (1, C, F, h, w), got {got}")
        self._check_conditions(image_embeds, ref_latents, shape)
        n_train = self.scheduler.config.num_train_timesteps
        if reference_timestep != int(reference_timestep) or not 0 <= reference_timestep < n_train:
            raise InputError(
                f"reference_timestep must be a whole number in [0, {n_train}), got {reference_timestep}"
            )
        device, dtype = self._execution_device, _dtype_of(self.denoising_unet)
        do_cfg = do_classifier_free_guidance(guidance_scale)
        max_len = (self.denoising_unet.motion_kwargs or {}).get("temporal_position_encoding_max_len")
        windows = context_windows(video_length, context_frames, context_overlap, max_len=max_len)
        batch_windows(windows, context_batch_size)  # checks context_batch_size before any network runs

        # 1. CLIP tokens (1, 1, D) and reference latents (1, 4, h, w), unless given
        if image_embeds is None or ref_latents is None:
            clip_tokens, encoded = self.encode_reference(ref_image, height, width, dtype, device)
            ref_latents = encoded if ref_latents is None else ref_latents
        clip_tokens = (clip_tokens if image_embeds is None else image_embeds).to(device, dtype)
        ref_latents = ref_latents.to(device, dtype)

        # 2. pose features for the whole sequence (1, C0, F, h, w) or a list of five; None: no guider
        pose_fea = None
        if use_pose_guider:
            pose_fea = self.encode_poses(
                pose_images[:video_length], height, width, dtype, device, ref_pose_image, faithful=faithful
            )

        # 3. initial noise (1, 4, F, h, w)
        timesteps = set_timesteps(self.scheduler, num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        readers = contextlib.nullcontext()  # no bank: every attn1 stays plain self-attention
        if use_reference_attention:
            readers = reference_attention(
                self.reference_unet,
                self.denoising_unet,
                fusion_blocks=fusion_blocks,
                do_classifier_free_guidance=do_cfg,
                faithful=faithful,
            )
        with readers as bank:
            # 4. the ReferenceNet, once, at t = 0: fills the bank. On the cond row only (the uncond rows never
            # read it); faithful=True runs it on the CFG-doubled batch [zero tokens; CLIP tokens] as the
            # reference does, so the fp16-rounded bank matches it bit for bit.
            t_ref = int(reference_timestep)
            if bank is not None and t_ref:  # an experiment: the ReferenceNet sees a noised reference
                noise = randn_tensor(ref_latents.shape, generator=generator, device=device, dtype=dtype)
                ref_latents = self.scheduler.add_noise(
                    ref_latents, noise, torch.tensor([t_ref], device=device)
                )
            if bank is not None and faithful and do_cfg:
                context = cfg_encoder_hidden_states(clip_tokens)  # (2, 1, D): zero tokens, the CLIP token
                bank.write(cfg_batch(ref_latents), t=t_ref, encoder_hidden_states=context)
            elif bank is not None:
                bank.write(ref_latents, t=t_ref, encoder_hidden_states=clip_tokens)
            # the cond row of every bank entry, (1, HW, C)
            one_reference = {k: v[-1:] for k, v in bank.entries.items()} if bank is not None else {}
            bank_videos = [1]  # how many videos (windows) the bank's rows serve now

            def predict(x: torch.Tensor, batch: list[list[int]], t: torch.Tensor) -> torch.Tensor:
                """x (n, 4, f, h, w): latents of n windows at timestep t -> their prediction, the CFG batch
                (2n, ...)."""
                n = len(batch)
                if bank is not None and bank_videos[0] != n:  # one bank row per window: expanded views
                    bank.load({k: v.expand(n, -1, -1) for k, v in one_reference.items()})
                    bank_videos[0] = n
                # the same frames of the pose features as of the latents: (n, C, f, h, w), or a list of them
                pose = None
                if pose_fea is not None:
                    pose = (
                        [gather_windows(p, batch) for p in pose_fea]
                        if multi_scale
                        else gather_windows(pose_fea, batch)
                    )
                context = clip_tokens.expand(n, -1, -1)  # (n, 1, D)
                if do_cfg:  # (2n, ...): every window's uncond rows first, then the cond rows
                    x = cfg_batch(x)
                    if pose is not None:
                        pose = [cfg_batch(p) for p in pose] if multi_scale else cfg_batch(pose)
                    context = cfg_encoder_hidden_states(context)  # zero CLIP tokens for the uncond rows
                x = self.scheduler.scale_model_input(x, t)
                return self.denoising_unet(
                    x,
                    t,
                    encoder_hidden_states=context,
                    pose_cond_fea=pose,
                    use_motion_modules=use_motion_modules,
                )

            multi_scale = pose_fea is not None and not isinstance(pose_fea, torch.Tensor)

            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    # windows -> averaged prediction (G, 4, F, h, w), G = 2 under CFG (uncond first)
                    noise_pred = predict_in_windows(
                        functools.partial(predict, t=t),
                        latents,
                        windows,
                        context_batch_size,
                        do_cfg,
                        faithful,
                    )
                    if do_cfg:
                        noise_pred = cfg_combine(noise_pred, guidance_scale)  # -> (1, 4, F, h, w)
                    latents = self.scheduler.step(
                        noise_pred, t, latents, eta=DDIM_ETA, generator=generator
                    ).prev_sample
                    check_finite(latents, f"denoising step {i + 1} (t = {int(t)})", self.components)

                    if callback_on_step_end is not None:
                        names = dict(latents=latents)
                        out = callback_on_step_end(
                            self, i, t, {k: names[k] for k in callback_on_step_end_tensor_inputs}
                        )
                        latents = (out or {}).get("latents", latents)
                    progress_bar.update()

        # 5. decode
        if output_type == "latent":
            frames = latents
        else:
            video = self.decode_latents(latents, decode_chunk_size)  # (1, 3, F, H, W) in [-1, 1]
            check_finite(video, "decoding the latents", {"vae": self.vae})
            frames = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return Pose2VideoPipelineOutput(frames=frames, latents=latents)
