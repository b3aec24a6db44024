# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["core"]
# # Chapter 09 — Pose2Video: the whole pipeline on the trained toy animator
#
# *A reference portrait and a driving pose video go in, a video comes out. This chapter runs every stage of
# AnimateAnyone's `Pose2VideoPipeline` by hand on the trained toy animator, prints the shape at each stage,
# checks the hand-written loop against `pipe(...)`, and then animates a 64-frame clip in context windows.*
#
# - **You will build**: the CLIP token and its zero unconditional twin, the reference latents, the
#   ReferenceNet's bank at t = 0, the pose features, the denoising loop (windows → CFG batch → denoising
#   UNet → averaged prediction → guidance → DDIM step) and the VAE decode, all by hand and checked against the
#   pipeline; the x0 prediction as it sharpens over the steps; a 64-frame video in windows of 16 with overlap
#   0 and 4, the wrap-around window, and the seam error; the result as a strip and an inline animation
# - **Library modules**: `anim_lab.pipelines.pose2video` (`Pose2VideoPipeline`), `anim_lab.toy`
#   (`load_animator`), `anim_lab.cli` (`demo_strip`), `anim_lab.reference` (`reference_attention`),
#   `anim_lab.context` (`context_windows`, `window_counter`), `anim_lab.guidance` (`cfg_batch`,
#   `cfg_combine`), `anim_lab.clip`, `anim_lab.viz`; `scripts/eval_animator.py` (`make_cases`, `generate`);
#   `anim_lab.metrics` (`psnr`, `seam_error`, `flicker`)
# - **Questions answered**: In which order does the pipeline run its networks, and what shape does each
#   stage hand on? Why does the ReferenceNet run only once, on a clean latent at t = 0, and what happens to
#   its prediction? Does the reader add the reference features or concatenate them? Do the pose images go
#   through the VAE? What does the x0 prediction look like after each step? Why context windows at all (they
#   are not a speed-up), why does the last window wrap around to the start, and what does the overlap change
#   at the seams?
# - **CPU runtime**: measured in chapters/README.md
#
# Facts about the reference code come from Moore-AnimateAnyone's `pipeline_pose2vid_long.py` and
# animatediff-cli-prompt-travel's `uniform` context scheduler (implementations.md §1.7 and §1.10 of the
# shared reference notes); the tests compare the pipeline with a plain transcription of that loop,
# `anim_lab/plain/pose2video.py`. The model is the toy animator trained by `scripts/train_animator.py`
# (`anim_lab/assets/toy_animator`): 128-px portraits of the toy world, 4×16×16 latents. Its quality is
# measured by `scripts/eval_animator.py`; this chapter is about what the pipeline does, and prints the
# numbers of the weights it loads.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: no stderr
import io

import diffusers
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging as diffusers_logging
from einops import rearrange
from IPython.display import Image, display
from transformers.utils import logging as transformers_logging

import anim_lab
from anim_lab import metrics as M
from anim_lab.cli import demo_strip
from anim_lab.clip import CLIP_MEAN, CLIP_STD
from anim_lab.context import context_windows, window_counter
from anim_lab.guidance import DDIM_ETA, cfg_batch, cfg_combine
from anim_lab.reference import reference_attention
from anim_lab.toy import load_animator
from anim_lab.viz import image_grid, save

torch.manual_seed(0)
torch.set_grad_enabled(False)  # inference only
torch.set_num_threads(1)  # small tensors: one thread is as fast, and steady on a busy machine
diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
torch.set_printoptions(precision=3, sci_mode=False)
np.set_printoptions(precision=3, suppress=True)
print(
    f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
    f"matplotlib {matplotlib.__version__}"
)

# %% [markdown] tags=["core"]
# ## 1. The toy animator and a held-out case
#
# `load_animator()` loads the embedded weights, a standard diffusers pipeline folder, with
# `Pose2VideoPipeline.from_pretrained`: the toy VAE, the frozen toy image encoder (CLIP-like, one token per
# image), the ReferenceNet, the denoising UNet and the pose guider, with the DDIM scheduler the training
# used. Stage 1 of the training (the paper's image stage) has no motion
# modules; stage 2 adds them. The cell prints which of the two the loaded weights are.

# %% tags=["core"]
pipe = load_animator()
pipe.set_progress_bar_config(disable=True)  # no progress bars in the outputs


def millions(module):
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"


for name in ("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider"):
    module = getattr(pipe, name)
    print(f"{name:15s} {type(module).__name__:32s} {millions(module)}")
has_motion = pipe.denoising_unet.has_motion_modules
print("motion modules in the denoising UNet:", has_motion, f"({len(pipe.denoising_unet.motion_modules())})")
max_len = (pipe.denoising_unet.motion_kwargs or {}).get("temporal_position_encoding_max_len")
print("motion module position-encoding length:", max_len)
sched = pipe.scheduler.config
print(
    f"scheduler: {type(pipe.scheduler).__name__}, {sched.prediction_type}, {sched.beta_schedule} betas, "
    f"{sched.timestep_spacing} timesteps, zero terminal SNR: {sched.rescale_betas_zero_snr}"
)

