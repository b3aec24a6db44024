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
# # Chapter 08 — The causal 3D VAE and its tiling
#
# *HunyuanVideo's VAE compresses time as well as space: 17 frames become 5 latent frames. We build it from
# causal convolutions, check it against diffusers, look at what "causal" really means, and cut videos into
# overlapping tiles so that long, large clips fit in memory.*
#
# - **You will build**: a causal 3D convolution by hand; the frame arithmetic T → (T−1)//4+1 → 4(T_lat−1)+1; a
#   latent-by-frame sensitivity map of a trained causal VAE; the GroupNorm leak measured; a
#   transposed-convolution upsampler next to the causal one on an impulse; spatial and temporal tiling with
#   and without blending, their seams and their memory
# - **Library modules**: `anim_lab.causal_vae`, `anim_lab.tiling`, `anim_lab.toy`, `anim_lab.viz`
# - **Questions answered**: Why 4n+1 frames, and why is the first frame handled apart (and could any other
#   frame be)? Why causal padding, and what does "causal" not guarantee here? Why no transposed convolution in
#   the upsampler? Why do tiles overlap and blend, what do seams cost, and what memory does tiling save? Is
#   the `permute` in the original `DownsampleCausal3D` norm a bug?
# - **CPU runtime**: about 70 s of CPU time
#
# The toy causal VAE (channels 16-32-64-64, 16 latent channels, 2.9M parameters; HunyuanVideo's has 246.5M)
# was trained on 17-frame, 64 px toy clips by `scripts/train_causal_vae.py` (seed 0, about 45 minutes on one
# CPU thread). Its weights ship in `anim_lab/assets/toy_causal_vae/` in the diffusers layout, so diffusers'
# `AutoencoderKLHunyuanVideo.from_pretrained` loads them too.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import json

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.utils import logging as diffusers_logging
from einops import rearrange
from torch import nn
from torch.nn import functional as F

import anim_lab
from anim_lab import causal_vae as CV
from anim_lab import metrics, toy, viz
from anim_lab.inspect import PeakMemory
from anim_lab.tiling import TileSettings, tiled_decode

torch.manual_seed(0)
torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
np.set_printoptions(precision=3, suppress=True)
torch.set_printoptions(precision=3, sci_mode=False)
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")

# %% [markdown] tags=["core"]
# ## 1. A causal 3D convolution
#
# - A 3×3×3 convolution with ordinary padding mixes frames t−1, t, t+1: each output frame peeks one frame
#   ahead.
# - A **causal** convolution pads k−1 = 2 frames *in front* (copies of frame 0, "replicate") and none behind,
#   so output frame t sees input frames t−2, t−1, t only. Space is padded symmetrically, also by replication.
#   In time, for a kernel $w_0, \dots, w_{k-1}$:
#   $$y_t = \sum_{j=0}^{k-1} w_j\, x_{\max(t - j,\, 0)}$$
# - Re-derive it with `F.pad` + `F.conv3d` and compare with `CV.CausalConv3d`.

# %% tags=["core"]
conv = CV.CausalConv3d(1, 1, kernel_size=3)
x = torch.randn(1, 1, 6, 5, 5)  # (B, C, T, H, W)
padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)  # two copies of frame 0 in front: (1, 1, 8, 5, 5)
padded = F.pad(padded, (1, 1, 1, 1, 0, 0), mode="replicate")  # replicate borders in H, W: (1, 1, 8, 7, 7)
by_hand = F.conv3d(padded, conv.conv.weight, conv.conv.bias)  # no padding left to do: (1, 1, 6, 5, 5)
torch.testing.assert_close(by_hand, conv(x))
print("hand-made causal conv matches CV.CausalConv3d:", tuple(by_hand.shape))

# %% [markdown] tags=["core"]
# An impulse at frame 3: which output frames respond?

# %% tags=["core"]
impulse = torch.zeros(1, 1, 6, 5, 5)
impulse[:, :, 3, 2, 2] = 1.0
symmetric = nn.Conv3d(1, 1, 3, padding=1)  # the usual "same" padding
with torch.no_grad():
    symmetric.weight.copy_(conv.conv.weight)
    symmetric.bias.copy_(conv.conv.bias)
    zero = torch.zeros_like(impulse)
    causal_resp = (conv(impulse) - conv(zero)).abs().amax(dim=(0, 1, 3, 4)) > 0  # (T,)
    same_resp = (symmetric(impulse) - symmetric(zero)).abs().amax(dim=(0, 1, 3, 4)) > 0
print("causal conv, frames that respond:", causal_resp.nonzero().flatten().tolist())
print(
    "'same' conv,  frames that respond:", same_resp.nonzero().flatten().tolist(), "<- frame 2 sees the future"
)

# %% [markdown] tags=["core"]
# ## 2. The causal VAE: 4n+1 frames and a first frame apart
#
# - The encoder halves time twice with *strided causal* convolutions, the decoder's upsamplers double it back
#   except for the first frame:
#   $$T_\text{lat} = \left\lfloor \frac{T - 1}{4} \right\rfloor + 1, \qquad
#   T_\text{out} = 4\,(T_\text{lat} - 1) + 1$$
#   (each stage: $T \to \lfloor (T-1)/2 \rfloor + 1$ down, $T \to 2(T-1) + 1$ up). So $T = 4k + 1$
#   frames round-trip exactly; other lengths are refused.
# - The library equals diffusers' `AutoencoderKLHunyuanVideo` (same keys, loaded strictly;
#   `tests/test_causal_vae.py` checks T = 1, 5, 9, 17 to 1e-5). Check it once more here on the trained
#   weights, at 17 frames.

