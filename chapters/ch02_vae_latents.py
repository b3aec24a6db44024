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
# # Chapter 02 — VAE latents
#
# *Where the denoising happens: an 8× smaller, 4-channel picture of each frame, made by a variational
# autoencoder. We load a tiny `AutoencoderKL` trained on the toy world, look inside its latents, and measure
# the famous 0.18215.*
#
# - **You will build**: encode/decode of toy portraits with a trained tiny VAE; the latent distribution
#   (mean, std, a sample); the scaling factor measured as 1/std; reference latents next to the random starting
#   latents of a video; frame-by-frame video encode/decode in chunks; a least-squares latent → RGB preview
# - **Library modules**: `anim_lab.vae`, `anim_lab.configs`, `anim_lab.toy`, `anim_lab.viz`
# - **Questions answered**: What is a latent, in shapes and in pictures? Mean or sample — which does the
#   reference image use, and how different are they? Why 0.18215, and how is the factor derived for any VAE?
#   How do the reference latents differ from the starting latents of a video? How is a long video encoded
#   without running out of memory? How good is the toy VAE, and what did its training cost?
# - **CPU runtime**: about 20 s of CPU time
#
# The toy VAE was trained by `scripts/train_toy_vae.py` (seed 0, 25 minutes on one CPU core, 5,275 steps); its
# weights ship with the package in `anim_lab/assets/toy_vae/` (diffusers layout) and load with
# `from_pretrained`.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import copy
import json

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from einops import rearrange

import anim_lab
from anim_lab import configs, metrics, toy, viz
from anim_lab import vae as V
from anim_lab.inspect import format_table

torch.manual_seed(0)
torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
np.set_printoptions(precision=3, suppress=True)
torch.set_printoptions(precision=3, sci_mode=False)
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")

# %% [markdown] tags=["core"]
# ## 1. Pixels in, latents out
#
# - `AutoencoderKL` (diffusers) is the VAE of Stable Diffusion: an encoder with 3 stride-2 downsamplings (8×)
#   to a 4-channel latent, and a decoder back. The toy VAE has the same blocks, narrower: channels
#   (16, 32, 64, 64).
# - Images are `(B, 3, H, W)` in [-1, 1]; latents are `(B, 4, H/8, W/8)`. A 128-px portrait becomes 4 × 16 ×
#   16 = 1024 numbers, 48× fewer than its 49,152 pixel values.

# %% tags=["core"]
vae = V.load_toy_vae()
print("block_out_channels:", vae.config.block_out_channels, " latent_channels:", vae.config.latent_channels)
print(
    "parameters:",
    f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M",
    f"(SD1.5's VAE: {sum(p.numel() for p in V.build_vae(configs.SD15.vae, 'meta').parameters()) / 1e6:.1f}M)",
)

rng = np.random.default_rng(0)
test_ids = list(toy.identity_split("test"))[:6]  # identities never seen in training
frames = [
    toy.render(
        toy.identity_from_seed(s),
        toy.HeadPose(yaw=rng.uniform(-20, 20), roll=rng.uniform(-8, 8)),
        toy.Expression(mouth_open=float(i % 2)),
        size=128,
    )[0]
    for i, s in enumerate(test_ids)
]
images = V.images_from_uint8(np.stack(frames))  # (6, H, W, 3) uint8 -> (6, 3, H, W) in [-1, 1]
with torch.no_grad():
    latents = V.encode(vae, images)  # (6, 3, 128, 128) -> (6, 4, 16, 16), mean, scaled
    recon = V.decode(vae, latents)  # (6, 4, 16, 16) -> (6, 3, 128, 128)
print(
    "images",
    tuple(images.shape),
    "-> latents",
    tuple(latents.shape),
    "-> reconstructions",
    tuple(recon.shape),
)
print("PSNR per image (dB):", metrics.psnr(recon, images).numpy().round(0))


# %% tags=["core"]
def to_01(x):  # (B, 3, H, W) in [-1, 1] -> list of (H, W, 3) in [0, 1]
    return list(rearrange((x.clamp(-1, 1) + 1) / 2, "b c h w -> b h w c").numpy())