# %% [markdown] tags=["core"]
# The held-out cases of `scripts/eval_animator.py`: an identity from the toy world's test split, rendered in
# another pose as the reference, a driving clip from motion seeds never used in training, its pose images,
# and the ground truth (the identity rendered in the driving poses). The script is not a package module, so it
# is loaded from its file. One 64-frame case serves the whole chapter; its first 24 frames are the short run.

# %% tags=["core"]
ev = anim_lab.load_script("eval_animator")  # scripts/eval_animator.py: held-out cases and metrics

case = ev.make_cases(num_cases=1, num_frames=64)[0]
print("reference", case.reference.shape, case.reference.dtype)  # (H, W, 3) uint8
print("poses    ", case.poses.shape)  # (F, H, W, 3) uint8, the driving pose images
print("truth    ", case.truth.shape)  # (F, H, W, 3) uint8, the identity in the driving poses

fig = image_grid(
    [case.reference] + [case.poses[i] for i in (0, 20, 40)] + [case.truth[i] for i in (0, 20, 40)],
    titles=["reference", "pose 0", "pose 20", "pose 40", "truth 0", "truth 20", "truth 40"],
    figsize=(14, 2.4),
)
plt.show()

# %% [markdown] tags=["core"]
# ## 2. The pipeline, stage by stage
#
# The order of `Pose2VideoPipeline.__call__` (and of the reference's `pipeline_pose2vid_long.py`):
#
# 1. the reference image → the image encoder → **one CLIP token** (the unconditional token: zeros);
# 2. the reference image → the VAE encoder → **reference latents** (the mean, times the scaling factor);
# 3. the pose images → the pose guider → **pose features** for every frame;
# 4. **initial noise** for every frame;
# 5. the ReferenceNet, **once**, at t = 0 → the **bank**;
# 6. for each timestep: for each window: **CFG batch → denoising UNet**; average the windows; **guidance**;
#    **DDIM step**;
# 7. the VAE decoder, frame by frame.
#
# Steps 1-5 depend only on the inputs, not on each other; the sections below take 4 and 5 in the other order.
# The short run: 24 frames at 128 px, windows of 16 frames overlapping by 4, 6 DDIM steps, guidance 3.5.

# %% tags=["core"]
F = 24  # frames
H = W = 128  # pixels; the latents are H/8 x W/8
STEPS, CFG, SEED = 6, 3.5, 0
CONTEXT, OVERLAP = 16, 4
ref_pil = PIL.Image.fromarray(case.reference)
poses = list(case.poses[:F])  # F images (H, W, 3) uint8

# %% [markdown] tags=["core"]
# ### 2.1 The CLIP token and the zero unconditional token
#
# The reference is squashed to the encoder's square input (96 px for the toy encoder, 224 for CLIP ViT-L),
# normalised with CLIP's mean and std, and encoded; `image_embeds` is the projected embedding, one vector per
# image. It becomes a sequence of **one token**, the `encoder_hidden_states` of every cross-attention. The
# unconditional input of classifier-free guidance is the same shape filled with zeros.

# %% tags=["core"]
S = pipe.image_encoder.config.image_size
x = torch.from_numpy(np.array(ref_pil.resize((S, S))) / np.float32(255))  # (S, S, 3) in [0, 1]
x = rearrange(x, "h w c -> 1 c h w")
mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
pixel_values = (x - mean) / std  # (1, 3, S, S)
clip_tokens = pipe.image_encoder(pixel_values=pixel_values).image_embeds[:, None]  # (1, D) -> (1, 1, D)
uncond_tokens = torch.zeros_like(clip_tokens)  # (1, 1, D)
print("pixel values", tuple(pixel_values.shape), "-> CLIP tokens", tuple(clip_tokens.shape))
print("unconditional tokens", tuple(uncond_tokens.shape), "all zero:", bool((uncond_tokens == 0).all()))

# %% [markdown] tags=["core"]
# ### 2.2 The reference latents
#
# The reference at the output size, in [-1, 1], through the VAE encoder. The pipeline takes the **mean** of
# the posterior (no sampling: the same reference gives the same latents every time) and multiplies by the
# VAE's scaling factor, which makes the latents of unit variance, the scale the UNets were trained at (chapter
# 02). Both steps by hand, then against the pipeline's own `encode_reference`:

# %% tags=["core"]
image = torch.from_numpy(case.reference / np.float32(255)) * 2 - 1  # (H, W, 3) in [-1, 1]
image = rearrange(image, "h w c -> 1 c h w")
posterior = pipe.vae.encode(image).latent_dist
ref_latents = posterior.mean * pipe.vae.config.scaling_factor  # (1, 4, H/8, W/8)
print("image", tuple(image.shape), "-> reference latents", tuple(ref_latents.shape))
print(f"scaling factor {pipe.vae.config.scaling_factor:.4f}, latent std {ref_latents.std():.2f}")