# %% tags=["core"]
vae = CV.CausalVAE.from_pretrained()  # anim_lab/assets/toy_causal_vae
print("frames T:         ", [1, 5, 9, 13, 17, 129])
print("latent frames:    ", [CV.latent_num_frames(t) for t in (1, 5, 9, 13, 17, 129)])
print("decoded frames:   ", [CV.sample_num_frames(CV.latent_num_frames(t)) for t in (1, 5, 9, 13, 17, 129)])
try:
    vae.encode(torch.zeros(1, 3, 16, 64, 64))
except ValueError as err:
    print("16 frames ->", str(err).split(":")[0])

ref = AutoencoderKLHunyuanVideo.from_pretrained(CV.TOY_ASSET_DIR).eval()
ref.use_framewise_encoding = ref.use_framewise_decoding = (
    False  # diffusers would otherwise tile in time by itself
)
test_ids = list(toy.identity_split("test"))  # identities never seen in training
clip = toy.make_clip(toy.identity_from_seed(test_ids[0]), num_frames=17, size=64, seed=7)
video = toy.images_to_tensor(clip.frames).unsqueeze(
    0
)  # (17, 64, 64, 3) uint8 -> (1, 3, 17, 64, 64) in [-1, 1]
with torch.no_grad():
    z = vae.encode(video).mean  # (1, 3, 17, 64, 64) -> (1, 16, 5, 8, 8)
    recon = vae.decode(z)  # -> (1, 3, 17, 64, 64)
    torch.testing.assert_close(recon, ref.decode(z).sample, atol=1e-5, rtol=0)
print(
    "video",
    tuple(video.shape),
    "-> latents",
    tuple(z.shape),
    "-> video",
    tuple(recon.shape),
    "| equals diffusers",
)


# %% [markdown] tags=["core"]
# How good is it? PSNR on 8 clips of unseen identities (17 frames, 64 px), and a strip of one of them.


# %% tags=["core"]
def psnr(a, b):  # clamped to [-1, 1] as a display would -> dB per clip (or per image), anim_lab.metrics
    a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    return metrics.video_psnr(a, b) if a.ndim == 5 else metrics.psnr(a, b)


clips = torch.cat(
    [
        toy.images_to_tensor(toy.make_clip(toy.identity_from_seed(s), 17, 64, seed=s).frames)[None]
        for s in test_ids[:8]
    ]
)  # (8, 3, 17, 64, 64)
with torch.no_grad():
    scores = psnr(vae(clips), clips)
log = json.loads((CV.TOY_ASSET_DIR / "train_log.json").read_text())
print(
    f"held-out PSNR, 8 clips: {scores.mean():.1f} dB "
    f"(training log, 64 clips: {log['held_out_psnr_db']:.1f} dB)"
)
print("scaling factor (1 / std of latents):", round(vae.scaling_factor, 2))


# %% tags=["core"]
def frames_01(v):  # (1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) in [0, 1]
    return rearrange((v[0].clamp(-1, 1) + 1) / 2, "c t h w -> t h w c").numpy()


shown = [0, 1, 4, 8, 12, 16]
fig, axes = plt.subplots(2, len(shown), figsize=(9, 3.3))
for j, t in enumerate(shown):
    for i, (v, name) in enumerate([(video, "original"), (recon, "reconstruction")]):
        axes[i, j].imshow(frames_01(v)[t])
        axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[0, j].set_title(f"frame {t}", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=8)
fig.tight_layout()
viz.save(fig, "ch08_reconstruction")
plt.show()

# %% [markdown] tags=["core"]
# The reconstructions are blurry: 2.9M parameters, 48× compression (4 frames × 8 × 8 pixels × 3 colours into
# 16 numbers), 45 CPU minutes of training. Colours, pose and head shape survive; eyes and mouth mostly do not.
#
# **Which frames does each latent frame encode?** Differentiate each latent frame with respect to each input
# frame and take the mean |gradient|: a latent × frame sensitivity map. Do it twice: for the VAE as it is, and
# with every GroupNorm of the encoder computing its statistics **per frame** (a forward hook; the mid
# attention switched off), which isolates what the convolutions alone do.


# %% tags=["core"]
def per_frame_norm(
    module, inputs, output
):  # GroupNorm over (C/G, H, W) of each frame instead of (C/G, T, H, W)
    (h,) = inputs
    return torch.stack(
        [
            F.group_norm(h[:, :, t], module.num_groups, module.weight, module.bias, module.eps)
            for t in range(h.shape[2])
        ],
        dim=2,
    )


class PerFrameNorms:
    """Context manager: the encoder's GroupNorms per frame, its mid attention off."""

    def __enter__(self):
        self.hooks = [
            m.register_forward_hook(per_frame_norm)
            for m in vae.encoder.modules()
            if isinstance(m, nn.GroupNorm)
        ]
        self.attentions, vae.encoder.mid_block.attentions = vae.encoder.mid_block.attentions, None

    def __exit__(self, *exc):
        vae.encoder.mid_block.attentions = self.attentions
        for hook in self.hooks:
            hook.remove()


def sensitivity_map(clip):  # (1, 3, 17, H, W) -> (5 latent frames, 17 input frames)
    x = clip.clone().requires_grad_(True)
    mean = vae.encode(x).mean  # (1, 16, 5, 8, 8)
    rows = [
        torch.autograd.grad(mean[:, :, k].abs().sum(), x, retain_graph=True)[0].abs().mean(dim=(0, 1, 3, 4))
        for k in range(mean.shape[2])
    ]
    return torch.stack(rows)


