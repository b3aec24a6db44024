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
# # Chapter 06 — Pose guiders
#
# *How a pose image becomes features inside the denoising UNet: AnimateAnyone's small single-scale guider,
# AniPortrait's multi-scale guider as it was released (with a "cross-attention" that ignores its reference),
# and Hallo's face locator on a face-box mask.*
#
# - **You will build**: both guiders at full size on the `meta` device, stage by stage with shapes,
#   parameters and FLOPs; one transformer stage re-derived by hand and checked against the library; receptive
#   fields measured by gradient; the zero-init argument checked through the video UNet; BatchNorm's train/eval
#   trap; the reference pose that changes nothing; AniPortrait's [-1, 509] input slip; Hallo's face-box mask
#   on a real face; then the trained toy guider stage by stage (channel maps for one pose image) and the pose
#   error of the toy animator with and without its guider (mediapipe on the generated frames)
# - **Library modules**: `anim_lab.pose_guider` (`PoseGuider`, `PoseGuiderMultiScale`,
#   `prepare_pose_images`, `face_region_mask`), `anim_lab.unet` (`VideoUNet`), `anim_lab.inspect`,
#   `anim_lab.landmarks`, `anim_lab.configs`, `anim_lab.toy` (`load_animator`); `scripts/eval_animator.py`
#   (held-out cases, `pose_errors`, `without_pose_guider`)
# - **Questions answered**: What is in each guider, stage by stage, and why is one 1.09M parameters and the
#   other 167.5M? Which pose pixels reach one latent? Why is the last layer zero-initialised, and does that
#   leave the UNet unchanged at step 0 for both guiders? What does BatchNorm do differently in train and eval
#   mode on a batch of pose frames? Does AniPortrait's guider really use the reference landmarks? What does
#   the [-1, 509] range slip do to the features? What does Hallo's face locator see? What does a trained
#   guider compute at each stage, and how much of the driving motion is lost without it?
# - **CPU runtime**: about 20 s
#
# Sections 1–9 use random weights, so they are about structure (shapes, what reaches what, what is zero, what
# changes), not about good poses. Section 10 uses the trained toy animator in `anim_lab/assets/toy_animator`.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import warnings

# diffusers imports tqdm.auto, which warns on stderr when ipywidgets is absent; progress bars are unused here
warnings.filterwarnings("ignore", message="IProgress not found")

import math

import cv2
import diffusers
import matplotlib.pyplot as plt
import numpy as np
import skimage.data
import torch
from torch.nn import functional as F

import anim_lab
from anim_lab.configs import (
    FACE_LOCATOR_SD15,
    POSE_GUIDER_MULTISCALE_SD15,
    POSE_GUIDER_MULTISCALE_TINY,
    SD15,
    TINY,
)
from anim_lab.inspect import count_flops, count_parameters, flops_by_module, format_table, human, trace_shapes
from anim_lab.landmarks import FaceLandmarker, draw_pose_image
from anim_lab.metrics import psnr, video_from_uint8
from anim_lab.motion import MOTION_TINY
from anim_lab.pose_guider import (
    PoseGuider,
    PoseGuiderMultiScale,
    face_region_bbox,
    face_region_mask,
    prepare_pose_images,
)
from anim_lab.toy import load_animator
from anim_lab.unet import VideoUNet
from anim_lab.viz import image_grid, save

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is as fast, and steady on a busy machine
torch.set_printoptions(precision=3, sci_mode=False)
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")


# a real face for the pose frames of sections 6-9: the astronaut's 478 landmarks
astronaut = skimage.data.astronaut()  # (512, 512, 3) uint8
with FaceLandmarker() as landmarker:
    face = landmarker.detect(astronaut, "astronaut")

# %% [markdown] tags=["core"]
# ## 1. Two guiders at full size, stage by stage
#
# - **AnimateAnyone** (Moore-AnimateAnyone's `PoseGuider`): `conv_in`, three pairs of 3×3 convolutions (the
#   second of each pair with stride 2), `conv_out` to 320 channels; SiLU between. Its output is added
#   **once**, to the UNet's `conv_in` output.
# - **AniPortrait** (`PoseGuiderMultiScale`): a BatchNorm/ReLU trunk with 4×4 stride-2 convolutions, a
#   zero-initialised 1×1 `final_proj` times a learnable `scale` (2.0) → `fea[0]`; then four stages
#   `conv_layers_k` + `cross_attn_k` (a `Transformer2DModel`, 16 heads × 88) → `fea[1..4]` at 1/16, 1/32,
#   1/64, 1/64 of the image, added after each down block of the UNet.
# - Both built on the `meta` device for one 512×512 frame: shapes, parameters and FLOPs, no memory.

# %% tags=["core"]
with torch.device("meta"):
    aa = PoseGuider(**SD15.pose_guider)
    ap = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_SD15)
    locator = PoseGuider(**FACE_LOCATOR_SD15)
frame = torch.empty(1, 3, 1, 512, 512, device="meta")  # (B, 3, F, H, W)


