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
# # Chapter 07 — Guidance, the sampler, and context windows
#
# *The pieces of the denoising loop around the networks: classifier-free guidance and the dropout that trains
# it, the DDIM sampler exactly as the official configs build it, and the overlapping windows that let a
# 32-frame motion module denoise a video of any length.*
#
# - **You will build**: a CFG step on a video UNet and its combine by hand, the training-time dropout next to
#   the inference-time zeros, the row mask of the CFG batch, one DDIM step by hand, the SNR curves of four
#   schedules, the windows of a 64-frame video with their counter, the averaging bug measured, and the CFG
#   sweep (1 / 2 / 3.5 / 5 / 7) on the trained toy animator as pictures and a metric table
# - **Library modules**: `anim_lab.guidance` (`cfg_batch`, `cfg_encoder_hidden_states`, `cfg_combine`,
#   `draw_uncond`, `draw_hallo_uncond`, `build_scheduler`, `set_timesteps`,
#   `convert_prediction`), `anim_lab.context` (`context_windows`, `window_counter`, `predict_in_windows`),
#   `anim_lab.unet`, `anim_lab.clip`, `anim_lab.inspect`, `anim_lab.toy`
#   (`load_animator`); `scripts/eval_animator.py` (held-out cases, `score`, the metric table)
# - **Questions answered**: Is CFG more than arithmetic on two predictions, and why does it double the UNet's
#   cost? Why are zeros the unconditional embedding, and what did the training-time dropout really feed? Which
#   rows of the CFG batch see the reference? Why does zero terminal SNR need v-prediction and trailing
#   timesteps — how much signal is left at t = 999 under each schedule, and what does ε-prediction give at
#   SNR 0? How do linear and scaled_linear betas differ, and what does their mismatch do? Which frames does
#   each window of a 64-frame video cover, and why must overlapping predictions be averaged? What does the
#   guidance scale do to a trained model's videos, and which scale do the metrics prefer?
# - **CPU runtime**: about 25 s
#
# Facts about the reference code come from `implementations.md` §1.6, §1.7, §1.9, §1.10 and §3 of the shared
# reference notes. Sections 1–8 use the TINY preset with random weights: they are about the loop, not about
# what a trained model draws. Section 9 sweeps the guidance scale on the trained toy animator.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import random
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
import diffusers
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from diffusers.utils import logging as diffusers_logging
from einops import rearrange
from transformers.utils import logging as transformers_logging

import anim_lab
from anim_lab import clip as C
from anim_lab import toy
from anim_lab.configs import TINY
from anim_lab.context import context_windows, predict_in_windows, window_counter
from anim_lab.guidance import (
    DDIM_ETA,
    DDIM_INFERENCE_V1,
    DDIM_OFFICIAL,
    build_scheduler,
    cfg_batch,
    cfg_combine,
    cfg_encoder_hidden_states,
    convert_prediction,
    do_classifier_free_guidance,
    draw_hallo_uncond,
    draw_uncond,
    drop_condition,
    hallo_uncond_tokens,
    set_timesteps,
)
from anim_lab.inspect import count_flops, format_table
from anim_lab.motion import MOTION_TINY
from anim_lab.toy import load_animator
from anim_lab.unet import VideoUNet
from anim_lab.viz import image_grid, save

torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is as fast, and steady on a busy machine
torch.set_grad_enabled(False)  # inference only
diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()  # no "Loading weights" bars on stderr
torch.set_printoptions(precision=3, sci_mode=False)
np.set_printoptions(precision=3, suppress=True)
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
print(f"matplotlib {matplotlib.__version__}")


# %% [markdown] tags=["core"]
# ## 1. CFG is arithmetic on two predictions
#
# The denoising UNet predicts the same quantity twice — once with the conditions, once without — and the
# sampler uses an extrapolation of the two:
#
# $$\hat v = v_\varnothing + s\,(v_c - v_\varnothing) = s\,v_c + (1-s)\,v_\varnothing$$
#
# - $s = 1$ is the conditional prediction alone, $s = 0$ the unconditional one, $s = 3.5$ (the official
#   default) goes 2.5 times *past* the conditional prediction, away from the unconditional one.
# - The two predictions come from **one** UNet call on a doubled batch: rows `[0, B)` unconditional, rows
#   `[B, 2B)` conditional, in that order, as `torch.cat([uncond, cond])` in the reference.
# - A TINY video UNet with random weights — every weight nonzero, so that the motion modules mix frames:


# %% tags=["core"]
def randomise_zero_weights(module, std=0.1):
    """Give the zero-initialised weights (motion proj_out, norm biases) random values."""
    for p in module.parameters():
        if p.abs().max() == 0:
            p.normal_(0, std)
    return module


unet = randomise_zero_weights(VideoUNet(TINY.unet, MOTION_TINY).eval())
B, F = 1, 16
latents = torch.randn(B, 4, F, 8, 8)  # (B, C, F, h, w)
tokens = torch.randn(B, 1, TINY.unet["cross_attention_dim"])  # one CLIP image token per video
t = 500
noise_pred = unet(cfg_batch(latents), t, cfg_encoder_hidden_states(tokens))  # (2B, 4, F, h, w)
guided = cfg_combine(noise_pred, guidance_scale=3.5)  # (B, 4, F, h, w)
print("CFG batch in:", tuple(cfg_batch(latents).shape), "-> predictions", tuple(noise_pred.shape))
print("guided prediction:", tuple(guided.shape))

# %% [markdown] tags=["core"]
# The combine by hand, in both ways of writing it, against the library:

# %% tags=["core"]
v_uncond, v_cond = noise_pred[:B], noise_pred[B:]
torch.testing.assert_close(guided, v_uncond + 3.5 * (v_cond - v_uncond))
torch.testing.assert_close(guided, 3.5 * v_cond + (1 - 3.5) * v_uncond)
torch.testing.assert_close(cfg_combine(noise_pred, 1.0), v_cond)
print("combine by hand == cfg_combine: True")
print("guidance on for s = 1.0 / 3.5:", do_classifier_free_guidance(1.0), do_classifier_free_guidance(3.5))