maps = {"as trained (GroupNorm over all frames)": sensitivity_map(video)}
with PerFrameNorms():
    maps["GroupNorm per frame, no attention"] = sensitivity_map(video)
for name, sens in maps.items():
    share = sens / sens.sum(1, keepdim=True)
    future = [share[k, 4 * k + 1 :].sum().item() for k in range(5)]  # frames after latent k's last frame, 4k
    print(f"{name:38s} share from future frames, latents 0..4 (%):", np.round(100 * np.array(future), 0))

# %% tags=["core"]
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6))
for ax, (name, sens) in zip(axes, maps.items(), strict=True):
    im = ax.imshow(
        torch.log10(sens / sens.max()).clamp(min=-4).numpy(), cmap="magma", vmin=-4, vmax=0, aspect="auto"
    )
    ax.set_xlabel("input frame"), ax.set_ylabel("latent frame"), ax.set_yticks(range(5))
    ax.set_title(f"log10 sensitivity: {name}", fontsize=8)
fig.colorbar(im, ax=axes, shrink=0.9)
plt.show()

# %% [markdown] tags=["core"]
# - With per-frame statistics the map is lower-triangular: latent 0 sees frame 0 only, latent k frames ≤ 4k.
#   That is the causal wiring. As trained, gradients also flow from *future* frames, through the GroupNorm
#   statistics (section 3 measures what that does to the latents).
# - **Why the first frame apart, and why 4n+1?** Frame 0 has no past: the front padding repeats it, so latent
#   0 is an *image* latent. Every later latent summarises 4 new frames. Hence T = 1 + 4k, and a single image
#   (T = 1) is a valid one-frame video: one VAE for images and videos.
# - **Could another frame be split off** (the seed notes ask)? No: only frame 0 is preceded by padding. The
#   decoder mirrors the encoder: its upsampler keeps the first latent frame as *one* frame (space only) and
#   doubles the rest in time, 1 + 2(T−1). Doubling every frame would give 2T, one frame too many for 4k+1, and
#   would put an invented frame *before* frame 0's successor.

# %% tags=["core"]
up = CV.UpsampleCausal3D(4, (2, 2, 2))
h = torch.randn(1, 4, 3, 4, 4)  # 3 latent frames
naive = F.interpolate(h, scale_factor=(2, 2, 2), mode="nearest")  # every frame doubled
print("library upsampler:", tuple(up(h).shape[2:]), " naive x2 in time:", tuple(naive.shape[2:]))

# %% [markdown]
# ## 3. What "causal" does not guarantee: GroupNorm spans all frames
#
# - Every convolution is causal, but every **GroupNorm** (resnets, `conv_norm_out`, the mid attention's
#   `group_norm`) averages over T × H × W: statistics of later frames flow back into earlier ones.
# - Experiment: replace frames 9..16 of the clip with another person and re-encode. Frame 0 did not change;
#   does latent 0?

# %%
other = toy.images_to_tensor(toy.make_clip(toy.identity_from_seed(test_ids[1]), 17, 64, seed=8).frames)[None]
changed = torch.cat([video[:, :, :9], other[:, :, 9:]], dim=2)  # same frames 0..8, new frames 9..16
with torch.no_grad():
    z_changed = vae.encode(changed).mean
    z_alone = vae.encode(video[:, :, :1]).mean  # frame 0 encoded on its own, as an image

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(
        f"latent 0 changed by {100 * rel(z_changed[:, :, 0], z[:, :, 0]):.0f}% (relative L2) "
        f"when frames 9..16 changed"
    )
    print(f"encode(frame 0 alone) vs latent 0 of the clip: {100 * rel(z_alone[:, :, 0], z[:, :, 0]):.0f}%")

    def frame0(latents):
        return vae.decode(latents)[:, :, :1]

    print(f"decoded frame 0, clip vs changed clip: PSNR {psnr(frame0(z_changed), frame0(z)).item():.0f} dB")


# %% [markdown]
# The same layers with statistics taken per frame (section 2's hook) and the mid attention off: now latents
# 0..2 (frames 0..8) do not move at all.

# %%
with torch.no_grad(), PerFrameNorms():
    a, b = vae.encode(video).mean, vae.encode(changed).mean
print(
    "per-frame norms, no attention: latents 0..2 unchanged:",
    torch.equal(a[:, :, :3], b[:, :, :3]),
    "| latents 3..4 changed:",
    not torch.allclose(a[:, :, 3:], b[:, :, 3:]),
)

# %% [markdown]
# - So the network is causal **in its wiring, not in its numbers**. Replacing the second half of the clip by
#   another person moves latent 0 by a fifth of its norm and changes decoded frame 0 visibly (about 30 dB),
#   although frame 0 itself did not change. For one smooth clip the effect is small: frame 0 encoded alone is
#   within about 1% of the clip's latent 0.
# - Consequences: an image latent of frame 0 (image-to-video conditioning) is not exactly the first latent of
#   the video, and temporal tiles cannot be encoded "exactly" on their own, which is one reason they are
#   blended.

# %% [markdown]
# ## 4. Why no transposed convolution in the upsampler
#
# A stride-2 transposed convolution with a 3-wide kernel spreads each input over 3 outputs that overlap
# unevenly: some outputs get 2 contributions, others 1. Feed it a **constant** and look at the output.