def stage_table(model, *args):
    """One row per stage (a child of the guider, or of its ModuleList ``blocks``): output shape in the
    per-frame layout, parameters, FLOPs."""
    lists = {n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)}

    def is_stage(name, module):
        parent = name.rpartition(".")[0]
        stage = parent in lists if parent else name not in lists and name != ""
        return stage and count_parameters(module) > 0

    flops = flops_by_module(model, *args) | flops_by_module(model, *args, depth=2)
    rows = [
        [r.name, r.outputs[0], human(r.params), human(flops.get(r.name, 0))]
        for r in trace_shapes(model, *args, include=is_stage)
    ]
    return format_table(rows, ["stage", "output (B*F, C, h, w)", "params", "FLOPs"])


print(stage_table(aa, frame))

# %% tags=["core"]
print(stage_table(ap, frame))
print("scale:", tuple(ap.scale.shape), "(one learnable number multiplying fea[0])")

# %% [markdown] tags=["core"]
# - 1.09M against 167.5M parameters: almost all of AniPortrait's guider is its four transformer blocks.
#   Each widens its level to 16 × 88 = **1408** channels (`proj_in`), so even the 320-channel level pays for
#   1408-wide attention and a 1408 → 2·5632 GEGLU feed-forward.
# - The FLOPs follow: `cross_attn1` runs 1408-wide attention and feed-forward on 32×32 = 1024 tokens per
#   512² frame, about 73 GFLOPs, five times the whole AnimateAnyone guider. The trunk at full resolution is
#   cheap (2 GFLOPs).

# %% tags=["core"]
attn_params = sum(count_parameters(getattr(ap, f"cross_attn{k}")) for k in range(1, 5))
rows = [
    ["AnimateAnyone PoseGuider", human(count_parameters(aa)), human(count_flops(aa, frame))],
    ["AniPortrait PoseGuider", human(count_parameters(ap)), human(count_flops(ap, frame))],
    ["Hallo FaceLocator", human(count_parameters(locator)), human(count_flops(locator, frame))],
]
print(format_table(rows, ["guider (one 512x512 frame)", "params", "FLOPs"]))
print(f"share of AniPortrait's parameters in the 4 transformers: {attn_params / count_parameters(ap):.1%}")
print("state-dict keys (with BatchNorm buffers):", len(ap.state_dict()), "vs", len(aa.state_dict()))

# %% [markdown] tags=["core"]
# ## 2. Where the five features go
#
# - AniPortrait's UNet adds `fea[0]` after `conv_in` and `fea[k]` to the **main path** after down block `k`
#   (the skips handed to the up path are left as they were). The features therefore have exactly the shapes
#   of the UNet's feature maps at those points.
# - The features are **added**, not concatenated: the UNet's channel counts and weights stay those of SD1.5,
#   and each feature must have exactly the shape of the feature map it joins.
# - `VideoUNet.forward(pose_cond_fea=...)` takes one tensor (AnimateAnyone, Hallo) or this list (AniPortrait).

# %% tags=["core"]
with torch.device("meta"):
    unet = VideoUNet(SD15.unet)
fea = ap(torch.empty(1, 3, 2, 512, 512, device="meta"))  # 2 frames
expected = unet.pose_feature_shapes(1, 2, 64, 64)  # for the 64x64 latent of a 512x512 video
for k, (f, shape) in enumerate(zip(fea, expected, strict=True)):
    print(f"fea[{k}] {tuple(f.shape)}  UNet at that point {shape}  equal: {tuple(f.shape) == shape}")

# %% [markdown] tags=["core"]
# ## 3. One stage by hand: `cross_attn1` is self-attention
#
# - The block is built without `cross_attention_dim`, so it has no `attn2`: GroupNorm → 1×1 `proj_in` →
#   tokens → LayerNorm + self-attention (residual) → LayerNorm + GEGLU feed-forward (residual) → 1×1
#   `proj_out` → + input.
# - Self-attention per head, with $d$ the head width:
#   $\mathrm{softmax}\!\left(QK^\top/\sqrt{d}\right)V$, $Q = XW_q$, $K = XW_k$, $V = XW_v$ — all three from
#   the same target-pose tokens $X$.
# - Re-derived here on a TINY guider with random weights and checked against the library.

# %% tags=["core"]
tiny = PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_TINY).eval()
with torch.no_grad():
    for p in tiny.parameters():
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 4))
block = tiny.cross_attn1
x = torch.randn(2, 32, 8, 8)  # (B*F, C, h, w): conv_layers_1's output
print("attn2:", block.transformer_blocks[0].attn2, "| heads:", block.transformer_blocks[0].attn1.heads)


def by_hand(x, m):
    n, c, h, w = x.shape
    y = F.conv2d(F.group_norm(x, 8, m.norm.weight, m.norm.bias, eps=1e-6), m.proj_in.weight, m.proj_in.bias)
    t = y.flatten(2).transpose(1, 2)  # (N, inner, h, w) -> (N, h*w, inner) tokens
    blk = m.transformer_blocks[0]
    z = F.layer_norm(t, t.shape[-1:], blk.norm1.weight, blk.norm1.bias)
    q, k, v = (z @ lin.weight.T for lin in (blk.attn1.to_q, blk.attn1.to_k, blk.attn1.to_v))
    heads, d = blk.attn1.heads, t.shape[-1] // blk.attn1.heads
    q, k, v = (u.reshape(n, h * w, heads, d).transpose(1, 2) for u in (q, k, v))  # (N, heads, h*w, d)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    t = t + blk.attn1.to_out[0](a.transpose(1, 2).reshape(n, h * w, heads * d))
    hidden, gate = (
        blk.ff.net[0].proj(F.layer_norm(t, t.shape[-1:], blk.norm3.weight, blk.norm3.bias)).chunk(2, -1)
    )
    t = t + blk.ff.net[2](hidden * F.gelu(gate))
    return m.proj_out(t.transpose(1, 2).reshape(n, -1, h, w)) + x