err = [np.repeat(e[..., None], 3, -1) for e in (recon - images).abs().mean(1).clamp(0, 0.25).numpy() * 4]
fig = viz.image_grid(
    to_01(images) + to_01(recon) + err,
    ncols=6,
    figsize=(12, 6.3),
    titles=["original"] * 6 + ["reconstruction"] * 6 + ["|error| (x4)"] * 6,
    suptitle="Held-out toy portraits through the toy VAE (128 px -> 4 x 16 x 16 -> 128 px)",
)
viz.save(fig, "ch02_reconstructions")
plt.show()

# %% [markdown] tags=["core"]
# Colours, pose, hair, eyes and mouth come back. What error remains sits on edges and in textures: there the
# decoder draws detail that is plausible rather than pixel-exact, which is what it was trained for (section 6
# shows why a decoder trained on a pixel loss alone blurs instead).
#
# ## 2. A distribution, not a point: mean versus sample
#
# - The encoder outputs a diagonal Gaussian per latent value: `latent_dist.mean` $\mu$ and `latent_dist.std`
#   $\sigma$; a sample is $z = \mu + \sigma \odot \varepsilon$, $\varepsilon \sim \mathcal N(0, I)$.
# - Moore-AnimateAnyone is not consistent here. Its **training** scripts encode both the target frames and
#   the **reference image** with `latent_dist.sample() * 0.18215`; its **inference** pipelines encode the
#   reference with `latent_dist.mean * 0.18215`. So the ReferenceNet was trained on sampled reference latents
#   and runs on mean ones. How far apart are the two? Measured below.
# - Re-derive a sample by hand and check it against the library:

# %% tags=["core"]
with torch.no_grad():
    dist = V.encode_latent_dist(vae, images[:1])  # unscaled N(mean, std^2) over (1, 4, 16, 16)
    s = vae.config.scaling_factor
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(1))
    by_hand = (dist.mean + dist.std * eps) * s  # z = (mu + sigma * eps) * scaling_factor
    sample = V.encode(vae, images[:1], sample=True, generator=torch.Generator().manual_seed(1))
torch.testing.assert_close(by_hand, sample)
print("sample = (mean + std * eps) * scaling_factor: matches the library")
print("posterior std / spread of the means:", round(float(dist.std.mean() / dist.mean.std()), 3))
mean_scaled = dist.mean * s
print(
    f"|sample - mean| / |mean| (relative L2 of the scaled latents): "
    f"{float((sample - mean_scaled).norm() / mean_scaled.norm()):.2f}"
)
with torch.no_grad():
    psnr_mean = metrics.psnr(V.decode(vae, dist.mean * s), images[:1]).item()
    psnr_sample = metrics.psnr(V.decode(vae, sample), images[:1]).item()
print(f"PSNR decoding the mean: {psnr_mean:.0f} dB, decoding a sample: {psnr_sample:.0f} dB")

# %% [markdown] tags=["core"]
# The posterior is narrow: the KL weight in training is tiny (1e-6: SD's VAE uses the same coefficient, but
# on a reconstruction loss summed over each image's pixels, where the toy's loss (L1, section 6) is a mean
# over them, so relative to reconstruction the toy's KL weighs about 10⁴ times more: 3 × 64 × 64 = 12,288
# pixels per training crop). Still, the encoder is nearly deterministic and a sample is the mean plus a
# little noise (the relative difference above), too little to change the decoded image. The train/inference
# mismatch of the reference latents is therefore small for such a VAE; using the mean at inference removes
# that noise from the condition.
#
# ## 3. The scaling factor: why 0.18215
#
# - Diffusion mixes latents with unit Gaussian noise:
#   $$x_t = \sqrt{\bar\alpha_t}\, z + \sqrt{1 - \bar\alpha_t}\, \varepsilon, \qquad
#   \varepsilon \sim \mathcal N(0, I), \qquad \bar\alpha_t = \prod_{s \le t} (1 - \beta_s)$$
#   That mixing assumes `z` has unit variance; otherwise the noise schedule means something else.
# - The VAE's latents have whatever scale training gave them. The latent-diffusion authors measured the
#   standard deviation of SD's VAE latents on a batch of images, ≈ 5.49, and multiply by
#   **1 / 5.49 = 0.18215** (their `scale_by_std` option; the value is written in SD's `vae/config.json` as
#   `scaling_factor`).
# - The recipe works for any VAE: encode a dataset, take `1 / std`. Here on 128 training frames:

# %% tags=["core"]
train_ids = list(toy.identity_split("train"))[:128]
poses = [toy.HeadPose(yaw=rng.uniform(-25, 25), pitch=rng.uniform(-10, 10)) for _ in train_ids]
batch = np.stack(
    [
        toy.render(toy.identity_from_seed(i), p, toy.Expression(mouth_open=rng.uniform()), size=128)[0]
        for i, p in zip(train_ids, poses, strict=True)
    ]
)
train_images = V.images_from_uint8(batch)  # (128, 128, 128, 3) uint8 -> (128, 3, 128, 128)
with torch.no_grad():
    z = V.encode_latent_dist(vae, train_images).sample(generator=torch.Generator().manual_seed(0))  # unscaled
factor = 1 / z.flatten().std()  # the whole recipe: s = 1 / std(z)
torch.testing.assert_close(float(factor), V.scaling_factor_from_latents(z))
print(f"std of unscaled latents: {z.std():.2f} -> factor 1/std = {factor:.3f}")
print(
    f"factor stored in the toy VAE's config.json (measured on other frames): {vae.config.scaling_factor:.3f}"
)
print(f"std after scaling: {(z * vae.config.scaling_factor).std():.2f}")
print(f"SD: 1 / 0.18215 = {1 / 0.18215:.2f} is the std that was measured for SD's VAE")

# %% [markdown] tags=["core"]
# The toy VAE's latents have a std of about 1.2 already, so scaling shrinks them by only a sixth. To see the
# recipe at work, build a VAE whose latents are far from unit scale: the same weights, with the encoder's
# output (`quant_conv`) changed so that the mean is multiplied by 5.49, SD's std, and the log-variance is
# shifted by 2·ln 5.49 (so the std is multiplied by 5.49 too), and the decoder's input (`post_quant_conv`)
# divided by 5.49. It is the same autoencoder (the decoded images do not change), but its
# raw latents are 5.49× larger, as SD's are.

# %% tags=["core"]
k = 5.49
big = copy.deepcopy(vae)
with torch.no_grad():
    c = big.config.latent_channels
    big.quant_conv.weight[:c] *= k  # mean channels x k
    big.quant_conv.bias[:c] *= k
    big.quant_conv.bias[c:] += 2 * np.log(k)  # log-variance: std x k
    big.post_quant_conv.weight /= k  # the decoder sees the same input as before
    z_big = V.encode_latent_dist(big, train_images).sample(generator=torch.Generator().manual_seed(0))
    big.register_to_config(scaling_factor=V.scaling_factor_from_latents(z_big))
    torch.testing.assert_close(
        V.decode(big, V.encode(big, images)), V.decode(vae, V.encode(vae, images)), atol=1e-4, rtol=0
    )
print("same decoded images: True")
print(f"std of its unscaled latents: {z_big.std():.2f} -> factor {big.config.scaling_factor:.3f}")
print(f"std after scaling: {(z_big * big.config.scaling_factor).std():.2f}")

# %% tags=["core"]
fig, axes = plt.subplots(2, 2, figsize=(10, 5.6))
grid = np.linspace(-12, 12, 400)
for row, (latent, factor_k, name) in enumerate(
    ((z, vae.config.scaling_factor, "toy VAE"), (z_big, big.config.scaling_factor, "toy VAE, latents x 5.49"))
):
    for ax, data, title in (
        (axes[row, 0], latent, f"{name}: unscaled latents"),
        (axes[row, 1], latent * factor_k, f"{name}: scaled by {factor_k:.3f}"),
    ):
        for ch in range(4):
            ax.hist(
                data[:, ch].flatten().numpy(), bins=80, density=True, histtype="step", label=f"channel {ch}"
            )
        ax.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k--", label="N(0, 1)")
        ax.set_xlim(-12, 12)
        ax.set_title(title, fontsize=9)
axes[0, 1].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown] tags=["core"]
# The channels differ in centre and shape, but after scaling their overall spread matches the noise; for the
# 5.49× VAE the unscaled latents are far wider than the N(0, 1) the sampler starts from. What goes wrong
# without scaling: the signal-to-noise ratio at step t is
# $$\mathrm{SNR}(t) = \frac{\bar\alpha_t\, \mathrm{Var}(z)}{1 - \bar\alpha_t}.$$
# With SD's schedule at the last training step (t = 999), unit-variance latents are almost pure noise, as the
# sampler's starting point assumes; unscaled SD latents (std 5.49) would still be 30× stronger there, so
# "pure noise" at inference would never match what the UNet saw in training:

# %% tags=["core"]
sched = DDPMScheduler(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
)
ab = sched.alphas_cumprod
for t in (999, 800, 500):
    snr = ab[t] / (1 - ab[t])
    print(f"t={t}: SNR with scaled latents {snr:.4f}, with unscaled SD latents {snr * 5.49**2:.3f}")

# %% [markdown]
# ## 4. Reference latents versus the starting latents of a video
#
# - The **reference latents**: the reference image's *mean* latent × scaling factor, `(1, 4, h, w)`. They go
#   to the ReferenceNet (run once, at t = 0), never into the denoised video itself.
# - The **starting latents** of the video: pure Gaussian noise `(1, 4, F, h, w)` drawn with a `generator` (×
#   `init_noise_sigma` = 1 for DDIM). Nothing of the reference is in them.
# - After scaling both have unit spread; what differs is structure. Neighbouring latent pixels of an image are
#   strongly correlated; neighbouring noise values are not.

# %%
reference = latents[:1]  # (1, 4, 16, 16): mean * scaling_factor
num_frames = 8
start = torch.randn((1, 4, num_frames, 16, 16), generator=torch.Generator().manual_seed(0))  # (B, C, F, h, w)


def neighbour_corr(x):  # correlation of horizontally adjacent values, over all channels/frames
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


print(
    "reference latents",
    tuple(reference.shape),
    f"std {reference.std():.2f}",
    f"neighbour correlation {neighbour_corr(reference):.2f}",
)
print(
    "starting latents ",
    tuple(start.shape),
    f"std {start.std():.2f}",
    f"neighbour correlation is small: {abs(neighbour_corr(start)) < 0.1}",
)

# %%
with torch.no_grad():
    prev = V.LatentPreview.fit(V.encode(vae, train_images), train_images)  # a 4 -> 3 linear map
with torch.no_grad():
    noise_decoded = V.decode(vae, start[:, :, 0])  # what the decoder makes of pure noise
panels = [to_01(images[:1])[0]] + [(reference[0, c] / 6 + 0.5).clamp(0, 1).numpy() for c in range(4)]
panels += [to_01(prev(reference))[0], (start[0, 0, 0] / 6 + 0.5).clamp(0, 1).numpy(), to_01(noise_decoded)[0]]
titles = (
    ["image"]
    + [f"latent channel {c}" for c in range(4)]
    + ["linear preview", "start noise (ch 0)", "decode(noise)"]
)
fig = viz.image_grid(
    panels,
    titles=titles,
    ncols=8,
    figsize=(16, 2.6),
    suptitle="A reference latent (16 x 16 x 4), its linear RGB preview, and a video's starting noise",
)
viz.save(fig, "ch02_latents")
plt.show()

# %% [markdown]
# The latent channels are a blurred, recoloured image: SD's latents look the same way, which is why a fixed 4
# × 3 matrix gives rough but recognisable previews. `LatentPreview.fit` finds that matrix by least squares on
# (latent, 8×-downsampled image) pairs:

# %%
print("preview weights (latent channel -> R, G, B):\n", prev.weight.numpy().round(2))
with torch.no_grad():
    small = torch.nn.functional.adaptive_avg_pool2d(images, (16, 16))  # (6, 3, 16, 16), the target of the fit
    print(
        f"preview PSNR against the 16x16 image on held-out frames: "
        f"{metrics.psnr(prev(latents), small).mean():.0f} dB"
    )

# %% [markdown]
# ## 5. Videos, frame by frame and in chunks
#
# - A 2D VAE treats frames independently: `(B, 3, F, H, W)` → `(B·F, 3, H, W)` → encode → `(B, 4, F, h, w)`.
# - Long videos are split into chunks of frames so that memory stays bounded. Moore-AnimateAnyone decodes one
#   frame per call; diffusers' AnimateDiff 16 per call. The result must not depend on the chunk size:

# %%
clip = toy.make_clip(toy.identity_from_seed(test_ids[0]), num_frames=num_frames, size=128, seed=3)
video = toy.images_to_tensor(clip.frames)[None]  # (1, 3, F, 128, 128) in [-1, 1]
with torch.no_grad():
    video_latents = V.encode_video(vae, video, chunk_size=3)  # (1, 3, 8, 128, 128) -> (1, 4, 8, 16, 16)
    one_by_one = V.encode_video(vae, video, chunk_size=1)
    decoded = V.decode_video(vae, video_latents, chunk_size=4)  # -> (1, 3, 8, 128, 128)
