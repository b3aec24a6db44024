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
# # Chapter 12 — Flow matching and image-to-video, the HunyuanVideo way
#
# *HunyuanVideo does not denoise along DDPM's curved noise schedule: it learns a velocity along a straight
# line from data to noise (rectified flow) and integrates it with Euler steps on a shifted time grid. Its
# image-to-video model takes the first frame either as extra input channels ("latent_concat") or as a clean
# first latent frame ("token_replace"). We train both, tiny, on the toy world's causal-VAE latents.*
#
# - **You will build**: the rectified-flow target and one Euler step by hand; the x0 prediction along the
#   sampling path; DDIM on DDPM's curved path shown to be flow Euler on another time grid, and plain Euler
#   along the curve vs along the line, with one trained model; the time shift; the token and FLOP bill of
#   channel-concat vs token-append; both i2v conditions compared on trained models; a generated clip decoded
#   through the causal VAE with tiling, as an animation and a strip
# - **Library modules**: `anim_lab.flow` (on diffusers' `HunyuanVideoTransformer3DModel` and
#   `FlowMatchEulerDiscreteScheduler`), `anim_lab.causal_vae`, `anim_lab.tiling`, `anim_lab.toy`,
#   `anim_lab.viz`
# - **Questions answered**: What is the sampler of HunyuanVideo, step by step? Why are flow paths "straight",
#   and does DDIM on DDPM's curved path step any differently? What does the shift do? Why is the image
#   latent concatenated on the *channel* axis? What is `i2v_stability` (the 0.001 of image latent in the
#   starting noise)? What does token_replace change inside the transformer? latent_concat or token_replace?
# - **CPU runtime**: about 15 s (chapters/README.md)
#
# The two tiny transformers (2.1M parameters each: 2 dual-stream + 2 single-stream blocks, width 128, patch
# 2; HunyuanVideo has 13B) were trained by `scripts/train_toy_i2v.py` on 1024 toy clips (17 frames, 64 px →
# causal-VAE latents 16×5×8×8), conditioned on frame 0 and on the toy caption through the toy CLIP's text
# tower. Their weights and logs are in `anim_lab/assets/toy_i2v/`; `scripts/eval_i2v.py` measures them.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import base64
import copy
import io
import json

import diffusers
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from einops import rearrange
from IPython.display import HTML, display
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging as transformers_logging

import anim_lab
from anim_lab import flow, metrics, toy, viz
from anim_lab.causal_vae import CausalVAE
from anim_lab.metrics import psnr
from anim_lab.tiling import TileSettings

torch.manual_seed(0)
torch.set_num_threads(1)
diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
np.set_printoptions(precision=3, suppress=True)
torch.set_printoptions(precision=3, sci_mode=False)

vae = CausalVAE.from_pretrained()  # the toy causal VAE (chapter 08)
models = {kind: flow.load_toy_i2v(kind) for kind in flow.IMAGE_CONDITION_TYPES}
SEED = 1_000_003  # a held-out identity (test split)
ident = toy.identity_from_seed(SEED)
clip = toy.make_clip(ident, num_frames=17, size=64, seed=SEED)  # what the training clips look like
gt = (
    rearrange(torch.from_numpy(clip.frames), "f h w c -> 1 c f h w").float() / 127.5 - 1
)  # (1, 3, 17, 64, 64)
image = gt[:, :, 0]  # (1, 3, 64, 64) the condition image
image_latents = flow.encode_condition_image(vae, image, size=(64, 64))  # (1, 16, 1, 8, 8)
caption = flow.toy_caption(ident)
text, uncond = flow.toy_text_tokens([caption]), flow.toy_text_tokens([""])
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")

# %% tags=["core"]
print("caption:", caption)
print(
    "condition latent:",
    tuple(image_latents.shape),
    "| text tokens:",
    tuple(text["encoder_hidden_states"].shape),
)
for kind, m in models.items():
    print(
        f"{kind:14s} in_channels {m.config.in_channels}, parameters {sum(p.numel() for p in m.parameters())}"
    )

# %% [markdown] tags=["core"]
# ## 1. Rectified flow: a straight path and its velocity
#
# Draw a clean latent video $x_0$ and noise $\varepsilon \sim \mathcal N(0, I)$ and join them by a line:
#
# $$x_t = (1-t)\,x_0 + t\,\varepsilon, \qquad v = \frac{dx_t}{dt} = \varepsilon - x_0 .$$
#
# The transformer learns $v_\theta(x_t, t) \approx \mathbb E[\varepsilon - x_0 \mid x_t]$ with a plain MSE.
# Sampling runs the ODE $dx/dt = v_\theta$ backwards from $t=1$ (noise) to $t=0$ with Euler steps
#
# $$x_{t'} = x_t + (t' - t)\, v_\theta(x_t, t), \qquad t' < t,$$
#
# and that is all `FlowMatchEulerDiscreteScheduler.step` does (diffusers calls $t$ *sigma* and feeds the
# transformer `timestep = 1000·sigma`). Re-derive one step by hand:

# %% tags=["core"]
sched = flow.make_scheduler(shift=3.0)
sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 5)[:-1])  # the pipeline's grid: 4 steps
x = torch.randn(1, 16, 5, 8, 8)
v = torch.randn_like(x)
sigma, sigma_next = sched.sigmas[0], sched.sigmas[1]
by_hand = x + (sigma_next - sigma) * v
torch.testing.assert_close(sched.step(v, sched.timesteps[0], x, return_dict=False)[0], by_hand)
print("sigmas:", sched.sigmas.numpy().round(3), "| timesteps:", sched.timesteps.numpy().round(1))
print("one Euler step by hand == scheduler.step")

# %% [markdown] tags=["core"]
# **The x0 prediction along the path.** Since $x_t = x_0 + t\,v$ on a straight line, every velocity gives a
# guess of the clean video, $\hat x_0 = x_t - t\,v_\theta$. If the learned paths were exactly straight,
# $\hat x_0$ would not move from the first step on: one Euler step would land on the answer. Follow it along a
# 32-step sample of the trained latent_concat model (same noise throughout this chapter):

# %% tags=["core"]
noise = torch.randn((1, 16, 5, 8, 8), generator=torch.Generator().manual_seed(0))
lc = models["latent_concat"]


def velocity(model, x_t, t, image_latents=image_latents, text=text):
    """v_theta(x_t, t) of a latent_concat model for the chapter's condition image and caption."""
    model_input = flow.latent_concat_input(x_t, image_latents)  # (1, 33, 5, 8, 8)
    return model(hidden_states=model_input, timestep=t.reshape(1) * 1000, return_dict=False, **text)[0]


with torch.no_grad():
    reference, traj = flow.sample_i2v(
        lc, image_latents, text, 17, 32, shift=3.0, latents=noise, faithful=False, return_trajectory=True
    )
    sched = flow.make_scheduler(3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 33)[:-1])
    x_t, x0_hats = noise, []
    for i in range(len(sched.timesteps)):
        s = sched.sigmas[i]
        x0_hats.append(x_t - s * velocity(lc, x_t, s))  # x0_hat = x_t - t v
        x_t = traj[i]
dist = [float((h - reference).norm() / reference.norm()) for h in x0_hats]
print("relative distance of x0_hat to the final sample, at steps 0, 4, 8, 16, 31:")
print(np.round([dist[i] for i in (0, 4, 8, 16, 31)], 2))

# %% [markdown] tags=["core"]
# **DDPM's curved path, same model.** DDPM mixes $x = \alpha x_0 + \sigma \varepsilon$ with
# $\alpha^2 + \sigma^2 = 1$: a quarter circle, not a line. Divided by $\alpha + \sigma$, the same point lies
# on our line at $t_f = \sigma/(\alpha+\sigma)$, so the trained velocity also gives DDPM's $\hat x_0$ and
# $\hat\varepsilon$ anywhere on the circle. Now take a DDIM step, $x' = \alpha' \hat x_0 + \sigma'
# \hat\varepsilon$, and divide it by $\alpha' + \sigma'$: with $\hat x_0 = x_f - t_f v$ and
# $\hat\varepsilon = x_f + (1 - t_f) v$ it becomes $x_f + (t_f' - t_f)\,v$, **exactly a flow-Euler step** from
# $t_f$ to $t_f'$. DDIM never feels the curve: it is flow Euler on another time grid. Check it on whole
# samplers in float64 (same noise, same network):

# %% tags=["core"]
# linear betas 1e-4 .. 0.02, as in DDPM (SD uses scaled_linear betas 0.00085 .. 0.012)
ddpm = DDPMScheduler(num_train_timesteps=1000)
abar = ddpm.alphas_cumprod.double()
cond = (image_latents, text)


def flow_time(t):
    """DDPM timesteps -> t_f = s / (a + s), where x / (a + s) sits on the straight line."""
    a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
    return (s / (a + s)).numpy()


