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
# # Chapter 00 — The map: AnimateAnyone at real size, with no weights
#
# *Every component of a portrait-animation pipeline, built at full size on PyTorch's `meta` device: what each
# one is, how big it is, what shape the data has at every stage, and what one run costs.*
#
# - **You will build**: the five models of AnimateAnyone at SD1.5 size (no weights, no memory), a shape trace
#   of a 512×512, 24-frame request, a FLOP budget of a 25-step run with classifier-free guidance, and a
#   diagram of the whole pipeline
# - **Library modules**: `anim_lab.configs`, `anim_lab.inspect`, `anim_lab.unet`, `anim_lab.motion`,
#   `anim_lab.pose_guider`, `anim_lab.viz`
# - **Questions answered**: Which networks does AnimateAnyone run, and how big is each? What shape is the data
#   between them? Where does the compute go — and how much does CFG cost? How much memory do the weights need
#   in fp16? Why is memory-efficient attention not optional at 512 px?
# - **CPU runtime**: about 25 s of CPU time
#
# The `meta` device gives every tensor a shape and a dtype but no storage. A model built there allocates
# nothing, and a forward pass on meta tensors computes every shape and no number — exactly what a map needs.
# Later chapters build each part for real (the chapter names are in the last column of every table).

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import diffusers
import torch
import transformers

import anim_lab
from anim_lab.configs import SD15, TINY
from anim_lab.inspect import (
    build,
    count_flops,
    count_parameters,
    flops_by_module,
    format_table,
    human,
    trace_shapes,
)

torch.manual_seed(0)
torch.set_grad_enabled(False)  # shapes and counts only: no autograd graph
torch.set_printoptions(precision=4, sci_mode=False)
print(
    f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
    f"transformers {transformers.__version__}"
)

# %% [markdown] tags=["core"]
# ## 1. The five networks
#
# AnimateAnyone animates one reference image with a sequence of pose images:
# - a **VAE** maps images to latents 8× smaller and back (chapter 02);
# - a **CLIP image encoder** turns the reference image into one token for cross-attention (chapter 03);
# - a **ReferenceNet** (an SD1.5 UNet without its output head) reads the reference latents once and hands its
#   self-attention inputs to the denoiser (chapters 04–05);
# - a **PoseGuider** turns the pose images into features on the latent grid (chapter 06);
# - the **denoising UNet** — SD1.5's UNet applied to every frame, plus 21 *motion modules* that attend across
#   frames — predicts the noise at each step (chapter 04).

# %% tags=["core"]
CHAPTER = {
    "vae": "ch02_vae_latents",
    "image_encoder": "ch03_clip_embeddings",
    "reference_unet": "ch04_unet_blocks, ch05_reference_attention",
    "pose_guider": "ch06_pose_guider",
    "denoising_unet": "ch04_unet_blocks",
}
models = {name: build(SD15, name) for name in CHAPTER}  # all on the meta device
rows = [
    [
        name,
        type(m).__name__,
        f"{count_parameters(m):,}",
        f"{count_parameters(m) * 2 / 2**20:,.0f}",
        CHAPTER[name],
    ]
    for name, m in models.items()
]
print(format_table(rows, ["component", "class", "parameters", "fp16 MiB", "built in"]))
total_params = sum(count_parameters(m) for m in models.values())
print(f"\ntotal: {total_params:,} parameters = {total_params * 2 / 2**30:.2f} GiB of fp16 weights")
print(
    "any real memory allocated?",
    any(p.device.type != "meta" for m in models.values() for p in m.parameters()),
)

# %% [markdown] tags=["core"]
# - The two UNets dominate: together 2.2 of the 2.6 billion parameters.
# - The ReferenceNet is SD1.5's UNet minus `conv_norm_out`/`conv_out` (it never has to predict noise, only to
#   produce features), so it has 12,164 parameters fewer: 859,508,800 in the table against SD1.5's
#   859,520,964.
# - The denoiser is SD1.5's UNet plus the motion modules. How much do the 21 motion modules add?