print(
    "video", tuple(video.shape), "-> latents", tuple(video_latents.shape), "-> decoded", tuple(decoded.shape)
)
print("chunk size 3 equals chunk size 1:", torch.allclose(video_latents, one_by_one, atol=1e-5))
per_frame = metrics.psnr(
    rearrange(decoded, "b c f h w -> (b f) c h w"), rearrange(video, "b c f h w -> (b f) c h w")
)
print(f"PSNR over the clip: min {per_frame.min():.0f} dB, mean {per_frame.mean():.0f} dB")

# %%
strip = to_01(rearrange(video[:, :, ::2], "b c f h w -> (b f) c h w")) + to_01(
    rearrange(decoded[:, :, ::2], "b c f h w -> (b f) c h w")
)
fig = viz.image_grid(
    strip,
    titles=[f"frame {i}" for i in range(0, num_frames, 2)] * 2,
    ncols=4,
    figsize=(8, 4.4),
    suptitle="A toy clip (top) and its frame-by-frame reconstruction (bottom)",
)
plt.show()

# %% [markdown]
# ## 6. Why a pixel loss blurs, and the second toy VAE
#
# The first toy VAE (v1, which the first toy animator was trained with and decoded with) learned with MSE +
# 0.1·L1 + 1e-6·KL. Its held-out PSNR was 29.8 dB, yet its faces were pale and soft: teeth, irises and the
# hair's edge went missing. PSNR did not see it, because **a squared error rewards blur**. Where the 16 × 16
# latent cannot say exactly where an edge lies, the decoder's best answer under MSE is the *average* of the
# places it could be, a ramp; a sharp edge one pixel off costs more. The smallest case, an edge at one of four
# positions:

# %%
edges = np.stack([(np.arange(16) >= 6 + k).astype(float) for k in range(4)])  # 4 equally likely sharp edges
mean_edge = edges.mean(0)  # what minimises the expected squared error: the average, a 4-px ramp
mse = lambda guess: float(((edges - guess) ** 2).mean())  # noqa: E731  expected over the 4 positions
print("expected MSE of the averaged (blurred) edge:", f"{mse(mean_edge):.4f}")
print("expected MSE of a sharp edge at one of the positions:", f"{min(mse(e) for e in edges):.4f}")

# %% [markdown]
# The blur is the optimum of the loss, not a lack of training. Stable Diffusion's autoencoder (Esser et al.
# 2021; Rombach et al. 2022) adds two terms that make the blurred answer expensive:
#
# - a **patch discriminator** that tells real patches from reconstructed ones, with the hinge loss; a ramp
#   where the data only has steps is easy to spot, so the decoder is pushed to commit to one sharp edge;
# - an **adaptive weight** for that adversarial term, the ratio of the reconstruction loss's and the
#   adversarial loss's gradient norms at the decoder's last layer, so that neither drowns the other; the
#   discriminator starts after a warm-up (here it trains alone for a while before the decoder hears it);
# - and a perceptual loss on a pretrained network's features, which cannot be downloaded here: features of
#   the toy image encoder did not help (the A/B in `scripts/train_toy_vae.py`), so v2 does without.
#
# v2 is the same architecture and latent shape (4 × 16 × 16 at 128 px), started from v1's weights and trained
# 150 minutes on one core with L1 + 1e-6·KL + the discriminator, keeping an EMA of the weights. Both side by
# side on this chapter's six held-out frames:

# %%
vae_v1 = V.load_vae(anim_lab.REPO_DIR / "history" / "toy_vae_v1")  # v1, kept beside the package
with torch.no_grad():
    recon_v1 = V.decode(vae_v1, V.encode(vae_v1, images)).clamp(-1, 1)
rows = []
for name, rec in (("v1 (MSE + L1)", recon_v1), ("v2 (L1 + discriminator)", recon.clamp(-1, 1))):
    rows.append(
        [
            name,
            f"{metrics.psnr(rec, images).mean():.1f}",
            f"{metrics.sharpness_ratio(rec, images):.2f}",
            f"{metrics.colour_error(rec, images).mean():.1f}",
        ]
    )