@torch.no_grad()
def euler(model, sigmas, x, cond):
    """Flow Euler steps through sigmas (from noise to sigmas[-1] = 0)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + (s_next - s) * velocity(model, x, torch.tensor(s, dtype=x.dtype), *cond)
    return x


@torch.no_grad()
def ddim(model, ts, x, cond):
    """DDIM on the DDPM path through timesteps ts, the last step to clean data, with the flow model."""
    for i, t in enumerate(ts):
        a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
        tf, xf = s / (a + s), x / (a + s)  # the same point on the straight line
        vel = velocity(model, xf, tf.to(x.dtype), *cond)
        x0_hat, eps_hat = xf - tf * vel, xf + (1 - tf) * vel
        last = i == len(ts) - 1
        a2, s2 = (1.0, 0.0) if last else (abar[ts[i + 1]].sqrt(), (1 - abar[ts[i + 1]]).sqrt())
        x = a2 * x0_hat + s2 * eps_hat  # DDIM: keep the predicted noise, move along the circle
    return x


lc64 = copy.deepcopy(lc).double()
cond64 = (image_latents.double(), {k: v.double() if v.is_floating_point() else v for k, v in text.items()})
for n in (2, 4):
    ts = np.linspace(999, 0, n).round().astype(int)
    grid = np.append(flow_time(ts), 0.0)  # DDIM's timesteps as flow times, then clean data
    x = noise.double()  # DDIM starts from noise at t = 999, i.e. from x / (a + s) at t_f = grid[0]
    by_ddim = ddim(lc64, ts, x, cond64)
    by_euler = euler(lc64, grid, x / float(abar[ts[0]].sqrt() + (1 - abar[ts[0]]).sqrt()), cond64)
    same = torch.allclose(by_ddim, by_euler, rtol=0, atol=1e-12)
    print(f"DDIM at t = {ts.tolist()} == flow Euler at t_f = {grid.round(4)} (to 1e-12): {same}")


# %% [markdown] tags=["core"]
# Two things follow. First, `linspace(999, 0, n)` ends at DDPM's $t = 0$, which is not clean data
# ($t_f \approx 0.01$): its last step barely moves, so of $n = 2$ steps one is wasted. Spaced as
# `linspace(999, 0, n + 1)[:-1]`, the last step lands on clean data (diffusers' "trailing" spacing is nearly
# the same grid). Second, a fair comparison of *paths* keeps the noise levels and changes only the path:
# plain Euler along the circle, in the angle $\theta$ ($\alpha = \cos\theta$, $\sigma = \sin\theta$), steps
# along the tangent $x + \Delta\theta\,(-\sin\theta\,\hat x_0 + \cos\theta\,\hat\varepsilon)$ at the noise
# levels of the uniform flow grid. Three samplers, the same network and noise, each measured against a
# 64-step flow answer:


# %% tags=["core"]
@torch.no_grad()
def euler_on_circle(model, sigmas, x, cond):
    """Plain Euler along DDPM's quarter circle x = cos(th) x0 + sin(th) eps, at flow noise levels sigmas."""
    th = np.arctan2(sigmas, 1 - sigmas)  # the angle whose circle point maps onto sigma on the line
    for i in range(len(sigmas) - 1):
        c, s = np.cos(th[i]), np.sin(th[i])
        tf, xf = torch.tensor(s / (c + s)), x / (c + s)  # tf == sigmas[i]
        vel = velocity(model, xf, tf, *cond)
        x0_hat, eps_hat = xf - tf * vel, xf + (1 - tf) * vel
        x = x + (th[i + 1] - th[i]) * (-s * x0_hat + c * eps_hat)  # the tangent dx/dth
    return x


with torch.no_grad():
    ref64 = flow.sample_i2v(lc, image_latents, text, 17, 64, shift=1.0, latents=noise, faithful=False)
    u4 = np.linspace(1.0, 0.0, 5)
    torch.testing.assert_close(
        euler(lc, u4, noise, cond),
        flow.sample_i2v(lc, image_latents, text, 17, 4, shift=1.0, latents=noise, faithful=False),
    )
err = lambda y: float((y - ref64).norm() / ref64.norm())  # noqa: E731
print("euler(...) == flow.sample_i2v(shift=1, faithful=False)")
print("relative error vs 64 flow steps:")
print("steps | flow Euler (line) | Euler on the circle | ratio | DDIM, DDPM timesteps")
ratios = []
for n in (1, 2, 4, 8, 16):
    u = np.linspace(1.0, 0.0, n + 1)  # the same noise levels for the line and the circle
    ts = np.linspace(999, 0, n + 1)[:-1].round().astype(int)  # n DDPM timesteps, the last step to clean data
    line, curve, by_ddim = (
        err(euler(lc, u, noise, cond)),
        err(euler_on_circle(lc, u, noise, cond)),
        err(ddim(lc, ts, noise, cond)),
    )
    ratios.append(curve / line)
    print(f"{n:5d} | {line:17.3f} | {curve:19.3f} | {curve / line:5.2f} | {by_ddim:.3f}")