# %% [markdown] tags=["core"]
# **Why it doubles the cost.** The unconditional rows are full rows of the batch: every convolution and every
# attention runs on them. Counted on the meta device (no arithmetic, exact FLOPs):

# %% tags=["core"]
with torch.device("meta"):
    meta_unet = VideoUNet(TINY.unet, MOTION_TINY)
x_meta = torch.empty(B, 4, F, 8, 8, device="meta")
e_meta = torch.empty(B, 1, TINY.unet["cross_attention_dim"], device="meta")
t_meta = torch.full((B,), t, device="meta")
one = count_flops(meta_unet, x_meta, t_meta, e_meta)
two = count_flops(meta_unet, cfg_batch(x_meta), cfg_batch(t_meta), cfg_encoder_hidden_states(e_meta))
print(f"FLOPs with CFG / without: {two / one:.3f}")

# %% [markdown] tags=["core"]
# - Exactly 2: the batch dimension multiplies every layer. Running the two halves as two calls costs the same
#   FLOPs; batching only saves kernel launches. This is why the reference turns CFG off for
#   `guidance_scale <= 1` (`do_classifier_free_guidance`): there the extrapolation would add nothing.
# - Strong guidance inflates the prediction: its standard deviation grows with $s$. Lin et al. (2023, §3.4)
#   rescale it back towards the conditional prediction's,
#   $\hat v \leftarrow \varphi\,\hat v\,\sigma(v_c)/\sigma(\hat v) + (1-\varphi)\,\hat v$
#   (`guidance_rescale`; the official configs leave it at 0):

# %% tags=["core"]
scales = np.linspace(0, 8, 17)
std_plain = [float(cfg_combine(noise_pred, s).std()) for s in scales]
std_rescaled = [float(cfg_combine(noise_pred, s, guidance_rescale=0.7).std()) for s in scales]
print("std of the guided prediction at s = 0, 1, 3.5, 8:", [round(std_plain[i], 2) for i in (0, 2, 7, 16)])
print("... with guidance_rescale = 0.7:", [round(std_rescaled[i], 2) for i in (0, 2, 7, 16)])
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(scales, std_plain, "o-", label="plain CFG")
ax.plot(scales, std_rescaled, "s-", label="guidance_rescale = 0.7")
ax.axhline(float(v_cond.std()), color="grey", ls=":", label="std of the conditional prediction")
ax.set_xlabel("guidance_scale s")
ax.set_ylabel("std of the guided prediction")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "ch07_cfg_scale")
plt.show()

# %% [markdown] tags=["core"]
# ## 2. The unconditional embedding: zeros at inference, something else in training
#
# CFG needs a network that knows how to predict *without* the condition, so training drops it now and then.
# The reference (`train_stage_1.py` / `train_stage_2.py`, `uncond_ratio = 0.1`) flips **one coin per step**
# for the whole batch, `random.random() < 0.1`; on heads it
#
# - replaces the **CLIP input pixels** (already normalised) by zeros, *before* the image encoder, and
# - skips the ReferenceNet, so the denoising UNet's bank is empty.
#
# Inference instead feeds **zero tokens** (`torch.zeros_like(clip_tokens)`). With the toy world's image
# encoder, the two unconditional tokens side by side:

# %% tags=["core"]
image_encoder = C.load_toy_image_encoder()
preprocess = C.ClipPreprocess(size=160, crop_size=96)  # the toy CLIP's processor settings (chapter 03)
rng = np.random.default_rng(0)
portraits = np.stack(
    [
        toy.render(toy.identity_from_seed(int(s)), toy.HeadPose(yaw=rng.uniform(-20, 20)), size=128)[0]
        for s in rng.integers(0, 10_000, 8)
    ]
)  # (8, 128, 128, 3) uint8
images = torch.from_numpy(portraits).permute(0, 3, 1, 2).float() / 127.5 - 1  # (8, 3, 128, 128) in [-1, 1]
pixel_values = preprocess(images)  # (8, 3, 96, 96), CLIP-normalised
cond_tokens = C.image_embeds_to_tokens(image_encoder(pixel_values=pixel_values).image_embeds)  # (8, 1, 64)
dropped = drop_condition(pixel_values[:1], drop=True)  # what a dropped training step feeds the encoder
trained_uncond = C.image_embeds_to_tokens(image_encoder(pixel_values=dropped).image_embeds)  # (1, 1, 64)
inference_uncond = cfg_encoder_hidden_states(cond_tokens[:1])[:1]  # (1, 1, 64): zeros
ratio = trained_uncond.norm() / cond_tokens.norm(dim=-1).mean()
cosine = C.cosine_similarity(trained_uncond[0, 0], cond_tokens[:, 0]).mean()
print("inference uncond token is all zeros:", bool((inference_uncond == 0).all()))
print(f"training uncond token image_encoder(0 px): norm {ratio:.2f} x a portrait's, mean cosine {cosine:.2f}")

# %% [markdown] tags=["core"]
# What a cross-attention layer makes of each: with one token the softmax has a single entry, so every position
# receives `to_out(to_v(token))` — a constant, the same for every image. SD's `to_k`/`to_v` have no bias, so a
# zero token gives exactly `to_out`'s bias: a context that says nothing. That is why zeros serve as
# "unconditional". But the network was trained on the *other* constant:

# %% tags=["core"]
torch.manual_seed(0)
attn2 = Attention(query_dim=32, cross_attention_dim=64, heads=4, dim_head=8).eval()  # a toy-sized attn2
queries = torch.randn(1, 64, 32)  # (B, h*w, C) UNet features


def attend(context):
    return attn2(queries, encoder_hidden_states=context)  # (1, 64, 32)


gap = (attend(trained_uncond) - attend(inference_uncond)).norm()
between = torch.stack(
    [
        (attend(cond_tokens[i : i + 1]) - attend(cond_tokens[j : j + 1])).norm()
        for i in range(8)
        for j in range(i)
    ]
).mean()
torch.testing.assert_close(attend(inference_uncond), attn2.to_out[0].bias.expand(1, 64, 32))
print("zero token -> to_out bias at every position: True")
print(f"train/inference uncond gap, relative to the gap between two portraits: {gap / between:.2f}")