# %% tags=["core"]
denoiser = models["denoising_unet"]
motion = {n: m for n, m in denoiser.named_modules() if n.endswith("motion_modules")}
motion_params = sum(count_parameters(m) for m in motion.values())
n_modules = sum(len(m) for m in motion.values())
print(
    f"{n_modules} motion modules, {motion_params:,} parameters "
    f"({motion_params / count_parameters(denoiser):.0%} of the denoising UNet)"
)
unet2d_params = count_parameters(denoiser) - motion_params
print(f"2D part of the denoiser: {unet2d_params:,} parameters, SD1.5's UNet:", unet2d_params == 859_520_964)

# %% [markdown] tags=["core"]
# Re-derive the motion-module count by hand. A module of width C has: GroupNorm (2C), `proj_in` and `proj_out`
# (C² + C each), two temporal attentions (Q, K, V without bias: 3C²; output projection C² + C; a LayerNorm 2C
# each), and a GEGLU feed-forward (C → 8C with bias, 4C → C with bias, LayerNorm 2C). That is 22C² + 21C.


# %% tags=["core"]
def motion_module_params(c: int) -> int:
    norm_and_projections = 2 * c + 2 * (c * c + c)
    attentions = 2 * (3 * c * c + c * c + c + 2 * c)
    feed_forward = (c * 8 * c + 8 * c) + (4 * c * c + c) + 2 * c
    return norm_and_projections + attentions + feed_forward


widths = [m.temporal_transformer.proj_in.in_features for mm in motion.values() for m in mm]
print("module widths:", {c: widths.count(c) for c in sorted(set(widths))})
print("hand count == library count:", sum(motion_module_params(c) for c in widths) == motion_params)
print("22C^2 + 21C at C=320:", motion_module_params(320) == 22 * 320**2 + 21 * 320)

# %% [markdown] tags=["core"]
# ## 2. A 512×512, 24-frame request, stage by stage
#
# Our example request: one reference image, 24 pose frames, 512×512, 25 DDIM steps, guidance scale 3.5. This
# is a round, square example, not Moore-AnimateAnyone's default: its `scripts/pose2vid.py` defaults to
# W 512 × H 784, 24 frames, **30 steps**, cfg 3.5 (AniPortrait's `pose2vid.py`: 512×512, 25 steps, cfg 3.5).
# Section 3 prices the real default too. We push meta tensors through each network and print the shapes.
# Images are `(B, C, H, W)` in [-1, 1]; videos and latents `(B, C, F, H, W)`.

