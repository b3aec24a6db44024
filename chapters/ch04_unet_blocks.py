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
# # Chapter 04 — UNet blocks, the video UNet and its motion module
#
# *Stable Diffusion 1.5's UNet, taken apart block by block, applied to every frame of a video, and joined
# across frames by AnimateDiff's motion modules — with the keys of the official AnimateAnyone checkpoints.*
#
# - **You will build**: the four normalisations by hand, a shape table of SD1.5's UNet, a resnet block and a
#   temporal attention re-derived and checked against the library, per-frame 2D vs 3D convolutions compared,
#   and the video UNet with 21 motion modules
# - **Library modules**: `anim_lab.unet` (`VideoUNet`, `ReferenceUNet`), `anim_lab.motion` (`MotionModule`),
#   `anim_lab.weights`, `anim_lab.inspect`, `anim_lab.configs`
# - **Questions answered**: Which axes do BatchNorm, LayerNorm, InstanceNorm and GroupNorm average over, and
#   which one is used where? How do channels and resolution change through the UNet, and why are skips
#   concatenated? How does the timestep reach every resnet? Where are the 16 cross-attention sites, and what
#   are the shapes of Q, K, V for one CLIP image token? Why per-frame 2D convolutions rather than Conv3d? What
#   does the temporal reshape do, what happens to frame order without the position encoding, and what does a
#   motion module do with `encoder_hidden_states` (nothing)? (How the ReferenceNet's blocks pair with the
#   denoiser's: chapter 05.)
# - **CPU runtime**: about 12 s (chapters/README.md)
#
# Full-size shapes come from the `meta` device (shapes, no numbers); every numerical experiment runs on the
# TINY preset — the same structure with small widths — on the CPU.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import diffusers
import matplotlib
import matplotlib.pyplot as plt
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from einops import rearrange, repeat
from torch import nn

import anim_lab
from anim_lab.configs import SD15, TINY
from anim_lab.inspect import count_flops, count_parameters, flops_by_module, format_table, human, trace_shapes
from anim_lab.motion import MOTION_SD15, MOTION_TINY, MotionModule, sinusoidal_position_encoding
from anim_lab.unet import ReferenceUNet, VideoUNet, build_unet2d
from anim_lab.viz import save

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is as fast, and steady on a busy machine
torch.set_grad_enabled(False)  # inference only: no autograd graph
torch.set_printoptions(precision=3, sci_mode=False)
print(
    f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
    f"matplotlib {matplotlib.__version__}"
)

# %% [markdown] tags=["core"]
# ## 1. Four normalisations, one feature tensor
#
# - A normalisation subtracts a mean and divides by a standard deviation; the four kinds differ only in
#   **which values share one mean**.
# - For a per-frame feature map `(N, C, H, W)` with `N = B·F`: BatchNorm pools `(N, H, W)` per channel,
#   InstanceNorm `(H, W)` per sample and channel, GroupNorm `(C/G, H, W)` per sample and group of channels,
#   and the transformers' LayerNorm pools `C` per token (each position of each sample on its own).
# - All four are the same formula over a different set $S$ of indices:
#   $$\hat x = \frac{x - \mu_S}{\sqrt{\sigma_S^2 + \epsilon}}\,\gamma + \beta, \qquad
#   \mu_S = \frac{1}{|S|}\sum_{i \in S} x_i, \quad \sigma_S^2 = \frac{1}{|S|}\sum_{i \in S} (x_i - \mu_S)^2$$
#   with $S_\text{BN}(c) = \{(n, c, h, w)\}_{n,h,w}$, $S_\text{IN}(n, c) = \{(n, c, h, w)\}_{h,w}$,
#   $S_\text{GN}(n, g) = \{(n, c, h, w)\}_{c \in g,\,h,w}$ and $S_\text{LN}(n, h, w) = \{(n, c, h, w)\}_c$
#   ($\gamma, \beta$ per channel; BatchNorm keeps running averages of $\mu, \sigma^2$ for inference).
# - A real feature tensor: the output of the first resnet of a TINY video UNet, 2 videos × 4 frames.

# %% tags=["core"]
tiny = VideoUNet(TINY.unet, MOTION_TINY).eval()  # random weights, zero-initialised motion modules
B, F, S = 2, 4, 16
latents = torch.randn(B, 4, F, S, S)  # (B, C, F, H, W)
tokens = torch.randn(B, 1, TINY.unet["cross_attention_dim"])  # one CLIP image token per video
seen = {}
hook = tiny.down_blocks[0].resnets[0].register_forward_hook(lambda m, i, o: seen.update(x=o))
_ = tiny(latents, 500, tokens)
hook.remove()
x = seen["x"]  # (B*F, C, H, W): the frames of both videos as one batch
N, C, H, W = x.shape
print("feature tensor:", tuple(x.shape))

# %% [markdown] tags=["core"]
# Each normalisation by hand — a mean and a variance over the pooled axes — checked against `torch.nn`:


# %% tags=["core"]
def normalise(v, dims, eps):
    return (v - v.mean(dims, keepdim=True)) / torch.sqrt(v.var(dims, keepdim=True, unbiased=False) + eps)