# %% [markdown] tags=["core"]
# - Both unconditional contexts carry no image, so CFG still contrasts "this person" with "nobody". But at
#   inference the unconditional rows see a context they never saw in training — a train/inference gap the
#   reference lives with (users report colour shifts, Moore-AnimateAnyone #102). On this random attention
#   layer the gap is more than half the difference between two portraits (the ratio printed above).
# - **Hallo** is consistent: stage 1 zeroes the 512-d face embedding *before* its `image_proj`, and inference
#   feeds `image_proj(zeros)` — the projection of zeros (Linear → 4 tokens → LayerNorm), not zero tokens:

# %% tags=["core"]
torch.manual_seed(0)


class ImageProj(torch.nn.Module):
    """Hallo's ImageProjModel structure: Linear(512 -> 4 * D), 4 tokens, LayerNorm."""

    def __init__(self, dim=32):
        super().__init__()
        self.proj, self.norm = torch.nn.Linear(512, 4 * dim), torch.nn.LayerNorm(dim)
        torch.nn.init.normal_(self.norm.bias)

    def forward(self, face_emb):  # (B, 512) -> (B, 4, D)
        return self.norm(rearrange(self.proj(face_emb), "b (n d) -> b n d", n=4))


image_proj = ImageProj()
face_emb = torch.randn(1, 512)  # an ArcFace embedding
hallo_uncond = hallo_uncond_tokens(image_proj, face_emb)
print("Hallo uncond tokens:", tuple(hallo_uncond.shape), "| all zero:", bool((hallo_uncond == 0).all()))

# %% [markdown] tags=["core"]
# Hallo's stage 2 drops the image (skip the ReferenceNet; the face embedding stays) and the audio (zero audio
# tokens after `audio_proj`) with **two independent coins** at 0.05 each; its config also names an
# `uncond_ia_ratio` of 0.05 for "both", which the code never reads. Counted over 40 000 steps:

# %% tags=["core"]
rng_train = random.Random(0)
moore = np.mean([draw_uncond(rng_train, 0.1) for _ in range(40_000)])
print(f"Moore-AnimateAnyone, unconditional steps: {moore:.3f} (uncond_ratio 0.1)")
rows = []
for faithful in (True, False):
    draws = np.array([draw_hallo_uncond(rng_train, faithful=faithful) for _ in range(40_000)])
    image, audio = draws[:, 0], draws[:, 1]
    rows.append(
        [
            "two coins (the code)" if faithful else "exclusive (the config names)",
            f"{(image & ~audio).mean():.3f}",
            f"{(audio & ~image).mean():.3f}",
            f"{(image & audio).mean():.4f}",
        ]
    )
print(format_table(rows, ["Hallo stage 2", "image only", "audio only", "both"]))

# %% [markdown] tags=["core"]
# ## 3. Which rows see the reference
#
# In the reference's denoising UNet, self-attention of the conditional rows attends to the frame's own tokens
# **and** the ReferenceNet's bank; the unconditional rows (`uc_mask`, the first half of the batch) attend to
# their own tokens only. So the uncond rows lose both the CLIP token and the reference appearance, and CFG
# guides the two together. Chapter 05 builds the real processors; here the rule on one attention layer, with
# the first half of the batch as the mask:

# %% tags=["core"]
torch.manual_seed(0)
attn1 = Attention(query_dim=32, heads=4, dim_head=8).eval()
hidden = torch.randn(2 * B, 64, 32)  # (2B, h*w, C) the CFG batch's features
mask = torch.arange(2 * B) < B  # (2B,) True for the unconditional rows, the first half


def reference_self_attention(hidden, bank):
    """Cond rows: keys/values = own tokens + bank; uncond rows: own tokens only."""
    with_ref = attn1(hidden, encoder_hidden_states=torch.cat([hidden, bank.expand_as(hidden)], dim=1))
    plain = attn1(hidden)
    return torch.where(mask[:, None, None], plain, with_ref)


out_a = reference_self_attention(hidden, torch.randn(1, 64, 32))
out_b = reference_self_attention(hidden, torch.randn(1, 64, 32))  # another reference image
changed = (out_a - out_b).flatten(1).norm(dim=1) > 1e-3
print("row mask (True = uncond):", mask.tolist())
print("rows whose output depends on the reference:", changed.tolist())

# %% [markdown] tags=["core"]
# - The reference still runs the ReferenceNet on **two** copies of the reference latent
#   (`ref_latents.repeat(2)`). The uncond half is read, then thrown away: every row's first `attn1` call
#   attends to the bank, and the uncond rows' results are replaced by self-attention alone.
#
# ## 4. Zero terminal SNR: why v-prediction and trailing timesteps
#
# Training noises a latent as $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ with
# $\mathrm{SNR}(t) = \bar\alpha_t / (1-\bar\alpha_t)$. Sampling starts from pure noise. If
# $\bar\alpha_{999} > 0$, training never showed the network pure noise — at its last step a trace of $x_0$
# was still there. The official inference config (`inference_v2.yaml`):

