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

What differs from the reference, and why (the output is the same to float rounding unless noted):

- The ReferenceNet runs once on the *cond* row only. The reference runs it on ``[uncond, cond]``, but every
  uncond row of the denoiser attends to itself alone, so the uncond half of the bank is never read.
- The bank's keys and values (``to_k``/``to_v`` of the reference tokens) are computed once per block for the
  whole request, not per step, window and frame; the uncond rows never compute attention over the reference.
- Several windows go through the denoiser in one batch (``context_batch_size``), each with its own prediction
  (the reference adds the whole batch's prediction to every window of it: a bug, not reproduced).
- Frames are decoded ``decode_chunk_size`` at a time (a 2D VAE decodes frames independently).
- Without CFG the reference *sums* overlapping windows instead of averaging them, and it rounds the bank to
  fp16 even in fp32 runs. Both are bugs; ``faithful=True`` reproduces them.

Reference attention runs through diffusers attention processors installed for the duration of a call
(``ReferenceAttention``, below). The paired blocks have the same module name in both UNets
(``down_blocks.i.attentions.j.transformer_blocks.0.attn1``), the pairing the reference's width sort yields.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import Attention
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import CLIPVisionModelWithProjection

from ..clip import ClipPreprocess, load_image_encoder
from ..motion import MOTION_SD15
from ..pose_guider import PoseGuider
from ..unet import MOTION_KEY, ReferenceUNet, VideoUNet
from ..vae import load_vae
from ..weights import KeyMismatchError, load_checkpoint, load_into, read_unet_config

__all__ = [
    "Pose2VideoPipeline",
    "Pose2VideoPipelineOutput",
    "ReferenceAttention",
    "context_windows",
    "official_scheduler",
    "save_video",
    "OFFICIAL_SCHEDULER_KWARGS",
    "OFFICIAL_LAYOUTS",
]

# inference_v2.yaml's noise_scheduler_kwargs (Moore-AnimateAnyone and AniPortrait): DDIM, linear betas,
# v-prediction, zero terminal SNR, trailing timesteps. DDIMScheduler(**kwargs) keeps the other defaults.
OFFICIAL_SCHEDULER_KWARGS = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)

# The files of the official repositories' weight folders (README "pretrained_weights" / "pretrained_model").
_BASE_UNET_DIRS = ("stable-diffusion-v1-5", "sd-image-variations-diffusers")
OFFICIAL_LAYOUTS = {
    "animate_anyone": "Moore-AnimateAnyone pretrained_weights/",
    "aniportrait": "AniPortrait pretrained_model/",
}
_LAYOUT_TREE = """{root}
|-- denoising_unet.pth
|-- reference_unet.pth
|-- pose_guider.pth            ({guider})
|-- motion_module.pth          (or an AnimateDiff mm_sd_v15_v2.ckpt)
|-- stable-diffusion-v1-5/     (or sd-image-variations-diffusers/)
|   `-- unet/config.json
|-- sd-vae-ft-mse/             (config.json + diffusion_pytorch_model.safetensors or .bin)
`-- image_encoder/             (config.json + model.safetensors or pytorch_model.bin)
(any .pth/.ckpt may be given as a .safetensors file of the same name instead; safetensors is preferred)"""

_MODEL_INDEX = "model_index.json"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def official_scheduler() -> DDIMScheduler:
    """The scheduler the official inference config builds: ``DDIMScheduler(**noise_scheduler_kwargs)``."""
    return DDIMScheduler(**OFFICIAL_SCHEDULER_KWARGS)


# --- context windows ----------------------------------------------------------------------------------------
def context_windows(num_frames: int, context_frames: int, context_overlap: int) -> list[list[int]]:
    """The reference's ``uniform`` schedule at step 0 (closed loop, stride 1): windows of ``context_frames``
    frames starting every ``context_frames - context_overlap`` frames, indices wrapped modulo ``num_frames``
    (the last window mixes the end with the start). One window when the video fits in it."""
    if context_frames < 1 or not 0 <= context_overlap < context_frames:
        raise ValueError(
            f"need context_frames >= 1 and 0 <= context_overlap < context_frames, "
            f"got context_frames={context_frames}, context_overlap={context_overlap}"
        )
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    step = context_frames - context_overlap
    return [[f % num_frames for f in range(j, j + context_frames)] for j in range(0, num_frames, step)]