# %%
const = torch.ones(1, 1, 8, 8)
tconv = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=1, bias=False)
nn.init.ones_(tconv.weight)
nn_conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="replicate", bias=False)
nn.init.ones_(nn_conv.weight)
with torch.no_grad():
    checker = tconv(const)[0, 0]  # (16, 16)
    smooth = nn_conv(F.interpolate(const, scale_factor=2, mode="nearest"))[0, 0]  # nearest x2, then conv
print("transposed conv on a constant, values:", checker[2:-2, 2:-2].unique().tolist(), "<- checkerboard")
print("nearest + conv on a constant, values: ", smooth.unique().tolist())

# %% [markdown]
# Is it the odd kernel? A stride-2 transposed convolution with kernel $k$ gives each output
# $\lceil k/2 \rceil$ or $\lfloor k/2 \rfloor$ contributions, alternating with the output's parity. With
# kernels 2 and 4 (divisible by the stride) the overlap is even: on a constant with an all-ones kernel, the
# interior is flat. But the kernel taps that reach even and odd outputs are different weights; unless
# training makes their sums equal, a constant still comes out as a period-2 pattern. Random kernels, three
# sizes:

# %%
for k in (2, 3, 4):
    tc = nn.ConvTranspose2d(1, 1, k, stride=2, padding=(k - 1) // 2, bias=False)
    with torch.no_grad():
        nn.init.ones_(tc.weight)
        ones_out = tc(const)[0, 0, 2:-2, 2:-2]  # the interior, away from the borders
        torch.manual_seed(k)
        nn.init.normal_(tc.weight)
        rand_out = tc(const)[0, 0, 2:-2, 2:-2]
    spread = (rand_out.max() - rand_out.min()) / rand_out.abs().mean()
    print(
        f"kernel {k}: ones kernel -> interior values {sorted(set(ones_out.flatten().tolist()))}; "
        f"random kernel -> {len(rand_out.round(decimals=4).unique())} distinct values, "
        f"spread/mean {spread:.1f}"
    )
up_nearest = nn.Conv2d(1, 1, 3, padding=1, padding_mode="replicate", bias=False)
with torch.no_grad():
    nn.init.normal_(up_nearest.weight)
    near = up_nearest(F.interpolate(const, scale_factor=2, mode="nearest"))[0, 0]
print("nearest + random 3x3 conv on a constant: distinct values", len(near.round(decimals=4).unique()))

# %% [markdown]
# - Kernel 3 (odd): uneven overlap, a checkerboard even with equal weights.
# - Kernels 2 and 4 (divisible by the stride): even overlap, flat with equal weights; with random weights each
#   output parity sums a different subset of taps, so the constant still becomes a 2 × 2 pattern (4 values).
# - Nearest upsampling followed by a convolution applies *the same* kernel at every output pixel: a constant
#   stays a constant (1 value, replicate padding keeps even the borders flat), whatever the weights.
#
# In time the same unevenness is **flicker**, and the transposed kernel also reaches *backwards*: latent frame
# t writes into output frame 2t−1, which belongs to the previous latent's frames (2t−2, 2t−1) in a 2T-frame
# layout. The library's upsampler (nearest, first frame apart, then a causal conv) does neither.

# %%
t_up = nn.ConvTranspose3d(1, 1, 3, stride=2, padding=1, output_padding=1, bias=False)
nn.init.ones_(t_up.weight)
c_up = CV.UpsampleCausal3D(1, (2, 2, 2))
with torch.no_grad():
    nn.init.ones_(c_up.conv.conv.weight), nn.init.zeros_(c_up.conv.conv.bias)
    flat = torch.ones(1, 1, 4, 4, 4)  # 4 latent frames, constant
    print("transposed, per-frame mean of a constant:", t_up(flat).mean(dim=(0, 1, 3, 4)).round().tolist())
    print("causal,     per-frame mean of a constant:", c_up(flat).mean(dim=(0, 1, 3, 4)).round().tolist())
    spike = torch.zeros(1, 1, 4, 4, 4)
    spike[:, :, 2] = 1.0  # an impulse at latent frame 2
    t_resp = t_up(spike).abs().amax(dim=(0, 1, 3, 4)) > 0
    c_resp = c_up(spike).abs().amax(dim=(0, 1, 3, 4)) > 0
print(
    "impulse at latent 2 -> transposed conv output frames:",
    t_resp.nonzero().flatten().tolist(),
    "(latent 2 owns 4, 5 of 8)",
)
print(
    "impulse at latent 2 -> causal upsampler output frames:",
    c_resp.nonzero().flatten().tolist(),
    "(latent 2 owns 3, 4 of 7)",
)

# %%
fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
axes[0].imshow(checker.numpy(), cmap="gray"), axes[0].set_title("transposed conv of a constant", fontsize=8)
axes[1].imshow(smooth.numpy(), cmap="gray", vmin=0, vmax=10), axes[1].set_title("nearest + conv", fontsize=8)
for ax in axes[:2]:
    ax.set_xticks([]), ax.set_yticks([])
axes[2].stem(
    range(8), t_resp.float().numpy(), linefmt="C3-", markerfmt="C3o", basefmt=" ", label="transposed"
)
axes[2].stem(
    np.arange(7) + 0.15,
    c_resp.float().numpy() * 0.8,
    linefmt="C0-",
    markerfmt="C0s",
    basefmt=" ",
    label="causal upsampler",
)
axes[2].set_title("output frames hit by latent frame 2", fontsize=8), axes[2].set_xlabel("output frame")
axes[2].legend(fontsize=7), axes[2].set_yticks([])
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Tiling: why tiles overlap and blend, and what it saves
#
# `anim_lab.tiling` decodes overlapping tiles and blends the overlaps with a linear ramp (the tile geometry of
# diffusers, checked equal in `tests/test_tiling.py`). Decode a 128 px, 9-frame clip (latents 16 × 16) as 2 ×
# 2 tiles in three ways and compare each with the untiled decode:
#
# - tiles of 64 px **side by side** (stride 64): each tile sees no context beyond its border;
# - tiles of 80 px **overlapping** by 16 px (stride 64), cut hard at the stride;
# - the same overlap, **blended** over the 16 px;
#
# and a fourth, diffusers' proportions (tiles 64, stride 48: 25% overlap) on this frame size.

# %%
clip128 = toy.make_clip(toy.identity_from_seed(test_ids[2]), num_frames=9, size=128, seed=3)
video128 = toy.images_to_tensor(clip128.frames)[None]  # (1, 3, 9, 128, 128)
settings = {
    "side by side (64/64)": TileSettings(64, 64, 64, 64, temporal=False),
    "overlap, hard cut (80/64)": TileSettings(80, 80, 64, 64, temporal=False, blend=False),
    "overlap + blend (80/64)": TileSettings(80, 80, 64, 64, temporal=False),
    "25% overlap + blend (64/48)": TileSettings(64, 64, 48, 48, temporal=False),
}
with torch.no_grad():
    z128 = vae.encode(video128).mean  # (1, 16, 3, 16, 16)
    full = vae.decode(z128)
    tiled = {name: vae.decode(z128, tiling=s) for name, s in settings.items()}
print(f"untiled vs original: {psnr(full, video128).item():.1f} dB")
for name, out in tiled.items():
    print(
        f"{name:27s} vs untiled: {psnr(out, full).item():5.1f} dB   "
        f"vs original: {psnr(out, video128).item():.1f} dB"
    )

# %%
fig, axes = plt.subplots(1, 6, figsize=(13, 2.6))
axes[0].imshow(frames_01(video128)[4]), axes[0].set_title("original, frame 4", fontsize=8)
axes[1].imshow(frames_01(full)[4]), axes[1].set_title("untiled decode", fontsize=8)
for ax, (name, out) in zip(axes[2:], tiled.items(), strict=True):
    err = (out - full).abs().mean(dim=(0, 1, 2)).numpy()  # mean |tiled - untiled| over channels and frames
    ax.imshow(err, cmap="inferno", vmin=0, vmax=0.15), ax.set_title(f"|error|: {name}", fontsize=7)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
fig.tight_layout()
viz.save(fig, "ch08_seams")
plt.show()

# %% [markdown]
# - Side by side, each tile's border pixels are decoded with replicated padding instead of their real
#   neighbours: a cross of errors along the tile borders. Overlap gives the kept pixels real context; blending
#   fades the two decodes into each other, so no hard line is left.
# - The 64/48 geometry is worse here, and not because of its overlap: tiles start at every multiple of the
#   stride up to the edge (diffusers' loop), so at 128 px the last row and column of tiles are only 32 px wide
#   (4 latents). A tile is decoded with **its own GroupNorm statistics**; a thin strip of background and shirt
#   normalises very differently from a whole portrait and comes out with shifted colours. Pick tile sizes so
#   the last tiles are not slivers (exercise 3).
#
# **In time**: 33 frames (9 latents) decoded in windows of 16 frames every 12 (diffusers' defaults). A later
# window decodes its first latent as if it were frame 0 (an image); that frame is dropped, and 4 frames are
# blended.

# %%
clip33 = toy.make_clip(toy.identity_from_seed(test_ids[3]), num_frames=33, size=64, seed=4)
video33 = toy.images_to_tensor(clip33.frames)[None]  # (1, 3, 33, 64, 64)
windows = {
    "windows 16/16 (no blend)": TileSettings(16, 16, 16, 16, 16, 16, spatial=False),
    "windows 16/12, hard cut": TileSettings(spatial=False, blend=False),
    "windows 16/12 + blend": TileSettings(spatial=False),
}
with torch.no_grad():
    z33 = vae.encode(video33).mean  # (1, 16, 9, 8, 8)
    full33 = vae.decode(z33)
    per_frame = {
        name: 10 * torch.log10(4.0 / (vae.decode(z33, tiling=s) - full33).pow(2).mean(dim=(0, 1, 3, 4)))
        for name, s in windows.items()
    }
for name, curve in per_frame.items():
    print(f"{name:25s}: worst frame {curve.min().item():.1f} dB vs untiled")

# %%
fig, ax = plt.subplots(figsize=(8, 2.8))
for name, curve in per_frame.items():
    ax.plot(curve.clamp(max=60).numpy(), marker=".", label=name)
ax.set_xlabel("frame"), ax.set_ylabel("PSNR vs untiled (dB, capped at 60)"), ax.legend(fontsize=7)
fig.tight_layout()
plt.show()


# %% [markdown]
# - The error is largest right where a window takes over and shrinks along the window: the window's first
#   latent is decoded as an image, with no past, and context builds up frame by frame (the causal convolutions
#   at work). Blending hands over gradually, under the previous window's decode, and gains a few dB at the
#   worst frame.
# - All variants stay well above the spatial seams: consecutive frames of a smooth clip are nearly alike, and
#   the GroupNorm of a 16-frame window sees much the same content as that of the whole clip.

# %% [markdown]
# **Memory.** `PeakMemory` counts every tensor the code allocates while it runs; "working memory" is the peak
# minus the output itself. Spatial: the 9-frame clip at 128 px, by tile size. Temporal: 17 to 65 frames at 64
# px.


# %%
def working_mib(fn):
    with torch.no_grad(), PeakMemory() as mem:
        out = fn()
    return (mem.peak - out.numel() * out.element_size()) / 2**20


untiled_mib = working_mib(lambda: vae.decode(z128))
tile_sizes = [32, 64, 96]
tiled_mib = [
    working_mib(lambda s=s: tiled_decode(vae, z128, TileSettings(s, s, s * 3 // 4, s * 3 // 4)))
    for s in tile_sizes
]
print(
    "spatial, tiled / untiled working memory by tile size (px):",
    {s: round(m / untiled_mib, 2) for s, m in zip(tile_sizes, tiled_mib, strict=True)},
)
frames_list = [17, 33, 65]
lat = {f: torch.randn(1, 16, (f - 1) // 4 + 1, 8, 8) for f in frames_list}
time_untiled = [working_mib(lambda f=f: vae.decode(lat[f])) for f in frames_list]
time_tiled = [
    working_mib(lambda f=f: tiled_decode(vae, lat[f], TileSettings(spatial=False))) for f in frames_list
]
print(
    "temporal, untiled growth 17 -> 65 frames: x",
    round(time_untiled[-1] / time_untiled[0], 1),
    "| windows: x",
    round(time_tiled[-1] / time_tiled[0], 2),
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
axes[0].plot(tile_sizes, tiled_mib, "o-", label="tiled (overlap 25%)")
axes[0].axhline(untiled_mib, color="C3", ls="--", label="untiled")
axes[0].set_xlabel("tile size (px), frame 128 px"), axes[0].set_ylabel("working memory (MiB)")
axes[1].plot(frames_list, time_untiled, "o--", color="C3", label="untiled")
axes[1].plot(frames_list, time_tiled, "o-", label="windows 16/12")
axes[1].set_xlabel("frames, 64 px"), axes[1].set_ylabel("working memory (MiB)")
for ax in axes:
    ax.legend(fontsize=7), ax.set_ylim(bottom=0)
fig.tight_layout()
viz.save(fig, "ch08_memory")
plt.show()

# %% [markdown]
# - Working memory follows the tile, not the video: with windows it stays flat from 17 to 65 frames; with
#   spatial tiles a 128 px decode needs a fraction of the untiled memory. The price is compute on the overlaps
#   (×1.56 the decoded area at 25% overlap, as exercise 5's solution prints: per axis, tiles of 64 every 48
#   cover 64 + 64 + 32 = 160 of 128 pixels, the last one cut at the edge; a frame many tiles wide approaches
#   (64/48)² ≈ 1.78) and the small seam errors measured above.
# - `anim_lab.tiling` writes each tile's kept part straight into the output and keeps only the strips still
#   needed for blending; diffusers keeps every decoded tile until the end. Same numbers, less memory
#   (`benchmarks/bench_causal_vae_tiling.py` compares both).

# %% [markdown]
# ## 6. The `DownsampleCausal3D` norm `permute`: bug or not?
#
# The original HunyuanVideo `DownsampleCausal3D.forward` starts with an optional norm:
# `self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)`. The seed notes ask where T went. Run it.

# %%
norm = nn.LayerNorm(16)
h5 = torch.randn(1, 16, 5, 8, 8)  # a video feature map (B, C, T, H, W)
try:
    norm(h5.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
except RuntimeError as err:
    print("on a video:", type(err).__name__, "-", str(err).split(" i.e. ")[-1])
h4 = torch.randn(1, 16, 8, 8)  # an image feature map (B, C, H, W)
line = norm(h4.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
channel_ln = rearrange(
    F.layer_norm(rearrange(h4, "b c h w -> b h w c"), (16,), norm.weight, norm.bias), "b h w c -> b c h w"
)
torch.testing.assert_close(line, channel_ln)
print("on an image: a LayerNorm over channels at each pixel (matches F.layer_norm)")
with torch.device("meta"):
    full_keys = list(CV.CausalVAE(**CV.CAUSAL_VAE_HUNYUAN).state_dict())
print(
    "anim_lab's full-size CausalVAE (HunyuanVideo config, meta device) has a downsampler norm key:",
    any("downsamplers" in k and "norm" in k for k in full_keys),
)

# %% [markdown]
# - The line was written for 4-D image tensors (B, C, H, W) → (B, H, W, C): the channels-last LayerNorm of the
#   2-D `Downsample2D` it was copied from. On a 5-D video it **raises**; T does not "disappear", the call
#   fails.
# - It is **dead code**: the norm is off (`norm_type=None`) in every HunyuanVideo config, so a model built
#   from that config has no downsampler norm, and neither can weights saved from it; diffusers dropped the
#   branch. What the check above reads is **`anim_lab`'s own full-size model**, built on the meta device from
#   HunyuanVideo's config (its keys are diffusers' `AutoencoderKLHunyuanVideo` keys, loaded strictly in
#   `tests/test_causal_vae.py`); the released checkpoint file itself is not opened here. A bug that never
#   runs; a 5-D version would be `rearrange(h, "b c t h w -> b t h w c")`, norm, and back.
#
# ## Summary
#
# - A causal 3D conv pads k−1 copies of frame 0 in front; strided twice it maps 4k+1 frames to k+1 latents,
#   latent 0 being an image latent of frame 0 alone. The decoder upsamples the first frame in space only:
#   4(T_lat−1)+1 frames.
# - Causal wiring is not causal numbers: GroupNorm statistics span all frames, so latent 0 moves when later
#   frames change (section 3); with per-frame norms it would not.
# - Nearest upsampling + causal conv instead of a transposed conv: no checkerboard, no temporal flicker, and
#   no latent frame writing into earlier frames.
# - Tiles must overlap (context at the borders) and blend (no hard line). Working memory then follows the tile
#   size and stays flat with video length; the cost is recomputing the overlaps.
# - The `permute` in `DownsampleCausal3D`'s norm is a 2-D leftover that would fail on video, in a branch no
#   config uses.
#
# ## Exercises
#
# 1. Encode 18 frames: the library refuses. What does diffusers do with 18 (and with 6 or 8) frames? Which
#    frames are silently dropped?
# 2. Switch the trained encoder's GroupNorms to per-frame statistics (the hook of section 2) and check that
#    `encode(frame 0 alone)` equals latent 0 of the clip exactly. What would training need to change?
# 3. At 128 px, tiles of 64 with stride 48 leave 32-px slivers at the end. Decode with all tiles full size
#    (the last one shifted back to end at the edge, overlaps averaged) and compare its PSNR against the
#    untiled decode with the 64/48 layout of section 5.
# 4. In `anim_lab.tiling`, temporal *encoding* blends over `(16 − 12) / 4 = 1` latent frame. What does a
#    1-wide linear ramp actually do (look at its weights)? Try a larger encode overlap and measure the latent
#    error against the untiled encode.
# 5. What does spatial overlap cost? Count the decoded area (tiles × tile area / frame area) for overlaps of
#    0, 25% and 50% at 64-px tiles on a 128-px frame, next to the seam PSNR.
#
# ## Solutions
#
# **1.** diffusers computes the latent length with the same floor, $\lfloor (T-1)/4 \rfloor + 1$, and never
# checks $T$: the leftover frames are encoded into nothing.

# %%
with torch.no_grad():
    for t in (18, 6, 8):
        frames_in = torch.zeros(1, 3, t, 16, 16)
        lat_t = ref.encode(frames_in).latent_dist.mean.shape[2]
        out_t = ref.decode(ref.encode(frames_in).latent_dist.mean).sample.shape[2]
        print(
            f"diffusers: {t} frames -> {lat_t} latent frames -> {out_t} frames; lost: {list(range(out_t, t))}"
        )

# %% [markdown]
# **2.** With per-frame statistics and no mid attention the encoder is causal in its numbers too:

# %%
with torch.no_grad(), PerFrameNorms():
    latent0_alone = vae.encode(video[:, :, :1]).mean[:, :, 0]
    latent0_clip = vae.encode(video).mean[:, :, 0]
print(
    "per-frame norms: encode(frame 0 alone) == latent 0 of the clip:",
    torch.allclose(latent0_alone, latent0_clip, atol=1e-5),
)

# %% [markdown]
# Training would have to use the same per-frame norms (the trained weights expect clip-wide statistics). The
# mid-block attention already has a causal mask over frames (`causal_vae.frame_causal_mask`); what lets later
# frames reach frame 0 there is the GroupNorm before it, which takes its statistics over all frames and would
# have to be per frame too.
#
# **3.** Tile starts with diffusers' loop, and a layout whose last tile ends at the edge (in latents: tiles of
# 8, frame of 16):


# %%
def shifted_decode(z, tile=8, starts=(0, 6, 8)):  # (1, C, T, 16, 16) latents -> (1, 3, T', 128, 128)
    out = torch.zeros(1, 3, 4 * (z.shape[2] - 1) + 1, 8 * z.shape[3], 8 * z.shape[4])
    count = torch.zeros_like(out)
    for i in starts:
        for j in starts:
            out[..., 8 * i : 8 * (i + tile), 8 * j : 8 * (j + tile)] += vae.decode(
                z[..., i : i + tile, j : j + tile]
            )
            count[..., 8 * i : 8 * (i + tile), 8 * j : 8 * (j + tile)] += 1
    return out / count  # overlaps averaged


print(
    "diffusers' loop, 64/48 at 128 px, tile starts and widths:",
    [(s, min(64, 128 - s)) for s in range(0, 128, 48)],
)
with torch.no_grad():
    shifted = shifted_decode(z128)
print(f"64/48 (slivers) vs untiled: {psnr(tiled['25% overlap + blend (64/48)'], full).item():.1f} dB")
print(f"all tiles 64 px (starts 0, 48, 64) vs untiled: {psnr(shifted, full).item():.1f} dB")

# %% [markdown]
# **4.** The ramp's weights are $y/E$ for $y < E$: with $E = 1$ the only weight is 0, so the new window's
# first kept latent is *replaced* by the previous window's; no blending happens, just a cut one latent later.
# A stride of 8 frames gives $E = 2$ (weights 0, 0.5):

# %%
print("ramp weights, E=1:", (torch.arange(1) / 1).tolist(), " E=2:", (torch.arange(2) / 2).tolist())
with torch.no_grad():
    for stride in (12, 8):
        tiles_t = TileSettings(spatial=False, tile_sample_stride_num_frames=stride)
        z_tiled = vae.encode(video33, tiling=tiles_t).mean
        print(
            f"encode windows 16/{stride}: latent error vs untiled "
            f"{100 * rel(z_tiled, z33):.1f}% (relative L2)"
        )

# %% [markdown]
# **5.** Decoded area grows quickly with the overlap, and so does the compute:

# %%
for stride in (64, 48, 32):
    starts = range(0, 128, stride)
    area = sum(min(64, 128 - a) * min(64, 128 - b) for a in starts for b in starts) / 128**2
    with torch.no_grad():
        seam = psnr(
            vae.decode(z128, tiling=TileSettings(64, 64, stride, stride, temporal=False)), full
        ).item()
    print(f"overlap {(64 - stride) / 64:.0%}: decoded area x{area:.2f}, seam PSNR vs untiled {seam:.1f} dB")

# %% [markdown]
# The decoded area (and with it the compute) grows fast: ×1.56 at 25% overlap, ×3 at 50%. The seam PSNR is
# not monotonic here because of the slivers of solution 3: at 128 px both overlapped layouts end with thin
# tiles. A default should pick the overlap *and* a layout without slivers; diffusers' 25% is a fair compromise
# on large frames, where the last tile is a small part of the image.

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch
import torch.nn.functional as F

from anim_lab import causal_vae as lab_causal_vae
from anim_lab import tiling as lab_tiling

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): causal padding
# Write `my_causal_conv3d(conv, x)`: the output of a `CausalConv3d` module `conv` on a video
# `x` `(B, C, T, H, W)`, from its inner `conv.conv` (an `nn.Conv3d` with no padding of its own: use its
# weight, bias and stride with `F.conv3d`). Pad by *replication*: $k_t - 1$ copies of the first frame in
# front and none behind; $\lfloor k_h/2 \rfloor$ and $\lfloor k_w/2 \rfloor$ on both sides in space.


# %% nbgrader={"grade": false, "grade_id": "ch08_causal_conv3d", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_causal_conv3d(conv, x):
    ### BEGIN SOLUTION
    kt, kh, kw = conv.conv.kernel_size
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0), mode="replicate")
    return F.conv3d(padded, conv.conv.weight, conv.conv.bias, stride=conv.conv.stride)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch08_causal_conv3d_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
torch.manual_seed(8)
gen = torch.Generator().manual_seed(8)
for kernel, stride, frames in [(3, 1, 5), ((3, 1, 1), 1, 9), (3, (2, 2, 2), 9), ((2, 3, 3), 1, 4), (1, 1, 3)]:
    conv = lab_causal_vae.CausalConv3d(3, 4, kernel, stride)
    x = torch.randn(2, 3, frames, 6, 6, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(my_causal_conv3d(conv, x), conv(x))
print("my_causal_conv3d matches CausalConv3d on 5 kernels and strides")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): 4n + 1 frames
# Write `my_latent_num_frames(num_frames, r=4)`, the latent frames of a causal VAE with temporal compression
# `r` (the first frame alone, then one latent per `r` frames), and `my_sample_num_frames(latent_frames, r=4)`,
# the video frames a latent video decodes to.


# %% nbgrader={"grade": false, "grade_id": "ch08_num_frames", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_latent_num_frames(num_frames, r=4):
    ### BEGIN SOLUTION
    return (num_frames - 1) // r + 1
    ### END SOLUTION


def my_sample_num_frames(latent_frames, r=4):
    ### BEGIN SOLUTION
    return r * (latent_frames - 1) + 1
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch08_num_frames_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_latent_num_frames is not lab_causal_vae.latent_num_frames
for r in (1, 2, 4, 8):
    for n in range(1, 40):
        assert my_latent_num_frames(n, r) == lab_causal_vae.latent_num_frames(n, r), (n, r)
        assert my_sample_num_frames(n, r) == lab_causal_vae.sample_num_frames(n, r), (n, r)
print("my_latent_num_frames and my_sample_num_frames match the library for r = 1, 2, 4, 8")

# %% [markdown] tags=["core"]
# ### Exercise 3 (3 points): the linear tile blend
# Write `my_blend(prev_tail, tile, extent, dim)`: return a copy of `tile` whose first $E$ entries along `dim`
# fade in over the last $E$ entries of `prev_tail`, $E = \min(\text{extent}$, both lengths along `dim`$)$:
# `tile[y] = prev_tail[-E + y] * (1 - y/E) + tile[y] * (y/E)` for $y < E$; the rest of `tile` unchanged.


# %% nbgrader={"grade": false, "grade_id": "ch08_blend", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_blend(prev_tail, tile, extent, dim):
    ### BEGIN SOLUTION
    out = tile.clone()
    e = min(prev_tail.shape[dim], tile.shape[dim], extent)
    if e <= 0:
        return out
    shape = [1] * tile.ndim
    shape[dim] = e
    w = (torch.arange(e, dtype=tile.dtype) / e).view(shape)
    a = prev_tail.narrow(dim, prev_tail.shape[dim] - e, e)
    out.narrow(dim, 0, e).copy_(a * (1 - w) + tile.narrow(dim, 0, e) * w)
    return out
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch08_blend_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(9)
for prev_shape, tile_shape, extent, dim in [
    ((1, 4, 3, 8, 6), (1, 4, 3, 8, 10), 4, 4),
    ((1, 4, 3, 5, 8), (1, 4, 3, 9, 8), 8, 3),
    ((2, 3, 6, 4, 4), (2, 3, 4, 4, 4), 2, 2),
    ((1, 2, 3, 4), (1, 2, 3, 4), 0, 3),
]:
    prev, tile = torch.randn(prev_shape, generator=gen), torch.randn(tile_shape, generator=gen)
    mine = my_blend(prev, tile.clone(), extent, dim)
    torch.testing.assert_close(mine, lab_tiling.blend(prev, tile.clone(), extent, dim))
print("my_blend matches tiling.blend along width, height and time")