# %% tags=["core"]
print({k: DDIM_OFFICIAL[k] for k in ("beta_schedule", "prediction_type", "rescale_betas_zero_snr")})
print({k: DDIM_OFFICIAL[k] for k in ("timestep_spacing", "steps_offset", "clip_sample")}, "eta", DDIM_ETA)
schedules = {}
for beta_schedule in ("linear", "scaled_linear"):
    for zero_snr in (False, True):
        s = DDIMScheduler(
            **{**DDIM_OFFICIAL, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": zero_snr}
        )
        schedules[f"{beta_schedule}{', zero SNR' if zero_snr else ''}"] = s
rows = [[name, f"{float(s.alphas_cumprod[999].sqrt()):.4f}"] for name, s in schedules.items()]
print(format_table(rows, ["schedule", "signal left at t = 999: sqrt(alpha_bar)"]))

# %% [markdown] tags=["core"]
# A few hundredths of signal sounds harmless. It is not: noise averages out over a latent's 4·64·64 values,
# the signal does not, so the **mean** of $x_{999}$ still tells the image's mean brightness. Latents with
# random brightness offsets, noised to t = 999 under each schedule:

# %% tags=["core"]
g = torch.Generator().manual_seed(0)
x0 = torch.randn(256, 4, 64, 64, generator=g) * 0.5 + torch.randn(256, 1, 1, 1, generator=g)  # bright/dark
eps = torch.randn(256, 4, 64, 64, generator=g)
rows = []
for name, s in schedules.items():
    x_999 = s.add_noise(x0, eps, torch.full((256,), 999))
    corr = np.corrcoef(x0.mean((1, 2, 3)), x_999.mean((1, 2, 3)))[0, 1]
    rows.append([name, f"{corr:.2f}"])
print(format_table(rows, ["schedule", "corr(mean of x0, mean of x_999)"]))

# %% [markdown] tags=["core"]
# - Without the rescale, "pure noise" at t = 999 still carries the brightness, and a network trained on it
#   learns to keep it. At inference the noise has mean ≈ 0, so every video comes out mid-grey on average.
#   `rescale_betas_zero_snr` (Lin et al., Algorithm 1) shifts the schedule so that $\bar\alpha_{999} = 0$.
# - **Then ε-prediction breaks**: at SNR 0, $x_t = \varepsilon$, so predicting ε is trivial and carries no
#   information about $x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$ — a
#   division by 0:

# %% tags=["core"]
eps_zero_snr = DDIMScheduler(**{**DDIM_OFFICIAL, "prediction_type": "epsilon"})  # the combination to avoid
set_timesteps(eps_zero_snr, 25)
x_t = torch.randn(1, 4, 2, 8, 8)
step = eps_zero_snr.step(torch.randn_like(x_t), 999, x_t, eta=DDIM_ETA)
print("epsilon at t = 999: x0 estimate all finite:", bool(torch.isfinite(step.pred_original_sample).all()))
try:
    build_scheduler(prediction_type="epsilon")
except ValueError as error:
    print("build_scheduler refuses it:", str(error)[:80], "...")

# %% [markdown] tags=["core"]
# **v-prediction** targets $v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0$. Both ε and
# $x_0$ come back without dividing:
#
# $$x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v, \qquad
#   \varepsilon = \sqrt{\bar\alpha_t}\,v + \sqrt{1-\bar\alpha_t}\,x_t$$
#
# and at SNR 0, $v = -x_0$: the network must predict the clean image from nothing, a well-posed (if hard)
# target. The conversions, checked against diffusers' own `get_velocity`:

# %% tags=["core"]
scheduler = build_scheduler()  # the official sampler
x0_small, eps_small = x0[:3, :, :8, :8], eps[:3, :, :8, :8]
ts = torch.tensor([999, 500, 20])
x_t = scheduler.add_noise(x0_small, eps_small, ts)
v = scheduler.get_velocity(x0_small, eps_small, ts)
torch.testing.assert_close(
    convert_prediction(scheduler, v, x_t, ts, "sample"), x0_small, atol=1e-5, rtol=1e-5
)
torch.testing.assert_close(
    convert_prediction(scheduler, v, x_t, ts, "epsilon"), eps_small, atol=1e-5, rtol=1e-5
)
torch.testing.assert_close(v[0], -x0_small[0])
print("v -> x0 and v -> eps recover both; at t = 999, v = -x0: True")

# %% [markdown] tags=["core"]
# **Trailing timesteps.** With zero SNR, the sampler's first step must be t = 999, the only timestep whose
# input is pure noise — and the one where the network learned to expect it. "Leading" spacing (the legacy
# v1 config) never reaches it:

# %% tags=["core"]
legacy = DDIMScheduler(**DDIM_INFERENCE_V1)
configs_25 = {
    "trailing (official)": DDIMScheduler(**DDIM_OFFICIAL),
    "leading": DDIMScheduler(**{**DDIM_OFFICIAL, "timestep_spacing": "leading"}),
    "linspace": DDIMScheduler(**{**DDIM_OFFICIAL, "timestep_spacing": "linspace"}),
    "leading, legacy v1 (no rescale)": legacy,
}
rows = []
for name, s in configs_25.items():
    ts_25 = set_timesteps(s, 25)
    signal = float(s.alphas_cumprod[ts_25[0]].sqrt())
    rows.append([name, ts_25[:3].tolist(), ts_25[-2:].tolist(), f"{signal:.3f}"])
print(format_table(rows, ["spacing, 25 steps", "first", "last", "signal the network expects at step 1"]))
official_30 = set_timesteps(scheduler, 30)
print("official 30 steps:", official_30[:4].tolist(), "...", official_30[-3:].tolist())
print("legacy v1 30 steps:", set_timesteps(legacy, 30)[:3].tolist(), "...", legacy.timesteps[-2:].tolist())

# %% [markdown] tags=["core"]
# - With leading spacing the sampler hands pure noise to a network told "t = 961", a timestep at which it
#   always saw some signal: 1 % on the zero-SNR schedule, 5 % on the legacy one. The first step then
#   "denoises" structure that is not there.
# - `linspace` starts at 999 too, but rounds its steps unevenly and ends at t = 0; trailing ends at 39, and
#   DDIM's last step jumps from there to the clean image ($\bar\alpha = 1$, `set_alpha_to_one`).
#
# **One DDIM step by hand** (η = 0, DDIM paper eq. 12): estimate $x_0$ and ε from v, then move to the
# previous timestep, $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon$.
# Note diffusers' rule for $t'$: $t - \lfloor 1000/n \rfloor$, which with trailing spacing is not always the
# next entry of the list (966 → 933, while the list goes on with 932):

# %% tags=["core"]
timesteps = set_timesteps(scheduler, 30)
t, t_next = int(timesteps[1]), int(timesteps[2])
t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
x_t = torch.randn(1, 4, 2, 8, 8)
v_pred = torch.randn_like(x_t)
a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
x0_hat = a_t.sqrt() * x_t - (1 - a_t).sqrt() * v_pred
eps_hat = a_t.sqrt() * v_pred + (1 - a_t).sqrt() * x_t
by_hand = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat
library = scheduler.step(v_pred, t, x_t, eta=DDIM_ETA).prev_sample
torch.testing.assert_close(by_hand, library, atol=1e-6, rtol=1e-5)
print(f"step from t = {t}: to t' = {t_prev} (next listed timestep {t_next}); by hand == scheduler.step: True")

# %% [markdown]
# ## 5. Linear and scaled_linear betas, and their SNR curves
#
# - `linear`: $\beta_t$ evenly spaced from 0.00085 to 0.012 — the official **inference** config.
# - `scaled_linear`: $\sqrt{\beta_t}$ evenly spaced, then squared — Stable Diffusion's schedule, and what the
#   reference's **training** scripts force (`sched_kwargs.update(beta_schedule="scaled_linear")`).
#
# Same endpoints, smaller betas in between, so scaled_linear keeps more signal through the middle:

# %%
tt = np.arange(1000)
fig, ax = plt.subplots(figsize=(7, 3.6))
for (name, s), style in zip(schedules.items(), ["C0:", "C0-", "C1:", "C1-"], strict=True):
    a = s.alphas_cumprod.double().numpy()
    with np.errstate(divide="ignore"):
        ax.plot(tt, np.log10(a / (1 - a)), style, label=name)
ax.set_xlabel("timestep t")
ax.set_ylabel("log10 SNR(t)")
ax.set_ylim(-8, 4)
ax.legend(fontsize=8)
ax.set_title("SNR = alpha_bar / (1 - alpha_bar); zero SNR sends the last step to -inf", fontsize=9)
fig.tight_layout()
save(fig, "ch07_snr")
plt.show()
linear, scaled = build_scheduler("linear"), build_scheduler("scaled_linear")
rows = [
    [t_, f"{float(linear.alphas_cumprod[t_]):.3f}", f"{float(scaled.alphas_cumprod[t_]):.3f}"]
    for t_ in (100, 300, 500, 700, 900)
]
print(format_table(rows, ["t", "alpha_bar linear (inference)", "alpha_bar scaled_linear (training)"]))

# %% [markdown]
# **The mismatch.** A network trained with scaled_linear learned "at t the latent holds this much signal".
# Sampled with linear, at timestep t it receives a latent noised as the training schedule would have noised it
# at a *later* t. For each official sampling step, the training timestep with the same noise level:

# %%
snr_train = (scaled.alphas_cumprod / (1 - scaled.alphas_cumprod)).double()
rows = []
for t_ in set_timesteps(linear, 25)[[1, 6, 12, 18, 23]].tolist():
    snr_t = float(linear.alphas_cumprod[t_] / (1 - linear.alphas_cumprod[t_]))
    same = int((snr_train.log() - np.log(snr_t)).abs().argmin())
    rows.append([t_, same, same - t_])
print(format_table(rows, ["sampling t (linear)", "training t with that SNR", "shift"]))

# %% [markdown]
# The model is told one noise level and given another, off by 60-90 timesteps mid-schedule. A pull request
# to EchoMimic (antgroup/echomimic #127, never merged) traced background noise in Moore-derived code to
# this and proposed sampling with scaled_linear (`build_scheduler("scaled_linear")`, what the toy animator
# uses, as it was trained). To reproduce the *official* outputs, keep linear.
#
# ## 6. Context windows over a long video
#
# The motion module's position encoding has 32 entries, and it was trained on 24-frame windows. A longer video
# is denoised window by window at every step (Moore-AnimateAnyone: 24 frames, overlap 4; AniPortrait: 16/4).
# The reference's scheduler starts a window every `context_frames - context_overlap` frames from 0 to the end,
# and **wraps around**:

# %%
for num_frames, size in [(64, 24), (64, 16), (25, 24), (10, 24)]:
    windows = context_windows(num_frames, size, 4)
    print(f"{num_frames} frames at {size}/4:", [(w[0], w[-1]) for w in windows])
try:
    context_windows(64, 40, 4)
except ValueError as error:
    print("40-frame windows:", str(error)[:96], "...")

# %% [markdown]
# - The last window of 64 frames at 24/4 runs 60, 61, 62, 63, 0, 1, …, 19: the video is treated as a loop, and
#   its end is denoised together with its start. Good for looping dances, odd for anything else (Moore-AA
#   #76 reports artefacts at both ends).
# - The windows are the same at every step (the scheduler's step argument is always 0).
# - A video no longer than a window is one window; a window longer than the position encoding is refused here,
#   before any UNet runs, instead of failing inside the motion module.

# %%
windows = context_windows(64, 24, 4)
counter = window_counter(windows, 64)
chart = np.zeros((len(windows), 64))
for i, w in enumerate(windows):
    chart[i, w] = 1
fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(9, 3.6), sharex=True, height_ratios=[3, 1.4])
ax.imshow(
    chart, aspect="auto", cmap="Blues", interpolation="nearest", extent=(-0.5, 63.5, len(windows) - 0.5, -0.5)
)
ax.set_yticks(range(len(windows)), [f"window {i}" for i in range(len(windows))])
ax.set_title("64 frames, context_frames 24, overlap 4: the last window wraps around", fontsize=9)
ax_count.bar(range(64), counter.numpy(), color="C1")
ax_count.set_ylabel("counter")
ax_count.set_xlabel("frame")
fig.tight_layout()
save(fig, "ch07_windows")
plt.show()
print(
    "frames covered twice:",
    int((counter == 2).sum()),
    "of 64; counter values:",
    sorted(set(counter.tolist())),
)