ts4 = np.linspace(999, 0, 5)[:-1].round().astype(int)
print(f"4 DDPM timesteps {ts4.tolist()} as flow times: {np.append(flow_time(ts4), 0).round(3)}")
print(f"Euler on the circle / on the line: x{min(ratios):.2f} to x{max(ratios):.2f}")

# %% [markdown] tags=["core"]
# Reading it: at the same noise levels, Euler along the circle errs more than along the line (the ratio
# column). If $\hat x_0$ and $\hat\varepsilon$ were exact, one step along the line would land on the answer,
# while a tangent step leaves the circle. DDIM has no such penalty, because it *is* the straight step; what
# separates it from flow Euler here is only the grid: evenly spaced linear-beta timesteps crowd the steps at
# high noise (the flow times printed), which costs this model accuracy, as a larger shift does in §2. So the
# case for rectified flow is its straight training path and simple target, not a sampler DDIM lacks. The
# learned paths are not perfectly straight either ($\hat x_0$ still moves over the first steps above: many
# videos are compatible with one noisy latent, and the velocity is their *average*), which is why HunyuanVideo
# still uses 30–50 steps; rectified-flow "reflow" or distillation straightens them further.
#
# ## 2. The shift: more steps at high noise
#
# HunyuanVideo (like SD3) keeps the uniform grid $u_i$ but *shifts* it:
#
# $$\sigma = \frac{s\,u}{1 + (s-1)\,u}, \qquad s = \texttt{flow\_shift}\;(7 \text{ for 720p HunyuanVideo}).$$
#
# $u=0$ and $u=1$ stay put; every step in between moves to higher noise. High noise is where the layout and
# the motion of a video are decided, and a larger latent needs more of it (its pixels are more redundant, so
# the same $\sigma$ destroys less). `flow.shift_sigmas` is the formula; the scheduler applies it inside
# `set_timesteps`:

# %% tags=["core"]
u = np.linspace(1.0, 0.0, 21)[:-1]
fig, ax = plt.subplots(figsize=(6, 3.2))
for s in (1.0, 3.0, 7.0):
    sched = flow.make_scheduler(s)
    sched.set_timesteps(sigmas=u)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), flow.shift_sigmas(u, s), rtol=1e-5)
    ax.plot(range(20), sched.sigmas[:-1].numpy(), "o-", ms=3, label=f"shift {s:g}")
    print(f"shift {s:g}: {int((flow.shift_sigmas(u, s) > 0.5).sum())} of 20 steps at sigma > 0.5")
ax.set_xlabel("step")
ax.set_ylabel("sigma (noise level)")
ax.legend()
ax.set_title("the shifted time grid (20 Euler steps)")
plt.tight_layout()
viz.save(fig, "ch12_shift")
plt.show()

# %% [markdown] tags=["core"]
# What it buys on the trained model (trained with $t$ drawn through shift 3): the error of a 4- and 8-step
# sample against the 64-step answer, for three shifts. The ODE is the same; only where the steps land changes.

# %% tags=["core"]
for n in (4, 8):
    with torch.no_grad():
        errs = [
            float(
                (
                    flow.sample_i2v(lc, image_latents, text, 17, n, s, latents=noise, faithful=False) - ref64
                ).norm()
                / ref64.norm()
            )
            for s in (1.0, 3.0, 7.0)
        ]
    print(f"{n} steps: relative error with shift 1 / 3 / 7 = {np.round(errs, 2)}")

# %% [markdown] tags=["core"]
# Reading it: on this toy model the *unshifted* grid integrates the ODE most accurately for a fixed step
# count;
# shift 3 and 7 spend their steps at high noise and leave big steps near the data, where this model's
# velocity still changes. The shift is not an ODE-accuracy trick: it decides *where* the sampler spends its
# effort. HunyuanVideo picks 7 for 720p because there the high-noise steps (layout, motion) matter most for
# what a viewer sees, and a large latent needs more noise to hide its structure; an 8×8×5 toy latent needs
# much less.
#
# ## 3. Why the image latent goes on the channel axis
#
# The condition image's latent is aligned with latent frame 0 *position by position*. latent_concat puts it
# (zero-padded over the other frames, plus a 0/1 mask channel) next to the noisy latents on channels:
# $16 + 16 + 1 = 33$ input channels. The patch embedding (a Conv3d) reads 33 channels instead of 16, and every
# later layer is unchanged: **zero extra tokens**. Appending the image as an extra latent frame of tokens
# would instead lengthen the sequence that every attention layer sees. Count tokens and FLOPs on the toy
# model, with `torch.utils.flop_counter.FlopCounterMode`:


# %% tags=["core"]
def count(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0]), return_dict=False, **text)
    p = model.config.patch_size
    return x.shape[2] * (x.shape[3] // p) * (x.shape[4] // p), counter.get_total_flops()


tr = models["token_replace"]  # a 16-channel model: what token-append would feed it
lat = torch.randn(1, 16, 5, 8, 8)
bill = {
    "no condition (16 ch)": count(tr, lat),
    "latent_concat (33 ch)": count(lc, flow.latent_concat_input(lat, image_latents)),
    "token_replace (16 ch)": count(tr, flow.token_replace_input(lat, image_latents)),
    "token-append (+1 frame)": count(tr, torch.cat([image_latents, lat], dim=2)),
}
base = bill["no condition (16 ch)"][1]
for name, (tokens, flops) in bill.items():
    print(f"{name:24s} video tokens {tokens:4d}   FLOPs x{flops / base:.3f}")

# %% [markdown] tags=["core"]
# At full size the proportions are the same but the numbers are large. 720p, 129 frames → latents
# $16 \times 33 \times 90 \times 160$ → patch 2: $33 \times 45 \times 80 = 118{,}800$ video tokens (plus 256
# text tokens). Appending one image frame adds $45 \times 80 = 3{,}600$ tokens (+3%); attention grows with the
# square, so its cost grows by about 6%, in every one of the 60 blocks. latent_concat adds
# $17 \times 2 \times 2 = 68$ inputs per token to the patch embedding only:

# %% tags=["core"]
D, L_tok, per_frame = 3072, 33 * 45 * 80, 45 * 80  # HunyuanVideo width, video tokens, tokens per latent frame
embed_extra = 2 * L_tok * (17 * 4) * D  # patch-embed multiply-adds for 17 more channels x (2x2) patch
block_linear = 2 * L_tok * 12 * D * D  # ~ qkv + out + 4x MLP per token and block (2 * 12 D^2 FLOPs)
attention = lambda n: 4 * n * n * D  # noqa: E731  QK^T and AV
print(f"latent_concat: +{embed_extra / 1e12:.2f} TFLOPs in the patch embedding, once")
print(
    f"token-append: +{per_frame} tokens; per block "
    f"+{(attention(L_tok + per_frame) - attention(L_tok)) / 1e12:.0f} TFLOPs "
    f"attention, +{2 * per_frame * 12 * D * D / 1e12:.1f} TFLOPs linear; x60 blocks"
)
print(f"one block's linear layers alone: {block_linear / 1e12:.0f} TFLOPs")

# %% [markdown] tags=["core"]
# So concatenation is nearly free and position-exact (the image pixel at $(h, w)$ sits in the token at
# $(h, w)$ of *every* frame, with the mask telling which frame it belongs to); appending costs sequence length
# and leaves the model to find, through attention, which image token matches which video token.
#
# **token_replace** is the third way, and costs nothing either: frame 0's tokens *are* the clean image latent,
# and diffusers' `HunyuanVideoTokenReplace*` blocks modulate them with the embedding of timestep 0
# (`token_replace_emb`) while the other tokens get the current $t$. The Euler step then moves frames 1.. only.
# In HunyuanVideo-I2V the seed notes also ask about `i2v_stability`: the diffusers pipeline starts from
# $0.999\,\varepsilon + 0.001 \cdot$ image latent (every frame), a tiny nudge of the start toward the image;
# `flow.sample_i2v(faithful=True)` does the same (its default, `faithful=False`, starts from pure noise).

# %% tags=["core"]
with torch.no_grad():
    seen = []
    hook = tr.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"]), with_kwargs=True)
    out = flow.sample_i2v(tr, image_latents, text, 17, 4, shift=3.0, latents=noise)
    hook.remove()
print(
    "token_replace: frame 0 of the input is the image latent at every step:",
    all(torch.equal(h[:, :, :1], image_latents) for h in seen),
    "| and of the output:",
    torch.equal(out[:, :, :1], image_latents),
)
print(
    "the 0.001 nudge (faithful=True) moves the start by",
    round(float((0.999 * noise + 0.001 * image_latents - noise).norm() / noise.norm()), 4),
    "of its norm",
)

# %% [markdown]
# ## 4. latent_concat vs token_replace, trained on the same budget
#
# Both models: the same data, steps, batch, schedule and seed. `scripts/eval_i2v.py` generated a clip for each
# of 64 held-out identities (20 Euler steps, shift 3) and measured it (its table, committed in
# `anim_lab/assets/toy_i2v/eval.json`):

# %%
ev = json.loads((flow.TOY_I2V_DIR / "eval.json").read_text())
logs = {
    k: json.loads((flow.TOY_I2V_DIR / k / "train_log.json").read_text()) for k in flow.IMAGE_CONDITION_TYPES
}
print(
    f"{ev['n_identities']} held-out identities, {ev['steps']} steps, shift {ev['shift']}; "
    f"VAE reconstruction of the condition images {ev['vae_reconstruction_psnr']:.1f} dB"
)
print(f"{'':14s} {'frame-0 PSNR':>12s} {'id top-1':>9s} {'faces':>7s} {'motion ratio':>13s}")
for name, r in ev["rows"].items():
    p = "-" if r["first_frame_psnr"] is None else f"{r['first_frame_psnr']:.1f} dB"
    print(f"{name:14s} {p:>12s} {r['identity_top1']:>9.0%} {r['detection']:>7.0%} {r['motion_ratio']:>13.2f}")
print("targets: identity >= 90%, faces >= 95%, motion ratio 0.5-1.5")
for size, r in ev["vae_recon_by_size"].items():
    print(f"VAE recon of {ev['recon_n']} of the clips rendered at {size} px: faces {r['detection']:.0%}")
for k, lg in logs.items():
    print(
        f"{k}: {lg['steps']} steps x batch {lg['batch']}, "
        f"held-out velocity MSE {lg['log'][-1]['held_out_loss']:.3f}"
    )

# %% [markdown]
# Reading it, honestly: after 500 steps (about 20 minutes of one CPU thread) each, both models start from the
# condition image (token_replace *is* the VAE's reconstruction at frame 0; latent_concat must regenerate frame
# 0 and loses about 2 dB) and miss the identity (≥ 90%) and face-detection (≥ 95%) targets. The row "VAE
# recon" says why: it is the ground-truth clips themselves, encoded by the toy causal VAE and decoded again,
# the best any model that generates these latents could do. The VAE's own reconstructions are the right person
# only about 83% of the time, mediapipe finds a face in about a quarter of them (the printed line below the
# table: more at 96 and 128 px, still short of 95%), and they keep under a tenth of the clips' frame-to-frame
# motion. The generated frames are already as recognisable as that, so the limit is the toy causal VAE at 64
# px, not the transformers or their training time; their motion ratios measure motion the VAE itself would not
# reproduce. token_replace is ahead on this budget on every measure but motion: its frame 0 is exact for free,
# and its loss is spent on the frames that must be generated.
#
# The same comparison live, on this chapter's held-out identity and noise (20 steps):

# %%
videos, lats = {}, {}
own = float(psnr(flow.decode_latents(vae, image_latents)[:, :, 0], image))
for kind, m in models.items():
    lats[kind] = flow.sample_i2v(
        m, image_latents, text, 17, 20, shift=3.0, generator=torch.Generator().manual_seed(0), faithful=True
    )  # as scripts/eval_i2v.py samples
    videos[kind] = flow.decode_latents(vae, lats[kind])  # (1, 3, 17, 64, 64)
    print(
        f"{kind:14s} frame-0 PSNR {float(psnr(videos[kind][:, :, 0], image)):.1f} dB "
        f"(VAE's own reconstruction: {own:.1f} dB)"
    )

# %%
to_u8 = lambda v: ((v.clamp(-1, 1) + 1) * 127.5).round().byte()  # noqa: E731
frames_shown = [0, 4, 8, 12, 16]
strip = {"ground truth": gt, **videos}
fig, axes = plt.subplots(3, len(frames_shown), figsize=(7.5, 4.8))
for row, (name, vid) in enumerate(strip.items()):
    for col, f in enumerate(frames_shown):
        axes[row, col].imshow(rearrange(to_u8(vid[0, :, f]), "c h w -> h w c").numpy())
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
        if row == 0:
            axes[row, col].set_title(f"frame {f}", fontsize=9)
    axes[row, 0].set_ylabel(name, fontsize=9)
fig.suptitle("held-out identity: ground truth and both i2v models (conditioned on frame 0)", fontsize=10)
plt.tight_layout()
viz.save(fig, "ch12_strip")
plt.show()

# %% [markdown]
# ## 5. The causal VAE in use: decoding with tiling
#
# The generated latents (16×5×8×8) decode to 17 frames of 64 px. A real HunyuanVideo latent is far larger,
# and the pipeline turns on the VAE's tiling before decoding (chapter 08). Decode ours in 32-px tiles (stride
# 24) and 8-frame windows (stride 4) and compare with the untiled decode:

# %%
tiles = TileSettings(32, 32, 24, 24, 8, 4)
tiled = flow.decode_latents(vae, lats["latent_concat"], tiling=tiles)
print(
    "tiled decode:",
    tuple(tiled.shape),
    f"| PSNR vs untiled {float(metrics.video_psnr(tiled, videos['latent_concat']).mean()):.0f} dB",
)


# %%
# NBVAL_IGNORE_OUTPUT
def gif_html(video, scale=3, fps=8):
    """(1, 3, F, H, W) in [-1, 1] -> an inline looping GIF."""
    frames = rearrange(to_u8(video[0]), "c f h w -> f h w c").numpy()
    imgs = [
        Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames
    ]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return f'<img src="data:image/gif;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


display(HTML(" ".join(gif_html(v) for v in (gt, videos["latent_concat"], videos["token_replace"]))))

# %% [markdown]
# Left to right: ground truth, latent_concat, token_replace. The tiled decode differs from the untiled one by
# the PSNR printed above: at 64 px a 32-px tile is half the frame, and each tile normalises with its own
# GroupNorm statistics (chapter 08); tiling pays off for frames far larger than a tile.
#
# ## Summary
#
# - Rectified flow trains a velocity $v = \varepsilon - x_0$ along straight lines
#   $x_t = (1-t)x_0 + t\varepsilon$; sampling is Euler steps $x \leftarrow x + (\sigma' - \sigma)\,v$
#   (`FlowMatchEulerDiscreteScheduler.step`), and $\hat x_0 = x_t - t\,v$ at any step.
# - A DDIM step on DDPM's curved path, with the same network, is exactly a flow-Euler step between the
#   matching times $t_f = \sigma/(\alpha+\sigma)$: DDIM and flow Euler differ only in their time grids. Plain
#   Euler along the curve, at the same noise levels, is less accurate than along the line.
# - The shift $\sigma = s u / (1 + (s-1) u)$ moves steps to high noise without changing the ODE.
# - latent_concat puts the image latent + a mask on channels: 33 input channels, no extra tokens, FLOPs up
#   by a fraction of a percent; appending the image as tokens would lengthen every attention. token_replace
#   keeps frame 0 clean and tells the transformer through a timestep-0 modulation of those tokens.
# - The generated latents decode through the causal VAE, tiled or not.
#
# ## Exercises
#
# 1. With shift $s$, which uniform $u$ lands on $\sigma = 1/2$? How many of 50 steps have $\sigma > 1/2$ for
#    $s = 7$?
# 2. Show that the classifier-free-guided velocity with scale $w = 1$ is the conditional one, and measure how
#    much $w = 3$ changes the toy latent_concat sample.
# 3. For latent_concat, build the 33-channel input for a 9-frame clip by hand (zeros, mask) and check it
#    against `flow.latent_concat_input`.
#
# ## Solutions

# %%
# 1. sigma = s u / (1 + (s-1) u) = 1/2  <=>  u = 1 / (s + 1)
s = 7.0
print("u for sigma=1/2:", 1 / (s + 1), "->", flow.shift_sigmas(1 / (s + 1), s))
print(
    "steps of 50 at sigma > 1/2 with shift 7:",
    int((flow.shift_sigmas(np.linspace(1, 0, 51)[:-1], s) > 0.5).sum()),
)

# %%
# 2. v_u + 1 * (v_c - v_u) = v_c, so w = 1 is exactly the conditional sample
with torch.no_grad():
    cond = flow.sample_i2v(lc, image_latents, text, 17, 8, 3.0, latents=noise)
    w1 = flow.sample_i2v(
        lc, image_latents, text, 17, 8, 3.0, guidance_scale=1.0, uncond_text=uncond, latents=noise
    )
    w3 = flow.sample_i2v(
        lc, image_latents, text, 17, 8, 3.0, guidance_scale=3.0, uncond_text=uncond, latents=noise
    )
torch.testing.assert_close(w1, cond)
print(
    "w=1 == conditional; w=3 moves the sample by",
    round(float((w3 - cond).norm() / cond.norm()), 2),
    "of its norm",
)

# %%
# 3. [latents | image latent in frame 0, zeros | mask 1 in frame 0, zeros]
lat9 = torch.randn(1, 16, 3, 8, 8)
by_hand = torch.cat(
    [
        lat9,
        torch.cat([image_latents, torch.zeros(1, 16, 2, 8, 8)], 2),
        torch.tensor([1.0, 0, 0]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 8, 8),
    ],
    dim=1,
)
torch.testing.assert_close(flow.latent_concat_input(lat9, image_latents), by_hand)
print("33-channel input by hand matches:", tuple(by_hand.shape))

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import numpy as np
import torch

from anim_lab import flow as lab_flow

# %% [markdown] tags=["core"]
# ### Exercise 1 (2 points): the time shift
# Write `my_shift_sigmas(sigmas, shift)`: $\sigma \mapsto s\,\sigma / (1 + (s - 1)\,\sigma)$, for a tensor of
# sigmas in [0, 1].


# %% nbgrader={"grade": false, "grade_id": "ch12_shift_sigmas", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_shift_sigmas(sigmas, shift):
    ### BEGIN SOLUTION
    return shift * sigmas / (1 + (shift - 1) * sigmas)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch12_shift_sigmas_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_shift_sigmas is not lab_flow.shift_sigmas
gen = torch.Generator().manual_seed(12)
for shift in (1.0, 3.0, 7.0, 17.0, 0.5):
    sigmas = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(20, generator=gen, dtype=torch.float64)])
    torch.testing.assert_close(my_shift_sigmas(sigmas, shift), lab_flow.shift_sigmas(sigmas, shift))
