"""HalloPipeline: a reference portrait and a recording in, a talking video out (Hallo, fudan-generative).

The loop follows Hallo's ``scripts/inference.py`` + ``FaceAnimatePipeline.__call__`` in order
(``reference/implementations.md`` §3; the parts are in :mod:`anim_lab.hallo`):

    audio (16 kHz) -> wav2vec2, every layer, at 25 fps, zero-padded to a multiple of clip_length frames
        -> 5-frame windows (F, 5, L, C) -> audio_proj -> 32 tokens per frame (1, F, T, D)
    identity embedding of the reference -> image_proj -> K tokens (1, K, D); uncond = image_proj(zeros)
    landmarks of the reference -> face-region masks (full / face / lip at every UNet level) and the face box
    face box -> face_locator -> added after conv_in (the same map for every frame; uncond rows: zeros)
    for each segment of clip_length frames (anim_lab.hallo.segments):
        motion frames: copies of the reference (segment 0), else the last n generated frames, in pixels
        ReferenceNet once, t = 0, on [reference, motion frames] per video -> the bank: the reference's entry
            for spatial attention (cond rows only), the motion frames' entries prepended along time before
            each motion module (every row: the uncond video's motion frames are encoded with its own tokens)
        noise (1, 4, clip_length, h, w) from the generator
        for each DDIM step: the CFG batch [uncond ; cond]
            uncond row: identity tokens image_proj(0), audio tokens zeros (after projection), face-locator
                features zeros, no reference attention; its own motion frames
            cond row: the identity tokens, the segment's audio tokens, the face-locator features, the bank
            noise_pred = uncond + guidance_scale * (cond - uncond);  scheduler.step
        VAE decode of the segment
    the video cut to the audio's true length, ceil(seconds * fps) frames

Hallo guides audio and identity together: one uncond row that lacks both (its pipeline has no separate
audio / identity scales).

Stand-ins and differences from the reference (the computation is otherwise the same):

- **Identity**: Hallo feeds InsightFace's 512-d ArcFace embedding of the largest face. InsightFace and its
  weights are not available here; ``image_encoder`` (a ``CLIPVisionModelWithProjection``, the toy CLIP for the
  toy models) gives the identity embedding instead: its ``image_embeds`` (1, E) of the reference squashed to
  its square, exactly as :func:`anim_lab.pipelines.pose2video.encode_reference` preprocesses it.
  ``image_proj.config.clip_embeddings_dim`` must equal the encoder's ``projection_dim``.
- **Vocal separation** (Hallo: Kim_Vocal_2 MDX-Net before wav2vec2) is not run: give clean speech.
- **Landmarks**: mediapipe's ``FaceLandmarker`` on the reference (:func:`anim_lab.landmarks.detect_landmarks`,
  the same 478-point mesh Hallo's ``get_mask`` uses), or ``landmarks=`` given (the toy world's exact ones).
  Hallo uses the whole image as the face region when no face is found; here that is an error, so that a
  wrong input is named rather than animated badly.
- The masks stay float and follow the image's aspect ratio (see :func:`anim_lab.hallo.face_region_masks`);
  the face box is the face locator's input, repeated to its ``conditioning_channels``.
- The reference latents are encoded once (Hallo encodes [reference, motion frames] each segment: the same
  numbers); the face-locator features and the audio tokens are computed once for the whole video (both
  work frame by frame, so a segment's slice equals Hallo's per-segment computation).
- ``faithful=True`` reproduces Hallo's known deviations (:mod:`anim_lab.hallo`): the ReferenceNet's tiled
  tokens, the skipped motion modules of the blocks without spatial attention, the bank rounded to fp16.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange, repeat
from transformers import CLIPVisionModelWithProjection, Wav2Vec2Model

from .. import audio as A
from ..clip import ClipPreprocess
from ..errors import InputError
from ..guidance import DDIM_ETA, cfg_batch, cfg_combine, do_classifier_free_guidance, set_timesteps
from ..hallo import (
    AudioProjModel,
    FaceRegionMasks,
    ImageProjModel,
    face_region_masks,
    reference_unet_tokens,
    segments,
    split_motion_bank,
)
from ..pose_guider import PoseGuider
from ..reference import reference_attention
from ..unet import ReferenceUNet, VideoUNet
from ..vae import decode_video
from ..vae import encode as vae_encode
from .pose2video import check_finite
from .saved import SavedPipelineMixin, saved_files

__all__ = [
    "HalloPipeline",
    "HalloPipelineOutput",
    "identity_embedding",
    "scale_landmarks",
    "face_box_input",
    "SAVED_FILES",
    "HALLO_FPS",
]

HALLO_FPS = A.HALLO_FPS  # 25
_OWN = ("reference_unet", "denoising_unet", "face_locator", "image_proj", "audio_proj")
SAVED_FILES = saved_files(
    (
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/config.json",
        "image_encoder/model.safetensors",
        "image_encoder/preprocessor_config.json",
        "audio_encoder/config.json",
        "audio_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ),
    _OWN,
)


@dataclass
class HalloPipelineOutput(BaseOutput):
    """``frames``: "pil" a list (batch of 1) of lists of PIL images; "np" (1, F, H, W, 3) float in [0, 1];
    "pt" (1, F, 3, H, W) float in [0, 1]; "latent" (1, 4, F, h, w). ``latents``: the final latents
    (1, 4, F, h, w) of every segment, cut to the audio's length like the frames. ``num_frames``: F =
    ``ceil(seconds * fps)``."""

    frames: list | np.ndarray | torch.Tensor
    latents: torch.Tensor | None = None
    num_frames: int = 0


# --- the conditions, as functions (the training script uses the same ones) ---------------------------------
def identity_embedding(
    image_encoder: CLIPVisionModelWithProjection, ref_image: PIL.Image.Image
) -> torch.Tensor:
    """The identity embedding (1, E) that stands in for Hallo's ArcFace embedding: ``image_embeds`` of the
    reference squashed to the encoder's square (PIL bicubic) and CLIP-normalised from its uint8 pixels, the
    preprocessing of :func:`anim_lab.pipelines.pose2video.encode_reference`."""
    size = image_encoder.config.image_size
    square = torch.from_numpy(np.asarray(ref_image.convert("RGB").resize((size, size))).copy())  # (S, S, 3)
    pixels = ClipPreprocess(size=size, crop_size=size).from_uint8(rearrange(square, "h w c -> 1 c h w"))
    p = next(image_encoder.parameters())
    return image_encoder(pixel_values=pixels.to(p.device, p.dtype)).image_embeds  # (1, E)


def scale_landmarks(landmarks, native: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(N, 2+) pixel landmarks of an image of ``native`` (height, width) -> (N, 2) pixels of ``size``
    (pixel centres kept: x' = (x + 0.5) * s - 0.5). Checked: N >= 468 finite points."""
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.ndim != 2 or lmk.shape[0] < 468 or lmk.shape[1] < 2 or not np.isfinite(lmk).all():
        raise InputError(
            f"landmarks must be (478, 2) (or (>= 468, 2+)) finite pixel coordinates of the reference image "
            f"(mediapipe's face mesh, FaceLandmarks.pixels); got {lmk.shape}"
        )
    xy = lmk[:, :2]
    if tuple(native) != tuple(size):
        s = np.array([size[1] / native[1], size[0] / native[0]])
        xy = (xy + 0.5) * s - 0.5
    return xy