# %% [markdown]
# ## 7. Averaging, and the bug without CFG
#
# Each window's prediction is added into its frames and the sum divided by the counter, so every frame gets
# the **mean** of its windows' predictions:
#
# $$\hat v_f = \frac{1}{|\{w \ni f\}|}\sum_{w \ni f} v^{(w)}_f$$
#
# `predict_in_windows` does the loop; the callable it runs gets each batch of windows' latents (window-major,
# and the CFG batch laid out `(g n b)`: every window's uncond rows first). The TINY UNet as the denoiser, at
# t = 500, first without CFG:

# %%
video = torch.randn(1, 4, 64, 8, 8)  # (B, C, F, h, w): 64 frames


def denoiser(do_cfg, timestep=500):
    def predict(x, batch):  # x: (n*B, C, 24, h, w) -> the prediction for those rows
        context = tokens.repeat(len(batch), 1, 1)  # (n*B, 1, D): one token per window's video
        if do_cfg:
            return unet(cfg_batch(x), timestep, cfg_encoder_hidden_states(context))  # (2*n*B, ...)
        return unet(x, timestep, context)

    return predict


mean = predict_in_windows(denoiser(False), video, windows)  # (B, 4, 64, h, w)
print("averaged prediction:", tuple(mean.shape))

# %% [markdown]
# The same frames by hand — the mean of the windows that cover frame 5 (windows 0 and 3) and frame 30
# (window 1 only):