# %% tags=["core"]
B, F, H, W = 1, 24, SD15.height, SD15.width
f = SD15.vae_scale_factor  # 8
meta = dict(device="meta")
ref_image = torch.empty(B, 3, H, W, **meta)
ref_latents = models["vae"].encode(ref_image).latent_dist.mean * SD15.vae_scaling_factor
clip_pixels = torch.empty(B, 3, 224, 224, **meta)
image_embeds = models["image_encoder"](pixel_values=clip_pixels).image_embeds
clip_tokens = image_embeds[:, None, :]  # (B, 768) -> (B, 1, 768): one token
clip_tokens_cfg = torch.cat([torch.zeros_like(clip_tokens), clip_tokens])  # uncond row first: zeros
pose_video = torch.empty(B, 3, F, H, W, **meta)  # pose images in [0, 1]
pose_fea = models["pose_guider"](pose_video)
latents = torch.empty(B, SD15.unet["in_channels"], F, H // f, W // f, **meta)  # the starting noise
for name, t in [
    ("reference image", ref_image),
    ("reference latents (VAE mean x 0.18215)", ref_latents),
    ("CLIP pixels", clip_pixels),
    ("CLIP image embedding", image_embeds),
    ("CLIP tokens, with the zero uncond row", clip_tokens_cfg),
    ("pose video", pose_video),
    ("pose features", pose_fea),
    ("noise latents", latents),
]:
    print(f"{name:42s} {tuple(t.shape)}")

# %% [markdown] tags=["core"]
# - The VAE shrinks 512×512×3 to 64×64×4: 48× fewer numbers, and the whole diffusion runs on that grid.
# - The reference image reaches the denoiser twice: as one CLIP token (global appearance) and through the
#   ReferenceNet (spatial detail).
# - The pose features already have the UNet's first width (320) and the latent grid, so they can simply be
#   added to the output of the denoiser's `conv_in`.
#
# ### 2.1 The ReferenceNet runs once, at t = 0
# Its job is to fill a *bank*: the input of every self-attention (the output of `norm1` of each transformer
# block). With CFG it runs on two rows (the unconditional row is later ignored by the denoiser).

# %% tags=["core"]
reference_unet = models["reference_unet"]
bank = trace_shapes(
    reference_unet,
    ref_latents.repeat(2, 1, 1, 1),
    torch.zeros(2, **meta),
    encoder_hidden_states=clip_tokens_cfg,
    include=lambda name, m: name.endswith("transformer_blocks.0.norm1"),
)
print(f"{len(bank)} bank entries (B*2 rows, tokens = h*w, channels):")
for r in bank:
    print(f"  {r.name.replace('.transformer_blocks.0.norm1', ''):28s} {r.outputs[0]}")

# %% [markdown] tags=["core"]
# Two questions readers of the reference code ask here:
# - *Why does the ReferenceNet lack `conv_out`?* Its output is never used — only the bank is — so the head
#   that would turn features into a noise prediction is dead weight and is left out of `reference_unet.pth`.
# - *Why do the writer's and the reader's attention blocks pair up one to one?* Because the denoiser is the
#   same SD1.5 layout: it has exactly one spatial transformer block under each name where the ReferenceNet
#   wrote one. (The reference code does not pair them by name: it sorts both lists by width with a stable
#   sort and zips them. Chapter 05 runs that sort and shows it gives the same pairs as the names.)

# %% tags=["core"]
reader_blocks = [
    n for n, m in denoiser.named_modules() if n.endswith("transformer_blocks.0") and "motion_modules" not in n
]
writer_blocks = [r.name.removesuffix(".norm1") for r in bank]
print(
    "ReferenceNet has conv_out:",
    hasattr(reference_unet, "conv_out"),
    "| denoiser has conv_out:",
    hasattr(denoiser, "conv_out"),
)
print(
    f"{len(writer_blocks)} writers, {len(reader_blocks)} readers, same names:",
    sorted(writer_blocks) == sorted(reader_blocks),
)

# %% [markdown] tags=["core"]
# ### 2.2 The denoising UNet, every step
# The latents of all 24 frames, doubled for CFG, go through SD1.5's blocks as a batch of 48 images; each
# motion module then regroups the features so that attention runs across the 24 frames at each of the h×w
# positions.

# %% tags=["core"]
t = torch.full((2 * B,), 999, **meta)
x = latents.repeat(2, 1, 1, 1, 1)  # (2B, 4, F, 64, 64): uncond + cond


def level(name):
    return name in ("conv_in", "conv_out") or name.endswith(("resnets.0", "downsamplers.0", "upsamplers.0"))


blocks = trace_shapes(
    denoiser,
    x,
    t,
    encoder_hidden_states=clip_tokens_cfg,
    pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1),
    include=lambda name, m: level(name),
)
for r in blocks:
    print(f"{r.name:28s} in {str(r.inputs[0]):22s} out {r.outputs[0]}")
noise_pred = denoiser(
    x, t, encoder_hidden_states=clip_tokens_cfg, pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1)
)
print(
    "noise prediction:",
    tuple(noise_pred.shape),
    "-> CFG combines the two rows ->",
    tuple(noise_pred[:1].shape),
)

# %% [markdown] tags=["core"]
# Inside a motion module the per-frame layout `(B·F, C, h, w)` becomes a set of short sequences `(B·h·w, F,
# C)`:

# %% tags=["core"]
mm = [
    r
    for r in trace_shapes(
        denoiser,
        x,
        t,
        encoder_hidden_states=clip_tokens_cfg,
        include=lambda name, m: "motion_modules" in name and name.endswith("attention_blocks.0.to_q"),
    )
]
for r in mm[:1] + mm[-1:]:
    print(f"{r.name.split('.temporal')[0]:32s} queries {r.inputs[0]} = (2 rows x h x w, frames, channels)")