lib_tokens, lib_latents = pipe.encode_reference(ref_pil, H, W, torch.float32, "cpu")
torch.testing.assert_close(clip_tokens, lib_tokens)
torch.testing.assert_close(ref_latents, lib_latents, atol=1e-4, rtol=1e-4)  # float rounding of the convs
print("CLIP tokens and reference latents by hand == encode_reference: True")

# %% [markdown] tags=["core"]
# ### 2.3 The pose features
#
# The pose images go into the pose guider **as pixels**, in [0, 1]: there is no VAE on this path (the
# pipeline's `pose_image_processor` is diffusers' `VaeImageProcessor`, a resize-and-convert helper whose name
# suggests more than it does). The guider's strided convolutions bring 128 px down to the latent grid and
# output the width of the UNet's first block, so the features can be **added** to the output of `conv_in`.
# It works frame by frame, so the features of a window's frames are a slice of the whole sequence's features:
# the pipeline runs the guider once, before the loop.

# %% tags=["core"]
pose = torch.from_numpy(np.stack(poses) / np.float32(255))  # (F, H, W, 3) in [0, 1]
pose = rearrange(pose, "f h w c -> 1 c f h w")  # (1, 3, F, H, W)
pose_fea = pipe.pose_guider(pose)  # (1, C0, F, h, w)
print("pose images", tuple(pose.shape), "-> pose features", tuple(pose_fea.shape))
print("conv_in output width:", pipe.denoising_unet.conv_in.out_channels)
torch.testing.assert_close(pose_fea, pipe.encode_poses(poses, H, W, torch.float32, "cpu"))
window = [20, 21, 22, 23, 0, 1, 2, 3]  # any frames, e.g. a wrap-around window
torch.testing.assert_close(pipe.pose_guider(pose[:, :, window]), pose_fea[:, :, window])
print("by hand == encode_poses: True | guider on a window == slice of the whole: True")

# %% [markdown] tags=["core"]
# ### 2.4 The bank: the ReferenceNet, once, at t = 0
#
# `reference_attention` installs writer processors on the ReferenceNet's spatial self-attentions and reader
# processors on the denoising UNet's (paired by module name, chapter 05). `bank.write` runs the ReferenceNet
# on the **clean** reference latents at **t = 0** and keeps the input of every writer's `attn1`; the network's
# own prediction is discarded (the `ReferenceUNet` has no `conv_out` at all). Every frame's tokens in the
# denoising UNet then attend to their own tokens **concatenated** with the bank's tokens (keys and values, not
# a sum).
#
# Why once: the ReferenceNet's input is the reference latent and t = 0 at every step and in every window,
# so its output cannot change. The cell writes the bank twice at t = 0 and compares, and once at t = 500 for
# contrast (the timestep embedding reaches every resnet, so t matters; training used t = 0 too:
# `scripts/train_animator.py` writes the bank with `t = zeros`).

# %% tags=["core"]
with reference_attention(pipe.reference_unet, pipe.denoising_unet, do_classifier_free_guidance=True) as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
    first = dict(bank.entries)
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
    again = dict(bank.entries)
    bank.write(ref_latents, t=500, encoder_hidden_states=clip_tokens)
    at500 = dict(bank.entries)
print(f"{len(first)} bank entries (one per spatial self-attention):")
for name, value in first.items():
    print(f"  {name.removesuffix('.transformer_blocks.0.attn1'):40s} {tuple(value.shape)}")  # (1, HW, C)
print("written twice at t = 0, equal:", all(torch.equal(first[n], again[n]) for n in first))
print("written at t = 500, equal to t = 0:", all(torch.equal(first[n], at500[n]) for n in first))
print("ReferenceUNet has a conv_out:", hasattr(pipe.reference_unet, "conv_out"))

# %% [markdown] tags=["core"]
# ### 2.5 The initial noise and the timesteps
#
# One Gaussian latent per frame, `(1, 4, F, h, w)`, drawn from the generator (`randn_tensor` with a CPU
# generator is `torch.randn` with it), times `init_noise_sigma` (1 for DDIM). The timesteps are the
# scheduler's `trailing` spacing, so the first step starts at t = 999.