# %%
pred_w = {i: denoiser(False)(video[:, :, windows[i]], [windows[i]]) for i in (0, 1, 3)}
torch.testing.assert_close(mean[:, :, 5], (pred_w[0][:, :, 5] + pred_w[3][:, :, windows[3].index(5)]) / 2)
torch.testing.assert_close(mean[:, :, 30], pred_w[1][:, :, 30 - 20])
print("frames 5 and 30 by hand == predict_in_windows: True")

# %% [markdown]
# With CFG the counter divides both halves of the batch, and the combine follows:

# %%
mean_cfg = predict_in_windows(denoiser(True), video, windows, do_classifier_free_guidance=True)  # (2B, ...)
guided = cfg_combine(mean_cfg, 3.5)  # (B, 4, 64, h, w)
print("averaged CFG prediction:", tuple(mean_cfg.shape), "-> guided", tuple(guided.shape))
torch.testing.assert_close(mean_cfg[1:], mean, atol=1e-5, rtol=1e-5)  # cond rows = the run without CFG
print("cond rows of the CFG run == the run without CFG: True")

# %% [markdown]
# **The bug.** The reference divides by the counter only inside its CFG branch
# (`(noise_pred / counter).chunk(2)`). With `guidance_scale <= 1` the overlapping frames keep the **sum** of
# two predictions. `faithful=True` reproduces it:

# %%
summed = predict_in_windows(denoiser(False), video, windows, faithful=True)
std_mean = mean.std(dim=(0, 1, 3, 4))  # (F,) per-frame std
std_sum = summed.std(dim=(0, 1, 3, 4))
ratio = (std_sum / std_mean)[counter == 2]
shared = int((counter == 2).sum())
print(f"std ratio, faithful sum / mean, on the {shared} shared frames: {float(ratio.mean()):.2f}")
print(
    "on frames in one window only, identical:",
    torch.equal(summed[:, :, counter == 1], mean[:, :, counter == 1]),
)
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(std_sum.numpy(), "C3.-", label="reference without CFG: summed")
ax.plot(std_mean.numpy(), "C0.-", label="anim_lab: averaged")
ax.set_xlabel("frame")
ax.set_ylabel("std of the prediction")
ax.legend(fontsize=8)
fig.tight_layout()
save(fig, "ch07_averaging_bug")
plt.show()

# %% [markdown]
# What a doubled v does to one DDIM step: the $x_0$ estimate is
# $\sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v$, so doubling v moves it off on exactly the shared
# frames — 32 of 64, in bands that flicker against their neighbours. At t = 500:

# %%
x0_mean = convert_prediction(scheduler, mean, video, 500, "sample")
x0_sum = convert_prediction(scheduler, summed, video, 500, "sample")
shift = (x0_sum - x0_mean).std(dim=(0, 1, 3, 4)) / x0_mean.std(dim=(0, 1, 3, 4))
print(f"x0 estimate moved by {float(shift[counter == 2].mean()):.2f} x its std on the shared frames")

# %% [markdown]
# **Batched windows.** `context_batch_size` windows share one UNet call. The reference adds the batch's
# whole prediction to each of its windows, which is only right for a batch of one; here each window's rows go
# back to its own frames, so any batch size gives the batch-size-1 result:

# %%
batched = predict_in_windows(denoiser(False), video, windows, context_batch_size=4)
torch.testing.assert_close(batched, mean, atol=1e-5, rtol=1e-5)
print("context_batch_size 4 == context_batch_size 1: True")

# %% [markdown]
# ## 8. One full denoising step
#
# Everything above in the order the pipeline runs it (chapter 09 adds the ReferenceNet and the pose features):

# %%
scheduler = build_scheduler()
timesteps = set_timesteps(scheduler, 25)
latents = torch.randn(1, 4, 64, 8, 8) * scheduler.init_noise_sigma
t = int(timesteps[0])
noise_pred = predict_in_windows(
    denoiser(True, t), latents, windows, context_batch_size=4, do_classifier_free_guidance=True
)  # (2B, 4, 64, h, w)
noise_pred = cfg_combine(noise_pred, guidance_scale=3.5)
latents = scheduler.step(noise_pred, t, latents, eta=DDIM_ETA).prev_sample
print("t =", t, "-> latents", tuple(latents.shape), "| finite:", bool(torch.isfinite(latents).all()))

# %% [markdown]
# ## 9. The guidance scale on a trained model
#
# Everything above used random weights. The toy animator (`anim_lab.toy.load_animator()`, trained on the
# toy portrait world at 128×128 pixels, with condition dropout so that it has an unconditional prediction)
# animates two held-out cases from `scripts/eval_animator.py` at each scale of the sweep 1 / 2 / 3.5 / 5 / 7,
# with the same seed and 8 DDIM steps. The metrics are the script's (`score`): PSNR and SSIM against the
# ground-truth renders, mediapipe's detection rate and landmark error on the generated frames (`detect`,
# `pose_px`, 256-px pixels), the identity probe's top-1 over the two cases (`id_top1`) and the flicker beyond
# the ground truth's own motion (`flicker`), printed with fewer digits than the script's table.

# %%
E = anim_lab.load_script("eval_animator")  # scripts/eval_animator.py: cases, metrics, ablations