with torch.no_grad():
    mine, lib = by_hand(x, block), block(x, return_dict=False)[0]
torch.testing.assert_close(mine, lib, rtol=1e-4, atol=1e-5)
print("hand-written self-attention block == cross_attn1:", True, "| output", tuple(lib.shape))

# %% [markdown]
# ## 4. Which pose pixels reach one latent? Receptive fields by gradient
#
# - Take one feature vector in the middle of a feature map, sum its channels, and back-propagate to the
#   pose image: the pixels with a nonzero gradient are the ones that can change it (union over 4 random
#   inputs, so that no dead ReLU hides a pixel).
# - For a convolution stack the answer is the receptive field $r = 1 + \sum_l (k_l - 1)\prod_{i<l} s_i$:
#   47 px for AnimateAnyone's guider, 68 px for AniPortrait's trunk (`fea[0]`).
# - Past the trunk, AniPortrait's transformer blocks attend over the whole feature map: one latent of
#   `fea[1..4]` sees **every** pose pixel.
# - Sizes: AnimateAnyone's guider as released; AniPortrait's with its released trunk and narrower levels
#   (32/64/128 channels, 2 heads × 16) so that CPU gradients take a second; the receptive fields do not
#   depend on the widths.

# %%
torch.manual_seed(0)
aa_cpu = PoseGuider(**SD15.pose_guider)
torch.nn.init.normal_(aa_cpu.conv_out.weight, std=0.02)  # non-zero, or every gradient is zero
AP_NARROW = dict(
    POSE_GUIDER_MULTISCALE_SD15,
    block_out_channels=(32, 64, 128, 128),
    num_attention_heads=2,
    attention_head_dim=16,
)
ap_cpu = PoseGuiderMultiScale(**AP_NARROW).eval()
torch.nn.init.normal_(ap_cpu.final_proj.weight, std=0.1)
S = 128