print(format_table(rows, ["6 held-out frames", "PSNR dB", "sharpness / truth", "colour error (levels)"]))
crop = (slice(None), slice(None), slice(30, 94), slice(32, 96))  # the face's middle: eyes, nose, mouth
fig = viz.image_grid(
    to_01(images[:3][crop]) + to_01(recon_v1[:3][crop]) + to_01(recon[:3][crop]),
    ncols=3,
    figsize=(7, 7.4),
    titles=["original"] * 3 + ["v1 (MSE + L1)"] * 3 + ["v2 (L1 + discriminator)"] * 3,
    suptitle="The middle of three held-out faces, 64 x 64 px of the 128-px frames",
)
viz.save(fig, "ch02_v1_vs_v2")
plt.show()

# %% [markdown]
# On 64 held-out renders (`scripts/eval_toy_vae.py`, the committed `results/toy_vae.json`), with mediapipe's
# face mesh run on the reconstructions upscaled to 256 px:

# %%
scores = json.loads((anim_lab.REPO_DIR / "results" / "toy_vae.json").read_text())["rows"]
columns = ["psnr", "ssim", "sharpness", "colour", "face_colour", "detect", "face_px"]
print(
    format_table(
        [[name] + ["-" if r[c] is None else f"{r[c]:.2f}" for c in columns] for name, r in scores.items()],
        ["64 renders", "PSNR dB", "SSIM", "sharpness", "colour", "face colour", "faces found", "landmark px"],
    )
)

# %% [markdown]
# - v2 keeps 0.95 of the renders' fine detail where v1 kept a third, at a slightly *higher* PSNR, and cuts
#   the face's colour drift from 6.3 to 3.9 levels; mediapipe finds every face in both, and places its
#   landmarks on v2's faces 2.5 px from the truth, against 4.0 px on v1's and 2.1 px on the renders
#   themselves (its own error).
# - Look closely at the skin in the pictures above: where the renders have a faint grain, v2 draws a regular
#   pattern of dots, the usual artefact of an adversarial decoder (detail that is plausible, not exact). The
#   sharpness ratio counts any fine detail, so it cannot tell the two apart; the eyes and teeth it restores
#   are real, the dots are not.
# - A VAE cannot be swapped under a trained animator: its UNets learned one VAE's latents. The toy animator
#   was retrained on v2's (chapter 10; its `COMMANDS.md`), and decodes with v2.
#
# **What v2 cost.** The training script logs every evaluation (EMA weights) in `train_log.json` beside the
# weights:

# %%
log = json.loads((V.TOY_VAE_DIR / "train_log.json").read_text())
curve = log["curve"]
print(
    f"{log['n_params'] / 1e6:.2f}M parameters, batch {log['batch_size']} crops of {log['crop']} px, "
    f"{log['final']['minutes']:.0f} minutes, {log['final']['step']} steps; final held-out PSNR "
    f"{log['final']['psnr']:.2f} dB, sharpness {log['final']['sharpness']:.3f}"
)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
minutes = [c["minutes"] for c in curve]
ax1.plot(minutes, [c["psnr"] for c in curve], "o-", ms=3)
ax1.axhline(28, color="red", ls="--", lw=0.8, label="target 28 dB")
ax1.set_ylabel("held-out PSNR (dB)")
ax2.plot(minutes, [c["sharpness"] for c in curve], "o-", ms=3)
ax2.axhline(0.8, color="red", ls="--", lw=0.8, label="target 0.8")
ax2.set_ylabel("sharpness / ground truth")
for ax in (ax1, ax2):
    ax.set_xlabel("training minutes (1 CPU core)")
    ax.legend()
fig.tight_layout()
viz.save(fig, "ch02_training_curve")
plt.show()