# --- reference attention ------------------------------------------------------------------------------------
def _self_attention_names(unet: torch.nn.Module) -> list[str]:
    """Names of the spatial transformer blocks' self-attentions (``...transformer_blocks.0.attn1``); the
    motion modules' temporal attentions are not among them."""
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, Attention)
        and n.endswith(".attn1")
        and ".transformer_blocks." in n
        and MOTION_KEY not in n
    ]


def _attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head scaled dot-product attention on projected tokens: (N, Lq, D), (N, Lk, D) -> (N, Lq, D)."""
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=attn.heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (N, heads, Lq, D/heads)
    return rearrange(out, "n h l d -> n l (h d)")


class _WriteProcessor:
    """ReferenceNet side: keep the self-attention input (norm1 output, (B, HW, C)), then attend as usual."""

    def __init__(self, control: ReferenceAttention, name: str, inner):
        self.control, self.name, self.inner = control, name, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.control.tokens[self.name] = hidden_states.detach()
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


class _ReadProcessor:
    """Denoiser side: cond rows attend to their own tokens plus the reference tokens; uncond rows (the first
    half of the batch under CFG) attend to their own tokens only."""

    def __init__(self, control: ReferenceAttention, name: str):
        self.control, self.name = control, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("reference attention replaces a plain self-attention (no context, no mask)")
        rows = hidden_states.shape[0]  # B*F rows: (uncond windows, cond windows) x frames
        n_uncond = rows // 2 if self.control.do_classifier_free_guidance else 0
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)  # (rows, L, D)
        ref_k, ref_v = self.control.reference_keys_values(self.name, attn)  # (1, L_ref, D), once per request
        n_cond = rows - n_uncond
        k_cond = torch.cat([k[n_uncond:], ref_k.expand(n_cond, -1, -1)], dim=1)  # (n_cond, L + L_ref, D)
        v_cond = torch.cat([v[n_uncond:], ref_v.expand(n_cond, -1, -1)], dim=1)
        out = _attention(attn, q[n_uncond:], k_cond, v_cond)  # (n_cond, L, D)
        if n_uncond:
            out_uncond = _attention(attn, q[:n_uncond], k[:n_uncond], v[:n_uncond])  # plain self-attention
            out = torch.cat([out_uncond, out])  # (rows, L, D)
        return attn.to_out[1](attn.to_out[0](out))  # output projection, dropout


class ReferenceAttention:
    """Reference attention between a ReferenceNet (writer) and a denoising UNet (reader), paired by name.

    Used as a context manager: processors are installed on enter and the originals restored (and the bank
    emptied) on exit. ``round_bank_fp16`` mirrors the reference's ``update(dtype=torch.float16)`` default.
    (A local adapter: ``anim_lab.reference`` is the module that teaches reference attention.)
    """

    def __init__(
        self,
        reference_unet: torch.nn.Module,
        denoising_unet: torch.nn.Module,
        do_classifier_free_guidance: bool,
        round_bank_fp16: bool = False,
    ):
        self.writers = dict(reference_unet.named_modules())
        self.readers = dict(denoising_unet.named_modules())
        self.names = _self_attention_names(reference_unet)
        unpaired = [n for n in self.names if n not in self.readers]
        if unpaired or len(self.names) != len(_self_attention_names(denoising_unet)):
            raise ValueError(
                "the reference UNet and the denoising UNet must have the same spatial transformer blocks "
                f"(paired by name); unpaired: {unpaired[:4]}"
            )
        self.do_classifier_free_guidance = do_classifier_free_guidance
        self.round_bank_fp16 = round_bank_fp16
        self.tokens: dict[str, torch.Tensor] = {}
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._saved: list[tuple[Attention, object]] = []

    def reference_keys_values(self, name: str, attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._kv:
            if name not in self.tokens:
                raise RuntimeError(f"the bank has no entry for {name}: run the reference UNet first")
            tokens = self.tokens[name]  # (1, L_ref, C)
            if self.round_bank_fp16:
                tokens = tokens.to(torch.float16).to(tokens.dtype)
            self._kv[name] = (attn.to_k(tokens), attn.to_v(tokens))  # (1, L_ref, D) each
        return self._kv[name]

    def __enter__(self) -> ReferenceAttention:
        for name in self.names:
            writer, reader = self.writers[name], self.readers[name]
            self._saved += [(writer, writer.processor), (reader, reader.processor)]
            writer.set_processor(_WriteProcessor(self, name, writer.processor))
            reader.set_processor(_ReadProcessor(self, name))
        return self

    def __exit__(self, *exc) -> None:
        for module, processor in self._saved:
            module.set_processor(processor)
        self._saved.clear()
        self.tokens.clear()
        self._kv.clear()


# --- output -------------------------------------------------------------------------------------------------
@dataclass
class Pose2VideoPipelineOutput(BaseOutput):
    """``frames``: "pil" a list (batch) of lists of PIL images; "np" (B, F, H, W, 3) float in [0, 1];
    "pt" (B, F, 3, H, W) float in [0, 1]; "latent" (B, 4, F, h, w)."""

    frames: list | np.ndarray | torch.Tensor


def _frames_to_uint8(frames) -> np.ndarray:
    """Any pipeline output (or one video of it) -> (F, H, W, 3) uint8."""
    if isinstance(frames, Pose2VideoPipelineOutput):
        frames = frames.frames
    if isinstance(frames, list) and frames and isinstance(frames[0], list):
        frames = frames[0]  # the first video of a batch
    if isinstance(frames, list):
        if not frames or not all(isinstance(f, PIL.Image.Image) for f in frames):
            raise ValueError("frames must be PIL images, an (F, H, W, 3) array or an (F, 3, H, W) tensor")
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 5:
            frames = frames[0]
        frames = rearrange(frames.detach().float().cpu(), "f c h w -> f h w c").numpy()  # (F, H, W, 3)
    frames = np.asarray(frames)
    if frames.ndim == 5:
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    return frames


def save_video(frames, path: str | os.PathLike, fps: float = 8.0, audio_from=None) -> Path:
    """Write pipeline output (any output type; the first video of a batch) to ``.mp4`` or ``.gif``.

    Written to a temporary file and renamed at the end, so a failure leaves nothing at ``path``;
    ``audio_from``: a media file whose audio is muxed into an mp4."""
    from ..video import write_video

    return write_video(path, _frames_to_uint8(frames), fps, audio_from=audio_from)


# --- the pipeline -------------------------------------------------------------------------------------------
def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _pose_guider_kwargs(guider: PoseGuider) -> dict:
    """The constructor kwargs of an AnimateAnyone PoseGuider, read off its layers."""
    return dict(
        conditioning_channels=guider.conv_in.in_channels,
        block_out_channels=[guider.conv_in.out_channels] + [c.out_channels for c in guider.blocks[1::2]],
        conditioning_embedding_channels=guider.conv_out.out_channels,
    )


class Pose2VideoPipeline(DiffusionPipeline):
    """Reference image + pose images -> video, with AnimateAnyone's ReferenceNet, PoseGuider and motion
    modules (see the module docstring for the order of the loop and what differs from the reference).

    Components: ``vae`` (AutoencoderKL), ``image_encoder`` (CLIPVisionModelWithProjection), ``reference_unet``
    (ReferenceUNet), ``denoising_unet`` (VideoUNet), ``pose_guider`` (PoseGuider), ``scheduler``.
    """

    model_cpu_offload_seq = "image_encoder->reference_unet->pose_guider->denoising_unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        reference_unet: ReferenceUNet,
        denoising_unet: VideoUNet,
        pose_guider: PoseGuider,
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

    # diffusers reads ``module.device``/``.dtype``, which plain torch modules lack: ask the denoiser instead
    @property
    def device(self) -> torch.device:
        return next(self.denoising_unet.parameters()).device

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    @property
    def dtype(self) -> torch.dtype:
        return _dtype_of(self.denoising_unet)

    def to(self, *args, **kwargs) -> Pose2VideoPipeline:
        """``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)``: all models."""
        for module in self.components.values():
            if isinstance(module, torch.nn.Module):
                module.to(*args, **kwargs)
        return self

    # --- inputs -------------------------------------------------------------------------------------
    @staticmethod
    def _as_pil(image, what: str) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(
                f"{what} must be a PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        return PIL.Image.fromarray(arr)

    def _check_inputs(self, pose_images, video_length, height, width, num_inference_steps, guidance_scale):
        if len(pose_images) == 0:
            raise ValueError("pose_images is empty: give at least one driving pose image")
        if video_length < 1 or video_length > len(pose_images):
            raise ValueError(
                f"video_length must be between 1 and the number of pose images ({len(pose_images)}), "
                f"got {video_length}"
            )
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise ValueError(
                f"height and width must be positive multiples of {multiple}, got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")

    def encode_reference(self, ref_image: PIL.Image.Image, height: int, width: int, dtype, device):
        """CLIP tokens (1, 1, D) of the reference squashed to the encoder's square size, and the reference
        latents (1, 4, h, w) = VAE mean x scaling factor."""
        size = self.image_encoder.config.image_size
        # squashed to the encoder's square (PIL's default bicubic, as the reference), then CLIP-normalised
        clip_input = self.image_processor.pil_to_numpy(ref_image.resize((size, size)))  # (1, S, S, 3) [0, 1]
        clip_input = rearrange(torch.from_numpy(clip_input), "b h w c -> b c h w") * 2 - 1  # -> [-1, 1]
        pixel_values = ClipPreprocess(size=size, crop_size=size)(clip_input).to(device, dtype)
        clip_tokens = self.image_encoder(pixel_values=pixel_values).image_embeds[
            :, None
        ]  # (1, D) -> (1, 1, D)
        ref = self.image_processor.preprocess(ref_image, height=height, width=width)  # (1, 3, H, W) [-1, 1]
        ref = ref.to(device, self.vae.dtype)
        ref_latents = self.vae.encode(ref).latent_dist.mean * self.vae.config.scaling_factor  # (1, 4, h, w)
        return clip_tokens, ref_latents.to(dtype)

    def encode_poses(self, pose_images: Sequence, height: int, width: int, dtype, device) -> torch.Tensor:
        """Pose images -> pose features for the whole sequence (1, C0, F, h, w) (the guider is per frame)."""
        frames = [self._as_pil(p, f"pose image {i}") for i, p in enumerate(pose_images)]
        pose = self.pose_image_processor.preprocess(frames, height=height, width=width)  # (F, 3, H, W) [0, 1]
        pose = rearrange(pose, "f c h w -> 1 c f h w").to(device, _dtype_of(self.pose_guider))
        return self.pose_guider(pose).to(dtype)  # (1, C0, F, h, w)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
        """(1, 4, F, h, w) -> video (1, 3, F, H, W) in [-1, 1], ``decode_chunk_size`` frames per VAE call."""
        frames = rearrange(latents, "b c f h w -> (b f) c h w") / self.vae.config.scaling_factor
        video = torch.cat(
            [
                self.vae.decode(frames[i : i + decode_chunk_size].to(self.vae.dtype)).sample.float()
                for i in range(0, len(frames), decode_chunk_size)
            ]
        )  # (F, 3, H, W)
        return rearrange(video, "(b f) c h w -> b c f h w", b=latents.shape[0]).clamp(-1, 1)

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
        faithful: bool = False,
    ):
        """Animate ``ref_image`` with ``pose_images`` (PIL images or (H, W, 3) uint8 arrays).

        ``video_length`` defaults to all pose images; longer requests than ``context_frames`` run in
        overlapping windows (``context_overlap`` frames shared, ``context_batch_size`` windows per UNet call).
        ``faithful=True`` reproduces two reference bugs: overlapping windows summed (not averaged) without
        CFG, and the bank rounded to fp16. ``callback_on_step_end(pipe, i, t, {"latents": ...})`` may return
        new latents. Output types: "pil", "np", "pt", "latent".
        """
        ref_image = self._as_pil(ref_image, "ref_image")
        sample_size = self.denoising_unet.unet_kwargs.get("sample_size", 64)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        video_length = len(pose_images) if video_length is None else video_length
        self._check_inputs(pose_images, video_length, height, width, num_inference_steps, guidance_scale)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if context_batch_size < 1 or decode_chunk_size < 1:
            raise ValueError("context_batch_size and decode_chunk_size must be >= 1")
        device, dtype = self._execution_device, _dtype_of(self.denoising_unet)
        do_cfg = guidance_scale > 1.0

        # 1. CLIP tokens (1, 1, D) and reference latents (1, 4, h, w)
        clip_tokens, ref_latents = self.encode_reference(ref_image, height, width, dtype, device)
        clip_tokens = clip_tokens.to(dtype)
        uncond_tokens = torch.zeros_like(clip_tokens)  # CFG's uncond context: zeros

        # 2. pose features for the whole sequence (1, C0, F, h, w)
        pose_fea = self.encode_poses(pose_images[:video_length], height, width, dtype, device)

        # 3. initial noise
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        channels = self.denoising_unet.conv_in.in_channels
        shape = (1, channels, video_length, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma  # (1, 4, F, h, w)

        step_kwargs = {}
        step_params = inspect.signature(self.scheduler.step).parameters
        if "eta" in step_params:
            step_kwargs["eta"] = 0.0
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        windows = context_windows(video_length, context_frames, context_overlap)
        batches = [windows[i : i + context_batch_size] for i in range(0, len(windows), context_batch_size)]
        counter = torch.zeros((1, 1, video_length, 1, 1), device=device, dtype=dtype)
        for window in windows:
            counter[:, :, window] += 1  # how many windows cover each frame

        with ReferenceAttention(self.reference_unet, self.denoising_unet, do_cfg, round_bank_fp16=faithful):
            # 4. the ReferenceNet, once, at t = 0, on the cond row: fills the bank
            self.reference_unet(
                ref_latents, torch.zeros_like(timesteps[0]), encoder_hidden_states=clip_tokens
            )

            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    noise_pred = torch.zeros((2 if do_cfg else 1, *shape[1:]), device=device, dtype=dtype)
                    for batch in batches:
                        k = len(batch)
                        # (1, 4, F, h, w) -> (k, 4, f, h, w): the windows of this batch, side by side
                        x = torch.cat([latents[:, :, w] for w in batch])
                        pose = torch.cat([pose_fea[:, :, w] for w in batch])  # (k, C0, f, h, w)
                        context = clip_tokens.expand(k, -1, -1)  # (k, 1, D)
                        if do_cfg:  # (2k, ...): uncond rows first, as the reference orders them
                            x, pose = torch.cat([x, x]), torch.cat([pose, pose])
                            context = torch.cat([uncond_tokens.expand(k, -1, -1), context])
                        x = self.scheduler.scale_model_input(x, t)
                        pred = self.denoising_unet(x, t, encoder_hidden_states=context, pose_cond_fea=pose)
                        pred = rearrange(pred, "(g k) c f h w -> k g c f h w", k=k)  # g: uncond/cond
                        for j, w in enumerate(batch):
                            noise_pred[:, :, w] += pred[j]

                    if do_cfg:
                        noise_uncond, noise_cond = (noise_pred / counter).chunk(2)
                        noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                    elif not faithful:
                        noise_pred = noise_pred / counter  # the reference sums here (faithful=True)
                    latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

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
            frames = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return Pose2VideoPipelineOutput(frames=frames)

    # --- anim_lab's own folder layout ---------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the pipeline to a folder: ``vae/``, ``image_encoder/``, ``scheduler/`` in their libraries'
        layouts, and ``reference_unet/``, ``denoising_unet/``, ``pose_guider/`` as config.json (constructor
        kwargs) + diffusion_pytorch_model.safetensors. Written to a temporary folder and moved into place, so
        a failure leaves nothing half-written."""
        target = Path(save_directory)
        if target.exists() and any(target.iterdir()) and not (target / _MODEL_INDEX).is_file():
            raise FileExistsError(
                f"{target} exists and is not a saved pipeline; choose an empty or new folder"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.vae.save_pretrained(tmp / "vae")
            self.image_encoder.save_pretrained(tmp / "image_encoder")
            self.scheduler.save_pretrained(tmp / "scheduler")
            own = {
                "reference_unet": {"unet_kwargs": self.reference_unet.unet_kwargs},
                "denoising_unet": {
                    "unet_kwargs": self.denoising_unet.unet_kwargs,
                    "motion_kwargs": self.denoising_unet.motion_kwargs,
                },
                "pose_guider": {"kwargs": _pose_guider_kwargs(self.pose_guider)},
            }
            for name, config in own.items():
                module = getattr(self, name)
                (tmp / name).mkdir()
                (tmp / name / "config.json").write_text(
                    json.dumps({"_class_name": type(module).__name__, **config}, indent=2)
                )
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(state, tmp / name / _WEIGHTS)
            (tmp / _MODEL_INDEX).write_text(json.dumps({"_class_name": type(self).__name__}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> Pose2VideoPipeline:
        """Load a folder written by :meth:`save_pretrained` (every key checked: nothing half-loads)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        folder = Path(pretrained_model_name_or_path)
        if not (folder / _MODEL_INDEX).is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved anim_lab Pose2VideoPipeline (no {_MODEL_INDEX}); for the "
                "official AnimateAnyone / AniPortrait weight folders use "
                "Pose2VideoPipeline.from_official(folder, layout=...)"
            )

        def own(name: str):
            config = json.loads((folder / name / "config.json").read_text())
            weights = load_checkpoint(folder / name / _WEIGHTS)
            with torch.device("meta"):
                if name == "reference_unet":
                    module = ReferenceUNet(config["unet_kwargs"])
                elif name == "denoising_unet":
                    module = VideoUNet(config["unet_kwargs"], config["motion_kwargs"])
                else:
                    module = PoseGuider(**config["kwargs"])
            load_into(module, weights, assign=True, what=f"{name}/{_WEIGHTS}")
            return module.to(torch_dtype).eval()

        return cls(
            vae=load_vae(folder / "vae", torch_dtype=torch_dtype),
            image_encoder=load_image_encoder(folder / "image_encoder", torch_dtype=torch_dtype),
            reference_unet=own("reference_unet"),
            denoising_unet=own("denoising_unet"),
            pose_guider=own("pose_guider"),
            scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        )

    # --- the official weight folders ----------------------------------------------------------------
    @classmethod
    def from_official(
        cls,
        folder: str | os.PathLike,
        layout: str = "animate_anyone",
        *,
        torch_dtype: torch.dtype = torch.float32,
        motion_kwargs: dict | None = None,
    ) -> Pose2VideoPipeline:
        """Load the weights as the official repositories ship them (see ``_LAYOUT_TREE``), strictly.

        The UNets' 2D configuration comes from the base model's ``unet/config.json`` (SD1.5 or
        sd-image-variations; its weights are not read: ``denoising_unet.pth`` and ``reference_unet.pth``
        hold every 2D key), the motion modules from ``motion_module.pth`` (``motion_kwargs``: default the
        inference_v2.yaml values). The scheduler is the official one (:func:`official_scheduler`).
        """
        if layout not in OFFICIAL_LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(OFFICIAL_LAYOUTS)}")
        folder = Path(folder)
        guider_name = "AniPortrait multi-scale" if layout == "aniportrait" else "AnimateAnyone single-scale"
        tree = _LAYOUT_TREE.format(root=f"{folder}/", guider=guider_name)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"weights folder {folder} does not exist; expected the {layout} layout:\n{tree}"
            )

        missing = []

        def weight_file(*stems: str) -> Path | None:
            for stem in stems:  # safetensors first: it cannot run code when loaded
                for suffix in (".safetensors", Path(stem).suffix or ".pth"):
                    path = folder / (Path(stem).stem + suffix)
                    if path.is_file():
                        return path
            missing.append(" or ".join(stems))
            return None

        def model_dir(names: Sequence[str], weight_names: Sequence[str], subfolder: str = "") -> Path | None:
            for name in names:
                d = folder / name / subfolder
                if (d / "config.json").is_file() and (
                    not weight_names or any((d / w).is_file() for w in weight_names)
                ):
                    return d
            missing.append(
                " or ".join(f"{n}/{subfolder}".rstrip("/") for n in names) + "/ (config.json + weights)"
            )
            return None

        files = dict(
            denoising_unet=weight_file("denoising_unet.pth"),
            reference_unet=weight_file("reference_unet.pth"),
            pose_guider=weight_file("pose_guider.pth"),
            motion_module=weight_file("motion_module.pth", "mm_sd_v15_v2.ckpt"),
            base_unet=model_dir(_BASE_UNET_DIRS, (), "unet"),
            vae=model_dir(
                ["sd-vae-ft-mse"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
            ),
            image_encoder=model_dir(
                ["image_encoder", "sd-image-variations-diffusers/image_encoder"],
                ["model.safetensors", "pytorch_model.bin"],
            ),
        )
        if missing:
            raise FileNotFoundError(
                f"the {layout} weights folder {folder} is incomplete; missing: {'; '.join(missing)}.\n"
                f"Expected layout:\n{tree}"
            )

        unet_kwargs = read_unet_config(files["base_unet"])
        motion_kwargs = MOTION_SD15 if motion_kwargs is None else motion_kwargs
        with torch.device("meta"):
            reference_unet = ReferenceUNet(unet_kwargs)
            denoising_unet = VideoUNet(unet_kwargs, motion_kwargs)
        reference_unet.load_weights(load_checkpoint(files["reference_unet"]), assign=True)
        denoising_unet.load_2d_weights(load_checkpoint(files["denoising_unet"]), assign=True)
        denoising_unet.load_motion_modules(load_checkpoint(files["motion_module"]), assign=True)
        pose_guider = cls._official_pose_guider(
            load_checkpoint(files["pose_guider"]), layout, files["pose_guider"]
        )
        return cls(
            vae=load_vae(files["vae"], torch_dtype=torch_dtype),
            image_encoder=load_image_encoder(files["image_encoder"], torch_dtype=torch_dtype),
            reference_unet=reference_unet.to(torch_dtype).eval(),
            denoising_unet=denoising_unet.to(torch_dtype).eval(),
            pose_guider=pose_guider.to(torch_dtype).eval(),
            scheduler=official_scheduler(),
        )

    @staticmethod
    def _official_pose_guider(state_dict: dict, layout: str, path: Path) -> torch.nn.Module:
        if layout == "aniportrait":
            # AniPortrait's multi-scale guider (184 keys, starting with `scale`) arrives with issue 11.
            if "scale" not in state_dict:
                raise ValueError(
                    f"{path.name} is a single-scale AnimateAnyone pose guider ({len(state_dict)} keys, no "
                    "'scale'), not AniPortrait's multi-scale one: is this an animate_anyone folder? "
                    "Pass layout='animate_anyone'"
                )
            raise NotImplementedError(
                "layout='aniportrait' needs anim_lab.pose_guider.PoseGuiderMultiScale and the UNet's "
                "multi-scale pose features (issues 11 and 10), which are not merged yet"
            )
        if "conv_in.weight" not in state_dict or "scale" in state_dict:
            raise ValueError(
                f"{path.name} is not an AnimateAnyone single-scale pose guider (keys like "
                f"{sorted(state_dict)[:3]}); for AniPortrait weights pass layout='aniportrait'"
            )
        convs = [
            state_dict[f"blocks.{i}.weight"] for i in range(1, 64, 2) if f"blocks.{i}.weight" in state_dict
        ]
        kwargs = dict(
            conditioning_channels=state_dict["conv_in.weight"].shape[1],
            block_out_channels=[state_dict["conv_in.weight"].shape[0]] + [w.shape[0] for w in convs],
            conditioning_embedding_channels=state_dict["conv_out.weight"].shape[0],
        )
        with torch.device("meta"):
            guider = PoseGuider(**kwargs)
        try:
            load_into(guider, state_dict, assign=True, what=path.name)
        except KeyMismatchError as err:
            raise KeyMismatchError(err.report, f"{path.name} (layout 'animate_anyone')") from None
        return guider