def reach(model, level=None, n=4):
    """|d (one centre feature vector) / d pose| summed over n random poses -> (S, S) map."""
    total = torch.zeros(S, S)
    for _ in range(n):
        pose = torch.rand(1, 3, S, S, requires_grad=True)
        out = model(pose)
        out = out if level is None else out[level]
        h, w = out.shape[-2:]
        out[0, :, h // 2, w // 2].sum().backward()
        total += pose.grad.abs().sum(dim=(0, 1))
    return total


def extent(m):
    rows, cols = m.gt(0).any(1).nonzero(), m.gt(0).any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


maps = {"AnimateAnyone": reach(aa_cpu)} | {f"AniPortrait fea[{k}]": reach(ap_cpu, k) for k in range(5)}
rows = [[name, "x".join(map(str, extent(m))), f"{m.gt(0).float().mean():.1%}"] for name, m in maps.items()]
print(format_table(rows, ["one centre latent of", "pixels reached (h x w)", f"share of the {S}x{S} image"]))


def receptive_field(layers):
    r, jump = 1, 1
    for k, s in layers:
        r, jump = r + (k - 1) * jump, jump * s
    return r


print(
    "formula:",
    receptive_field([(3, 1)] + [(3, 1), (3, 2)] * 3 + [(3, 1)]),
    receptive_field([(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (3, 1), (1, 1)]),
)

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
for ax, name in zip(axes, ["AnimateAnyone", "AniPortrait fea[0]", "AniPortrait fea[1]"], strict=True):
    ax.imshow(maps[name].clamp_min(1e-12).log10(), cmap="magma")
    ax.set_title(f"{name}: {'x'.join(map(str, extent(maps[name])))} px", fontsize=9)
    ax.axis("off")
fig.suptitle(f"log |gradient| of one centre latent w.r.t. a {S}x{S} pose image", fontsize=10)
save(fig, "ch06_receptive_fields")
plt.show()

# %% [markdown]
# ## 5. Why zero-init: the UNet at step 0
#
# - A guider added to a pretrained UNet should not disturb it before it has learnt anything. AnimateAnyone
#   zero-initialises `conv_out`: the added features are exactly 0 and the UNet's output is **bit-identical**
#   to the output without a guider (and gradients still reach `conv_out`, so it learns from step 1).
# - AniPortrait zero-initialises only `final_proj`, i.e. `fea[0]`. `fea[1..4]` come from He-initialised
#   convolutions and transformer blocks *after* `final_proj`; they are not zero, so a fresh multi-scale guider
#   **does** change the UNet at step 0. Their input is `fea[0] = 0` whatever the pose, so at step 0 they are
#   **constant offsets**, the same for every pose (biases, BatchNorm shifts, the transformers' biases): the
#   UNet starts shifted, but not yet pose-dependent.
# - Measured through a TINY video UNet with random weights.

# %%
torch.manual_seed(0)
unet = VideoUNet(TINY.unet, MOTION_TINY).eval()
latents = torch.randn(1, 4, 3, 16, 16)  # (B, 4, F, h, w)
tokens = torch.randn(1, 1, TINY.unet["cross_attention_dim"])
pose = torch.rand(1, 3, 3, 128, 128)  # (B, 3, F, H, W) in [0, 1]
single, multi = PoseGuider(**TINY.pose_guider), PoseGuiderMultiScale(**POSE_GUIDER_MULTISCALE_TINY).eval()
with torch.no_grad():
    plain = unet(latents, 500, tokens)
    fea = multi(pose)
    fea_other = multi(torch.rand(1, 3, 3, 128, 128))  # another pose
    with_single = unet(latents, 500, tokens, pose_cond_fea=single(pose))
    with_multi = unet(latents, 500, tokens, pose_cond_fea=fea)
print("AnimateAnyone guider at init -> UNet bit-identical:", torch.equal(with_single, plain))
print(
    "AniPortrait fea[0] all zero:",
    bool(fea[0].eq(0).all()),
    "| fea[1..4] mean |x|:",
    [round(f.abs().mean().item(), 2) for f in fea[1:]],
)
print(
    "AniPortrait fea[1..4] the same for another pose:",
    all(torch.equal(a, b) for a, b in zip(fea[1:], fea_other[1:], strict=True)),
)
print(
    "AniPortrait guider at init -> UNet bit-identical:",
    torch.equal(with_multi, plain),
    f"| relative change {((with_multi - plain).norm() / plain.norm()).item():.2f}",
)

# %% [markdown]
# ## 6. BatchNorm in train and eval mode on a batch of pose frames
#
# - BatchNorm normalises each channel with statistics over the **batch and the pixels**: in `train()` mode
#   the batch's own mean/variance (and it updates running averages,
#   $\mu \leftarrow (1-m)\,\mu + m\,\mu_\text{batch}$ with $m = 0.1$); in `eval()` mode the stored running
#   averages.
# - AniPortrait's guider is the only BatchNorm network in the system (the UNets use GroupNorm). In the video
#   UNet the batch is `(B·F)`: the frames of one clip. In train mode **one frame's features depend on the
#   other frames in the batch**; a single frame at inference gets other features.
# - The trap when fine-tuning: `model.train()` on the whole animator also switches the guider's BatchNorm to
#   batch statistics and overwrites the released running statistics with those of your clips. Keep the
#   guider in `eval()` (or freeze its BatchNorm) unless you mean to re-learn them.
# - 8 pose frames of the astronaut's face zoomed from 0.5× to 1.4× (a translation would barely move the
#   per-channel statistics), drawn as AniPortrait draws them; a guider whose `final_proj` is no longer zero,
#   as after training (at zero, everything after it is a pose-independent constant, section 5).

# %%
centre = face.pixels.mean(0)
frames = np.stack(
    [draw_pose_image(centre + (face.pixels - centre) * z, 512) for z in np.linspace(0.5, 1.4, 8)]
)  # (8, 512, 512, 3)
frames = np.stack([cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA) for f in frames])
poses = prepare_pose_images(frames)  # (1, 3, 8, 128, 128) in [0, 1]
bn = PoseGuiderMultiScale(**AP_NARROW)
torch.nn.init.normal_(bn.final_proj.weight, std=0.1)  # as after training
with torch.no_grad():
    bn.eval()
    alone_eval, batch_eval = bn(poses[:, :, :1])[1], bn(poses)[1]
    bn.train()
    alone_train, batch_train = bn(poses[:, :, :1])[1], bn(poses)[1]
print(
    "eval : frame 0 alone == frame 0 in a batch of 8:",
    torch.allclose(alone_eval[:, :, 0], batch_eval[:, :, 0], rtol=1e-4, atol=1e-4),
)
change = (alone_train[:, :, 0] - batch_train[:, :, 0]).norm() / batch_train[:, :, 0].norm()
print(
    "train: frame 0 alone == frame 0 in a batch of 8:",
    torch.allclose(alone_train[:, :, 0], batch_train[:, :, 0], rtol=1e-4, atol=1e-4),
    f"| relative difference {change.item():.2f}",
)

# %% [markdown]
# The running statistics moved twice (two train-mode calls). The first BatchNorm of the trunk, by hand:

# %%
bn1 = bn.conv_layers[1]
print("batches tracked:", int(bn1.num_batches_tracked))
with torch.no_grad():
    x_alone = bn.conv_layers[0](poses[0, :, :1].transpose(0, 1) * 2 - 1)  # (1, 3, H, W), [-1, 1]
    x_batch = bn.conv_layers[0](poses[0].transpose(0, 1) * 2 - 1)  # (8, 3, H, W)
mean = torch.zeros(3)  # BatchNorm starts with running mean 0
for x in (x_alone, x_batch):
    mean = 0.9 * mean + 0.1 * x.mean(dim=(0, 2, 3))
torch.testing.assert_close(bn1.running_mean, mean, rtol=1e-3, atol=1e-3)  # float32 sums
print("running mean after two train-mode calls, by hand == BatchNorm's:", True, mean)

# %% [markdown]
# ## 7. The "cross-attention" that ignores its reference
#
# - The paper: the reference image's landmarks are an extra input, and cross-attention lets each target
#   frame's landmarks interact with them. The released code encodes the reference pose with the same
#   convolutions and passes it as `encoder_hidden_states` to blocks that have no `attn2`: it is thrown away
#   (the author confirmed the released code is incomplete, AniPortrait #170).
# - So: change the reference pose completely and compare the features.
# - anim_lab's extension `reference_attention=True` adds a real cross-attention (`attn2`, new keys) from
#   each frame's tokens to the reference pose's tokens of the same level, with a zero output projection:
#   it starts as the released guider and can learn to use the reference.

# %%
ref_a = poses[:, :, 3]  # (1, 3, H, W): one pose image as the reference
ref_b = prepare_pose_images(np.ascontiguousarray(frames[0, ::-1]))[:, :, 0]  # a flipped, different one
released = PoseGuiderMultiScale(**AP_NARROW).eval()
torch.nn.init.normal_(released.final_proj.weight, std=0.1)  # as after training
ext = PoseGuiderMultiScale(**AP_NARROW, reference_attention=True).eval()
ext.load_weights(released.state_dict())  # the 184 released keys; attn2 keeps its zero output
with torch.no_grad():
    same = all(torch.equal(a, b) for a, b in zip(released(poses, ref_a), released(poses, ref_b), strict=True))
    start = all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(ext(poses, ref_a), released(poses), strict=True)
    )
    for k in range(1, 5):  # give the extension's cross-attention something to say
        torch.nn.init.normal_(
            getattr(ext, f"cross_attn{k}").transformer_blocks[0].attn2.to_out[0].weight, std=0.05
        )
    fa, fb = ext(poses, ref_a), ext(poses, ref_b)