# %% [markdown] tags=["core"]
# ## Summary
#
# - A VAE turns `(B, 3, H, W)` images in [-1, 1] into `(B, 4, H/8, W/8)` latents; videos go through it frame
#   by frame, `(B, C, F, H, W)` ↔ `(B·F, C, H, W)`, in chunks that bound memory without changing the result.
# - The encoder gives a Gaussian; with a tiny KL weight it is narrow, and pipelines encode the reference with
#   its **mean**. Training the UNet uses samples.
# - The **scaling factor is 1 / std** of the latents over a dataset: 0.18215 for SD's VAE (std 5.49), our own
#   value for the toy VAE, stored in `config.json`. It makes latents match the unit noise of the diffusion
#   schedule.
# - Reference latents and starting latents have the same spread but nothing else in common: the first are a
#   small blurred picture, the second are independent noise; the reference reaches the video only through the
#   UNets.
# - A 4 × 3 least-squares map previews latents as RGB without a decoder.
#
# ## Exercises
#
# 1. Measure the factor with posterior *means* instead of samples. How much does it change, and why so little?
# 2. Encode a frame, shift its latent by one latent pixel, decode. What moves, and by how many image pixels?
# 3. Decode a linear interpolation between the latents of two identities. Is the midpoint a face, or a
#    cross-fade of two faces?
# 4. How stable is the measured factor? Measure it on 16 frames and on held-out identities instead of 128
#    training frames.
# 5. SD's VAE at 512 × 512 gives `(1, 4, 64, 64)` latents: build it on the meta device with
#    `V.build_vae(configs.SD15.vae, "meta")` and trace the shapes of `encode_video` on a 24-frame video.
#
# ## Solutions
#
# **1.** $\mathrm{Var}(z) = \mathrm{Var}(\mu) + \mathbb E[\sigma^2]$, and $\sigma$ is tiny next to the spread
# of $\mu$ (section 2), so the two factors almost agree:

# %%
with torch.no_grad():
    z_means = V.encode_latent_dist(vae, train_images).mean
print(f"factor from samples {factor:.3f}, from means {1 / z_means.std():.3f}")

# %% [markdown]
# **2.** One latent pixel is 8 image pixels: the decoded face moves by 8 px (the best-matching shift of the
# decoded image). `torch.roll` wraps around, so the latent column that leaves on the right comes back on the
# left; the comparison leaves out 16 px at each side.

# %%
with torch.no_grad():
    lat0 = latents[:1]  # (1, 4, 16, 16)
    moved = V.decode(vae, torch.roll(lat0, shifts=1, dims=-1))  # one latent pixel to the right
    base = V.decode(vae, lat0)
errors = {
    dx: float((moved[..., 16:-16] - torch.roll(base, shifts=dx, dims=-1)[..., 16:-16]).abs().mean())
    for dx in range(0, 13)
}
print("best-matching image shift (px):", min(errors, key=errors.get))

# %% [markdown]
# **3.** The midpoint of two identities' latents decodes to something between a face and a cross-fade:
# compare it with the pixel average of the two images and with each of the two.

# %%
with torch.no_grad():
    a, b = latents[0:1], latents[1:2]
    mids = torch.cat([V.decode(vae, (1 - w) * a + w * b) for w in (0.0, 0.25, 0.5, 0.75, 1.0)])
    mid = mids[2:3]
print(
    "PSNR(midpoint, pixel average of the two images):",
    f"{metrics.psnr(mid, (images[0:1] + images[1:2]) / 2).item():.0f} dB",
)
print(
    f"PSNR(midpoint, image A): {metrics.psnr(mid, images[0:1]).item():.0f} dB, "
    f"(midpoint, image B): {metrics.psnr(mid, images[1:2]).item():.0f} dB"
)
fig = viz.image_grid(to_01(mids), titles=["A", "0.25", "0.5", "0.75", "B"], figsize=(10, 2.4))
plt.show()

# %% [markdown]
# Latent interpolation of such a small VAE is close to a cross-fade (double contours where the two heads
# differ): the latent is a blurred, recoloured image (section 4), so mixing latents mixes pictures. A
# generative model is needed to make the in-between a single plausible face.
#
# **4.** The factor is a statistic of the data: 16 training frames give it to within 0.004 of 128 frames,
# but 6 frames of one held-out clip (one identity, one background, strongly correlated) are about 5% off:

# %%
with torch.no_grad():
    z16 = V.encode_latent_dist(vae, train_images[:16]).sample(generator=torch.Generator().manual_seed(0))
    z_test = V.encode_latent_dist(vae, images).sample(generator=torch.Generator().manual_seed(0))
print(
    f"128 training frames {factor:.3f} | 16 training frames {V.scaling_factor_from_latents(z16):.3f} | "
    f"6 held-out frames {V.scaling_factor_from_latents(z_test):.3f}"
)

# %% [markdown]
# **5.** On the meta device the whole video path runs without memory:

# %%
sd_vae = V.build_vae(configs.SD15.vae, "meta")
sd_video = torch.empty(1, 3, 24, 512, 512, device="meta")  # (B, 3, F, H, W)
sd_latents = V.encode_video(sd_vae, sd_video, chunk_size=8)  # 3 calls of 8 frames
print("video", tuple(sd_video.shape), "-> latents", tuple(sd_latents.shape))
print("decoded back:", tuple(V.decode_video(sd_vae, sd_latents, chunk_size=1).shape))

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from anim_lab import toy as lab_toy
from anim_lab import vae as lab_vae