def face_box_input(box: torch.Tensor, channels: int, num_frames: int = 1) -> torch.Tensor:
    """The face locator's input: the face box (H, W) in [0, 1] -> (1, channels, F, H, W), the same map on
    every channel and frame (Hallo's ``*_face_mask.png`` repeated over the clip)."""
    return repeat(box, "h w -> 1 c f h w", c=channels, f=num_frames)


# --- the pipeline -------------------------------------------------------------------------------------------
def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class HalloPipeline(SavedPipelineMixin, DiffusionPipeline):
    """Reference image + speech -> talking video, with Hallo's audio modules, face-region masks, face locator,
    identity tokens and motion frames on top of AnimateAnyone's ReferenceNet and motion modules (module
    docstring: the order of the loop and what differs from the reference).

    Components: ``vae`` (AutoencoderKL), ``image_encoder`` (CLIPVisionModelWithProjection: the identity
    embedding, standing in for ArcFace), ``reference_unet`` (ReferenceUNet), ``denoising_unet`` (VideoUNet
    built with ``audio_kwargs``), ``face_locator`` (PoseGuider), ``image_proj`` (ImageProjModel),
    ``audio_proj`` (AudioProjModel), ``audio_encoder`` (transformers Wav2Vec2Model; its input is normalised
    as facebook/wav2vec2-base-960h's feature extractor does), ``scheduler`` (DDIM).
    """

    model_cpu_offload_seq = (
        "image_encoder->image_proj->audio_encoder->audio_proj->face_locator->reference_unet->"
        "denoising_unet->vae"
    )
    # saved folders (anim_lab.pipelines.saved: save_pretrained / from_pretrained check before they act)
    SAVED_FILES = SAVED_FILES
    LIBRARY_COMPONENTS = ("vae", "image_encoder", "audio_encoder", "scheduler")
    OWN_COMPONENTS = {
        "reference_unet": (ReferenceUNet,),
        "denoising_unet": (VideoUNet,),
        "face_locator": (PoseGuider,),
        "image_proj": (ImageProjModel,),
        "audio_proj": (AudioProjModel,),
    }

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        reference_unet: ReferenceUNet,
        denoising_unet: VideoUNet,
        face_locator: PoseGuider,
        image_proj: ImageProjModel,
        audio_proj: AudioProjModel,
        audio_encoder: Wav2Vec2Model,
        scheduler: DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            image_encoder=image_encoder,
            reference_unet=reference_unet,
            denoising_unet=denoising_unet,
            face_locator=face_locator,
            image_proj=image_proj,
            audio_proj=audio_proj,
            audio_encoder=audio_encoder,
            scheduler=scheduler,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor)
        self.audio_extractor = A.feature_extractor()

    # --- checks ---------------------------------------------------------------------------------------
    def check_components(self) -> None:
        """The components must fit each other: every width that one hands to another."""
        unet, ap, ip, enc = (
            self.denoising_unet,
            self.audio_proj.config,
            self.image_proj.config,
            self.audio_encoder,
        )
        problems = []
        if not getattr(unet, "has_audio_modules", False):
            problems.append("denoising_unet has no audio modules (build it with audio_kwargs)")
        else:
            width = unet.audio_kwargs["audio_attention_dim"]
            if ap.output_dim != width:
                problems.append(f"audio_proj.output_dim {ap.output_dim} != the audio modules' width {width}")
        if (ap.blocks, ap.channels) != (enc.config.num_hidden_layers, enc.config.hidden_size):
            problems.append(
                f"audio_proj takes (blocks, channels) = ({ap.blocks}, {ap.channels}) but the audio encoder "
                f"has "
                f"{enc.config.num_hidden_layers} layers of width {enc.config.hidden_size}"
            )
        cross = unet.unet_kwargs["cross_attention_dim"]
        if ip.cross_attention_dim != cross:
            problems.append(f"image_proj.cross_attention_dim {ip.cross_attention_dim} != the UNets' {cross}")
        if ip.clip_embeddings_dim != self.image_encoder.config.projection_dim:
            problems.append(
                f"image_proj.clip_embeddings_dim {ip.clip_embeddings_dim} != the image encoder's "
                f"projection_dim "
                f"{self.image_encoder.config.projection_dim}"
            )
        c0 = unet.conv_in.weight.shape[0]
        if self.face_locator.config.conditioning_embedding_channels != c0:
            problems.append(
                f"face_locator gives {self.face_locator.config.conditioning_embedding_channels} channels, "
                f"conv_in {c0}"
            )
        if problems:
            raise InputError("the pipeline's components do not fit: " + "; ".join(problems))

    @staticmethod
    def _as_pil(image, what: str = "ref_image") -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image.convert("RGB")
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise InputError(
                f"{what} must be a PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}"
            )
        return PIL.Image.fromarray(arr)

    def _check_inputs(
        self, height, width, num_inference_steps, guidance_scale, clip_length, n_motion_frames, fps,
        motion_scale, output_type, decode_chunk_size, generator,
    ) -> tuple[float, float, float]:  # fmt: skip
        multiple = self.vae_scale_factor
        if height % multiple or width % multiple or height < multiple or width < multiple:
            raise InputError(
                f"height and width must be positive multiples of {multiple}, got {height}x{width}"
            )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise InputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        do_classifier_free_guidance(guidance_scale)  # a finite number >= 0
        if isinstance(clip_length, bool) or not isinstance(clip_length, (int, np.integer)) or clip_length < 1:
            raise InputError(f"clip_length must be an integer >= 1, got {clip_length!r}")
        max_len = (self.denoising_unet.motion_kwargs or {}).get("temporal_position_encoding_max_len")
        if max_len and clip_length + n_motion_frames > max_len:
            raise InputError(
                f"clip_length + n_motion_frames = {clip_length + n_motion_frames} frames exceed the motion "
                f"modules' {max_len} positions"
            )
        if not isinstance(n_motion_frames, (int, np.integer)) or not 0 <= n_motion_frames <= clip_length:
            raise InputError(
                f"n_motion_frames must be an integer in [0, clip_length], got {n_motion_frames!r}"
            )
        if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
            raise InputError(f"fps must be a positive number of frames per second, got {fps!r}")
        scale = tuple(motion_scale) if isinstance(motion_scale, Sequence) else ()
        if len(scale) != 3 or not all(isinstance(s, (int, float)) and np.isfinite(s) for s in scale):
            raise InputError(f"motion_scale takes 3 finite weights (full, face, lip), got {motion_scale!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if decode_chunk_size < 1:
            raise InputError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")
        if isinstance(generator, list) and len(generator) != 1:
            raise InputError(
                f"generator: give one torch.Generator (a batch of 1 video), got {len(generator)}"
            )
        return tuple(float(s) for s in scale)

    # --- conditions -----------------------------------------------------------------------------------
    def reference_landmarks(self, ref_image: PIL.Image.Image, landmarks=None) -> np.ndarray:
        """(N, 2) pixel landmarks of the reference at its own size: given, or mediapipe's (a
        :class:`~anim_lab.landmarks.NoFaceError` naming the reference when it finds no face)."""
        if landmarks is not None:
            return scale_landmarks(
                landmarks, (ref_image.height, ref_image.width), (ref_image.height, ref_image.width)
            )
        from ..landmarks import NoFaceError, detect_landmarks

        try:
            return detect_landmarks(np.asarray(ref_image), name="the reference image").pixels
        except NoFaceError as err:
            raise NoFaceError(
                f"{err}; Hallo needs the face landmarks for its masks: give a portrait with a visible face, "
                "or "
                "its landmarks (landmarks=, (478, 2) pixels)"
            ) from None

    def face_masks(
        self, landmarks: np.ndarray, height: int, width: int, face_expand_ratio: float
    ) -> FaceRegionMasks:
        """Hallo's masks for (height, width): one level per UNet level (``face_region_masks``)."""
        return face_region_masks(
            landmarks,
            height,
            width,
            num_levels=len(self.denoising_unet.down_blocks),
            latent_factor=self.vae_scale_factor,
            face_expand_ratio=face_expand_ratio,
        )

    def encode_audio(self, audio: np.ndarray, fps: float, clip_length: int) -> tuple[torch.Tensor, int]:
        """16-kHz audio -> the audio tokens of every frame (1, F_pad, T, D), F_pad a multiple of
        ``clip_length``, and the true frame count ceil(seconds * fps)."""
        feats, length = A.hallo_audio_features(
            audio, self.audio_encoder, self.audio_extractor, fps, clip_length
        )
        window = A.hallo_window(feats)  # (F_pad, L, C) -> (F_pad, 5, L, C): frames i-2..i+2
        p = next(self.audio_proj.parameters())
        return self.audio_proj(window[None].to(p.device, p.dtype)), length  # (1, F_pad, T, D)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
        return decode_video(self.vae, latents, decode_chunk_size)  # (1, 3, F, H, W) in [-1, 1]

    # --- the loop -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        ref_image,
        audio,
        *,
        landmarks=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 3.5,
        clip_length: int = 16,
        n_motion_frames: int = 2,
        fps: float = HALLO_FPS,
        motion_scale: Sequence[float] = (1.0, 1.0, 1.0),
        face_expand_ratio: float = 1.2,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        decode_chunk_size: int = 8,
        faithful: bool = False,
    ):
        """Animate ``ref_image`` (PIL or (H, W, 3) uint8 RGB) speaking ``audio`` (a file path or a 16-kHz
        array). Hallo's defaults: 40 DDIM steps, guidance 3.5, 16-frame segments with 2 motion frames, 25 fps.

        ``landmarks``: the reference's (478, 2) pixel landmarks (default: mediapipe finds them).
        ``motion_scale``: the (full, face, lip) weights of the audio modules. Returns
        :class:`HalloPipelineOutput` with ``ceil(seconds * fps)`` frames (and their latents)."""
        ref_image = self._as_pil(ref_image)
        sample_size = self.denoising_unet.unet_kwargs.get("sample_size", 64)
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        scale = self._check_inputs(
            height, width, num_inference_steps, guidance_scale, clip_length, n_motion_frames, fps,
            motion_scale, output_type, decode_chunk_size, generator,
        )  # fmt: skip
        audio = (
            A.load_audio(Path(audio))
            if isinstance(audio, (str, os.PathLike))
            else A.prepare_audio(audio, A.SAMPLE_RATE)
        )
        self.check_components()
        points = scale_landmarks(
            self.reference_landmarks(ref_image, landmarks),
            (ref_image.height, ref_image.width),
            (height, width),
        )
        masks = self.face_masks(points, height, width, face_expand_ratio)
        device, dtype = self._execution_device, _dtype_of(self.denoising_unet)
        do_cfg = do_classifier_free_guidance(guidance_scale)

        # 1. audio tokens of every frame (1, F_pad, T, D) and the true length
        audio_tokens, num_frames = self.encode_audio(audio, fps, clip_length)
        audio_tokens = audio_tokens.to(device, dtype)
        plan = segments(audio_tokens.shape[1], clip_length, n_motion_frames)

        # 2. identity tokens (1, K, D); uncond: the projected zero embedding
        embeds = identity_embedding(self.image_encoder, ref_image).to(device, _dtype_of(self.image_proj))
        tokens = self.image_proj(embeds).to(dtype)
        uncond_tokens = self.image_proj.uncond(1).to(dtype)
        context = torch.cat([uncond_tokens, tokens]) if do_cfg else tokens  # (G, K, D)

        # 3. the face locator on the face box: (1, C0, 1, h, w), the same for every frame
        box = face_box_input(masks.box, self.face_locator.config.conditioning_channels)
        face_fea = self.face_locator(box.to(device, _dtype_of(self.face_locator))).to(dtype)
        face_fea = face_fea.expand(-1, -1, clip_length, -1, -1)  # (1, C0, F, h, w)
        if do_cfg:
            face_fea = torch.cat([torch.zeros_like(face_fea), face_fea])  # uncond rows: no face locator
        audio_masks = {
            name: [m.to(device, dtype) for m in getattr(masks, name)] for name in ("full", "face", "lip")
        }

        # 4. the reference latents (1, 4, h, w)
        ref_pixels = self.image_processor.preprocess(
            ref_image, height=height, width=width
        )  # (1, 3, H, W) [-1, 1]
        ref_pixels = ref_pixels.to(device, _dtype_of(self.vae))
        ref_latents = vae_encode(self.vae, ref_pixels).to(dtype)
        images = 1 + n_motion_frames  # [reference, motion frames] per video
        channels = self.denoising_unet.conv_in.weight.shape[1]
        shape = (1, channels, clip_length, height // self.vae_scale_factor, width // self.vae_scale_factor)

        video, all_latents = [], []
        with (
            reference_attention(
                self.reference_unet,
                self.denoising_unet,
                do_classifier_free_guidance=do_cfg,
                faithful=faithful,
            ) as bank,
            self.progress_bar(total=len(plan) * num_inference_steps) as progress_bar,
        ):
            for seg in plan:
                # motion frames: the reference (segment 0) or the last generated frames, in pixels [-1, 1]
                if n_motion_frames:
                    if seg.index == 0:
                        motion_latents = ref_latents.expand(n_motion_frames, -1, -1, -1)
                    else:
                        last = torch.cat(video, dim=2)[0, :, list(seg.motion_frames)]  # (3, n, H, W)
                        last = rearrange(last, "c n h w -> n c h w").to(_dtype_of(self.vae))
                        motion_latents = vae_encode(self.vae, last).to(dtype)  # (n, 4, h, w)
                    per_video = torch.cat([ref_latents, motion_latents])  # (S, 4, h, w)
                else:
                    per_video = ref_latents
                videos = 2 if do_cfg else 1
                ref_batch = repeat(per_video, "s c h w -> (v s) c h w", v=videos)  # (V*S, 4, h, w)
                bank.write(
                    ref_batch, t=0, encoder_hidden_states=reference_unet_tokens(context, images, faithful)
                )
                reference, motion = split_motion_bank(bank.entries, images)
                bank.load(reference)  # (V, HW, C): the cond row is read; the uncond rows read nothing
                motion = motion if n_motion_frames else None  # (V, n, HW, C) per attn1

                seg_audio = audio_tokens[:, seg.frames.start : seg.frames.stop]  # (1, F, T, D)
                if do_cfg:
                    seg_audio = torch.cat([torch.zeros_like(seg_audio), seg_audio])  # zeros after projection

                timesteps = set_timesteps(self.scheduler, num_inference_steps, device=device)
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = latents * self.scheduler.init_noise_sigma
                for t in timesteps:
                    x = cfg_batch(latents) if do_cfg else latents
                    x = self.scheduler.scale_model_input(x, t)
                    noise_pred = self.denoising_unet(
                        x,
                        t,
                        encoder_hidden_states=context,
                        pose_cond_fea=face_fea,
                        audio_tokens=seg_audio,
                        audio_masks=audio_masks,
                        motion_scale=scale,
                        motion_frame_features=motion,
                        faithful=faithful,
                    )
                    if do_cfg:
                        noise_pred = cfg_combine(noise_pred, guidance_scale)  # uncond + s (cond - uncond)
                    latents = self.scheduler.step(
                        noise_pred, t, latents, eta=DDIM_ETA, generator=generator
                    ).prev_sample
                    check_finite(latents, f"segment {seg.index}, t = {int(t)}", self.components)
                    progress_bar.update()
                all_latents.append(latents)
                if output_type != "latent" or seg.index + 1 < len(plan):  # the next segment's motion frames
                    decoded = self.decode_latents(latents, decode_chunk_size)  # (1, 3, F, H, W) [-1, 1]
                    check_finite(decoded, "decoding the latents", {"vae": self.vae})
                    video.append(decoded)

        latents = torch.cat(all_latents, dim=2)[:, :, :num_frames]  # (1, 4, F, h, w): the audio's length
        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(
                torch.cat(video, dim=2)[:, :, :num_frames].float(), output_type=output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return HalloPipelineOutput(frames=frames, latents=latents, num_frames=num_frames)