print("released guider: features with reference A == with reference B:", same)
print("extension at init == released guider:", start)
print(
    "extension, trained attn2: reference changes fea[1..4]:",
    [not torch.allclose(a, b, atol=1e-6) for a, b in zip(fa[1:], fb[1:], strict=True)],
)
print("keys added by the extension:", len(ext.state_dict()) - len(released.state_dict()))

# %% [markdown]
# ## 8. The [-1, 509] range slip
#
# - AniPortrait **trained** its guider on pose images normalised to [-1, 1] (`/255`, then `2x - 1`).
# - Its **inference** scripts hand uint8 arrays to diffusers' `VaeImageProcessor(do_normalize=True)`, which
#   does not divide numpy input by 255 and applies `2x - 1`: a drawn value of 200 becomes 399, black stays -1,
#   and a full 255 would reach **509**, the top of the range. The pose drawer's brightest channel value is
#   220, hence the 439 printed below. The official videos were made like this.
# - `anim_lab`: both guiders take [0, 1]; the multi-scale guider maps it to [-1, 1] itself.
#   `prepare_pose_images(frames, faithful=True)` builds the slipped tensor and `forward(..., faithful=True)`
#   takes it as it is, to reproduce official outputs.
# - What it does: black pixels are -1 in both ranges, so only the drawn lines change, by
#   $(2\cdot 255x - 1) - (-1) = 255\,\big((2x - 1) - (-1)\big)$: every line's deviation from black is
#   multiplied by exactly **255** at the first convolution. BatchNorm in eval mode does not undo it: the
#   running statistics were measured on [-1, 1] inputs.

# %%
train_range = prepare_pose_images(frames) * 2 - 1  # what training saw
slip = prepare_pose_images(frames, faithful=True)  # what inference fed
print(f"training range [{train_range.min():.0f}, {train_range.max():.0f}]")
print(f"inference range [{slip.min():.0f}, {slip.max():.0f}]")
guide = PoseGuiderMultiScale(**AP_NARROW).eval()
torch.nn.init.normal_(guide.final_proj.weight, std=0.1)
black = -torch.ones_like(train_range)
with torch.no_grad():
    conv = guide.conv_layers[0]
    lines = [conv(t[0].transpose(0, 1)) - conv(black[0].transpose(0, 1)) for t in (train_range, slip)]
    ratio = (lines[1].norm() / lines[0].norm()).item()
    f_black, f_train, f_slip = (guide(t, faithful=True) for t in (black, train_range, slip))
print(f"first convolution: line response x{ratio:.1f}")
for k in range(5):
    added = [(f - f_black[k]).abs().mean().item() for f in (f_train[k], f_slip[k])]
    print(f"fea[{k}]: what the lines add, inference / training range = {added[1] / added[0]:.0f}x")

# %%
fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
axes[0].imshow(frames[3])
axes[0].set_title("pose frame (128x128)", fontsize=9)
for ax, f, name in zip(
    axes[1:], (f_train, f_slip), ("[-1, 1] (training)", "[-1, 509] (inference)"), strict=True
):
    im = ax.imshow((f[0][0, :, 3] - f_black[0][0, :, 3]).abs().mean(0), cmap="viridis")
    ax.set_title(f"what the lines add to fea[0]\ninput {name}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
for ax in axes:
    ax.axis("off")
save(fig, "ch06_range_slip")
plt.show()

# %% [markdown]
# ## 9. Hallo's face locator
#
# - Hallo keeps AnimateAnyone's guider class with the class-default widths (16, 32, 64, 128): the
#   **FaceLocator**, 0.51M parameters, added after `conv_in`.
# - Its input is not a pose at all but a **box**: the bounding box of the 36 face-oval landmarks, rounded,
#   grown 1.2× about its centre and shifted back into the image; 1 inside, 0 outside, three equal channels,
#   the same for every frame. It tells the UNet *where* the face is, not how it moves (audio does that).

# %%
x0, x1, y0, y1 = face_region_bbox(face, 512, 512)
mask = face_region_mask(face, 512, 512)  # (3, H, W) in {0, 1}
print("face box x0, x1, y0, y1:", (x0, x1, y0, y1), "| size", (x1 - x0, y1 - y0))
print(
    "mask:",
    tuple(mask.shape),
    "values",
    mask.unique().tolist(),
    f"| face area {mask[0].mean():.1%} of the image",
)
face_locator = PoseGuider(**FACE_LOCATOR_SD15)
with torch.no_grad():
    mask_fea = face_locator(mask[None, :, None].expand(1, 3, 4, 512, 512))  # (1, 3, F=4, H, W)
print(
    "face locator:",
    human(count_parameters(face_locator)),
    "params ->",
    tuple(mask_fea.shape),
    "| zero at init:",
    bool(mask_fea.eq(0).all()),
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
axes[0].imshow(astronaut)
axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="yellow", lw=2))
axes[0].scatter(*face.pixels[list(range(468))].T, s=0.3, c="cyan")
axes[0].set_title("face-mesh points and the 1.2x face box", fontsize=9)
axes[1].imshow(mask[0], cmap="gray")
axes[1].set_title("FaceLocator input (one channel of three)", fontsize=9)
for ax in axes:
    ax.axis("off")