print("my_shift_sigmas matches flow.shift_sigmas for 5 shifts")

# %% [markdown] tags=["core"]
# ### Exercise 2 (3 points): the flow-matching Euler sampler with a shift
# Write `my_flow_euler_sample(velocity_fn, noise, num_steps, shift)`: start from `noise` at $\sigma = 1$; the
# sigmas are `num_steps` uniform values from 1 down to (not including) 0, shifted with `my_shift_sigmas`, then
# a final 0. Each step calls `velocity_fn(x, 1000 * sigma)` (the model's timestep is $1000\,\sigma$) and takes
# the Euler step $x \leftarrow x + (\sigma_{next} - \sigma)\,v$. Return the final `x`.


# %% nbgrader={"grade": false, "grade_id": "ch12_flow_euler", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_flow_euler_sample(velocity_fn, noise, num_steps, shift):
    ### BEGIN SOLUTION
    sigmas = my_shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1], shift)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = x + (sigma_next - sigma) * velocity_fn(x, 1000 * sigma)
    return x
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch12_flow_euler_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(13)
target = torch.randn(1, 4, 3, 4, 4, generator=gen)


def toy_velocity(x, t):  # a velocity field that depends on x and on t
    return (x - target) * (1 + t / 1000) + 0.1 * torch.sin(x)