G = TINY.unet["norm_num_groups"]
tokens_x = rearrange(x, "n c h w -> n (h w) c")  # LayerNorm sees tokens (N, HW, C)
by_hand = {
    "BatchNorm": (normalise(x, (0, 2, 3), 1e-5), nn.BatchNorm2d(C, affine=False).train()(x), C),
    "InstanceNorm": (normalise(x, (2, 3), 1e-5), nn.InstanceNorm2d(C)(x), N * C),
    "GroupNorm": (
        rearrange(
            normalise(rearrange(x, "n (g c) h w -> n g c h w", g=G), (2, 3, 4), 1e-5),
            "n g c h w -> n (g c) h w",
        ),
        nn.GroupNorm(G, C, affine=False)(x),
        N * G,
    ),
    "LayerNorm": (
        normalise(tokens_x, (2,), 1e-5),
        nn.LayerNorm(C, elementwise_affine=False)(tokens_x),
        N * H * W,
    ),
}
pooled = {
    "BatchNorm": "(N, H, W)",
    "InstanceNorm": "(H, W)",
    "GroupNorm": "(C/G, H, W)",
    "LayerNorm": "(C,) per token",
}
rows = []
for name, (mine, torch_out, n_means) in by_hand.items():
    torch.testing.assert_close(mine, torch_out, atol=1e-4, rtol=1e-4)
    rows.append([name, pooled[name], n_means, x.numel() // n_means])
print(format_table(rows, ["norm", "averages over", "means", "values per mean"]))
print("all four re-derivations match torch.nn: True")


# %% tags=["core"]
def show_pooling(ax, title, colour_of):
    """An N x C grid (samples x channels); cells that share one mean have one colour."""
    grid = torch.tensor([[colour_of(n, c) for c in range(C)] for n in range(N)], dtype=torch.float32)
    ax.imshow(grid, cmap="tab20", aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel c")
    ax.set_ylabel("sample n = (b, f)")


fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
show_pooling(axes[0], "BatchNorm: one mean per channel\n(over all samples, H, W)", lambda n, c: c % 20)
show_pooling(axes[1], "InstanceNorm: one per sample & channel\n(over H, W)", lambda n, c: (n * C + c) % 20)
show_pooling(
    axes[2],
    f"GroupNorm (G={G}): one per sample & group\n(over C/G channels, H, W)",
    lambda n, c: (n * G + c // (C // G)) % 20,
)
show_pooling(
    axes[3],
    "LayerNorm: one per sample & position\n(over all C; each of H·W tokens apart)",
    lambda n, c: n % 20,
)
fig.tight_layout()
plt.show()

# %% [markdown] tags=["core"]
# Where each one is used in the denoising UNet (SD15 size, counted on the meta device):
# - **GroupNorm**: in every resnet (`norm1`, `norm2`), before every spatial transformer and every motion
#   module, and in the output head. It does not depend on the batch, so a frame's result does not depend on
#   the other frames.
# - **LayerNorm**: inside every transformer block (spatial: `norm1..3`; temporal: `norms.0/1`, `ff_norm`).
# - **BatchNorm**: nowhere in the UNet (only in AniPortrait's pose guider); **InstanceNorm**: nowhere.

# %% tags=["core"]
with torch.device("meta"):
    denoiser = VideoUNet(SD15.unet, MOTION_SD15)
kinds = [type(m).__name__ for m in denoiser.modules()]
print({k: kinds.count(k) for k in ("GroupNorm", "LayerNorm", "BatchNorm2d", "InstanceNorm2d")})

# %% [markdown] tags=["core"]
# **The per-frame trap.** A motion module sees a whole video. If its GroupNorm runs on `(B, C, F, H, W)` it
# pools statistics over all frames (diffusers' `AnimateDiffTransformer3D` does this); the AnimateDiff
# checkpoints were trained with a GroupNorm on `(B·F, C, H, W)`, one frame at a time. Give the frames a
# brightness ramp and compare:

# %% tags=["core"]
ramp = torch.tensor([-1.5, -0.5, 0.5, 1.5])  # one offset per frame, e.g. a fade-in
video = rearrange(x, "(b f) c h w -> b c f h w", f=F) + ramp[None, None, :, None, None]  # (B, C, F, H, W)
norm = nn.GroupNorm(G, C, eps=1e-6, affine=False)
per_frame = rearrange(norm(rearrange(video, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=F)
across = norm(video)  # GroupNorm on 5-D input: statistics over (C/G, F, H, W)
frame_means = per_frame.mean((0, 1, 3, 4))  # (F,)
print("per frame: every frame has mean 0:", torch.allclose(frame_means, torch.zeros(F), atol=1e-4))
print("across frames: frame means", [round(v, 1) for v in across.mean((0, 1, 3, 4)).tolist()])
print("largest difference between the two:", round((per_frame - across).abs().max().item(), 1))

# %% [markdown] tags=["core"]
# ## 2. Channels and resolution through SD1.5's UNet
#
# - A shape trace on the meta device (one 512×512 frame → 64×64 latents): every resnet, downsampler and
#   upsampler.
# - Down path: 320 → 640 → 1280 → 1280 channels while 64 → 32 → 16 → 8; the up path mirrors it.
# - Every down-path output is kept as a **skip**; each up resnet takes its input **concatenated** with one
#   skip, so its input width is `C + C_skip` (e.g. 2560 = 1280 + 1280), and a 1×1 `conv_shortcut` brings the
#   residual back.

# %% tags=["core"]
with torch.device("meta"):
    unet2d_sd = VideoUNet(SD15.unet, None)  # the 2D part only
    frame = torch.empty(1, 4, 1, 64, 64)  # (B, C, F, H, W): one frame
    clip_token = torch.empty(1, 1, 768)


def wanted(name, module):
    parts = name.split(".")
    in_block = len(parts) == 4 and parts[2] in ("resnets", "downsamplers", "upsamplers")  # down/up blocks
    in_mid = len(parts) == 3 and parts[1] == "resnets"  # mid_block.resnets.i
    return name in ("conv_in", "conv_out") or in_block or in_mid


def fmt(shape):
    return "×".join(str(d) for d in shape[1:])  # drop the batch axis


trace = trace_shapes(unet2d_sd, frame, 999, clip_token, include=wanted)
print(
    format_table(
        [[r.name, r.kind, fmt(r.inputs[0]), fmt(r.outputs[0]), human(r.params)] for r in trace],
        ["module", "kind", "in (C×H×W)", "out (C×H×W)", "params"],
    )
)

# %% [markdown] tags=["core"]
# Why concatenate rather than add? An up resnet sends its input `[h, s]` (decoder features `h`, skip `s`)
# down two paths (section 3 re-derives the block). The 1×1 `conv_shortcut` sees it raw: with the same weights
# for both halves it computes `W(h + s)`, so on that path concatenation can add. The main path first
# normalises and activates, `conv1(SiLU(GroupNorm([h, s])))`: each GroupNorm group holds channels of one half
# (at SD1.5's 1280 + 640 inputs one group straddles the seam), so each half is normalised with its own
# statistics and bent by SiLU on its own. Tied weights there give `W SiLU(GN(h)) + W SiLU(GN(s))`, not
# `W SiLU(GN(h + s))`. So the concatenating block does not contain the adding one: it is a different function,
# in which the skip keeps its own scale and its own weights instead of being mixed into the decoder's
# features before the normalisation. Checked with diffusers' `ResnetBlock2D`, weights tied as far as they can
# be:

# %% tags=["core"]
h, s = torch.randn(2, 8, 6, 6), 3 * torch.randn(2, 8, 6, 6) + 1  # decoder features; a skip of another scale
add = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=None, groups=4)  # input h + s, 2 ch/group
cat = ResnetBlock2D(in_channels=16, out_channels=8, temb_channels=None, groups=8, groups_out=4)  # [h, s]
cat.norm1.weight.copy_(torch.cat([add.norm1.weight] * 2))  # the same affine GroupNorm for both halves
cat.norm1.bias.copy_(torch.cat([add.norm1.bias] * 2))
cat.conv1.weight.copy_(torch.cat([add.conv1.weight] * 2, dim=1))  # the same 3x3 kernel for both halves
cat.conv1.bias.copy_(add.conv1.bias)
for name in ("norm2", "conv2"):
    getattr(cat, name).load_state_dict(getattr(add, name).state_dict())
cat.conv_shortcut.weight.copy_(torch.cat([torch.eye(8)[:, :, None, None]] * 2, dim=1))  # W [h, s] = h + s
cat.conv_shortcut.bias.zero_()
x_cat, x_add = torch.cat([h, s], dim=1), h + s
gn, silu = nn.GroupNorm(4, 8), nn.SiLU()
print(
    "shortcut path, tied identity halves: W [h, s] == h + s:", torch.allclose(cat.conv_shortcut(x_cat), x_add)
)
print(
    "main path, conv1's input: SiLU(GN(h)) + SiLU(GN(s)) == SiLU(GN(h + s)):",
    torch.allclose(silu(gn(h)) + silu(gn(s)), silu(gn(h + s)), atol=1e-4),
)
y_cat, y_add = cat(x_cat, None), add(x_add, None)
main_cat, main_add = y_cat - cat.conv_shortcut(x_cat), y_add - x_add  # the residual branches alone
print(
    "whole resnet: concatenating block == adding block:",
    torch.allclose(y_cat, y_add, atol=1e-4),
    f"| their main paths differ by {float((main_cat - main_add).norm() / main_add.norm()):.2f} of its norm",
)

# %% [markdown] tags=["core"]
# The whole UNet as one picture: height = resolution level, width ∝ channels, arrows = skips. Where are the
# spatial transformers (self-attention `attn1`, cross-attention `attn2`)? Each `attentions.j` of a block runs
# right after `resnets.j`; the mid block's one sits between its two resnets. List them from the model itself:

# %% tags=["core"]
cross_sites = [
    n.removesuffix(".transformer_blocks.0.attn2")
    for n, m in unet2d_sd.named_modules()
    if n.endswith("attn2") and m.is_cross_attention
]
attention_after = {n.replace("attentions", "resnets") for n in cross_sites}  # the resnet each one follows
print(f"{len(cross_sites)} cross-attention sites:", ", ".join(n.replace("_blocks", "") for n in cross_sites))


# %% tags=["core"]
def draw_unet(trace, figsize=(13, 5.2)):
    stages = [r for r in trace if r.kind in ("ResnetBlock2D", "Downsample2D", "Upsample2D", "Conv2d")]
    fig, ax = plt.subplots(figsize=figsize)
    colours = {"down": "#9ecae1", "mid": "#fdae6b", "up": "#a1d99b", "conv": "#dddddd"}
    centres = []
    for i, r in enumerate(stages):
        c, hh = r.outputs[0][1], r.outputs[0][2]
        level = {64: 0, 32: 1, 16: 2, 8: 3}[hh]
        part = r.name.split(".")[0].split("_")[0]
        width = 0.25 + 0.55 * c / 1280
        ax.add_patch(
            plt.Rectangle(
                (i - width / 2, -level - 0.35),
                width,
                0.7,
                color=colours.get(part, colours["conv"]),
                ec="k",
                lw=0.6,
            )
        )
        ax.text(i, -level - 0.55, f"{c}\n{hh}²", ha="center", va="top", fontsize=6.5)
        if r.kind == "ResnetBlock2D" and part in ("down", "up"):  # a motion module follows this layer
            ax.plot(i, -level + 0.2, "o", color="#d62728", ms=4)
        if r.name == "mid_block.resnets.0":  # the mid block's motion module sits between its two resnets
            ax.plot(i + 0.5, -level + 0.2, "o", color="#d62728", ms=4)
        if r.name in attention_after:  # a spatial transformer (attn1 + cross-attention attn2) follows
            dx = 0.5 if r.name.startswith("mid") else 0.0
            ax.plot(i + dx, -level - 0.15, "v", color="#08519c", ms=6)
        centres.append((i, -level, r))
    # skips: every down-path output (conv_in, down resnets, downsamplers) feeds one up resnet, last in first
    # out
    sources = [p for p in centres if p[2].name == "conv_in" or p[2].name.startswith("down_blocks")]
    targets = [p for p in centres if p[2].name.startswith("up_blocks") and p[2].kind == "ResnetBlock2D"]
    for (x0, y0, _), (x1, y1, _) in zip(reversed(sources), targets, strict=True):
        ax.annotate(
            "",
            xy=(x1, y1 + 0.38),
            xytext=(x0, y0 + 0.38),
            arrowprops=dict(arrowstyle="->", color="#888888", lw=0.6, connectionstyle="arc3,rad=-0.15"),
        )
    ax.set_xlim(-1, len(stages))
    ax.set_ylim(-4.0, 1.3)
    ax.set_yticks([0, -1, -2, -3], ["64×64", "32×32", "16×16", "8×8"])
    ax.set_xticks([])
    ax.set_title(
        "SD1.5 UNet (per frame): resnets, down/upsamplers; label = channels, size². Blue down, orange mid, "
        "green up, arrows = concatenated skips.\nBlue triangles: the 16 spatial transformers, each with a "
        "cross-attention to the CLIP token. Red dots: the video UNet's 21 motion modules, one after every "
        "down/up resnet (+ its attention) and one in the mid block.",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


fig = draw_unet(trace)
_ = save(fig, "ch04_unet_shapes")
plt.show()

# %% [markdown] tags=["core"]
# ## 3. How the timestep reaches every resnet
#
# - `t` → sinusoidal features (`time_proj`, 320) → a 2-layer MLP (`time_embedding`, 1280): one vector `temb`
#   per sample — the same for all frames of a video.
# - Every resnet projects `SiLU(temb)` to its own width (`time_emb_proj`) and adds it after its first
#   convolution, **as a per-channel shift, the same at every pixel**.
# - Re-derived by hand for one TINY resnet and checked against diffusers' `ResnetBlock2D`:

# %% tags=["core"]
resnet = tiny.down_blocks[1].resnets[0]  # 32 -> 64 channels, with a 1x1 conv_shortcut
h_in = torch.randn(3, 32, 8, 8)
temb = tiny.time_embedding(tiny.time_proj(torch.tensor([10, 500, 990])))  # (3,) -> (3, 128)
act = nn.functional.silu
z = resnet.conv1(act(resnet.norm1(h_in)))  # (3, 32, 8, 8) -> (3, 64, 8, 8)
z = (
    z + resnet.time_emb_proj(act(temb))[:, :, None, None]
)  # + (3, 64, 1, 1): the timestep, broadcast over H, W
z = resnet.conv2(act(resnet.norm2(z)))
by_hand = resnet.conv_shortcut(h_in) + z  # residual path
torch.testing.assert_close(by_hand, resnet(h_in, temb), atol=1e-5, rtol=1e-5)
print("resnet re-derived:", tuple(h_in.shape), "->", tuple(by_hand.shape), "matches diffusers: True")
resnets = [m for m in denoiser.modules() if type(m).__name__ == "ResnetBlock2D"]
n_with_time = sum(m.time_emb_proj is not None for m in resnets)
print(f"SD15 resnets: {len(resnets)}, with a time_emb_proj: {n_with_time}")

# %% [markdown]
# ## 4. Where cross-attention sits, and its shapes for one CLIP image token
#
# - Each `Transformer2DModel` runs: GroupNorm → `proj_in` → [self-attention `attn1`, cross-attention `attn2`,
#   feed-forward] → `proj_out` → + residual. `attn2` takes its keys and values from `encoder_hidden_states`.
# - AnimateAnyone's `encoder_hidden_states` is **one** CLIP image token (768-d), not 77 text tokens.

# %%
names = ("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn2.to_k", "attn2.to_v")
prefix = "down_blocks.0.attentions.0.transformer_blocks.0."
qkv = trace_shapes(unet2d_sd, frame, 999, clip_token, include=lambda n, m: n in [prefix + k for k in names])
print(
    format_table(
        [[r.name[len(prefix) :], str(r.inputs[0]), str(r.outputs[0])] for r in qkv],
        ["projection", "input", "output (B, tokens, C)"],
    )
)

# %% [markdown]
# - Queries: 4096 tokens (64×64 positions); keys and values of `attn2`: **1 token**. A softmax over one key is
#   1, so every position receives the same value vector: the CLIP token acts as a per-channel offset,
#   identical everywhere. Checked on TINY:

# %%
block = tiny.down_blocks[0].attentions[0].transformer_blocks[0]
queries = torch.randn(2, 16 * 16, block.attn2.to_q.in_features)  # (B, HW, C)
out = block.attn2(queries, encoder_hidden_states=tokens)  # (B, HW, C) with 1 key/value token
same_everywhere = torch.allclose(out, out[:, :1].expand_as(out), atol=1e-6)
print("cross-attention output is the same at every position:", same_everywhere)
value_only = block.attn2.to_out[0](block.attn2.to_v(tokens[:, 0]))  # (B, C): no query involved
print("it equals to_out(to_v(token)):", torch.allclose(out[:, 0], value_only, atol=1e-6))

# %% [markdown]
# Spatial detail of the reference image therefore cannot come through cross-attention; it comes through
# reference attention (chapter 05), which concatenates the ReferenceNet's tokens to `attn1`'s keys and values.
#
# ## 5. Per-frame 2D convolutions, not Conv3d
#
# - The video UNet runs every 2D layer on `(B·F, C, H, W)`: frames are just a bigger batch. A Conv3d with a
#   3×3×3 kernel would also mix neighbouring frames.
# - Cost at SD1.5's first level (320 channels, 16 frames of 64×64):

# %%
with torch.device("meta"):
    conv2d, conv3d = nn.Conv2d(320, 320, 3, padding=1), nn.Conv3d(320, 320, 3, padding=1)
    clip16 = torch.empty(1, 320, 16, 64, 64)  # (B, C, F, H, W)
flops2d = count_flops(lambda v: conv2d(rearrange(v, "b c f h w -> (b f) c h w")), clip16)
flops3d = count_flops(conv3d, clip16)
print(
    format_table(
        [
            ["Conv2d per frame", f"{count_parameters(conv2d):,}", human(flops2d, "FLOP")],
            ["Conv3d 3×3×3", f"{count_parameters(conv3d):,}", human(flops3d, "FLOP")],
        ],
        ["layer", "params", "FLOPs"],
    )
)
print("ratio 3D / 2D:", round(flops3d / flops2d, 2))

# %% [markdown]
# What each mixes: change frame 2 of a 5-frame input and see which output frames move.

# %%
small2d, small3d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1)
clip = torch.randn(1, 4, 5, 8, 8)
changed = clip.clone()
changed[:, :, 2] += 1.0


def conv2d_per_frame(v):  # (B, C, F, H, W) -> (B*F, C, H, W) -> Conv2d -> (B, C, F, H, W)
    return rearrange(small2d(rearrange(v, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=5)


for name, layer in (("Conv2d per frame", conv2d_per_frame), ("Conv3d", small3d)):
    moved = (layer(changed) - layer(clip)).abs().amax(dim=(0, 1, 3, 4)) > 1e-6
    print(f"{name:17s} output frames that changed: {moved.nonzero().flatten().tolist()}")

# %% [markdown]
# Loading SD1.5 weights: a Conv2d kernel `(320, 320, 3, 3)` fits the per-frame layer as it is. A Conv3d needs
# a `(320, 320, 3, 3, 3)` kernel; "inflating" puts the 2D kernel at the middle time tap (zeros elsewhere),
# which is exactly the per-frame convolution until training changes it:

# %%
try:
    small3d.load_state_dict(small2d.state_dict())
    loads_as_is = True
except RuntimeError:
    loads_as_is = False
print("a Conv2d state dict loads into the Conv3d as is:", loads_as_is)
inflated = nn.Conv3d(4, 4, 3, padding=1)
inflated.weight.zero_()
inflated.weight[:, :, 1] = small2d.weight  # (out, in, 3, 3) -> the centre of (out, in, 3, 3, 3)
inflated.bias.copy_(small2d.bias)
torch.testing.assert_close(inflated(clip), conv2d_per_frame(clip), atol=1e-5, rtol=1e-5)
print("inflated Conv3d == per-frame Conv2d: True")

# %% [markdown]
# AnimateDiff's choice keeps every SD1.5 layer exactly as trained (so SD1.5 / AnimateAnyone 2D weights load by
# name) and adds time in separate motion modules whose output projection starts at zero. Fewer parameters and
# FLOPs than Conv3d everywhere, and the 2D network is untouched at the start of video training.
#
# ## 6. The motion module: attention across frames
#
# - Inside a motion module the per-frame layout becomes a set of short sequences:
#   `(B·F, H·W, C) -> (B·H·W, F, C)` — each pixel position is a sequence of F frames, and attention runs along
#   it: for position $s$, $\mathrm{softmax}\big(Q_s K_s^\top / \sqrt{d}\big) V_s$ with $Q_s, K_s, V_s \in
#   \mathbb{R}^{F \times d}$ per head.
# - At SD1.5's first level with 16 frames: 4096 sequences of 16 tokens; the attention matrix per head is 16×16
#   (the spatial self-attention's is 4096×4096).

# %%
with torch.device("meta"):
    clip_sd = torch.empty(1, 4, 16, 64, 64)  # (B, C, F, H, W): 16 frames
mm = "down_blocks.0.motion_modules.0.temporal_transformer."
inside = trace_shapes(
    denoiser,
    clip_sd,
    999,
    clip_token,
    include=lambda n, m: n in (mm + "proj_in", mm + "transformer_blocks.0.attention_blocks.0.to_q"),
)
for r in inside:
    print(f"{r.name[len(mm) :]:42s} input {r.inputs[0]}")

# %% [markdown]
# The position encoding: sinusoids of 32 positions (max window length), added **after** the LayerNorm, so
# queries, keys and values carry it and the residual stream does not. For frame $p$ and channel pair $i$ of
# $d$ channels:
# $$\mathrm{pe}[p, 2i] = \sin\!\left(\frac{p}{10000^{2i/d}}\right), \qquad
#   \mathrm{pe}[p, 2i+1] = \cos\!\left(\frac{p}{10000^{2i/d}}\right)$$
# so channel pair $i$ turns at angular speed $10000^{-2i/d}$ per frame: the first pairs change every frame,
# the last barely over 32 frames. Re-derived by hand:

# %%
p_idx = torch.arange(32.0)[:, None]  # (32, 1) frame index
i_idx = torch.arange(0, 320, 2.0)[None, :]  # (1, 160) even channel index 2i
angle = p_idx / 10000 ** (i_idx / 320)  # (32, 160)
pe_by_hand = rearrange(torch.stack([angle.sin(), angle.cos()], -1), "p i two -> p (i two)")  # interleave
torch.testing.assert_close(pe_by_hand, sinusoidal_position_encoding(32, 320)[0])
print("pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(...): matches the library")

# %% [markdown]
# The first 48 frequencies as a picture:

# %%
pe = sinusoidal_position_encoding(32, 320)[0]  # (32, 320)
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
for ax, start, name in ((axes[0], 0, "sin (even channels)"), (axes[1], 1, "cos (odd channels)")):
    ax.imshow(pe[:, start:96:2].T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("frame index")
    ax.set_ylabel("frequency index i (of 160)")
    ax.set_title(f"pe[frame, 2i{'+1' if start else ''}]: {name}", fontsize=9)
fig.suptitle(
    "sinusoidal position encoding, first 48 frequencies: fast in the first channels, slower further on",
    fontsize=9,
)
fig.tight_layout()
plt.show()

# %% [markdown]
# One temporal attention re-derived by hand at a single pixel, against the motion module's attention (a
# diffusers `Attention` whose `TemporalAttnProcessor` runs it along frames):

# %%
motion = MotionModule(32, num_attention_heads=4, norm_num_groups=8)
attn = motion.temporal_transformer.transformer_blocks[0].attention_blocks[0]
seq = torch.randn(B * F, 6, 32)  # (B*F, HW, C): 2 videos, 4 frames, 6 positions
library = attn(seq, num_frames=F)  # (B*F, HW, C)
frames = rearrange(seq, "(b f) d c -> b d f c", f=F)[0, 3]  # video 0, position 3: (F, C)
frames = frames + sinusoidal_position_encoding(32, 32)[0, :F]  # + PE for C = 32 channels
q, k, v = (rearrange(proj(frames), "f (n d) -> n f d", n=4) for proj in (attn.to_q, attn.to_k, attn.to_v))
weights = torch.softmax(
    q @ k.transpose(1, 2) / 8**0.5, dim=-1
)  # (heads, F, F): each frame attends to all frames
by_hand = attn.to_out[0](rearrange(weights @ v, "n f d -> f (n d)"))  # (F, C)
torch.testing.assert_close(
    by_hand, rearrange(library, "(b f) d c -> b d f c", f=F)[0, 3], atol=1e-5, rtol=1e-5
)
print("temporal attention at one pixel re-derived: matches the library")

# %% [markdown]
# **Frame order.** Attention alone is permutation-equivariant: shuffle the frames and the output is shuffled
# the same way — the module could not tell forward from backward. The position encoding breaks that symmetry.
# With trained-like (random, non-zero) weights:


# %%
def shuffles_along(with_pe: bool) -> bool:
    torch.manual_seed(1)
    m = MotionModule(32, num_attention_heads=4, norm_num_groups=8, temporal_position_encoding=with_pe)
    for name, p in m.named_parameters():  # random weights, proj_out included: a module that does something
        p.copy_(torch.randn_like(p) * 0.3 + float("norm" in name and name.endswith("weight")))
    feats = torch.randn(F, 32, 4, 4)  # one video: (F, C, H, W)
    order = torch.tensor([2, 0, 3, 1])
    return torch.allclose(m(feats, F)[order], m(feats[order], F), rtol=1e-4, atol=1e-4)


print("without PE: shuffling the input frames just shuffles the output:", shuffles_along(False))
print("with PE:    shuffling the input frames just shuffles the output:", shuffles_along(True))

# %% [markdown]
# **What does a motion module do with `encoder_hidden_states`?** Nothing. In the reference code
# (`TemporalTransformer3DModel`) the argument is passed down, but both attention blocks are `Temporal_Self`,
# which drop it: keys and values come from the frames themselves. In `anim_lab` the forward does not even take
# it. Two checks: no motion-module attention is a cross-attention (its `to_k` reads C channels, not the
# 768-d token), and an experiment: silence every spatial cross-attention (`attn2.to_out` set to zero), give
# the motion modules random non-zero weights, and change the CLIP tokens. If the motion modules read the
# tokens, the output would move.

# %%
motion_attn = [m for n, m in denoiser.named_modules() if "motion_modules" in n and isinstance(m, Attention)]
print(
    f"{len(motion_attn)} attentions in the motion modules, any cross-attention:",
    any(m.is_cross_attention for m in motion_attn),
    "| to_k input widths:",
    sorted({m.to_k.in_features for m in motion_attn}),
)
torch.manual_seed(2)
probe = VideoUNet(TINY.unet, MOTION_TINY).eval()
for name, p in probe.named_parameters():
    if "motion_modules" in name and "proj_out" in name:
        p.copy_(torch.randn_like(p) * 0.3)  # wake the zero-initialised motion modules up
other_tokens = torch.randn_like(tokens)
moved_with_attn2 = not torch.allclose(probe(latents, 500, tokens), probe(latents, 500, other_tokens))
for name, m in probe.named_modules():
    if name.endswith("attn2"):
        m.to_out[0].weight.zero_(), m.to_out[0].bias.zero_()  # spatial cross-attention now adds nothing
same = torch.equal(probe(latents, 500, tokens), probe(latents, 500, other_tokens))
print("other tokens change the output (cross-attention on):", moved_with_attn2)
print("other tokens change nothing once attn2 is silenced (motion modules still on):", same)

# %% [markdown]
# ## 7. The video UNet, assembled
#
# - `VideoUNet(unet_kwargs, motion_kwargs)` adopts diffusers' 2D blocks under their own names and inserts a
#   `motion_modules` list in each block; its forward walks the blocks (resnet → transformer → motion module).
# - Fresh motion modules have `proj_out = 0`, so the video UNet **is** the 2D UNet applied to every frame —
#   bit for bit:

# %%
unet2d = build_unet2d(TINY.unet).eval()
unet2d.load_state_dict({k: v for k, v in tiny.state_dict().items() if "motion_modules" not in k})
ours = tiny(latents, 500, tokens)  # (B, 4, F, H, W)
theirs = unet2d(
    rearrange(latents, "b c f h w -> (b f) c h w"),
    500,
    encoder_hidden_states=repeat(tokens, "b n d -> (b f) n d", f=F),
).sample
print("output:", tuple(ours.shape))
print(
    "video UNet == diffusers' 2D UNet on every frame, exactly:",
    torch.equal(ours, rearrange(theirs, "(b f) c h w -> b c f h w", f=F)),
)

# %% [markdown]
# At SD15 size the state-dict keys are those of the official checkpoints (`tests/test_unet.py` compares them
# with the key lists of `denoising_unet.pth`, `reference_unet.pth` and `motion_module.pth`):

# %%
keys = denoiser.state_dict()
motion_keys = [k for k in keys if "motion_modules" in k]
with torch.device("meta"):
    reference = ReferenceUNet(SD15.unet)
print(
    f"denoiser keys: {len(keys)} | motion keys: {len(motion_keys)} | "
    f"modules: {len(denoiser.motion_modules())}"
)
print("reference UNet keys:", len(reference.state_dict()), "| has conv_out:", hasattr(reference, "conv_out"))
print(motion_keys[0])
print(
    f"motion modules: {human(sum(count_parameters(m) for _, m in denoiser.motion_modules()))} parameters "
    f"on top of the 2D UNet's {human(count_parameters(unet2d_sd))}"
)

# %% [markdown] tags=["core"]
# ## Summary
# - The four normalisations differ only in which values share a mean; the UNet uses GroupNorm
#   (batch-independent) around convolutions and LayerNorm inside transformer blocks. A motion module's
#   GroupNorm must be **per frame**, as in the checkpoints; pooling over frames (diffusers' AnimateDiff block)
#   is another function on the same weights.
# - SD1.5's UNet goes 320→1280 channels while 64→8 pixels and back; skips are concatenated. Only the 1×1
#   shortcut could add the two halves; the main path normalises and activates each half apart, so a
#   concatenating block is a different function from an adding one, not a superset of it.
# - One time embedding per sample becomes a per-channel shift in all 22 resnets. One CLIP image token gives
#   the same cross-attention output at every position. The 16 cross-attention sites are the 16 spatial
#   transformers (6 down, 1 mid, 9 up); the motion modules have none and ignore the tokens.
# - Per-frame 2D convolutions keep SD1.5's weights exactly and cost a third of Conv3d; time is handled by 21
#   zero-initialised motion modules, attention over `(B·H·W, F, C)` sequences with a sinusoidal position
#   encoding — without it, frame order would be invisible.
#
# ## Exercises
# 1. Normalise a 16-frame window with the per-frame GroupNorm and with the across-frames one, and compare each
#    with the same frames normalised as two 8-frame windows. Which version is window-independent?
# 2. Set `motion_module_resolutions=(1,)` (motion modules at full resolution only). How many modules remain,
#    and what share of the motion-module FLOPs do they carry?
# 3. Feed 77 random tokens instead of one CLIP token to `attn2`. Is the output still the same at every
#    position?
# 4. The reference (AnimateDiff's `VersatileAttention`) adds the position encoding inside the temporal
#    transformer block, to each attention's LayerNorm'd input. Move it before the LayerNorm: add it once to
#    the block's input, its residual stream (after `proj_in`). Repeat the frame-order experiment. Does the
#    module still see the order? What changes for a freshly initialised module, and for trained weights?
#
# ## Solutions
#
# **1.** Per-frame statistics only look at one frame, so splitting the window changes nothing; across-frame
# statistics depend on which frames share the window.

# %%
clip16 = torch.randn(1, C, 16, H, W) + torch.linspace(-1, 1, 16)[None, None, :, None, None]  # drifting
gn = nn.GroupNorm(G, C, eps=1e-6, affine=False)


def gn_per_frame(v):  # (B, C, F, H, W) -> per-frame GroupNorm -> (B, C, F, H, W)
    f = v.shape[2]
    return rearrange(gn(rearrange(v, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=f)


for name, fn in (("per frame", gn_per_frame), ("across frames", gn)):
    whole = fn(clip16)
    halves = torch.cat([fn(clip16[:, :, :8]), fn(clip16[:, :, 8:])], dim=2)
    print(f"{name:13s}: 16-frame window == two 8-frame windows:", torch.allclose(whole, halves, atol=1e-5))

# %% [markdown]
# **2.** Motion modules only at the first level (resolution factor 1): 2 in `down_blocks.0`, 3 in
# `up_blocks.3`, plus the mid block's (kept by `motion_module_mid_block`).

# %%
with torch.device("meta"):
    first_only = VideoUNet(SD15.unet, MOTION_SD15 | {"motion_module_resolutions": (1,)})
    clip_sd2 = torch.empty(2, 4, 24, 64, 64)  # (2B, C, F, h, w): CFG rows, 24 frames


def motion_flops(unet):
    per = flops_by_module(unet, clip_sd2, 999, torch.empty(2, 1, 768, device="meta"), depth=3)
    per |= flops_by_module(unet, clip_sd2, 999, torch.empty(2, 1, 768, device="meta"), depth=2)
    return sum(v for n, v in per.items() if n.endswith("motion_modules"))


kept = len(first_only.motion_modules())
share = motion_flops(first_only) / motion_flops(denoiser)
print(f"modules left: {kept} of 21, carrying {share:.0%} of the motion-module FLOPs")

# %% [markdown]
# A motion module costs about $22C^2$ multiply-adds per token (position × frame), and positions × $C^2$ is the
# same at the first three levels ($4096 \cdot 320^2 = 1024 \cdot 640^2 = 256 \cdot 1280^2$): a module costs
# about the same wherever it sits (a quarter at 8×8), so the share follows the number of modules kept.
#
# **3.** With 77 different keys the softmax weights depend on the query, so positions receive different
# mixtures of the values:

# %%
many = torch.randn(2, 77, TINY.unet["cross_attention_dim"])  # (B, 77 tokens, D)
out77 = block.attn2(queries, encoder_hidden_states=many)  # (B, HW, C)
print(
    "77 tokens: same output at every position:",
    torch.allclose(out77, out77[:, :1].expand_as(out77), atol=1e-6),
)

# %% [markdown]
# **4.** A forward pre-hook adds the encoding to the transformer block's input, in a module built without its
# own. The order is still seen. A fresh module is still the identity (its `proj_out` is zero, whatever flows
# in the residual stream). With the same trained-like weights, though, the output changes: the encoding now
# goes through the LayerNorm, which rescales it together with the features, and stays in the residual
# stream, so the feed-forward and `proj_out` see it too. A checkpoint trained with the reference's placement
# gets inputs it never saw.


# %%
def trained_like(with_pe: bool) -> MotionModule:
    torch.manual_seed(1)
    m = MotionModule(32, num_attention_heads=4, norm_num_groups=8, temporal_position_encoding=with_pe)
    for name, p in m.named_parameters():  # the same draws with and without the PE (a buffer, not a parameter)
        p.copy_(torch.randn_like(p) * 0.3 + float("norm" in name and name.endswith("weight")))
    return m


def pe_before_layernorm(m: MotionModule) -> MotionModule:
    """m (built without its own PE) with pe[:F] added to the temporal transformer block's input."""
    pe = sinusoidal_position_encoding(32, m.temporal_transformer.proj_in.in_features)[0]  # (32, C)

    def add_pe(block, args):
        h, frames = args  # (B*F, HW, C), F
        return h + repeat(pe[:frames], "f c -> (b f) 1 c", b=len(h) // frames), frames

    m.temporal_transformer.transformer_blocks[0].register_forward_pre_hook(add_pe)
    return m


feats, order = torch.randn(F, 32, 4, 4), torch.tensor([2, 0, 3, 1])  # one video (F, C, H, W), a shuffle
moved = pe_before_layernorm(trained_like(False))
print(
    "PE before the LayerNorm: shuffling the input frames just shuffles the output:",
    torch.allclose(moved(feats, F)[order], moved(feats[order], F), rtol=1e-4, atol=1e-4),
)
fresh = pe_before_layernorm(
    MotionModule(32, num_attention_heads=4, norm_num_groups=8, temporal_position_encoding=False)
)
print("a fresh module (proj_out = 0) is still the identity:", torch.equal(fresh(feats, F), feats))
reference = trained_like(True)  # the reference's placement, same weights
print(
    "same weights, PE before vs after the LayerNorm: same output:",
    torch.allclose(moved(feats, F), reference(feats, F), rtol=1e-4, atol=1e-4),
)

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch
import torch.nn.functional as F
from einops import rearrange

from anim_lab import motion as lab_motion

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): GroupNorm by hand
# Write `my_group_norm(x, num_groups, weight, bias, eps=1e-5)` for `x` of shape `(B, C, *spatial)` (images or
# videos): split the C channels into `num_groups` groups, normalise each (sample, group) over its channels and
# all spatial positions with the biased variance, then scale and shift per channel. Use no normalisation
# function of torch.


# %% nbgrader={"grade": false, "grade_id": "ch04_group_norm", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_group_norm(x, num_groups, weight, bias, eps=1e-5):
    ### BEGIN SOLUTION
    b, c = x.shape[:2]
    groups = x.reshape(b, num_groups, -1)  # (B, C, ...) -> (B, G, C/G * ...)
    mean = groups.mean(dim=-1, keepdim=True)
    var = groups.var(dim=-1, unbiased=False, keepdim=True)
    normed = ((groups - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return normed * weight.reshape(shape) + bias.reshape(shape)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04_group_norm_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(4)
for shape, groups in [((2, 8, 5, 5), 4), ((1, 32, 3, 4, 4), 32), ((3, 6, 7), 2), ((2, 12, 2, 3, 3), 1)]:
    x = torch.randn(shape, generator=gen) * 3 + 1
    weight, bias = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
    torch.testing.assert_close(my_group_norm(x, groups, weight, bias), F.group_norm(x, groups, weight, bias))
print("my_group_norm matches torch's group_norm on images, videos and sequences")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): the motion module's position encoding
# Write `my_sinusoidal_position_encoding(max_len, dim)`: shape `(1, max_len, dim)`, float32, with
# $pe[pos, 2i] = \sin(pos / 10000^{2i/dim})$ and $pe[pos, 2i+1] = \cos(pos / 10000^{2i/dim})$.


# %% nbgrader={"grade": false, "grade_id": "ch04_position_encoding", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_sinusoidal_position_encoding(max_len, dim):
    ### BEGIN SOLUTION
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * inv_freq)
    pe[0, :, 1::2] = torch.cos(position * inv_freq)
    return pe
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04_position_encoding_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_sinusoidal_position_encoding is not lab_motion.sinusoidal_position_encoding
for max_len, dim in [(32, 320), (24, 8), (5, 2), (64, 1280)]:
    mine = my_sinusoidal_position_encoding(max_len, dim)
    torch.testing.assert_close(
        mine, lab_motion.sinusoidal_position_encoding(max_len, dim), atol=1e-5, rtol=1e-5
    )
print("my_sinusoidal_position_encoding matches motion.sinusoidal_position_encoding on 4 sizes")

# %% [markdown] tags=["core"]
# ### Exercise 3 (3 points): a temporal attention by hand
# Write `my_temporal_attention(attn, hidden_states, num_frames)`, what a motion module's attention does with
# `hidden_states` `(B*F, HW, C)`: every spatial position becomes a sequence over the F frames
# `(B*HW, F, C)`, plus `attn.pos_encoder.pe[:, :F]`; then multi-head self-attention with `attn.to_q`,
# `attn.to_k`, `attn.to_v` (`attn.heads` heads, softmax scaled by $1/\sqrt{d_{head}}$) and `attn.to_out[0]`;
# back to `(B*F, HW, C)`.


# %% nbgrader={"grade": false, "grade_id": "ch04_temporal_attention", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_temporal_attention(attn, hidden_states, num_frames):
    ### BEGIN SOLUTION
    hw = hidden_states.shape[1]
    x = rearrange(hidden_states, "(b f) d c -> (b d) f c", f=num_frames)
    x = x + attn.pos_encoder.pe[:, :num_frames]
    q, k, v = (
        rearrange(proj(x), "n f (h e) -> n h f e", h=attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v)
    )
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)  # (B*HW, heads, F, F)
    out = attn.to_out[0](rearrange(weights @ v, "n h f e -> n f (h e)"))
    return rearrange(out, "(b d) f c -> (b f) d c", d=hw)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04_temporal_attention_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
torch.manual_seed(5)
gen = torch.Generator().manual_seed(5)
for batch, frames, hw, dim, heads in [(1, 4, 6, 16, 2), (2, 3, 4, 32, 8), (1, 8, 1, 8, 1)]:
    attn = lab_motion.temporal_attention(dim, heads, max_len=32).eval()
    x = torch.randn(batch * frames, hw, dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(my_temporal_attention(attn, x, frames), attn(x, num_frames=frames))
print("my_temporal_attention matches the motion module's attention on 3 shapes")