save(fig, "ch06_face_locator")
plt.show()

# %% [markdown]
# ## 10. The trained toy guider
#
# Sections 1–9 used random weights. The toy animator (`anim_lab.toy.load_animator()`, trained on the toy
# portrait world at 128×128 pixels) has a trained AnimateAnyone-style guider with the class-default widths and
# a 32-channel output, the width of its denoiser's `conv_in`. One held-out driving pose image from
# `scripts/eval_animator.py`, through the guider stage by stage (re-derived and checked against `forward`):

# %%
E = anim_lab.load_script("eval_animator")  # scripts/eval_animator.py: cases, metrics, ablations

pipe = load_animator()
pipe.set_progress_bar_config(disable=True)
guider = pipe.pose_guider
print(
    "motion modules in the loaded denoiser:", "yes" if pipe.denoising_unet.motion_kwargs else "no (stage 1)"
)
print(
    "toy guider:", human(count_parameters(guider)), "params, blocks", [c.out_channels for c in guider.blocks]
)
cases = E.make_cases(num_cases=2, num_frames=8)  # 2 held-out identities x 8 driving frames
toy_pose = torch.from_numpy(cases[0].poses[0]).permute(2, 0, 1)[None].float() / 255  # (1, 3, 128, 128) [0, 1]

with torch.no_grad():
    stages = {"conv_in": F.silu(guider.conv_in(toy_pose))}  # (1, 16, 128, 128)
    x = stages["conv_in"]
    for i, conv in enumerate(guider.blocks):
        x = F.silu(conv(x))
        stages[f"blocks.{i}"] = x
    stages["conv_out"] = guider.conv_out(x)  # (1, 32, 16, 16): added to the denoiser's conv_in output
    torch.testing.assert_close(stages["conv_out"], guider(toy_pose))
print("stages by hand == PoseGuider.forward: True")

lines = toy_pose.amax(dim=1, keepdim=True) > 0  # (1, 1, H, W) pixels on a drawn line
rows = []
for name, fea in stages.items():
    on = F.adaptive_max_pool2d(lines.float(), fea.shape[-2:])[0, 0].bool()  # cells that hold a line pixel
    energy = fea[0].abs().mean(0)  # (h, w) mean |feature| over channels
    rows.append(
        [
            name,
            tuple(fea.shape[1:]),
            f"{on.float().mean():.2f}",
            f"{energy[on].mean() / energy[~on].mean():.2f}",
        ]
    )
print(format_table(rows, ["stage", "(C, h, w)", "cells with a line", "mean |f| on lines / off lines"]))

# %% [markdown]
# - The last column compares a stage's mean |feature| on the cells a drawn line touches with the cells it does
#   not: a value above 1 means the stage responds where the pose is drawn. After three stride-2 convolutions
#   a 16×16 cell covers 8×8 pixels, so more cells touch a line (the middle column).
# - The pictures: for each stage, the four channels whose maps vary most over the image (each map scaled to
#   its own range; brighter is larger):

# %%
shown = ["conv_in", "blocks.1", "blocks.3", "blocks.5", "conv_out"]
fig, axes = plt.subplots(len(shown), 5, figsize=(8.5, 8.8))
for row, name in zip(axes, shown, strict=True):
    fea = stages[name][0]  # (C, h, w)
    top4 = fea.flatten(1).std(dim=1).argsort(descending=True)[:4]
    row[0].imshow(cases[0].poses[0])
    row[0].set_title("pose image", fontsize=8)
    for ax, ch in zip(row[1:], top4.tolist(), strict=True):
        ax.imshow(fea[ch], cmap="magma")
        ax.set_title(f"{name} ch {ch} ({fea.shape[-1]}x{fea.shape[-2]})", fontsize=8)
    for ax in row:
        ax.axis("off")
fig.suptitle("the trained toy guider, stage by stage (most varying channels)", fontsize=10)
fig.tight_layout()
save(fig, "ch06_trained_guider_stages")
plt.show()

# %% [markdown]
# **Pose error with and without the guider.** The pipeline's ablation switch `use_pose_guider=False` adds no
# pose features, as a guider whose output is all zeros would: the denoiser gets no pose at all. mediapipe's
# face mesh runs on each generated frame (upscaled to 256 px): `detect` is the share of frames where it finds
# a face, `pose px` the mean distance of its 478 landmarks to the driving landmarks (256-px pixels, detected
# frames only). Showing the reference image for every frame is the baseline (right identity, no motion).