for steps, shift in [(10, 1.0), (20, 7.0), (4, 3.0), (1, 17.0)]:
    noise = torch.randn(1, 4, 3, 4, 4, generator=gen)
    scheduler = lab_flow.make_scheduler(shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(toy_velocity(x, t), t, x, return_dict=False)[0]
    torch.testing.assert_close(
        my_flow_euler_sample(toy_velocity, noise, steps, shift), x, atol=1e-4, rtol=1e-4
    )
print("my_flow_euler_sample matches FlowMatchEulerDiscreteScheduler for 4 (steps, shift) pairs")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# HunyuanVideo samples with a shift of 7. With 20 steps, on how many of them does the sampler stand at a noise
# level $\sigma > 0.5$ (its step *starts* there), against 10 of 20 without the shift? Store it, an int, in
# `high_noise_steps`.

# %% nbgrader={"grade": false, "grade_id": "ch12_high_noise_steps", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_sigmas = lab_flow.shift_sigmas(np.linspace(1.0, 0.0, 21)[:-1], 7.0)
high_noise_steps = int((lab_sigmas > 0.5).sum())
### END SOLUTION
print(f"shift 7: {high_noise_steps} of 20 steps start above sigma = 0.5")

# %% nbgrader={"grade": true, "grade_id": "ch12_high_noise_steps_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(high_noise_steps, int) and 0 <= high_noise_steps <= 20
### BEGIN HIDDEN TESTS
_s = lab_flow.make_scheduler(7.0)
_s.set_timesteps(sigmas=np.linspace(1.0, 0.0, 21)[:-1])
assert high_noise_steps == int((_s.sigmas[:-1] > 0.5).sum())
### END HIDDEN TESTS
print("high_noise_steps is a count")