# %% tags=["core"]
pipe.scheduler.set_timesteps(STEPS)
timesteps = pipe.scheduler.timesteps
generator = torch.Generator("cpu").manual_seed(SEED)
latents = torch.randn(1, 4, F, H // 8, W // 8, generator=generator) * pipe.scheduler.init_noise_sigma
print("initial latents", tuple(latents.shape), "| timesteps", timesteps.tolist())

# %% [markdown] tags=["core"]
# ### 2.6 The loop: windows → CFG batch → denoising UNet → average → guidance → DDIM step
#
# The 24 frames do not fit one window of 16, so every step runs the denoising UNet on two windows. The second
# window runs past the last frame and **wraps around** to frames 0-3 (section 4 explains why). Each frame's
# prediction is the mean over the windows that cover it; `window_counter` counts them.

# %% tags=["core"]
windows = context_windows(F, CONTEXT, OVERLAP, max_len=max_len)
counter = window_counter(windows, F)  # (F,) windows per frame
for w in windows:
    print("window", w)
print("windows per frame:", counter.tolist())

# %% [markdown] tags=["core"]
# Per window, the CFG batch stacks the unconditional rows first and the conditional rows second
# (`cfg_batch`): the same latents and pose features twice, with zero tokens for the first half and the CLIP
# token for the second. Under CFG the bank is read by the conditional rows only; the unconditional rows get
# plain self-attention (chapter 05). The toy denoiser is a **v-prediction** model, and DDIM's step first
# turns the prediction into an estimate of the clean latents,
#
# $$\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,\hat v,$$
#
# which the loop keeps at every step (re-derived against the scheduler's `pred_original_sample`) for the strip
# of section 3. The shapes are printed once, for the first window of the first step.

# %% tags=["core"]
x0_by_step = []  # (1, 4, F, h, w) per step
with reference_attention(pipe.reference_unet, pipe.denoising_unet, do_classifier_free_guidance=True) as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)  # once, before the loop
    for i, t in enumerate(timesteps):
        noise_pred = torch.zeros(2, *latents.shape[1:])  # (2, 4, F, h, w): [uncond ; cond] sums
        for k, w in enumerate(windows):
            x_in = cfg_batch(latents[:, :, w])  # (1, 4, f, h, w) -> (2, 4, f, h, w)
            x_in = pipe.scheduler.scale_model_input(x_in, t)  # DDIM: unchanged
            context = torch.cat([uncond_tokens, clip_tokens])  # (2, 1, D)
            pose_in = cfg_batch(pose_fea[:, :, w])  # (2, C0, f, h, w)
            pred = pipe.denoising_unet(x_in, t, encoder_hidden_states=context, pose_cond_fea=pose_in)
            noise_pred[:, :, w] += pred  # back to the window's frames
            if i == 0 and k == 0:
                print("window latents", tuple(latents[:, :, w].shape), "-> CFG batch", tuple(x_in.shape))
                print("tokens", tuple(context.shape), "| pose features", tuple(pose_in.shape))
                print("denoising UNet prediction", tuple(pred.shape))
        noise_pred = noise_pred / counter.view(1, 1, F, 1, 1)  # the mean over windows
        v_uncond, v_cond = noise_pred.chunk(2)  # 2 x (1, 4, F, h, w)
        v = v_uncond + CFG * (v_cond - v_uncond)  # guidance
        torch.testing.assert_close(v, cfg_combine(noise_pred, CFG))
        out = pipe.scheduler.step(v, t, latents, eta=DDIM_ETA)
        alpha_bar = pipe.scheduler.alphas_cumprod[t]
        torch.testing.assert_close(
            out.pred_original_sample, alpha_bar.sqrt() * latents - (1 - alpha_bar).sqrt() * v
        )
        x0_by_step.append(out.pred_original_sample)
        latents = out.prev_sample  # (1, 4, F, h, w)
        if i == 0:
            print("averaged prediction", tuple(noise_pred.shape), "-> guided", tuple(v.shape))
            print("DDIM step: latents", tuple(latents.shape))
    print("ReferenceNet runs in the whole loop:", bank.writes)
print("guidance by hand == cfg_combine, x0 by hand == pred_original_sample: True")

# %% [markdown] tags=["core"]
# ### 2.7 The VAE decode
#
# Undo the scaling factor and decode frame by frame: the VAE is a 2D model, so the frames are just a batch
# (the pipeline decodes `decode_chunk_size` of them per call to bound the memory).

# %% tags=["core"]
frames = rearrange(latents, "1 c f h w -> f c h w") / pipe.vae.config.scaling_factor  # (F, 4, h, w)
video = (pipe.vae.decode(frames).sample.clamp(-1, 1) + 1) / 2  # (F, 3, H, W) in [0, 1]
print("latents", tuple(latents.shape), "-> video", tuple(video.shape))

# %% [markdown] tags=["core"]
# ### 2.8 Against the pipeline
#
# The same request through `pipe(...)`, with a generator seeded the same way, and a hook that counts the
# ReferenceNet's forward calls. The two videos agree to float rounding (the pipeline batches the same
# operations slightly differently).

# %% tags=["core"]
calls = []
hook = pipe.reference_unet.register_forward_hook(lambda module, args, output: calls.append(1))
library = pipe(
    ref_pil,
    poses,
    num_inference_steps=STEPS,
    guidance_scale=CFG,
    generator=torch.Generator("cpu").manual_seed(SEED),
    context_frames=CONTEXT,
    context_overlap=OVERLAP,
    output_type="pt",
).frames[0]  # (F, 3, H, W) in [0, 1]
hook.remove()
torch.testing.assert_close(video, library, atol=1e-4, rtol=1e-4)
print("pipe(...) output", tuple(library.shape), "| the loop by hand matches it: True")
print("ReferenceNet forward calls inside pipe(...):", len(calls))


def to_u8(frames_01):
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    return (rearrange(frames_01, "f c h w -> f h w c").numpy() * 255).round().astype(np.uint8)