pipe = load_animator()
pipe.set_progress_bar_config(disable=True)
print(
    "motion modules in the loaded denoiser:", "yes" if pipe.denoising_unet.motion_kwargs else "no (stage 1)"
)
cases = E.make_cases(num_cases=2, num_frames=8)  # 2 held-out identities x 8 frames
probe = E.IdentityProbe()
SCALES = (1.0, 2.0, 3.5, 5.0, 7.0)
sweep_videos, table = {}, {}
table["copy reference (baseline)"] = E.score(E.copy_reference(cases), cases, probe)
for s in SCALES:  # what E.sweep_cfg does, keeping the videos for the pictures
    sweep_videos[s] = [E.generate(pipe, c, steps=8, cfg=s, seed=42) for c in cases]  # (F, H, W, 3) uint8
    table[f"cfg {s:g}"] = E.score(sweep_videos[s], cases, probe)
DECIMALS = {"psnr": 1, "ssim": 2, "detect": 2, "pose_px": 1, "id_top1": 2, "flicker": 3}  # stable digits only
rows = [[name] + [f"{r[m]:.{d}f}" for m, d in DECIMALS.items()] for name, r in table.items()]
print(format_table(rows, ["variant (2 cases x 8 frames)", *DECIMALS]))

# %%
picks = [0, 4, 7]
tiles, titles = [], []
for f in picks:
    tiles += [cases[0].truth[f]] + [sweep_videos[s][0][f] for s in SCALES]
    titles += [f"ground truth, frame {f}"] + [f"guidance_scale {s:g}" for s in SCALES]
fig = image_grid(tiles, titles, ncols=6, figsize=(10.5, 5.6), suptitle="one held-out case, the CFG sweep")
save(fig, "ch07_cfg_sweep")
plt.show()

# %% [markdown]
# - Scale 1 is the conditional prediction alone (and one UNet call per step, section 1); every larger scale
#   extrapolates further away from the unconditional prediction, which knows neither the CLIP token nor the
#   reference (section 3). What the condition adds gets amplified: first sharper faces and stronger colours,
#   then, past some scale, over-saturation and artefacts.
# - Where that point lies is a property of the trained weights, not of the formula: read it from the table
#   (PSNR and SSIM against the ground truth, mediapipe's detection and landmark error) and from the pictures.
#   The official default 3.5 comes with the SD1.5-sized models on real video, not with this toy.
# - For this toy animator the table puts that point at the start: PSNR, SSIM and the landmark error are best
#   at scale 1 and worse at every larger one, flicker grows from 3.5, detection drops at 7. The stronger
#   colours of 2 and 3.5 do not bring the frames closer to the ground truth. `scripts/eval_animator.py`,
#   choosing on validation cases of its own, picks 1 too (`anim_lab/assets/toy_animator/COMMANDS.md`).
# - The copy-the-reference row has the identity by construction and no motion: a generated video should beat
#   its `pose_px`; with two cases, `id_top1` separates only two identities.

# %% [markdown] tags=["core"]
# ## Summary
# - CFG is one UNet call on a doubled batch — unconditional rows first — and the extrapolation
#   $v_\varnothing + s(v_c - v_\varnothing)$; it costs exactly twice the FLOPs, so it is off for $s \le 1$.
#   Guidance rescale pulls the guided prediction's spread back to the conditional one's.
# - Inference uses zero CLIP tokens (cross-attention then returns a constant bias); training dropped the
#   condition by zeroing the CLIP *pixels* (one coin per step, p = 0.1) and skipping the ReferenceNet, so the
#   network learned another constant. Hallo uses `image_proj(0)` on both sides; its stage 2 flips independent
#   image and audio coins.
# - Unconditional rows see neither the CLIP token nor the reference bank.
# - Without the zero-SNR rescale, t = 999 keeps a few percent of signal that leaks the image's brightness.
#   With it, ε-prediction cannot recover $x_0$ (division by 0), v-prediction can ($x_0 = -v$), and only
#   trailing spacing starts at the pure-noise timestep. DDIM's step goes to $t - \lfloor 1000/n \rfloor$.
# - Training used scaled_linear betas, inference linear: the same timestep means different noise levels.
# - Long videos: fixed, wrap-around windows (every 20 frames at 24/4), predictions averaged by a counter —
#   with or without CFG, unlike the reference — and batched windows that equal one window at a time.
# - On a trained model the guidance scale trades the condition's strength against over-saturation; the sweep's
#   table and pictures show where the toy animator's best scale lies.
#
# ## Exercises
# 1. Show that with a single token and no `to_v` bias, a zero unconditional token makes the unconditional
#    prediction independent of `to_k`. What if `to_v` had a bias?
# 2. Compute $\bar\alpha_{t'}$ for the step 966 → 933 and for 966 → 932. By how much does the DDIM update
#    differ, relative to the latent's size? Does diffusers' rule matter?
# 3. Change `context_overlap` from 4 to 12 for a 64-frame video at 24 frames. How many windows, and how many
#    frames are covered twice? What does that cost per step?
# 4. Write the non-looping variant (`closed_loop=False` in the reference): window starts stop at
#    `num_frames - context_overlap`. For 64 and for 70 frames at 24/4, does every frame get a window, and
#    does any window still wrap around?
#
# ## Solutions

# %%
# 1. softmax over one key is 1 whatever the key: the output is to_out(to_v(token)); to_v(0) = 0 without bias.
#    With a to_v bias b the zero token would give to_out(b): still one constant for every image.
other = Attention(query_dim=32, cross_attention_dim=64, heads=4, dim_head=8).eval()
other.load_state_dict({k: v for k, v in attn2.state_dict().items() if "to_k" not in k}, strict=False)
print(
    "1. zero token, different to_k, same output:",
    torch.allclose(other(queries, encoder_hidden_states=inference_uncond), attend(inference_uncond)),
)

# %%
# 2. the two possible previous timesteps of one step from 966
scheduler = build_scheduler()
set_timesteps(scheduler, 30)
x_t, v_pred = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8)
a = scheduler.alphas_cumprod
x0_hat = a[966].sqrt() * x_t - (1 - a[966]).sqrt() * v_pred
eps_hat = a[966].sqrt() * v_pred + (1 - a[966]).sqrt() * x_t
to_933, to_932 = (a[p].sqrt() * x0_hat + (1 - a[p]).sqrt() * eps_hat for p in (933, 932))
relative = float((to_933 - to_932).norm() / to_933.norm())
print(
    f"2. alpha_bar(932) / alpha_bar(933) = {float(a[932] / a[933]):.3f}; the updates differ by {relative:.1e}"
)
print("   of the latent's norm: a sub-timestep offset, harmless, but it is why 'prev' is not 'next'")

