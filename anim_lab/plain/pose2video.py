"""A plain, step-by-step Pose2Video: Moore-AnimateAnyone ``pipeline_pose2vid_long.py`` (implementations §1.7).

Written the way the reference does it, independently of ``anim_lab.pipelines``: the transformer blocks'
``forward`` is replaced (as ``ReferenceAttentionControl`` does); the ReferenceNet appends its ``norm1``
outputs to per-block banks; the readers are paired by a stable sort on the channel width; the bank is
repeated over frames and concatenated to the frame's own tokens; the uncond rows are recomputed with plain
self-attention; the windows come from the ``uniform`` context scheduler (wrap-around); each window is its
own UNet call; the prediction is averaged by a counter; every frame is decoded on its own.

``faithful=True`` keeps the reference's two bugs (bank rounded to fp16; without CFG the windows are summed);
``faithful=False`` is the corrected semantics anim_lab's pipeline uses by default. What tests/test_pipeline.py
checks ``anim_lab.pipelines.Pose2VideoPipeline`` against, and benchmarks/bench_pose2video.py measures it
against.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention import BasicTransformerBlock
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange, repeat
from transformers import CLIPImageProcessor

from anim_lab.plain.reference import torch_dfs
from anim_lab.pose_guider import PoseGuiderMultiScale

try:  # transformers >= 5 names the PIL implementation apart
    from transformers import CLIPImageProcessorPil
except ImportError:  # pragma: no cover
    CLIPImageProcessorPil = CLIPImageProcessor


# --- the context scheduler (animatediff-cli-prompt-travel's `uniform`) --------------------------------------
def ordered_halving(val: int) -> float:
    bits = f"{val:064b}"
    return int(bits[::-1], 2) / (1 << 64)


def uniform(step, num_steps, num_frames, context_size, context_stride, context_overlap, closed_loop=True):
    if num_frames <= context_size:
        yield list(range(num_frames))
        return
    context_stride = min(context_stride, int(np.ceil(np.log2(num_frames / context_size))) + 1)
    for context_step in 1 << np.arange(context_stride):
        pad = int(round(num_frames * ordered_halving(step)))
        for j in range(
            int(ordered_halving(step) * context_step) + pad,
            num_frames + pad + (0 if closed_loop else -context_overlap),
            (context_size * context_step - context_overlap),
        ):
            yield [e % num_frames for e in range(j, j + context_size * context_step, context_step)]


# --- ReferenceAttentionControl, write and read --------------------------------------------------------------
def _hacked_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
    norm_hidden_states = self.norm1(hidden_states)
    if self.plain_mode == "write":
        self.bank.append(norm_hidden_states.clone())
        attn_output = self.attn1(norm_hidden_states, attention_mask=attention_mask)
        hidden_states = attn_output + hidden_states
    else:  # read
        video_length = norm_hidden_states.shape[0] // self.bank[0].shape[0]
        bank_fea = [
            rearrange(repeat(d, "b l c -> b t l c", t=video_length), "b t l c -> (b t) l c")
            for d in self.bank
        ]
        modify = torch.cat([norm_hidden_states] + bank_fea, dim=1)
        hidden_states_uc = self.attn1(norm_hidden_states, encoder_hidden_states=modify) + hidden_states
        if self.plain_do_cfg:
            hidden_states_c = hidden_states_uc.clone()
            rows = norm_hidden_states.shape[0]
            uc_mask = torch.tensor([1] * (rows // 2) + [0] * (rows - rows // 2), dtype=torch.bool)
            hidden_states_c[uc_mask] = (
                self.attn1(norm_hidden_states[uc_mask], encoder_hidden_states=norm_hidden_states[uc_mask])
                + hidden_states[uc_mask]
            )
            hidden_states = hidden_states_c
        else:
            hidden_states = hidden_states_uc
    norm_hidden_states = self.norm2(hidden_states)
    hidden_states = (
        self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states) + hidden_states
    )
    return self.ff(self.norm3(hidden_states)) + hidden_states


def _blocks(unet) -> list[BasicTransformerBlock]:
    blocks = [m for m in torch_dfs(unet) if isinstance(m, BasicTransformerBlock)]
    return sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])  # stable: ties keep dfs order


@contextmanager
def reference_control(reference_unet, denoising_unet, do_cfg: bool):
    writers, readers = _blocks(reference_unet), _blocks(denoising_unet)
    for mode, blocks in (("write", writers), ("read", readers)):
        for block in blocks:
            block.forward = types.MethodType(_hacked_forward, block)
            block.plain_mode, block.plain_do_cfg, block.bank = mode, do_cfg, []
    try:
        yield writers, readers
    finally:
        for block in writers + readers:
            for attr in ("forward", "plain_mode", "plain_do_cfg", "bank"):
                delattr(block, attr)


def update(writers, readers, dtype):
    for r, w in zip(readers, writers, strict=True):
        r.bank = [v.clone().to(dtype) for v in w.bank]


# --- Pose2VideoPipeline.__call__ ----------------------------------------------------------------------------
@torch.no_grad()
def plain_pose2video(
    pipe,
    ref_image,
    pose_images,
    height,
    width,
    video_length,
    num_inference_steps,
    guidance_scale,
    generator,
    context_frames=24,
    context_overlap=4,
    faithful=False,
    ref_pose_image=None,
    return_latents=False,
):
    """The reference loop on ``pipe``'s components; returns the video (1, 3, F, H, W) in [0, 1] (or, with
    ``return_latents``, the final latents (1, 4, F, h, w) before decoding)."""
    vae, image_encoder = pipe.vae, pipe.image_encoder
    reference_unet, denoising_unet, pose_guider, scheduler = (
        pipe.reference_unet,
        pipe.denoising_unet,
        pipe.pose_guider,
        pipe.scheduler,
    )
    dtype = next(denoising_unet.parameters()).dtype
    do_cfg = guidance_scale > 1.0
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps

    # CLIP: the reference squashed to the encoder's square size, CLIPImageProcessor defaults at that size
    size = image_encoder.config.image_size
    clip_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    clip_image = clip_processor.preprocess(ref_image.resize((size, size)), return_tensors="pt").pixel_values
    clip_image_embeds = image_encoder(clip_image.to(dtype)).image_embeds
    encoder_hidden_states = clip_image_embeds.unsqueeze(1)
    if do_cfg:
        encoder_hidden_states = torch.cat(
            [torch.zeros_like(encoder_hidden_states), encoder_hidden_states], dim=0
        )

    with reference_control(reference_unet, denoising_unet, do_cfg) as (writers, readers):
        num_channels = denoising_unet.conv_in.in_channels
        shape = (1, num_channels, video_length, height // 8, width // 8)
        latents = randn_tensor(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma

        ref_processor = VaeImageProcessor(vae_scale_factor=8)
        ref_image_tensor = ref_processor.preprocess(ref_image, height=height, width=width).to(dtype)
        ref_image_latents = vae.encode(ref_image_tensor).latent_dist.mean * vae.config.scaling_factor

        multi_scale = isinstance(pose_fea_module := pose_guider, PoseGuiderMultiScale)
        # AniPortrait's faithful inference: uint8 numpy arrays through VaeImageProcessor(do_normalize=True),
        # which does not divide them by 255: the [-1, 509] pose tensor
        aniportrait_range = faithful and multi_scale
        cond_processor = VaeImageProcessor(
            vae_scale_factor=8, do_convert_rgb=True, do_normalize=aniportrait_range
        )
        as_input = (lambda im: np.asarray(im)) if aniportrait_range else (lambda im: im)  # noqa: E731
        pose_list = [
            cond_processor.preprocess(as_input(p), height=height, width=width).unsqueeze(2)
            for p in pose_images
        ]
        pose_cond_tensor = torch.cat(pose_list, dim=2).to(dtype)  # (1, 3, F, H, W)
        ref_pose_tensor = None
        if ref_pose_image is not None:
            ref_pose_tensor = cond_processor.preprocess(as_input(ref_pose_image), height=height, width=width)
            ref_pose_tensor = ref_pose_tensor.to(dtype)
        if not multi_scale:
            pose_fea = pose_guider(pose_cond_tensor)  # AnimateAnyone: once, before the loop

        context_queue = list(
            uniform(0, num_inference_steps, video_length, context_frames, 1, context_overlap, True)
        )
        for i, t in enumerate(timesteps):
            noise_pred = torch.zeros((2 if do_cfg else 1, *latents.shape[1:]), dtype=latents.dtype)
            counter = torch.zeros((1, 1, latents.shape[2], 1, 1), dtype=latents.dtype)
            if i == 0:
                reference_unet(
                    ref_image_latents.repeat(2 if do_cfg else 1, 1, 1, 1),
                    torch.zeros_like(t),
                    encoder_hidden_states=encoder_hidden_states,
                )
                update(writers, readers, torch.float16 if faithful else dtype)
            for context in context_queue:  # context_batch_size = 1
                latent_model_input = latents[:, :, context].repeat(2 if do_cfg else 1, 1, 1, 1, 1)
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                b = latent_model_input.shape[0]
                if multi_scale:  # AniPortrait: the guider runs per window, at every step
                    pose_window = pose_cond_tensor[:, :, context].repeat(2 if do_cfg else 1, 1, 1, 1, 1)
                    latent_pose_input = pose_fea_module(
                        pose_window, ref_pose_tensor, faithful=aniportrait_range
                    )
                else:
                    latent_pose_input = pose_fea[:, :, context].repeat(2 if do_cfg else 1, 1, 1, 1, 1)
                pred = denoising_unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=encoder_hidden_states[:b],
                    pose_cond_fea=latent_pose_input,
                )
                noise_pred[:, :, context] = noise_pred[:, :, context] + pred
                counter[:, :, context] = counter[:, :, context] + 1
            if do_cfg:
                noise_pred_uncond, noise_pred_text = (noise_pred / counter).chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            elif not faithful:
                noise_pred = noise_pred / counter  # the fix; the reference sums
            latents = scheduler.step(noise_pred, t, latents, eta=0.0, generator=generator).prev_sample

    if return_latents:
        return latents
    # decode one frame at a time
    latents = latents / vae.config.scaling_factor
    video = torch.cat(
        [vae.decode(latents[:, :, f]).sample.unsqueeze(2) for f in range(latents.shape[2])], dim=2
    )
    return (video / 2 + 0.5).clamp(0, 1)