short = to_u8(video)
copy = np.repeat(case.reference[None], F, axis=0)  # the baseline: the reference as every frame
truth_short = M.video_from_uint8(case.truth[:F])  # (1, 3, F, H, W) in [-1, 1]
print(f"PSNR vs ground truth: {M.psnr(M.video_from_uint8(short), truth_short).mean():.1f} dB")
print(f"copying the reference: {M.psnr(M.video_from_uint8(copy), truth_short).mean():.1f} dB")

# %% [markdown] tags=["core"]
# The PSNR of the generated frames is printed next to the copy-the-reference baseline; at 6 steps on a toy
# model it is a sanity check, not a benchmark (`scripts/eval_animator.py` has the measured table).
#
# ## 3. The x0 prediction, step by step
#
# The loop kept DDIM's $\hat x_0$ at every step. Decoded, it shows what the model believes the clean frame is
# at each noise level: at t = 999 the input is pure noise and $\hat x_0$ comes from the conditions alone
# (the reference through the bank and the CLIP token, the pose through the guider); later steps refine it.
# Two frames, one per row; the last columns are the final frame and the ground truth.

# %% tags=["core"]
show = [0, 12]  # frames
tiles, titles = [], []
for f in show:
    for i, t in enumerate(timesteps):
        x0 = x0_by_step[i][0, :, f][None] / pipe.vae.config.scaling_factor  # (1, 4, h, w)
        tiles.append(to_u8((pipe.vae.decode(x0).sample.clamp(-1, 1) + 1) / 2)[0])
        titles.append(f"frame {f}, x0 at t={int(t)}")
    tiles += [short[f], case.truth[f]]
    titles += [f"frame {f}, final", f"frame {f}, truth"]
fig = image_grid(tiles, titles=titles, ncols=len(timesteps) + 2, figsize=(16, 4.6))
save(fig, "ch09_x0_by_step")
plt.show()
final = latents
for i, t in enumerate(timesteps):
    gap = (x0_by_step[i] - final).abs().mean()
    print(f"t={int(t):3d}: mean |x0 - final latents| = {gap:.2f}")

# %% [markdown] tags=["core"]
# The printed gap between each step's $\hat x_0$ and the final latents should shrink towards the last step
# (the last $\hat x_0$ is the output up to the final DDIM update). At t = 999 the input holds no signal (the
# trailing schedule with zero terminal SNR), so with v-prediction the model's output there is its whole
# guess of the clean latent, made from the conditions alone; the first columns show how much of the pose
# and of the reference's appearance that guess already holds, and the later ones what the steps add.
#
# ## 4. 64 frames in context windows
#
# ### 4.1 The windows, and the wrap-around
#
# The motion module's temporal attention carries a position encoding of `temporal_position_encoding_max_len`
# positions (32 in the official checkpoints) and was trained on clips of 16-24 frames; a long video is
# therefore denoised in overlapping windows at every step. The reference's window list comes from
# animatediff-cli-prompt-travel's `uniform` scheduler, which the pipelines call with `step = 0`, stride 1
# and `closed_loop=True`. Re-derived here from its definition and compared with
# `anim_lab.context.context_windows`:


# %% tags=["core"]
def ordered_halving(val):
    """The bit-reversed fraction of val: 0 -> 0, 1 -> 1/2, 2 -> 1/4, 3 -> 3/4 ..."""
    return int(f"{val:064b}"[::-1], 2) / (1 << 64)


def uniform(step, num_frames, size, overlap, closed_loop=True):
    """The reference's uniform context scheduler, context_stride 1."""
    if num_frames <= size:
        return [list(range(num_frames))]
    pad = int(round(num_frames * ordered_halving(step)))
    starts = range(pad, num_frames + pad + (0 if closed_loop else -overlap), size - overlap)
    return [[e % num_frames for e in range(j, j + size)] for j in starts]


for n, size, ov in ((24, 16, 4), (64, 16, 4), (64, 16, 0), (64, 24, 4), (598, 16, 4)):
    assert uniform(0, n, size, ov) == context_windows(n, size, ov, max_len=None)
print("uniform(step=0) == context_windows: True")