# %% [markdown] tags=["core"]
# ### Exercise 1 (2 points): model output back to pictures
# Write `my_images_to_uint8(images)`: model output `(..., 3, H, W)` in [-1, 1] (values outside are clamped) to
# uint8 pictures `(..., H, W, 3)`, a numpy array, rounded to the nearest integer: the inverse of
# $x / 127.5 - 1$.


# %% nbgrader={"grade": false, "grade_id": "ch02_images_to_uint8", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_images_to_uint8(images):
    ### BEGIN SOLUTION
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()  # (..., 3, H, W) -> (..., H, W, 3)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch02_images_to_uint8_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_images_to_uint8 is not lab_vae.images_to_uint8
gen = torch.Generator().manual_seed(2)
for shape in [(1, 3, 8, 8), (2, 3, 5, 7), (3, 5, 3, 4, 6), (3, 16, 16)]:
    images = torch.randn(shape, generator=gen) * 0.7  # some values outside [-1, 1]
    mine = my_images_to_uint8(images)
    assert isinstance(mine, np.ndarray) and mine.dtype == np.uint8, type(mine)
    np.testing.assert_array_equal(mine, lab_vae.images_to_uint8(images))
print("my_images_to_uint8 matches vae.images_to_uint8 on 4 shapes")

# %% [markdown] tags=["core"]
# ### Exercise 2 (3 points): a sample of the latent distribution
# The encoder outputs `parameters` `(B, 2C, h, w)`: the mean on the first C channels, the log-variance on the
# last C. Write `my_sample_latents(parameters, generator)`: the log-variance clamped to [-30, 20], then
# mean + std · ε with ε ~ N(0, I) drawn by `torch.randn(mean.shape, generator=generator)` (that exact call,
# so that the draw is the library's).


# %% nbgrader={"grade": false, "grade_id": "ch02_sample_latents", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_sample_latents(parameters, generator):
    ### BEGIN SOLUTION
    mean, logvar = parameters.chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch02_sample_latents_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(3)
for shape in [(1, 8, 4, 4), (2, 8, 3, 5), (4, 2, 6, 6)]:
    parameters = torch.randn(shape, generator=gen) * 3
    expected = DiagonalGaussianDistribution(parameters).sample(generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(my_sample_latents(parameters, torch.Generator().manual_seed(9)), expected)
print("my_sample_latents matches diffusers' DiagonalGaussianDistribution.sample on 3 shapes")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# Section 3 measured the scaling factor on latent *samples*. Measure it on the latent *means* instead: render
# the first 8 training identities (`toy.identity_split("train")`) in the neutral pose at 128 px, encode them
# with the toy VAE (`vae.load_toy_vae()`, `vae.encode_latent_dist(...).mean`, unscaled) and store
# $1/\text{std}$ in `factor_from_means` (a float).

# %% nbgrader={"grade": false, "grade_id": "ch02_factor_from_means", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_toy_vae = lab_vae.load_toy_vae()
ids = list(lab_toy.identity_split("train"))[:8]
frames = np.stack([lab_toy.render(lab_toy.identity_from_seed(i), size=128)[0] for i in ids])
with torch.no_grad():
    means = lab_vae.encode_latent_dist(lab_toy_vae, lab_vae.images_from_uint8(frames)).mean
factor_from_means = lab_vae.scaling_factor_from_latents(means)
### END SOLUTION
print(f"scaling factor from the latent means: {factor_from_means:.3f}")

# %% nbgrader={"grade": true, "grade_id": "ch02_factor_from_means_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(factor_from_means, float) and factor_from_means > 0
### BEGIN HIDDEN TESTS
_vae = lab_vae.load_toy_vae()
_frames = np.stack(
    [
        lab_toy.render(lab_toy.identity_from_seed(i), size=128)[0]
        for i in list(lab_toy.identity_split("train"))[:8]
    ]
)
with torch.no_grad():
    _means = lab_vae.encode_latent_dist(_vae, lab_vae.images_from_uint8(_frames)).mean
assert abs(factor_from_means / lab_vae.scaling_factor_from_latents(_means) - 1) < 0.01
### END HIDDEN TESTS
print("factor_from_means is a positive float")