# %% [markdown] tags=["core"]
# ### 2.3 Back to pixels
# After the last step the latents are divided by 0.18215 and decoded one frame at a time.

# %% tags=["core"]
frames = models["vae"].decode(latents[0].permute(1, 0, 2, 3) / SD15.vae_scaling_factor).sample
print("decoded frames:", tuple(frames.shape), "-> video", (B, 3, F, H, W))

# %% [markdown] tags=["core"]
# ## 3. Where the compute goes
#
# `FlopCounterMode` counts the FLOPs (2 per multiply-add) of every matrix multiplication and convolution that
# a forward would run; on meta tensors it costs no arithmetic at all. Count on `meta`: there attention is
# decomposed into matrix products that are counted, while on the CPU torch runs a fused attention kernel that
# the counter has no formula for, and its FLOPs would go missing (`inspect.count_flops`).

# %% tags=["core"]
step = count_flops(
    denoiser, x, t, encoder_hidden_states=clip_tokens_cfg, pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1)
)
once = {
    "VAE encode (reference)": count_flops(models["vae"].encode, ref_image),
    "CLIP image encoder": count_flops(models["image_encoder"], pixel_values=clip_pixels),
    "PoseGuider (24 frames)": count_flops(models["pose_guider"], pose_video),
    "ReferenceNet (once, 2 rows)": count_flops(
        reference_unet,
        ref_latents.repeat(2, 1, 1, 1),
        torch.zeros(2, **meta),
        encoder_hidden_states=clip_tokens_cfg,
    ),
    "VAE decode (24 frames)": count_flops(models["vae"].decode, frames.new_empty(F, 4, H // f, W // f)),
}
steps = 25
rows = [[k, human(v, "FLOP"), f"{v / (steps * step + sum(once.values())):.2%}"] for k, v in once.items()]
rows.append(
    [
        f"denoising UNet x {steps} steps (CFG: 2 x 24 frames)",
        human(steps * step, "FLOP"),
        f"{steps * step / (steps * step + sum(once.values())):.2%}",
    ]
)
print(format_table(rows, ["stage", "FLOPs", "share"]))
print(
    f"\none denoising step with CFG: {human(step, 'FLOP')}; "
    f"whole run: {human(steps * step + sum(once.values()), 'FLOP')}"
)

# %% [markdown] tags=["core"]
# - The denoising loop is the bill; of what runs once only the VAE decoder (24 frames at full resolution)
#   shows up.
# - CFG doubles it: the unconditional rows cost exactly as much as the conditional ones.

# %% tags=["core"]
half = count_flops(denoiser, latents, t[:1], encoder_hidden_states=clip_tokens, pose_cond_fea=pose_fea)
print("one step without CFG:", human(half, "FLOP"), "| with CFG / without:", round(step / half, 3))
by_part = flops_by_module(
    denoiser, x, t, encoder_hidden_states=clip_tokens_cfg, pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1)
)
print(
    format_table(
        [[k, human(v, "FLOP"), f"{v / step:.1%}"] for k, v in by_part.items()], ["part", "FLOPs", "share"]
    )
)

# %% [markdown] tags=["core"]
# Where inside the blocks? Split the same step one level deeper and add up the three kinds of layer: the
# ResNet blocks, the spatial transformers (`attentions`: self-attention, cross-attention, feed-forward) and
# the motion modules.

# %% tags=["core"]
deeper = flops_by_module(
    denoiser,
    x,
    t,
    encoder_hidden_states=clip_tokens_cfg,
    pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1),
    depth=3,
)
deeper |= flops_by_module(  # the mid block's lists sit one level higher
    denoiser,
    x,
    t,
    encoder_hidden_states=clip_tokens_cfg,
    pose_cond_fea=pose_fea.repeat(2, 1, 1, 1, 1),
    depth=2,
)
kinds = {
    k: sum(v for n, v in deeper.items() if n.endswith(k)) for k in ("resnets", "attentions", "motion_modules")
}
print(
    format_table(
        [[k, human(v, "FLOP"), f"{v / step:.0%}"] for k, v in kinds.items()], ["layers", "FLOPs", "share"]
    )
)
motion_share = kinds["motion_modules"] / step