# %%
# 3. overlap 12: a window every 12 frames
w12 = context_windows(64, 24, 12)
c12 = window_counter(w12, 64)
print(
    f"3. {len(w12)} windows (vs {len(windows)}), {int((c12 > 1).sum())} frames covered more than once, "
    f"{len(w12) / len(windows):.2f}x the UNet calls per step"
)

# %%
# 4. the open-loop variant: window starts range(0, num_frames - overlap, 20)
for num_frames in (64, 70):
    open_loop = [[f % num_frames for f in range(s, s + 24)] for s in range(0, num_frames - 4, 20)]
    uncovered = sorted(set(range(num_frames)) - {f for w in open_loop for f in w})
    wraps = any(w[-1] < w[0] for w in open_loop)
    print(
        f"4. {num_frames} frames:",
        [(w[0], w[-1]) for w in open_loop],
        "| uncovered:",
        uncovered,
        "| wraps:",
        wraps,
    )

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
# ### Exercise 1 (3 points): the CFG combine and its rescale
# Write `my_cfg_combine(noise_pred, guidance_scale, guidance_rescale=0.0)`. `noise_pred` is the CFG batch's
# prediction, `(2B, ...)` with the unconditional rows first. Return `(B, ...)`:
# $\hat\epsilon = \epsilon_u + s\,(\epsilon_c - \epsilon_u)$. When `guidance_rescale` $= \phi > 0$, mix in the
# guided prediction rescaled to the conditional one's standard deviation, per sample (over every axis but the
# batch): $\phi\,\hat\epsilon\,\sigma(\epsilon_c)/\sigma(\hat\epsilon) + (1 - \phi)\,\hat\epsilon$.


# %% nbgrader={"grade": false, "grade_id": "ch07_cfg_combine", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_cfg_combine(noise_pred, guidance_scale, guidance_rescale=0.0):
    ### BEGIN SOLUTION
    uncond, cond = noise_pred.chunk(2)  # (2B, ...) -> 2 x (B, ...)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        rescaled = guided * cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07_cfg_combine_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_cfg_combine is not lab_guidance.cfg_combine
gen = torch.Generator().manual_seed(7)
for shape in [(2, 4, 3, 8, 8), (4, 4, 1, 5, 7), (2, 3, 6)]:
    for scale, rescale in [(1.0, 0.0), (3.5, 0.0), (7.0, 0.7), (2.0, 1.0)]:
        pred = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(
            my_cfg_combine(pred, scale, rescale), lab_guidance.cfg_combine(pred, scale, rescale)
        )
print("my_cfg_combine matches guidance.cfg_combine on 3 shapes x 4 (scale, rescale) pairs")

# %% [markdown] tags=["core"]
# ### Exercise 2 (3 points): context windows with the wrap-around
# Write `my_context_windows(num_frames, context_frames, context_overlap)`: a list of windows, each a list of
# `context_frames` frame indices. A new window starts every `context_frames - context_overlap` frames, from
# frame 0 while the start is below `num_frames`; indices past the end wrap around to the start. A video no
# longer than one window is a single window of all its frames.


# %% nbgrader={"grade": false, "grade_id": "ch07_context_windows", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_context_windows(num_frames, context_frames, context_overlap):
    ### BEGIN SOLUTION
    if num_frames <= context_frames:
        return [list(range(num_frames))]
    step = context_frames - context_overlap
    return [[(start + k) % num_frames for k in range(context_frames)] for start in range(0, num_frames, step)]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07_context_windows_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_context_windows is not lab_context.context_windows
gen = torch.Generator().manual_seed(8)
cases = [(64, 24, 4), (70, 16, 4), (24, 24, 4), (10, 16, 4), (33, 8, 0)]
cases += [
    tuple(int(v) for v in (torch.randint(1, 9, (1,), generator=gen) * n, n, o)) for n, o in [(12, 3), (5, 2)]
]
for num_frames, context_frames, overlap in cases:
    mine = [list(map(int, w)) for w in my_context_windows(num_frames, context_frames, overlap)]
    assert mine == lab_context.context_windows(num_frames, context_frames, overlap, max_len=None), (
        num_frames,
        context_frames,
        overlap,
    )
print(f"my_context_windows matches context.context_windows on {len(cases)} videos")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): one DDIM step, as the official scheduler takes it
# Write `my_ddim_step(alphas_cumprod, v_pred, t, prev_t, x_t)`: the deterministic DDIM update ($\eta = 0$)
# from timestep `t` to `prev_t` for a v-prediction model, with $\bar\alpha$ = `alphas_cumprod` and
# $\bar\alpha_{\text{prev}} = 1$ when `prev_t < 0` (`set_alpha_to_one`). Recover $\hat x_0$ and
# $\hat\epsilon$ from $v$, then step: $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,
# \hat\epsilon$.


# %% nbgrader={"grade": false, "grade_id": "ch07_ddim_step", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_ddim_step(alphas_cumprod, v_pred, t, prev_t, x_t):
    ### BEGIN SOLUTION
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=alphas_cumprod.dtype)
    x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * v_pred
    eps = a_t.sqrt() * v_pred + (1 - a_t).sqrt() * x_t
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07_ddim_step_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(9)
for steps, shape in [(30, (1, 4, 2, 8, 8)), (4, (2, 4, 1, 6, 5)), (25, (1, 3, 8))]:
    scheduler = lab_guidance.build_scheduler()
    lab_guidance.set_timesteps(scheduler, steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    for i in (0, len(timesteps) // 2, len(timesteps) - 1):
        t = timesteps[i]
        prev_t = t - scheduler.config.num_train_timesteps // steps
        x_t, v_pred = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        expected = scheduler.step(v_pred, t, x_t, eta=0.0).prev_sample
        mine = my_ddim_step(scheduler.alphas_cumprod, v_pred, t, prev_t, x_t)
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
print(
    "my_ddim_step matches DDIMScheduler.step (the official settings) at the first, a middle and the last step"
)