def runs(w):
    """A window as its runs of consecutive frames, e.g. '60-63 + 0-11'."""
    parts, start = [], w[0]
    for a, b in zip(w, w[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(f"{start}-{a}")
            start = b
    return " + ".join(parts)


LONG = 64
for ov in (0, 4):
    ws = context_windows(LONG, 16, ov, max_len=max_len)
    print(f"overlap {ov}: {len(ws)} windows:", ", ".join(runs(w) for w in ws))
    print("   windows per frame:", window_counter(ws, LONG).tolist())

# %% [markdown] tags=["core"]
# - With overlap 4 the windows start every 12 frames, at 0, 12, ..., 60; the last start is still below
#   64, so the last window takes frames 60-63 and **wraps** to 0-11. The scheduler was written for looping
#   animations (`closed_loop=True`): the range of starts runs to the last frame, and the modulo makes the
#   clip a circle. For a clip that does not loop, the wrap-around window puts the last frames next to the
#   first ones in the motion module's temporal attention, and frames 0-11 are averaged between the first
#   window and the wrap-around one.
# - With overlap 0 on 64 frames the windows tile the clip exactly (64 = 4 × 16), so nothing wraps.
# - `step` was meant to shift the windows from one denoising step to the next (`ordered_halving(step)` is a
#   fraction of the clip: 0, 1/2, 1/4, 3/4, ...), so that seams fall at different frames at every step.
#   The pipelines always pass 0: the windows never move. What step 1 would have given:

# %% tags=["core"]
print("step 1, overlap 4:", ", ".join(runs(w) for w in uniform(1, LONG, 16, 4)))
work = {ov: sum(len(w) for w in context_windows(LONG, 16, ov, max_len=None)) / LONG for ov in (0, 4)}
print(f"UNet frame-evaluations per frame per step: overlap 0 -> {work[0]:.2f}, overlap 4 -> {work[4]:.2f}")
seed_windows = context_windows(598, 16, 4, max_len=None)
print(f"598 frames at 16/4: {len(seed_windows)} windows, the last {runs(seed_windows[-1])}")

# %% [markdown] tags=["core"]
# Windows are not a speed-up: every frame is evaluated at least once per step either way, and the overlapped
# frames are evaluated twice (the UNet work per frame is printed above). They bound the length of the
# temporal attention (the position encoding, and memory that grows with the square of the window length),
# which is why a 598-frame video (the seed notes' example: 50 windows, confirmed above) can be denoised
# at all.
#
# ### 4.2 Overlap 0 vs 4: the seam error
#
# The whole 64-frame clip through the pipeline, 4 steps (enough for the seams; cheap on a CPU), windows of 16
# with overlap 0 and overlap 4. `seam_error` (from `scripts/eval_animator.py`) takes every seam (a frame that
# starts a window, or follows a jump inside one) and averages the generated frame-to-frame change there minus
# the ground truth's change at the same frame: the extra jump the windows add, in [0, 1] units.

# %% tags=["core"]
LONG_STEPS = 4
long_windows = {ov: context_windows(LONG, 16, ov, max_len=max_len) for ov in (0, 4)}
long_videos = {
    ov: ev.generate(pipe, case, steps=LONG_STEPS, cfg=CFG, seed=SEED, context_frames=16, context_overlap=ov)
    for ov in (0, 4)
}  # (64, H, W, 3) uint8 each
print(f"{'video':11s}{'seams of overlap 0':>20s}{'seams of overlap 4':>20s}{'all frames':>12s}{'PSNR':>9s}")
truth_long = M.video_from_uint8(case.truth)
for ov, vid in long_videos.items():
    x = M.video_from_uint8(vid)  # (1, 3, 64, H, W) in [-1, 1]
    at = [M.seam_error(x, truth_long, long_windows[o]).item() for o in (0, 4)]
    every = M.flicker(x, truth_long).item()  # the same jump difference, over all frames
    psnr_db = M.psnr(x, truth_long).mean()
    print(f"overlap {ov:<3d}{at[0]:20.3f}{at[1]:20.3f}{every:12.3f}{psnr_db:6.1f} dB")
diff = np.abs(long_videos[0].astype(int) - long_videos[4].astype(int)).max()
print("motion modules:", has_motion)
print("overlap 0 and overlap 4 give the same video (to 1 grey level):", bool(diff <= 1))

# %% [markdown] tags=["core"]
# The two window lists put their seams at different frames (16, 32, 48 against 12, 24, ..., 60), so the
# table measures both videos at both sets of seams, next to the same difference averaged over every pair of
# neighbouring frames (`flicker` in the script). A seam is visible only where the error at the seams stands
# above the all-frames value. How to read the rows depends on the model the first section reported:
#
# - **Without motion modules** (stage 1 weights), nothing in the denoising UNet mixes frames: every frame's
#   prediction depends on its own latent, its pose and the reference only. A frame covered by two windows
#   gets the same prediction twice and their mean is that prediction, so the windows cannot leave a trace:
#   the two overlaps must give the same video and the two rows must agree (the last line checks it; if it
#   said otherwise for such a model, the averaging would be broken). What the numbers measure is then the
#   frame-to-frame flicker of a model that draws every frame on its own, not the windows.
# - **With motion modules** (stage 2), a frame's prediction depends on the other frames of its window, so a
#   frame at a seam is predicted from different neighbourhoods on its two sides. Overlap 0 switches windows
#   abruptly; overlap 4 averages four frames of the two windows. The rows then differ, and the columns say
#   at which seams and by how much: here overlap 0 leaves a small extra jump at its own seams (0.013
#   against 0.012 over all frames, at the edge of the printed precision), and overlap 4 none. At 4 steps the
#   effect is slight; `results/eval_animator.json` has the 10-step seam errors of the evaluation.
#
# ## 5. The result
#
# The 64-frame video (overlap 4) as a strip: reference | pose | generated | ground truth, six frames spread
# over the clip (`anim_lab.cli.demo_strip`, the same strip `anim-lab demo` writes).

# %% tags=["core"]
strip = demo_strip(case.reference, case.poses, long_videos[4], case.truth, columns=6)
print("strip", strip.shape)  # (6*H, 4*W, 3)
fig, ax = plt.subplots(figsize=(6, 9))
ax.imshow(strip)
ax.set_xticks([W * (k + 0.5) for k in range(4)], ["reference", "pose", "generated", "ground truth"])
ax.set_yticks([])
ax.set_title(f"held-out identity and clip, {LONG} frames, {LONG_STEPS} DDIM steps", fontsize=9)
fig.tight_layout()
save(fig, "ch09_pose2video_strip")
plt.show()

# %% [markdown] tags=["core"]
# And as an animation: pose | generated | ground truth side by side, every other frame of the 64 at 6 fps
# (an inline GIF, so the notebook shows it without any file next to it; every other frame keeps it small).

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
side_by_side = np.concatenate([case.poses, long_videos[4], case.truth], axis=2)[::2]  # (F/2, H, 3W, 3)
gif_frames = [PIL.Image.fromarray(f) for f in side_by_side]
buffer = io.BytesIO()
gif_frames[0].save(buffer, format="GIF", save_all=True, append_images=gif_frames[1:], duration=167, loop=0)
display(Image(data=buffer.getvalue(), format="gif"))

# %% [markdown]
# ## 6. The seed notes' questions
#
# - **The order.** CLIP token, reference latents, pose features, noise, the ReferenceNet once, then the loop
#   over steps and windows, then the decode (section 2). Everything before the loop depends only on the
#   inputs, not on t; the loop touches only the denoising UNet and the scheduler.
# - **"Why predict noise on a clean latent with the ReferenceNet, and what are the stored values for?"** The
#   prediction is not wanted: the ReferenceNet has no `conv_out`, and its output is dropped. It is run for the
#   inputs of its spatial self-attentions, which become extra keys and values of the denoiser's (section 2.4).
#   The latent is clean and t = 0 because that is how the ReferenceNet was trained: it is an image encoder
#   that happens to share SD's architecture and initial weights.
# - **"Why only at i == 0?"** Its input never changes (section 2.4: two writes at t = 0 are equal), so the
#   bank serves every step and every window; the hook in 2.8 counted one forward call for the whole request.
#   Running it per step and window would multiply its cost by steps × windows for identical numbers.
# - **"The reader adds the stored features to its own."** It concatenates them: the frame's tokens and the
#   reference's tokens are joined along the token axis for the keys and values, and the output keeps the
#   frame's own token count (chapter 05 re-derives the reader by hand).
# - **"The pose images go through the VAE encoder."** They do not: `VaeImageProcessor` only resizes and
#   converts them; the guider takes [0, 1] pixels (section 2.3).
# - **"The context windows speed up denoising."** They do not (section 4.1): they bound the temporal
#   attention's length. The window list of the notes (`[0..15], [12..27], ...`) is right, and the last of the
#   50 windows for 598 frames wraps around to the start.
#
# ## Exercises
#
# 1. Run section 2.6's loop without CFG (`guidance_scale` 1: no uncond rows, `do_classifier_free_guidance`
#    False in `reference_attention`) and check it against `pipe(..., guidance_scale=1.0)`.
# 2. Count the denoising UNet's forward calls in `pipe(...)` for one step of the 24-frame request with
#    `context_batch_size` 1 and 2, and check that the output is the same.
# 3. Which frames does the wrap-around window of section 4.1 average with the first window, for 64 frames at
#    24/4? Predict, then print the windows.
#
# ## Solutions

# %%
# 1. No CFG: one row per window, the bank read by every row, no guidance combine (3 steps to save time).
pipe.scheduler.set_timesteps(3)
lat = torch.randn(1, 4, F, H // 8, W // 8, generator=torch.Generator("cpu").manual_seed(SEED))
with reference_attention(pipe.reference_unet, pipe.denoising_unet, do_classifier_free_guidance=False) as bank:
    bank.write(ref_latents, t=0, encoder_hidden_states=clip_tokens)
    for t in pipe.scheduler.timesteps:
        pred = torch.zeros_like(lat)
        for w in windows:
            pred[:, :, w] += pipe.denoising_unet(
                lat[:, :, w], t, encoder_hidden_states=clip_tokens, pose_cond_fea=pose_fea[:, :, w]
            )
        lat = pipe.scheduler.step(pred / counter.view(1, 1, F, 1, 1), t, lat, eta=DDIM_ETA).prev_sample
lib_lat = pipe(
    ref_pil,
    poses,
    num_inference_steps=3,
    guidance_scale=1.0,
    generator=torch.Generator("cpu").manual_seed(SEED),
    context_frames=CONTEXT,
    context_overlap=OVERLAP,
    output_type="latent",
).frames
torch.testing.assert_close(lat, lib_lat, atol=1e-4, rtol=1e-4)
print("no-CFG loop by hand == pipe(guidance_scale=1.0): True")

# %%
# 2. On the 24 frames (2 windows), 1 step: 2 calls with batch size 1, 1 call with batch size 2; the reference
#    would add the whole batch's prediction to both windows, anim_lab gives each window its own rows.
outputs, unet_calls = {}, []
hook = pipe.denoising_unet.register_forward_hook(lambda module, args, output: unet_calls.append(1))
for bs in (1, 2):
    unet_calls.clear()
    outputs[bs] = pipe(
        ref_pil,
        poses,
        num_inference_steps=1,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        context_frames=CONTEXT,
        context_overlap=OVERLAP,
        context_batch_size=bs,
        output_type="latent",
    ).frames
    print(f"context_batch_size {bs}: {len(unet_calls)} denoising UNet calls for 1 step")
hook.remove()
torch.testing.assert_close(outputs[1], outputs[2], atol=1e-4, rtol=1e-4)
print("same latents: True")

# %%
# 3. Windows start every 20 frames: 0, 20, 40, 60; the last one is 60-63 + 0-19, so frames 0-19 are averaged
#    between the first window and the wrap-around one.
for w in context_windows(64, 24, 4, max_len=max_len):
    print(runs(w))

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch

from anim_lab import context as lab_context
from anim_lab import guidance as lab_guidance

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): averaging the windows' predictions
# Write `my_average_windows(predict, latents, windows)`: `latents` `(B, C, F, H, W)`; for each window (a list
# of frame indices) call `predict` on that window's frames, `(B, C, f, H, W)`, which returns a prediction of
# the same shape; return `(B, C, F, H, W)`, each frame's predictions summed over the windows that cover it and
# divided by their number.


# %% nbgrader={"grade": false, "grade_id": "ch09_average_windows", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_average_windows(predict, latents, windows):
    ### BEGIN SOLUTION
    total = torch.zeros_like(latents)
    count = torch.zeros(latents.shape[2])
    for window in windows:
        index = torch.tensor(window)
        total.index_add_(2, index, predict(latents[:, :, index]))  # frames shared by windows add up
        count.index_add_(0, index, torch.ones(len(window)))
    return total / count.reshape(1, 1, -1, 1, 1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch09_average_windows_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(9)


def toy_predict(x):  # depends on the whole window, as a motion module does
    return torch.tanh(x) + x.mean(dim=2, keepdim=True)


for frames, size, overlap, batch in [(64, 24, 4, 1), (30, 8, 3, 2), (12, 16, 4, 1), (20, 6, 5, 3)]:
    latents = torch.randn(2, 4, frames, 3, 3, generator=gen)
    windows = lab_context.context_windows(frames, size, overlap, max_len=None)
    expected = lab_context.predict_in_windows(lambda x, _: toy_predict(x), latents, windows, batch)
    torch.testing.assert_close(my_average_windows(toy_predict, latents, windows), expected)
print("my_average_windows matches context.predict_in_windows on 4 videos (wrap-around windows included)")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): the x0 prediction from v
# Write `my_x0_from_v(alphas_cumprod, v_pred, x_t, t)`: the clean-latent estimate $\hat x_0$ of a
# v-prediction model at timestep `t` (an int, or a tensor of one timestep per row of the batch), with
# $\bar\alpha$ = `alphas_cumprod`.


# %% nbgrader={"grade": false, "grade_id": "ch09_x0_from_v", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_x0_from_v(alphas_cumprod, v_pred, x_t, t):
    ### BEGIN SOLUTION
    a = alphas_cumprod[torch.as_tensor(t)].to(x_t.dtype)
    if a.ndim == 1:
        a = a.reshape(-1, *([1] * (x_t.ndim - 1)))  # one timestep per row
    return a.sqrt() * x_t - (1 - a).sqrt() * v_pred
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch09_x0_from_v_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(10)
scheduler = lab_guidance.build_scheduler()
for t, shape in [
    (999, (1, 4, 2, 8, 8)),
    (500, (2, 4, 3, 4, 4)),
    (torch.tensor([10, 700, 999]), (3, 4, 1, 2, 2)),
]:
    x_t, v_pred = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    expected = lab_guidance.convert_prediction(scheduler, v_pred, x_t, t, "sample")
    torch.testing.assert_close(my_x0_from_v(scheduler.alphas_cumprod, v_pred, x_t, t), expected)
print("my_x0_from_v matches guidance.convert_prediction at t = 999, 500 and per-row timesteps")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# A 64-frame video in windows of 24 frames overlapping by 4, two windows per UNet call
# (`context_batch_size=2`), 25 steps, CFG on (both halves in the same call). How many calls of the denoising
# UNet does the whole run make? Store it, an int, in `unet_calls`.

# %% nbgrader={"grade": false, "grade_id": "ch09_unet_calls", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_windows = lab_context.context_windows(64, 24, 4)
unet_calls = len(lab_context.batch_windows(lab_windows, 2)) * 25
### END SOLUTION
print(f"{unet_calls} UNet calls")

# %% nbgrader={"grade": true, "grade_id": "ch09_unet_calls_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(unet_calls, int) and unet_calls > 0
### BEGIN HIDDEN TESTS
assert unet_calls == 25 * len(lab_context.batch_windows(lab_context.context_windows(64, 24, 4), 2))
### END HIDDEN TESTS
print("unet_calls is a count")