# %%
GEN = {"steps": 8, "cfg": 3.5, "seed": 42}
videos = {"copy the reference (baseline)": E.copy_reference(cases)}
videos["toy animator"] = [E.generate(pipe, c, **GEN) for c in cases]  # (F, H, W, 3) uint8 each
videos["no pose guider (zeros)"] = [E.generate(pipe, c, use_pose_guider=False, **GEN) for c in cases]
rows = []
with FaceLandmarker(video=False) as toy_landmarker:
    for name, vs in videos.items():
        errors = [
            e for v, c in zip(vs, cases, strict=True) for e in E.pose_errors(v, c.landmarks, toy_landmarker)
        ]
        found = [e for e in errors if e is not None]
        pairs = [(video_from_uint8(v), video_from_uint8(c.truth)) for v, c in zip(vs, cases, strict=True)]
        psnr_db = np.mean([psnr(v, t).mean() for v, t in pairs])
        px = f"{np.mean(found):.1f}" if found else "-"
        rows.append([name, f"{len(found) / len(errors):.2f}", px, f"{psnr_db:.1f}"])
print(format_table(rows, ["variant (2 cases x 8 frames)", "detect", "pose px", "PSNR dB"]))

# %% [markdown]
# - The pose reaches the denoiser only through this one 32-channel map added after `conv_in`. With zeros in
#   its place mediapipe finds a face in only 2 of the 16 frames (detect 0.12), and there its landmarks are
#   nearly twice as far off as the still baseline's: the denoiser paints a narrow, smeared head (pictures
#   below), and the PSNR falls below the still baseline's. The baseline row gives the landmark error of a face
#   that does not move at all.

# %%
picks = [0, 3, 7]
tiles, titles = [], []
for f in picks:
    tiles += [cases[0].poses[f], cases[0].truth[f]] + [videos[k][0][f] for k in list(videos)[1:]]
    titles += [f"pose {f}", "ground truth", "toy animator", "no pose guider"]
fig = image_grid(
    tiles, titles, ncols=4, figsize=(7.5, 5.8), suptitle="held-out case: with and without the guider"
)
save(fig, "ch06_trained_with_without_guider")
plt.show()

# %% [markdown] tags=["core"]
# ## Summary
# - AnimateAnyone's guider: 8 convolutions, 1.09M parameters, a 47-px receptive field, one 320-channel
#   feature added after `conv_in`, zero-initialised so the UNet is bit-identical at step 0.
# - AniPortrait's guider: a BatchNorm trunk plus four transformer stages, 167.5M parameters (82% in the
#   transformers) and 8× the FLOPs, five features added after `conv_in` and after every down block. Only
#   `fea[0]` is zero at init; `fea[1..4]` shift the UNet from step 0 (by pose-independent constants until
#   `final_proj` learns) and, through self-attention, depend on every pose pixel.
# - Its "cross-attention to the reference landmarks" is self-attention: the reference pose changes nothing.
#   `reference_attention=True` is the cross-attention the paper describes, starting as the released guider.
# - BatchNorm makes a frame's features depend on its batch in train mode and rewrites the running statistics;
#   keep the guider in eval mode when fine-tuning the animator.
# - AniPortrait's inference fed [-1, 509] to a guider trained on [-1, 1]: every line 255× too bright; anim_lab
#   takes [0, 1] and offers `faithful=True` to reproduce the official outputs.
# - Hallo's face locator is AnimateAnyone's guider on a 1.2× face-box mask.
# - The trained toy guider's stages can be looked at channel by channel; its features are the denoiser's only
#   source of pose, which the with/without table measures with mediapipe on the generated frames.
#
# ## Exercises
# 1. Compute the receptive field of `fea[0]` if AniPortrait's trunk used 3×3 stride-2 convolutions instead
#    of 4×4 ones. Check with `receptive_field`.
# 2. How many parameters would AniPortrait's four transformers have if each kept its level's width
#    (8 heads of `C/8` instead of 16 × 88 = 1408)? Build them on `meta`.
# 3. Feed a single 64×64 pose frame to the guider in train mode, then in eval mode. What happens, and why
#    only in one of them?
# 4. For the [-1, 509] slip, which single affine map `a·x + b` of the [0, 1] input gives the inference tensor,
#    and which gives the training tensor?
#
# ## Solutions