# %% [markdown] tags=["core"]
# The 21 motion modules cost more than a quarter of every step: they are not cheap. Their attention matrices
# are tiny (24 × 24 per position), but every one of the $2 \cdot F \cdot hw$ tokens still goes through
# `proj_in`, Q/K/V/out of two attentions, the feed-forward and `proj_out`: about $22C^2$ weights per token,
# the same as the parameter count above.
#
# Check one entry by hand: `conv_in` is a 3×3 convolution from 4 to 320 channels on 48 latent images of 64×64.
# A convolution costs $2 \cdot N \cdot H W \cdot C_\text{out} \cdot C_\text{in} k^2$ FLOPs (one multiply and
# one add per weight and output pixel).

# %% tags=["core"]
conv_in_by_hand = 2 * (2 * F * 64 * 64) * 320 * (4 * 3 * 3)
print(
    "conv_in by hand:",
    human(conv_in_by_hand, "FLOP"),
    "| matches the counter:",
    conv_in_by_hand == by_part["conv_in"],
)

# %% [markdown] tags=["core"]
# **Moore-AnimateAnyone's real default** (`pose2vid.py`: W 512 × H 784, 24 frames, 30 steps, cfg 3.5): 784 is
# not a multiple of 64, so the latent grid is 98 × 64 and the downsampling goes 98 → 49 → 25 → 13 (the up path
# uses the skips' sizes to come back). Price one step and the 30-step loop:


# %% tags=["core"]
def denoiser_step_flops(height, width, frames, rows=2):
    """FLOPs of one denoiser call on meta tensors: `rows` = 2 with CFG."""
    lat = torch.empty(rows, 4, frames, height // f, width // f, **meta)  # (2B, 4, F, h, w)
    pose = models["pose_guider"](torch.empty(1, 3, frames, height, width, **meta)).repeat(rows, 1, 1, 1, 1)
    tok = torch.empty(rows, 1, 768, **meta)
    return count_flops(
        denoiser, lat, torch.full((rows,), 999, **meta), encoder_hidden_states=tok, pose_cond_fea=pose
    )


step_784 = denoiser_step_flops(784, 512, 24)
print(f"512x784, 24 frames: one step {human(step_784, 'FLOP')}, 30 steps {human(30 * step_784, 'FLOP')}")
print(f"vs our 512x512, 25-step example: x{30 * step_784 / (steps * step):.2f}")

# %% [markdown]
# ## 4. Memory: weights and the attention matrix
#
# - fp16 weights of the five networks (from §1) must sit on the GPU together.
# - Attention is the activation that explodes: at the first level a 64×64 latent has 4096 tokens, and the
#   ReferenceNet doubles the keys of every spatial self-attention (own tokens + reference tokens).

# %%
tokens = 64 * 64
heads = SD15.unet["attention_head_dim"]  # 8 heads (diffusers' historical name)
rows_cfg = 2 * F  # 48 images per step
for keys, what in [(tokens, "plain self-attention"), (2 * tokens, "with reference tokens")]:
    scores = rows_cfg * heads * tokens * keys * 2  # fp16 bytes of one full score matrix
    print(f"{what:24s}: scores for one layer = {scores / 2**30:.1f} GiB")
print(f"all fp16 weights       : {total_params * 2 / 2**30:.1f} GiB")

# %% [markdown]
# The formula: one layer's scores take $\text{rows} \times \text{heads} \times N_q \times N_k \times 2$
# bytes in fp16, with $N_q = hw = 4096$ queries and $N_k = N_q$ keys ($2N_q$ with reference tokens).
# A materialised score matrix for one layer would be several times the weights. Two ways avoid it:
# - **memory-efficient / flash attention** (`scaled_dot_product_attention`, xformers) computes the softmax in
#   blocks of keys with a running maximum and never stores the scores; this is what every attention in
#   `anim_lab` goes through (Moore-AnimateAnyone's training configs turn on xformers for the same reason);
# - **sliced attention** (diffusers' `set_attention_slice`) still materialises scores, but for a slice of the
#   batch × heads at a time, so only one slice is ever in memory: the same result, less memory, more time.
#
# The maintainers report about 15 GB of GPU memory for 512×768 inference (Moore-AnimateAnyone issue #3); we
# did not measure that here.
#
# ## 5. The whole pipeline in one picture

# %%
from anim_lab.viz import pipeline_diagram, save  # noqa: E402

shape = lambda t: "x".join(map(str, t.shape))  # noqa: E731
fig = pipeline_diagram(
    shapes={
        "ref_image": shape(ref_image),
        "clip_pixels": shape(clip_pixels),
        "ref_latents": shape(ref_latents.repeat(2, 1, 1, 1)) + " (CFG: 2 rows)",
        "clip_tokens": "tokens " + shape(clip_tokens_cfg),
        "clip_tokens_unet": "tokens " + shape(clip_tokens_cfg),
        "bank": f"bank: {len(bank)} x (2, h*w, C)",
        "latents": shape(latents),
        "pose_video": shape(pose_video),
        "pose_fea": shape(pose_fea),
        "denoised": shape(latents),
        "frames": f"{F}x3x{H}x{W}",
    },
    chapters={
        "vae_enc": CHAPTER["vae"],
        "clip": CHAPTER["image_encoder"],
        "refnet": CHAPTER["reference_unet"],
        "guider": CHAPTER["pose_guider"],
        "unet": CHAPTER["denoising_unet"],
        "vae_dec": CHAPTER["vae"],
    },
)
_ = save(fig, "ch00_pipeline")

# %% [markdown] tags=["core"]
# ## Summary
# - AnimateAnyone runs five networks; the two SD1.5-sized UNets hold 2.2 of the 2.6 B parameters, and the
#   21 motion modules add about half a UNet on top of SD1.5.
# - The reference image enters twice: one CLIP token for global appearance, and the ReferenceNet's bank for
#   detail. The pose enters once, added after `conv_in`.
# - The cost is the denoising loop: steps × (2 for CFG) × frames UNet evaluations; everything else is under 5
#   %. Inside a step the 21 motion modules take about a quarter of the FLOPs (section 3).
# - With CFG the ReferenceNet also runs on 2 rows (the reference latents repeated, zero and real CLIP tokens),
#   as the figure's labels show, although the denoiser only reads the conditional row's bank.
# - Attention at 64×64 latents is why memory-efficient attention is mandatory, and why reference attention
#   (twice the keys) is not free.
#
# ## Exercises
# 1. Rebuild the cost for 512×768 (`H=768`) and 64 frames. Which numbers scale with the area, which with
#    frames?
# 2. The motion modules are about a quarter of a step's FLOPs (section 3). How much of that is the temporal
#    attention itself (the $F \times F$ score matrices), and how much the linear layers around it?
# 3. The 25-step run with CFG costs twice the run without. Estimate the cost of guidance applied on every
#    second step only.
# 4. Replace `SD15` by `TINY` and run the pipeline's networks on real (random) weights on the CPU.
#
# ## Solutions
#
# **1.** 64 frames do not fit the motion modules (their position encoding has 32 positions), so the pipeline
# runs *context windows*: Moore-AnimateAnyone uses 24 frames with an overlap of 4 and wraps around, giving
# windows starting at 0, 20, 40, 60, i.e. 4 windows of 24 frames per step.

# %%
try:
    denoiser_step_flops(768, 512, 64)
except ValueError as err:
    print("64 frames at once:", str(err).split(";")[0])
step_768 = denoiser_step_flops(768, 512, 24)
windows = len(range(0, 64, 24 - 4))  # window starts 0, 20, 40, 60
print(f"512x768: one 24-frame window {human(step_768, 'FLOP')}, x{step_768 / step:.2f} the 512x512 window")
print(f"64 frames = {windows} windows per step: {human(windows * step_768, 'FLOP')} per step")
print(
    f"ReferenceNet bank at 512x768: {len(bank)} entries, the first (2, {768 // 8 * 512 // 8}, 320); "
    f"attention scores per layer grow with area^2: x{(768 / 512) ** 2:.2f}"
)

# %% [markdown]
# Everything per frame (convolutions, linear layers, decoding) scales with area × frames; the spatial
# attention's score matrices with area² per frame; the motion modules' attention with frames² per position.
# With context windows the compute grows with the number of windows, while the activation memory is set by
# one window (24 frames), not by the length of the video.
#
# **2.** Count the temporal attention's matrix products apart: per attention and position, $QK^\top$ and the
# weighted sum of values each cost $2 F^2 C$ FLOPs.

# %%
levels = [r.inputs[0] for r in mm]  # (2*h*w, F, C) queries of every motion module
matmuls = sum(2 * 2 * 2 * n * frames * frames * c for n, frames, c in levels)  # 2 attentions x (QK^T, AV)
print(
    f"{len(levels)} motion modules; attention matrix products: "
    f"{matmuls / kinds['motion_modules']:.0%} of their FLOPs"
)
print(f"motion modules: {motion_share:.0%} of a step")

# %% [markdown]
# Almost all of a motion module's cost is its linear layers; the attention over 24 frames is about 1%.
# Spatial self-attention is the opposite: 4096 keys per query at the first level.
#
# **3.** With guidance on every second step, half the steps run 2 rows and half 1 row: 1.5 instead of 2
# UNet evaluations per step on average.

# %%
every_other = (steps // 2 + steps % 2) * step + (steps // 2) * half  # 13 steps with CFG, 12 without
print(f"25 steps, CFG on every second step: x{every_other / (steps * step):.2f} of full CFG")

# %% [markdown]
# **4.** The same five networks at TINY size, on the CPU with random weights: the same calls, real numbers.

# %%
tiny_models = {name: build(TINY, name, "cpu") for name in CHAPTER}
Ht, Wt, Ft = TINY.height, TINY.width, 4
torch.manual_seed(0)
ref_t = torch.rand(1, 3, Ht, Wt) * 2 - 1
ref_lat_t = tiny_models["vae"].encode(ref_t).latent_dist.mean * TINY.vae_scaling_factor
enc_cfg = TINY.image_encoder
emb_t = tiny_models["image_encoder"](
    pixel_values=torch.rand(1, 3, enc_cfg["image_size"], enc_cfg["image_size"])
).image_embeds[:, None]  # (1, 1, D)
emb_cfg = torch.cat([torch.zeros_like(emb_t), emb_t])  # (2, 1, D)
pose_t = tiny_models["pose_guider"](torch.rand(1, 3, Ft, Ht, Wt)).repeat(2, 1, 1, 1, 1)
lat_t = torch.randn(2, 4, Ft, Ht // f, Wt // f)
pred = tiny_models["denoising_unet"](
    lat_t, torch.tensor([999, 999]), encoder_hidden_states=emb_cfg, pose_cond_fea=pose_t
)
print("TINY reference latents", tuple(ref_lat_t.shape), "| noise prediction", tuple(pred.shape))
print(
    "finite:",
    bool(torch.isfinite(pred).all()),
    "| parameters:",
    f"{sum(count_parameters(m) for m in tiny_models.values()):,}",
)

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch
from diffusers.models.attention_processor import Attention

from anim_lab import inspect as lab_inspect
from anim_lab.configs import SD15 as LAB_SD15

# %% [markdown] tags=["core"]
# ### Exercise 1 (2 points): count parameters
# Write `my_count_parameters(module, trainable_only=False)`: the number of parameters of `module` (buffers are
# not parameters), only those with `requires_grad` when `trainable_only`. It must work on the meta device.


# %% nbgrader={"grade": false, "grade_id": "ch00_count_parameters", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_count_parameters(module, trainable_only=False):
    ### BEGIN SOLUTION
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch00_count_parameters_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_count_parameters is not lab_inspect.count_parameters
gen = torch.Generator().manual_seed(0)
for trial in range(4):
    widths = torch.randint(1, 40, (4,), generator=gen).tolist()
    with torch.device("meta" if trial % 2 else "cpu"):
        net = torch.nn.Sequential(
            torch.nn.Conv2d(widths[0], widths[1], 3),
            torch.nn.GroupNorm(1, widths[1]),
            torch.nn.Linear(widths[1], widths[2], bias=trial > 1),
            torch.nn.LayerNorm(widths[2]),
            torch.nn.Linear(widths[2], widths[3]),
        )
    net.register_buffer("table", torch.zeros(7, 9))  # a buffer, not a parameter
    net[int(torch.randint(0, 5, (1,), generator=gen))].requires_grad_(False)
    for trainable_only in (False, True):
        assert my_count_parameters(net, trainable_only) == lab_inspect.count_parameters(net, trainable_only)
guider = lab_inspect.build(LAB_SD15, "pose_guider")  # on the meta device
assert my_count_parameters(guider) == lab_inspect.count_parameters(guider)
print("my_count_parameters matches inspect.count_parameters on 4 random networks and the SD1.5 pose guider")

# %% [markdown] tags=["core"]
# ### Exercise 2 (3 points): the FLOPs of a convolution
# Write `my_conv2d_flops(conv, x)`: the FLOPs of `conv(x)` for a `torch.nn.Conv2d` (any stride, padding and
# groups) as `FlopCounterMode` counts them: a multiply-add is 2 FLOPs, the bias is not counted. Compute it
# from the shapes alone (you may run `conv` on `x` to get the output shape, or derive it).


# %% nbgrader={"grade": false, "grade_id": "ch00_conv2d_flops", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_conv2d_flops(conv, x):
    ### BEGIN SOLUTION
    out = conv(x)  # (B, C_out, H', W'): every output element is a dot product of C_in/groups * kh * kw terms
    kh, kw = conv.kernel_size
    return 2 * out.numel() * (conv.in_channels // conv.groups) * kh * kw
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch00_conv2d_flops_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(1)
for _ in range(6):
    groups = int(torch.randint(1, 4, (1,), generator=gen))
    c_in, c_out = (groups * int(torch.randint(1, 6, (1,), generator=gen)) for _ in range(2))
    kernel, stride, padding = (
        int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in [(1, 6), (1, 3), (0, 3)]
    )
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups)
    x = torch.randn(int(torch.randint(1, 3, (1,), generator=gen)), c_in, 11, 9, generator=gen)
    assert my_conv2d_flops(conv, x) == lab_inspect.count_flops(conv, x), (c_in, c_out, kernel, stride, groups)
print("my_conv2d_flops matches inspect.count_flops on 6 random convolutions")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# What fraction of the SD1.5-size denoising UNet's parameters sit in attention layers (the modules of class
# `diffusers.models.attention_processor.Attention`: spatial self-, cross- and the motion modules' temporal
# attention)? Build it on the meta device and store the fraction, a float in [0, 1], in `attention_share`.

# %% nbgrader={"grade": false, "grade_id": "ch00_attention_share", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_unet = lab_inspect.build(LAB_SD15, "denoising_unet")
attention_params = sum(
    p.numel() for m in lab_unet.modules() if isinstance(m, Attention) for p in m.parameters()
)
attention_share = attention_params / lab_inspect.count_parameters(lab_unet)
### END SOLUTION
print(f"attention layers: {attention_share:.1%} of the denoising UNet's parameters")

# %% nbgrader={"grade": true, "grade_id": "ch00_attention_share_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(attention_share, float) and 0 <= attention_share <= 1
### BEGIN HIDDEN TESTS
_unet = lab_inspect.build(LAB_SD15, "denoising_unet")
_share = sum(p.numel() for m in _unet.modules() if isinstance(m, Attention) for p in m.parameters())
assert abs(attention_share - _share / lab_inspect.count_parameters(_unet)) < 0.005
### END HIDDEN TESTS
print("attention_share is a fraction")