# %%
# 1. 3x3 stride-2 convolutions in the trunk
print(
    "1. receptive field with k3 s2:",
    receptive_field([(3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 1), (3, 1)]),
    "vs k4 s2:",
    receptive_field([(3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (3, 1)]),
)

# 2. transformers at the level's own width
parts = []
with torch.device("meta"):
    for c in ap.feature_channels[1:]:
        narrow = diffusers.models.transformers.transformer_2d.Transformer2DModel(
            num_attention_heads=8, attention_head_dim=c // 8, in_channels=c
        )
        parts.append(count_parameters(narrow))
print(
    "2. transformers at width C:",
    human(sum(parts)),
    "instead of",
    human(attn_params),
    "-> guider",
    human(count_parameters(ap) - attn_params + sum(parts)),
)

# 3. one 64x64 frame: its deepest feature maps are 1x1, so train-mode BatchNorm has one value per channel
one_frame = torch.rand(1, 3, 1, 64, 64)
bn.train()
try:
    bn(one_frame)
except ValueError as err:
    print("3. train mode:", str(err).split(",")[0])
bn.eval()
with torch.no_grad():
    print("   eval mode (running statistics, no batch statistics needed):", tuple(bn(one_frame)[4].shape))

# 4. the affine maps
u = torch.tensor([0.0, 200 / 255, 1.0])  # [0, 1] pose values
print(
    "4. inference: 510 x - 1 ->",
    (510 * u - 1).round().tolist(),
    "| training: 2 x - 1 ->",
    [round(v, 3) for v in (2 * u - 1).tolist()],
)

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from anim_lab import pose_guider as lab_pose_guider

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): AnimateAnyone's guider, forward by hand
# Write `my_pose_guider_forward(guider, pose)` for a `PoseGuider` and a pose video `(B, 3, F, H, W)`: run
# every frame through `guider.conv_in`, then each conv of `guider.blocks`, each followed by SiLU (SiLU after
# `conv_in` too), then `guider.conv_out` (no activation); return `(B, C_out, F, H/8, W/8)`.


# %% nbgrader={"grade": false, "grade_id": "ch06_pose_guider_forward", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_pose_guider_forward(guider, pose):
    ### BEGIN SOLUTION
    frames = pose.shape[2]
    x = rearrange(pose, "b c f h w -> (b f) c h w")  # every frame on its own
    x = F.silu(guider.conv_in(x))
    for conv in guider.blocks:
        x = F.silu(conv(x))
    return rearrange(guider.conv_out(x), "(b f) c h w -> b c f h w", f=frames)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch06_pose_guider_forward_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
torch.manual_seed(6)
gen = torch.Generator().manual_seed(6)
for channels, out, shape in [((4, 8, 8, 16), 12, (1, 3, 2, 16, 16)), ((8, 16), 4, (2, 3, 3, 8, 12))]:
    guider = lab_pose_guider.PoseGuider(3, channels, out).eval()
    torch.nn.init.normal_(guider.conv_out.weight, std=0.1)  # not zero, or every output is 0
    pose = torch.rand(shape, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(my_pose_guider_forward(guider, pose), guider(pose))
print("my_pose_guider_forward matches PoseGuider on 2 sizes")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): pose frames to the guider's input
# Write `my_prepare_pose_images(frames, faithful=False)`: uint8 pose frames `(F, H, W, 3)` (numpy) to a
# float32 tensor `(1, 3, F, H, W)`, divided by 255; with `faithful=True` AniPortrait's inference tensor
# instead, $2x - 1$ on the raw 0–255 values (the [-1, 509] slip of section 8).


# %% nbgrader={"grade": false, "grade_id": "ch06_prepare_pose_images", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_prepare_pose_images(frames, faithful=False):
    ### BEGIN SOLUTION
    x = rearrange(torch.as_tensor(np.asarray(frames)).float(), "f h w c -> 1 c f h w")
    return x * 2 - 1 if faithful else x / 255
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch06_prepare_pose_images_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_prepare_pose_images is not lab_pose_guider.prepare_pose_images
rng = np.random.default_rng(6)
for shape in [(1, 8, 8, 3), (4, 16, 12, 3), (2, 5, 7, 3)]:
    frames = rng.integers(0, 256, shape, dtype=np.uint8)
    for faithful in (False, True):
        torch.testing.assert_close(
            my_prepare_pose_images(frames, faithful),
            lab_pose_guider.prepare_pose_images(frames, faithful=faithful),
        )
print("my_prepare_pose_images matches pose_guider.prepare_pose_images on 3 shapes, both modes")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# A deeper guider: `PoseGuider(3, (8, 16, 32, 64, 128), 320)` downsamples 16×. Give its `conv_out` nonzero
# weights, feed 128×128 pose images and measure, as in section 4, the height in pixels of the region of the
# pose image that can change the centre output vector. Store it, an int, in `reach_px`.

# %% nbgrader={"grade": false, "grade_id": "ch06_reach_px", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
torch.manual_seed(0)
deep = lab_pose_guider.PoseGuider(3, (8, 16, 32, 64, 128), 320)
torch.nn.init.normal_(deep.conv_out.weight, std=0.02)
grad = torch.zeros(128, 128)
for _ in range(2):
    pose = torch.rand(1, 3, 128, 128, requires_grad=True)
    out = deep(pose)  # (1, 320, 8, 8)
    out[0, :, 4, 4].sum().backward()
    grad += pose.grad.abs().sum(dim=(0, 1))
rows = grad.gt(0).any(1).nonzero()
reach_px = int(rows.max() - rows.min() + 1)
### END SOLUTION
print(f"one centre output sees {reach_px} pose rows")

# %% nbgrader={"grade": true, "grade_id": "ch06_reach_px_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(reach_px, int) and 1 <= reach_px <= 128
### BEGIN HIDDEN TESTS
_r, _jump = 1, 1
for _k, _s in [(3, 1)] + [(3, 1), (3, 2)] * 4 + [(3, 1)]:  # the receptive field formula of section 4
    _r, _jump = _r + (_k - 1) * _jump, _jump * _s
assert reach_px == _r, (reach_px, _r)
### END HIDDEN TESTS
print("reach_px is a pixel count")
