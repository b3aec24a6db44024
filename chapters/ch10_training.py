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
# # Chapter 10 — Training the animator
#
# *How the toy animator's weights were made: AnimateAnyone's two stages, the v-prediction loss with min-SNR
# weights on a zero-terminal-SNR schedule, condition dropout, the training curves and what they cost, and why
# the same script gives the same weights on one process or many.*
#
# - **You will build**: the parameter count of every component in each stage, one training batch drawn by the
#   script, its loss written out from the formulas and checked against `train_step_loss`, the min-SNR weight
#   curve, the gradient's reach into the ReferenceNet's frozen last block, the start of stage 2 as an exact
#   copy of stage 1, the training curves of every run in the weights' history, samples from the network at
#   step 0, at four earlier checkpoints of two versions and at the end, and the one-process vs two-process
#   gradient
# - **Library modules and scripts**: `scripts/train_animator.py` (`Animator`, `init_stage1`, `build_cache`,
#   `step_batch`, `train_step_loss`, `diffusion_loss`, `training_scheduler`, `lr_factor`),
#   `scripts/eval_animator.py` (`make_cases`, `generate`), `scripts/sample_checkpoints.py`, `anim_lab.toy`
#   (`load_animator`), `anim_lab.guidance`, `anim_lab.weights`, `anim_lab.vae`, `anim_lab.clip`,
#   `anim_lab.viz`
# - **Questions answered**: What does each stage train and freeze, and why? Why v-prediction and not the
#   ε-loss of the Stable Diffusion papers? What is min-SNR weighting, and why the "+1"? What does zero
#   terminal SNR ask of the network at t = 999? What does the noise offset do at this latent size? What is
#   dropped on an unconditional step, and how does it differ from inference's zero tokens? Does the gradient
#   reach the ReferenceNet block that the reference freezes? How long did training take, and how did the loss
#   and the learning rate go? How does the same script run on N processes, and why are its batches a function
#   of (seed, step)?
# - **CPU runtime**: about 14 s (chapters/README.md)
#
# The script is Moore-AnimateAnyone's `train_stage_1.py` / `train_stage_2.py` rewritten for a tiny model
# trained from scratch (`implementations.md` §1.10 lists the reference's settings). The final weights are in
# `anim_lab/assets/toy_animator` (earlier ones in its git history); their `train_log.json` holds the loss of
# every run that led to them.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import argparse
import functools
import json
import tempfile
import warnings
from pathlib import Path
from unittest import mock

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
import accelerate
import diffusers
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

import anim_lab
from anim_lab.inspect import format_table
from anim_lab.metrics import psnr, video_from_uint8
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.toy import TOY_ANIMATOR_DIR, load_animator
from anim_lab.unet import MOTION_KEY
from anim_lab.vae import images_to_uint8
from anim_lab.viz import image_grid, save
from anim_lab.weights import load_checkpoint, load_into

diffusers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()  # no "Loading weights" bars on stderr
torch.manual_seed(0)
torch.set_num_threads(1)  # small tensors: one thread is as fast, and steady on a busy machine
torch.set_printoptions(precision=4, sci_mode=False)
np.set_printoptions(precision=4, suppress=True)
T = anim_lab.load_script("train_animator")  # scripts/train_animator.py as a module
E = anim_lab.load_script("eval_animator")
print(f"anim_lab {anim_lab.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
print(f"accelerate {accelerate.__version__}, matplotlib {matplotlib.__version__}")

# %% [markdown] tags=["core"]
# ## 1. Two stages: what is trained, what is frozen
#
# AnimateAnyone (and Moore-AnimateAnyone's code) trains in two stages:
#
# - **Stage 1, images.** Single frames: a random frame of a clip is the target, another image of the same
#   person the reference (the toy world renders it in another pose and expression). Trained: the
#   ReferenceNet, the denoising UNet *without* motion modules, and the PoseGuider. The network learns
#   appearance (from the reference) and pose (from the pose image) with no time axis, so a step is cheap and
#   the batch can be large.
# - **Stage 2, motion.** 16-frame clips here (24 in the reference). The motion modules are inserted into the
#   denoising UNet and are the **only** trained weights: everything learned in stage 1 stays as it was, and
#   the motion modules only have to learn how frames go together.
# - **Frozen in both**: the VAE and the CLIP image encoder (the toy ones here). Their outputs are even
#   pre-computed once (`build_cache`), since they never change.
#
# The model's sizes come from the committed weights' own config files, and what the loaded model has:

# %% tags=["core"]
WEIGHTS_DIR = TOY_ANIMATOR_DIR
den_config = json.loads((WEIGHTS_DIR / "denoising_unet" / "config.json").read_text())
guider_config = json.loads((WEIGHTS_DIR / "pose_guider" / "config.json").read_text())
has_motion = bool(den_config.get("motion_kwargs"))
config = {
    "unet": den_config["unet_kwargs"],
    "pose_guider": {k: v for k, v in guider_config.items() if not k.startswith("_")},  # its constructor's
    "motion": den_config["motion_kwargs"] or T.model_config()["motion"],  # stage 2's sizes (configs.TOY)
}
print("committed denoising UNet has motion modules (stage 2 trained):", has_motion)
print(
    "UNet block_out_channels:", config["unet"]["block_out_channels"], "| PoseGuider:", config["pose_guider"]
)

# %% [markdown] tags=["core"]
# `Animator(config, stage)` is the script's module that holds the three trained networks; its
# `set_trainable()` returns the parameters the optimizer gets. Counted per component and stage, with the
# frozen VAE and image encoder beside them:

# %% tags=["core"]
pipe = load_animator(
    WEIGHTS_DIR
)  # the committed weights as a pipeline, with the scaled_linear DDIM of training
pipe.set_progress_bar_config(disable=True)
vae = pipe.vae  # the toy VAE (the cache's latents come from it)
image_encoder = pipe.image_encoder  # the frozen encoder that travels with the weights (image_encoder/)


def count(params):
    return sum(p.numel() for p in params)


stages = {}
for stage in (1, 2):
    animator = T.Animator(config, stage)
    trainable = {id(p) for p in animator.set_trainable()}
    parts = {
        "reference_unet": list(animator.reference_unet.named_parameters()),
        "denoising_unet (2D)": [
            (n, p) for n, p in animator.denoising_unet.named_parameters() if MOTION_KEY not in n
        ],
        "motion modules": [(n, p) for n, p in animator.denoising_unet.named_parameters() if MOTION_KEY in n],
        "pose_guider": list(animator.pose_guider.named_parameters()),
    }
    stages[stage] = {
        k: (count(p for _, p in v), count(p for _, p in v if id(p) in trainable)) for k, v in parts.items()
    }
    stages[stage]["total"] = (count(animator.parameters()), count(animator.set_trainable()))
rows = [
    [name, f"{stages[2][name][0]:,}", f"{stages[1][name][1]:,}", f"{stages[2][name][1]:,}"]
    for name in stages[2]
]
rows += [
    ["VAE (frozen)", f"{count(vae.parameters()):,}", 0, 0],
    ["image encoder (frozen)", f"{count(image_encoder.parameters()):,}", 0, 0],
]
print(format_table(rows, ["component", "parameters", "trained in stage 1", "trained in stage 2"]))

# %% [markdown] tags=["core"]
# - Stage 1 trains everything but the motion modules (which do not exist yet) and a slice of the ReferenceNet:
#   its last up block (`up_blocks.3`, the reference freezes it too; section 6 measures what that costs).
# - Stage 2 trains the motion modules only, a fraction of the whole network.
#
# **How the networks start.** The seed notes, translating the paper, say that both UNets start from SD's
# weights, and the PoseGuider from Gaussian weights with a zero convolution as its last layer. The toy has no
# SD to start from, so `init_stage1` gives the ReferenceNet the denoising UNet's *random* 2D weights: the two
# UNets start identical, as they would from one SD checkpoint, so their features live in the same space and
# the denoiser's `attn1` can match its own tokens against the ReferenceNet's from the first step. The
# PoseGuider's last conv starts at zero (chapter 06 shows why): at step 0 the pose adds nothing.

# %% tags=["core"]
torch.manual_seed(0)  # the script's default --seed
at_init = T.Animator(config, 1)
T.init_stage1(at_init)
ref_state, den_state = at_init.reference_unet.state_dict(), at_init.denoising_unet.state_dict()
shared = [k for k in ref_state if k in den_state]
print(f"ReferenceNet keys shared with the denoiser: {len(shared)} of {len(ref_state)}")
print("equal at step 0:", all(torch.equal(ref_state[k], den_state[k]) for k in shared))
conv_out_zero = all(bool((p == 0).all()) for p in at_init.pose_guider.conv_out.parameters())
print("PoseGuider conv_out (weight and bias) all zero at step 0:", conv_out_zero)

# %% [markdown] tags=["core"]
# ## 2. One training batch, drawn by the script
#
# The script pre-encodes the toy clips once (`build_cache`): reference latents and CLIP token, every frame's
# latent (VAE mean × scaling factor), the landmarks (pose images are drawn per step), and the CLIP token of
# zero pixels (for dropped steps). Here on 2 clips × 2 frames, in a temporary folder that is deleted right
# after (the script's pre-encoding progress bar is turned off):

# %% tags=["core"]
with (
    tempfile.TemporaryDirectory() as tmp,
    mock.patch.object(T, "tqdm", functools.partial(T.tqdm, disable=True)),
):
    # encoded with the VAE the committed animator was trained with (the toy VAE v2, a copy in its folder)
    cache = T.build_cache(
        Path(tmp) / "cache.safetensors",
        num_items=2,
        num_frames=2,
        fps=2.0,
        seed=0,
        vae_dir=TOY_ANIMATOR_DIR / "vae",
    )
for key, value in cache.items():
    if key != "meta":
        print(f"{key:13s}", tuple(value.shape))

# %% [markdown] tags=["core"]
# `step_batch` draws one step's whole batch from `(seed, step)` alone (section 9 says why): which clips and
# frames, the noise and its offset, the timesteps, and the coin of condition dropout. Stage 1 takes one frame
# per clip, so F = 1:

# %% tags=["core"]
batch = T.step_batch(cache, stage=1, step=0, seed=0, batch_size=2, uncond_ratio=0.1)
for key, value in batch.items():
    print(f"{key:12s}", tuple(value.shape) if isinstance(value, torch.Tensor) else value)

# %% [markdown] tags=["core"]
# ## 3. The loss, written out
#
# With $\bar\alpha_t$ the noise schedule, $x_0$ the target latent and $\varepsilon$ the noise:
#
# $$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\qquad
#   v = \sqrt{\bar\alpha_t}\,\varepsilon - \sqrt{1-\bar\alpha_t}\,x_0,\qquad
#   \mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t}$$
#
# The network predicts $\hat v$. Since $\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,\hat v$,
# an error in $v$ is an error in $x_0$ scaled: $\lVert\hat v - v\rVert^2 = (1+\mathrm{SNR})\,
# \lVert\hat x_0 - x_0\rVert^2$. Min-SNR weighting (Hang et al., 2023) caps how much the low-noise steps
# count. The script's loss, per sample, then averaged over the batch:
#
# $$\mathcal L = \frac1B\sum_b w(t_b)\,\lVert\hat v_b - v_b\rVert^2_{\text{mean}},\qquad
#   w(t) = \frac{\min(\mathrm{SNR}(t) + 1,\ \gamma)}{\mathrm{SNR}(t) + 1},\quad \gamma = 5$$
#
# - $\varepsilon$ includes the **noise offset**: `noise + 0.05 * offset`, one constant per sample and channel
#   (section 4).
# - The schedule: scaled_linear betas from 0.00085 to 0.012, rescaled to **zero terminal SNR** (Lin et al.,
#   2023, Algorithm 1): $\sqrt{\bar\alpha_t}$ is shifted so that its last value is 0 and scaled so that its
#   first is unchanged. Written out and checked against the script's scheduler:

# %% tags=["core"]
scheduler = T.training_scheduler()  # diffusers' DDPMScheduler with the reference's training kwargs
betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
root = torch.cumprod(1 - betas, dim=0).sqrt()  # sqrt(alpha_bar), (1000,)
root = (root - root[-1]) * root[0] / (root[0] - root[-1])  # shift the last to 0, keep the first
alphas_cumprod = (root**2).float()
torch.testing.assert_close(alphas_cumprod, scheduler.alphas_cumprod)
print("zero-SNR alpha_bar by hand == the script's scheduler: True")
print(
    "prediction_type:",
    scheduler.config.prediction_type,
    "| alpha_bar at t = 999:",
    float(alphas_cumprod[999]),
)

# %% [markdown] tags=["core"]
# The loss of the batch above, by hand, on the committed weights, against the script's `train_step_loss`
# (pose images, the networks and the ReferenceNet's bank as in training; only the arithmetic is ours):


# %% tags=["core"]
def committed_state(name, with_motion):
    state = load_checkpoint(WEIGHTS_DIR / name / T.WEIGHTS)
    return {k: v for k, v in state.items() if with_motion or MOTION_KEY not in k}


def animator_from_weights(stage, with_motion=True):
    """An Animator of `stage` with the committed weights (their motion modules' only if `with_motion`)."""
    torch.manual_seed(0)
    animator = T.Animator(config, stage)
    for name in T.COMPONENTS:
        state = committed_state(name, with_motion and stage == 2)
        load_into(getattr(animator, name), state, ignore_missing=(MOTION_KEY,), what=name)
    return animator.eval()


trained = animator_from_weights(2 if has_motion else 1)
with torch.no_grad():
    batch_loss = T.train_step_loss(trained, batch, scheduler, noise_offset=0.05, snr_gamma=5.0)

    a = alphas_cumprod[batch["timesteps"]].view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    x0 = batch["latents"]  # (B, 4, F, h, w)
    eps = batch["noise"] + 0.05 * batch["offset"]  # noise offset: (B, 4, 1, 1, 1) broadcast
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    snr = a.flatten() / (1 - a.flatten())  # (B,)
    w = torch.clamp(snr + 1, max=5.0) / (snr + 1)
    poses = T.pose_batch(batch["landmarks"])  # (B, 3, F, H, W) in [0, 1]
    v_pred = trained(x_t, batch["timesteps"], batch["tokens"], batch["ref_latents"], poses, batch["uncond"])
    by_hand = (w * ((v_pred - v) ** 2).mean(dim=(1, 2, 3, 4))).mean()
torch.testing.assert_close(by_hand, batch_loss, rtol=1e-5, atol=1e-6)
print("timesteps", batch["timesteps"].tolist(), "| weights", [round(float(x), 3) for x in w])
print(f"loss by hand {float(by_hand):.4f} == train_step_loss {float(batch_loss):.4f}: True")

# %% [markdown]
# ## 4. Zero terminal SNR, v-prediction, the weight curve, the noise offset
#
# The seed notes write Stable Diffusion's objective, $\lVert\varepsilon - \varepsilon_\theta(z_t, c, t)
# \rVert^2$: predict the noise. The animator is trained differently, because of the schedule's last step.
# Chapter 07 (§4) shows the sampling side: without the rescale, t = 999 keeps a trace of the image's
# brightness, and only trailing timesteps start sampling from it. The training side:
#
# - At t = 999, $\bar\alpha = 0$: $x_{999} = \varepsilon$ exactly. The ε-target is the input itself — a
#   network can score a perfect ε-loss there by copying its input, and learns nothing about the frame.
# - The v-target at t = 999 is $-x_0$: the network has to draw the frame from pure noise, that is from the
#   **conditions alone** — the reference (CLIP token and bank) and the pose. That is the hardest step, and the
#   one inference starts from.

# %%
at_ends = dict(batch, timesteps=torch.tensor([999, 20]))  # the same batch at both ends of the schedule
x0, eps = at_ends["latents"], at_ends["noise"] + 0.05 * at_ends["offset"]
x_t = scheduler.add_noise(x0, eps, at_ends["timesteps"])
v = scheduler.get_velocity(x0, eps, at_ends["timesteps"])
print(
    "t = 999: x_t is the noise:", torch.equal(x_t[0], eps[0]), "| v target == -x0:", torch.equal(v[0], -x0[0])
)
with torch.no_grad():
    poses_ends = T.pose_batch(at_ends["landmarks"])  # (B, 3, 1, H, W)
    v_pred = trained(x_t, at_ends["timesteps"], at_ends["tokens"], at_ends["ref_latents"], poses_ends, False)
per_sample = T.diffusion_loss(v_pred, x0, eps, at_ends["timesteps"], scheduler)  # (B,) weighted v-loss
print("weighted v-loss at t = 999, 20:", [round(float(x), 4) for x in per_sample])

# %% [markdown]
# What the trained network paints at t = 999 from the noise and the conditions: $\hat x_0 = -\hat v$, decoded,
# beside the reference, the pose image and the target frame (a training clip):


# %%
def decode(z):
    """(1, 4, h, w) latents (x scaling factor) -> (H, W, 3) uint8."""
    with torch.no_grad():
        return images_to_uint8(vae.decode(z / vae.config.scaling_factor).sample[0])


pose_image = (T.pose_batch(at_ends["landmarks"])[0, :, 0].permute(1, 2, 0) * 255).byte().numpy()  # (H, W, 3)
pictures = [decode(at_ends["ref_latents"][:1]), pose_image, decode(-v_pred[:1, :, 0]), decode(x0[:1, :, 0])]
titles = ["reference", "pose", "x0 predicted at t = 999", "target frame"]
fig = image_grid(pictures, titles, figsize=(8, 2.4))
save(fig, "ch10_t999_prediction")
plt.show()

# %% [markdown]
# **The weights.** In terms of the $x_0$ error, the script weighs each step by
# $\min(\mathrm{SNR}+1,\ \gamma)$: 1 at pure noise, growing with the signal, capped at 5, so that the easy
# low-noise steps do not dominate.
# On the v-loss that is $w(t)$ above, and at t = 999 (SNR 0) $w = 1$.
#
# - The min-SNR paper weighs the $x_0$ error by $\min(\mathrm{SNR}, \gamma)$ instead, i.e. the v-loss by
#   $\min(\mathrm{SNR}, \gamma)/(\mathrm{SNR}+1)$ (diffusers' example scripts use this form today). Below the
#   cap that is $\bar\alpha_t$ — the weight of a plain ε-loss (exercise 1) —, fading over the noisy half of
#   the schedule to **0** at t = 999: the step inference starts from would never be trained.
# - The reference uses the "+1" form, from an older diffusers recipe ("the velocity objective requires that we
#   add one to SNR values before we divide by them"), and so does the script. Checked on `diffusion_loss`:

# %%
snr_all = alphas_cumprod.double() / (1 - alphas_cumprod.double())  # (1000,), 0 at t = 999
w_script = torch.clamp(snr_all + 1, max=5) / (snr_all + 1)
w_paper = torch.clamp(snr_all, max=5) / (snr_all + 1)
ts = torch.tensor([0, 50, 100, 200, 300, 500, 700, 900, 999])
zeros, ones = torch.zeros(9, 4, 1, 2, 2), torch.ones(9, 4, 1, 2, 2)  # prediction 0, x0 = 1, noise 0
per_t = T.diffusion_loss(zeros, ones, zeros, ts, scheduler)  # w(t) |0 - v|^2 with v = -sqrt(1 - a) x0
torch.testing.assert_close(per_t / (1 - alphas_cumprod[ts]), w_script[ts].float())
rows = [
    [t] + [f"{float(x):.4g}" for x in (alphas_cumprod[t], snr_all[t], w_script[t], w_paper[t])]
    for t in ts.tolist()
]
print("the script's diffusion_loss uses w_script: True")
print(format_table(rows, ["t", "alpha_bar", "SNR", "w (script, +1)", "w (paper)"]))
capped = int((snr_all + 1 > 5).sum())
print(f"timesteps where the cap acts (SNR + 1 > 5): t < {capped}")

fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.plot(w_script.numpy(), label="min(SNR + 1, 5) / (SNR + 1)  (script, reference)")
ax.plot(w_paper.numpy(), "--", label="min(SNR, 5) / (SNR + 1)  (min-SNR paper, v-loss)")
ax.set_xlabel("timestep t")
ax.set_ylabel("weight of the v-loss")
ax.legend(fontsize=8)
ax.set_title("min-SNR weights on the zero-terminal-SNR schedule", fontsize=9)
fig.tight_layout()
save(fig, "ch10_snr_weights")
plt.show()

# %% [markdown]
# **The noise offset** (0.05, as the reference). Plain Gaussian noise has almost no per-channel mean over a
# whole latent, so the network rarely sees "the whole image is darker / more red" as something noise can do,
# and at inference struggles to change a latent's mean. Adding $0.05 \cdot \mathcal N(0,1)$ per sample and
# channel (`offset`, shape `(B, 4, 1, 1, 1)`) fixes that. It matters less here than at SD size: the natural
# spread of a channel's mean is $1/\sqrt{hw}$, already 0.0625 for the toy's 16×16 latents (0.016 at 64×64):

# %%
g = torch.Generator().manual_seed(0)
for side in (16, 64):
    noise = torch.randn(2000, 4, side, side, generator=g)
    offset = torch.randn(2000, 4, 1, 1, generator=g)
    plain, shifted = noise.mean((2, 3)).std(), (noise + 0.05 * offset).mean((2, 3)).std()
    print(f"{side}x{side} latents: std of a channel's mean {plain:.3f}, with the offset {shifted:.3f}")

# %% [markdown]
# With zero terminal SNR the two remedies overlap (pure noise at t = 999 no longer leaks the mean either);
# the reference keeps both, and so does the script.
#
# ## 5. Condition dropout: one coin per step
#
# CFG needs a network that can also predict without the reference. The seed notes describe text-to-image
# training, which swaps the prompt for the empty string 10 % of the time. The animator's version (chapter 07
# §2 compares it with inference): one coin per **step**, for the whole batch, p = 0.1; on heads
#
# - the CLIP **pixels** are zeros, so the token is `image_encoder(0)` (pre-computed as `uncond_token`), and
# - the ReferenceNet does not run: the denoiser's `attn1` sees no bank.

# %%
draws = [T.step_batch(cache, 1, s, seed=0, batch_size=2, uncond_ratio=0.1)["uncond"] for s in range(2000)]
dropped_step = draws.index(True)
print(f"unconditional steps over 2000: {np.mean(draws):.3f}; the first at step {dropped_step}")
dropped = T.step_batch(cache, 1, dropped_step, seed=0, batch_size=2, uncond_ratio=0.1)
size = image_encoder.config.image_size
with torch.no_grad():
    zero_pixels_token = image_encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds  # (1, D)
torch.testing.assert_close(dropped["tokens"], zero_pixels_token[:, None].expand(2, 1, -1))
print(
    "dropped step's tokens == image_encoder(zero pixels):",
    True,
    "| all zero:",
    bool((dropped["tokens"] == 0).all()),
)

# %% [markdown]
# The ReferenceNet's calls, counted with a forward hook, on a conditional and on a dropped step:

# %%
calls = []
hook = trained.reference_unet.register_forward_hook(lambda *args: calls.append(1))
with torch.no_grad():
    for b in (batch, dropped):
        calls.clear()
        T.train_step_loss(trained, b, scheduler, 0.05, 5.0)
        print(f"uncond {b['uncond']!s:5}: ReferenceNet forward calls {len(calls)}")
hook.remove()

# %% [markdown]
# Inference's unconditional rows get **zero tokens** instead (and no bank). On the trained denoiser, how far
# apart are the two "unconditional" predictions, relative to the step that the condition itself makes?


# %%
t500 = torch.tensor([500, 500])
x_t500 = scheduler.add_noise(batch["latents"], batch["noise"], t500)  # (B, 4, 1, h, w)
poses_b = T.pose_batch(batch["landmarks"])


def v_of(tokens, uncond):
    with torch.no_grad():
        return trained(x_t500, t500, tokens, batch["ref_latents"], poses_b, uncond)


v_cond = v_of(batch["tokens"], uncond=False)
v_train_uncond = v_of(cache["uncond_token"].expand(2, 1, -1), uncond=True)  # what training dropped to
v_zero_uncond = v_of(torch.zeros_like(batch["tokens"]), uncond=True)  # what inference feeds
gap = (v_train_uncond - v_zero_uncond).norm() / (v_cond - v_train_uncond).norm()
print(f"t = 500: |v(image_encoder(0)) - v(zeros)| / |v(cond) - v(image_encoder(0))| = {float(gap):.2f}")

# %% [markdown]
# The ratio printed above measures the train/inference mismatch of the unconditional branch on this model,
# relative to the conditional-minus-unconditional difference that CFG scales up; chapter 07 discusses its
# effect.
#
# ## 6. Where the gradient goes
#
# **The ReferenceNet's frozen `up_blocks.3`.** The reference freezes it ("some top layer params don't need
# grad"). Chapter 05 showed that the ReferenceNet's *output* is never used; but its last block still holds
# bank writers. With every parameter trainable, one backward pass on the conditional batch shows which of
# the block's parameters a gradient reaches:

# %%
full = animator_from_weights(2 if has_motion else 1)
full.requires_grad_(True)
with torch.enable_grad():
    T.train_step_loss(full, batch, scheduler, 0.05, 5.0).backward()
grads = {n: p.grad.clone() for n, p in full.named_parameters() if p.grad is not None}  # kept for section 9
block = "reference_unet.up_blocks.3."
reached = {
    n: bool(grads.get(n, torch.zeros(1)).abs().sum() > 0)
    for n, _ in full.named_parameters()
    if n.startswith(block)
}
sizes = dict(full.named_parameters())
n_all = sum(sizes[n].numel() for n in reached)
n_reached = sum(sizes[n].numel() for n, r in reached.items() if r)
print(f"up_blocks.3: {n_all:,} parameters, {n_reached:,} ({n_reached / n_all:.0%}) get a nonzero gradient")


def module_of(name):
    parts = name[len(block) :].split(".")
    return ".".join(parts[:5] if "transformer_blocks" in name else parts[:-1])


print("modules with no gradient:", list(dict.fromkeys(module_of(n) for n, r in reached.items() if not r)))

# %% [markdown]
# - Only the tail after the **last** bank writer (its `attn1`, `attn2`, feed-forward and `proj_out`) is dead.
#   The block's resnets and first transformer shape bank entries that the denoiser reads, so freezing them is
#   a choice — it saves the backward pass through the ReferenceNet's largest-resolution block — not a
#   necessity.
# - In the reference that block holds SD's pretrained weights; in this toy it keeps its random initial
#   values, which the denoiser's readers learn to use as they are. The committed weights confirm the freeze:
#   the block is bit for bit the seed-0 initialisation of section 1:

# %%
committed_ref = committed_state("reference_unet", with_motion=False)
frozen_keys = [k for k in committed_ref if k.startswith("up_blocks.3.")]
unchanged = all(torch.equal(committed_ref[k], ref_state[k]) for k in frozen_keys)
print(f"committed ReferenceNet up_blocks.3 == its step-0 values ({len(frozen_keys)} tensors): {unchanged}")
moved = [
    k
    for k in committed_ref
    if not k.startswith("up_blocks.3.") and not torch.equal(committed_ref[k], ref_state[k])
]
print(
    f"other ReferenceNet tensors moved by training: {len(moved)} of {len(committed_ref) - len(frozen_keys)}"
)

# %% [markdown]
# **Stage 2 starts exactly where stage 1 ended.** Each motion module adds its output to its input through a
# `proj_out` that starts at zero (AnimateDiff's zero initialisation; the reference instead starts from
# AnimateDiff's `mm_sd_v15_v2.ckpt`). So a fresh stage-2 network with stage 1's weights predicts every frame
# of a clip exactly as the image model does, and stage 2 can only improve from there. Checked on a 2-frame
# clip with the committed 2D weights:
#
# (The first stage-2 run behind the committed weights started this way. The three later ones did not: each
# followed a further stage-1 run and warm-started its motion modules from the stage 2 before it with
# `--motion-from`, so it began from those modules, trained on older 2D weights, rather than from the image
# model; v2's stage 2 took them from v1's; `COMMANDS.md`.)

# %%
stage1_net = animator_from_weights(1) if has_motion else trained  # the image model
stage2_start = animator_from_weights(2, with_motion=False)  # fresh motion modules, proj_out = 0
clip = T.step_batch(cache, stage=2, step=0, seed=0, batch_size=1, uncond_ratio=0.1)  # (1, 4, F=2, h, w)
noisy = scheduler.add_noise(clip["latents"], clip["noise"], clip["timesteps"])
args = (noisy, clip["timesteps"], clip["tokens"], clip["ref_latents"], T.pose_batch(clip["landmarks"]), False)
with torch.no_grad():
    out1, out2 = stage1_net(*args), stage2_start(*args)
print("motion modules at the start of stage 2:", len(stage2_start.denoising_unet.motion_modules()))
print("stage-2 start == stage-1 network, frame by frame:", torch.equal(out1, out2))

# %% [markdown]
# ## 7. The training curves, and what they cost
#
# Each weights folder written by the script has a `train_log.json`: the run's arguments, data, scheduler, and
# its log (`steps`, `loss` — the mean of the last 10 steps —, `lr`, `seconds`). A run started from earlier
# weights (`--init-from`: a stage-1 continuation, or stage 2) keeps their log under `"earlier"`, so the file
# is a chain back to the first run (a `--motion-from` source is only named in the run's arguments). The chain
# holds two versions: v1, seven runs from scratch on the first toy VAE's latents, and v2, the same two stages
# again on the sharper VAE v2's latents (chapter 02), started from v1's weights and keeping an EMA of them.
# Walked to any depth, oldest first:

# %%
train_log = json.loads((WEIGHTS_DIR / "train_log.json").read_text())


def runs_of(log):
    """The chain of runs behind a weights folder, oldest first."""
    runs = []
    while log:
        runs.append(log)
        log = log.get("earlier")
    return runs[::-1]


def on_one_axis(runs):
    """Each run's logged steps on one axis: a run that restarts its count (stage 2) follows the one before."""
    done, out = 0, []
    for run in runs:
        start = run["args"].get("start_step", 0)
        offset = done - start
        out.append(np.array(run["log"]["steps"]) + offset)
        done = run["step"] + offset
    return out


runs = runs_of(train_log)
axis = on_one_axis(runs)
version = lambda r: "v2" if r.get("ema_decay") else "v1"  # noqa: E731  v2's runs kept an EMA, v1's did not
labels = [
    f"{version(r)} stage {r['stage']}: steps {r['args'].get('start_step', 0)}-{r['step']}" for r in runs
]
print(len(runs), "run(s):", labels)

# %%
fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True, height_ratios=[3, 1.5])
for i, (run, x, label) in enumerate(zip(runs, axis, labels, strict=True)):
    run_loss = np.array(run["log"]["loss"])
    smooth = np.convolve(run_loss, np.ones(10) / 10, mode="valid") if len(run_loss) >= 10 else run_loss
    ax_loss.plot(x, run_loss, color=f"C{i}", alpha=0.3, lw=0.8)
    ax_loss.plot(x[len(x) - len(smooth) :], smooth, color=f"C{i}", label=label)
    ax_lr.plot(x, run["log"]["lr"], color=f"C{i}")
    if i:
        for ax in (ax_loss, ax_lr):
            ax.axvline(x[0], color="grey", ls=":", lw=0.8)
ax_loss.set_yscale("log")
ax_loss.set_ylabel("loss (10-step means; line: 100)")
ax_loss.legend(fontsize=8)
ax_lr.set_ylabel("lr")
ax_lr.set_xlabel("training step (all runs on one axis)")
fig.tight_layout()
save(fig, "ch10_training_curves")
plt.show()

# %% [markdown]
# Where v2 begins the loss jumps up: the same networks now meet another VAE's latents, whose scale and
# detail differ; it comes back down within v2's first stage, which starts from v1's weights and not from
# scratch (from scratch, over the same first 270 steps and draws, its mean loss was about five times higher;
# `COMMANDS.md`).
#
# The learning rate follows `lr_factor`: a linear warm-up from the run's start step, then a cosine from 1
# down to `--min-lr-ratio` at `--max-steps` (constant when the ratio is 1):
#
# $$\eta(s) = \eta_0 \cdot \min\!\Big(1, \frac{s - s_0 + 1}{W}\Big)\cdot
#   \Big(r + (1 - r)\,\tfrac12\big(1 + \cos(\pi\,\min(1, \tfrac{s - s_0}{S - s_0}))\big)\Big)$$
#
# Recomputed from each run's logged arguments (those of its last invocation) and compared with its logged lr.
# A run resumed with another `--max-steps` matches only from its resumption on, and the comparison says so
# (`COMMANDS.md` beside the weights lists every invocation):

# %%
defaults = vars(T.parse_args(["--stage", "1", "--out", "unused"]))
for run, label in zip(runs, labels, strict=True):
    run_args = argparse.Namespace(**{**defaults, **run["args"]})
    formula = [run_args.lr * T.lr_factor(s, run_args) for s in run["log"]["steps"]]
    logged = run["log"]["lr"]
    ok = np.isclose(formula, logged, rtol=1e-6)
    first = next((i for i in range(len(ok)) if ok[i:].all()), None)  # from here on, every entry matches
    if first == 0:
        where = "every logged step"
    elif first is None:
        where = "no logged step"
    else:
        where = f"steps {run['log']['steps'][first]}-{run['log']['steps'][-1]} (before: other arguments)"
    print(f"{label}: logged lr == formula on {where} (max {max(logged):.1e}, last {logged[-1]:.1e})")

# %% [markdown]
# **The cost**, read from the logs: each run's steps, batch, processes and torch threads per process,
# trainable parameters and training time (`seconds`: the training loop's wall time, summed over resumptions;
# where the runs ran is in `COMMANDS.md` beside the weights):

# %%
rows, total_steps, total_seconds = [], 0, 0.0
for run, label in zip(runs, labels, strict=True):
    steps = run["step"] - run["args"].get("start_step", 0)
    frames = 1 if run["stage"] == 1 else run["data"]["num_frames"]
    total_steps, total_seconds = total_steps + steps, total_seconds + run["seconds"]
    rows.append(
        [label, steps, f"{run['batch_size']} x {frames}", run["data"]["num_items"], run["processes"]]
        + [run["args"].get("threads", 1)]
        + [f"{run['trainable_parameters']:,}", f"{run['seconds'] / 60:.1f}", f"{run['seconds'] / steps:.2f}"]
        + [f"{run['log']['loss'][-1]:.4f}"]
    )
header = ["run", "steps", "batch x frames", "clips", "processes", "threads", "trained params", "minutes"]
print(format_table(rows, header + ["s/step", "last loss"]))
print(f"in all: {total_steps} steps, {total_seconds / 60:.1f} minutes of training")

# %% [markdown]
# For scale: the reference trains stage 1 for 30 000 steps of batch 4 at 768² and stage 2 for 10 000 steps of
# 24 frames, on A100s (`implementations.md` §1.10).
#
# ## 8. Samples along the way
#
# Only the final weights sit in the working tree; the earlier ones are in git history (each commit of
# `anim_lab/assets/toy_animator`). `scripts/sample_checkpoints.py` animated one held-out identity with a
# held-out driving clip (`eval_animator.make_cases`, 4 frames spread over the clip, 8 DDIM steps, CFG 3.5)
# with the weights of four earlier checkpoints and the final ones, and stored the frames
# (`samples_along_training.npz` beside the weights; its docstring has the exact commands). Two versions:
# v1, trained from scratch on the first toy VAE's latents and decoding with it (chapter 02), and v2, started
# from v1's weights and trained again on the sharper VAE v2's latents, with an EMA of the weights. Here: the
# network at step 0, rebuilt exactly (seed 0, `init_stage1`, as section 6's check confirms), the stored
# checkpoints, and the committed weights run live, which must reproduce the stored final row (to float
# rounding):

# %%
at_init.eval().requires_grad_(False)
nets = (at_init.reference_unet, at_init.denoising_unet, at_init.pose_guider)
pipe_init = Pose2VideoPipeline(pipe.vae, pipe.image_encoder, *nets, pipe.scheduler)  # the network at step 0
pipe_init.set_progress_bar_config(disable=True)
stored = np.load(WEIGHTS_DIR / "samples_along_training.npz")
settings = json.loads(str(stored["settings"]))
print("stored:", list(stored["labels"]), "| frames", tuple(stored["frames"].shape), "|", settings)
full_case = E.make_cases(1, num_frames=24)[0]
pick = settings["frames"]  # [0, 7, 15, 23]
case = E.Case(full_case.reference, full_case.poses[pick], full_case.truth[pick], full_case.landmarks[pick])
gen = {k: settings[k] for k in ("steps", "cfg", "seed")}
videos = {"step 0": E.generate(pipe_init, case, **gen)}
videos.update(zip(stored["labels"][:-1], stored["frames"][:-1], strict=True))  # the earlier checkpoints
videos["final"] = E.generate(pipe, case, **gen)
# equal up to float summation order: the script ran on one thread, this kernel may use more
gap = np.abs(videos["final"].astype(int) - stored["frames"][-1].astype(int)).max()
print("live final == stored final, to within 1 of 255:", bool(gap <= 1))
videos["copy reference"] = E.copy_reference([case])[0]
for name, video in videos.items():
    db = psnr(video_from_uint8(video), video_from_uint8(case.truth)).mean()
    print(f"{name:32s} PSNR against the ground truth: {db:.1f} dB")

# %%
rows = {"pose": case.poses, "ground truth": case.truth}
rows.update({name: v for name, v in videos.items() if name != "copy reference"})
fig, axes = plt.subplots(len(rows), 5, figsize=(8.5, 1.75 * len(rows)))
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for r, (name, frames) in enumerate(rows.items()):
    axes[r, 1].set_ylabel(name.replace(" after ", "\nafter "), fontsize=8)
    for c, frame in enumerate(frames, start=1):  # (H, W, 3) uint8
        axes[r, c].imshow(frame)
    axes[r, 0].axis("off")
axes[0, 0].imshow(case.reference)
axes[0, 0].set_title("reference", fontsize=9)
for c, f in enumerate(pick, start=1):
    axes[0, c].set_title(f"frame {f}", fontsize=9)
fig.tight_layout()
save(fig, "ch10_step0_vs_final")
plt.show()

# %% [markdown]
# At step 0 the pose guider adds nothing (zero conv) and the UNets are random: the output is coloured noise
# shaped by the VAE decoder. Along the checkpoints the picture sharpens from a rough face in roughly the right
# place towards the held-out identity in the driving pose, and the PSNR rises with training, against the
# baseline of copying the reference. Between v1's final row and v2's the change is the VAE: v1's faces are as
# soft as its decoder (teeth, irises and the hair's edge gone), v2's keep them. From there on this one case
# moves by a few tenths of a dB, less than it varies between cases (the evaluation over 32 held-out cases
# is `results/eval_animator.json`; `COMMANDS.md` beside the weights has the commands).
#
# ## 9. One process or many: accelerate, and batches from (seed, step)
#
# The script is written for HF accelerate. The same file runs on N processes (GPUs, or CPU processes with
# gloo when there is no GPU); `--batch-size` is the **global** batch, split over the processes:
#
# ```
# accelerate launch --multi_gpu --num_processes 4 scripts/train_animator.py --stage 1 \
#     --out runs/toy_animator/stage1 --batch-size 8
# ```
#
# Every process draws the **whole** global batch from `(seed, step)` and takes its own rows. Three things
# follow:
#
# - the processes agree on the step's coin (all drop the condition together, as one process would);
# - DDP averages the processes' gradients, and with equal slices the mean of the slices' mean losses is the
#   global batch's mean loss: N processes compute the gradient of one process on the whole batch;
# - nothing random is carried from step to step, so a resumed run draws exactly the batches an uninterrupted
#   run would; a checkpoint needs only the weights, the optimizer state and the step.
#
# `tests/test_train_animator.py` runs the first two for real (two gloo processes against one process, equal
# weights after 3 steps) and the third (resume at step 2 of 4 against a straight run). Here, the arithmetic on
# the batch of section 2 — two "processes" of one sample each, against the gradients of section 6:

# %%
local = 1
losses = []
grads_ranks = []
for rank in range(2):
    mine = {
        k: v[rank * local : (rank + 1) * local] if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    full.zero_grad()
    with torch.enable_grad():
        rank_loss = T.train_step_loss(full, mine, scheduler, 0.05, 5.0)
        rank_loss.backward()
    losses.append(rank_loss.detach())
    grads_ranks.append(torch.cat([full.get_parameter(n).grad.flatten() for n in grads]))  # (P,)
torch.testing.assert_close((losses[0] + losses[1]) / 2, batch_loss, rtol=1e-5, atol=1e-6)
global_grad = torch.cat([g.flatten() for g in grads.values()])  # (P,) section 6's whole-batch gradient
torch.testing.assert_close((grads_ranks[0] + grads_ranks[1]) / 2, global_grad, rtol=1e-4, atol=1e-7)
print(
    f"mean of the 2 ranks' losses == the global batch's loss; {len(grads)} gradients averaged == global: True"
)

# %% [markdown]
# And the batch does not depend on anything but `(seed, step)` — not on the global torch seed, not on what was
# drawn before:

# %%
first = T.step_batch(cache, 1, step=123, seed=0, batch_size=2, uncond_ratio=0.1)
torch.manual_seed(999)
_ = torch.randn(1000)  # disturb the global generator
_ = [T.step_batch(cache, 1, s, 0, 2, 0.1) for s in range(5)]  # draw other steps in between
again = T.step_batch(cache, 1, step=123, seed=0, batch_size=2, uncond_ratio=0.1)
same = [torch.equal(first[k], v) if isinstance(v, torch.Tensor) else first[k] == v for k, v in again.items()]
print("step 123 drawn twice, equal:", all(same))

# %% [markdown]
# One thing N processes do *not* preserve bit for bit is the order of floating-point sums: the test compares
# with a tolerance of 1e-5. BatchNorm would break the equivalence outright (per-process statistics); the
# PoseGuider of AnimateAnyone has none, AniPortrait's has (chapter 06).
#
# ## Summary
# - Stage 1 trains the ReferenceNet (less its last up block), the denoising UNet without motion modules and
#   the PoseGuider on single frames; stage 2 trains only the motion modules on clips. The VAE and the CLIP
#   encoder are frozen throughout. Both UNets start from the same weights, the PoseGuider's last conv and the
#   motion modules' `proj_out` at zero, so a fresh stage 2 starts as the stage-1 image model applied frame by
#   frame (the committed weights' last two stage-2 runs instead warm-started their motion modules,
#   `--motion-from`).
# - The loss is a v-prediction MSE with min-SNR weights $\min(\mathrm{SNR}+1, 5)/(\mathrm{SNR}+1)$ on a
#   zero-terminal-SNR scaled_linear schedule; at t = 999 the target is $-x_0$, which the network must draw
#   from the conditions alone, and the "+1" keeps that step's weight at 1. The noise carries a 0.05
#   per-channel offset.
# - Condition dropout: one coin per step (p = 0.1) — CLIP pixels zeroed, ReferenceNet skipped; inference
#   uses zero tokens instead.
# - Freezing the ReferenceNet's last up block is a choice: most of it would get a gradient.
# - The logs chain every run behind the weights; the curves, the lr schedule and the cost come from them.
# - Batches are a function of (seed, step): N processes equal one, and a resumed run equals a straight one.
#
# ## Exercises
# 1. Using the identity $\lVert\hat v - v\rVert^2 = (1+\mathrm{SNR})\lVert\hat x_0 - x_0\rVert^2$, write the
#    ε-loss in terms of the $x_0$ error. Which weight on the v-loss gives the same gradients as an unweighted
#    ε-loss? What happens to it at t = 999?
# 2. At which timestep does the min-SNR weight of the reference reach 1/2? How many of the 1000 timesteps have
#    a weight below 1/2?
# 3. In the 2000 coins of section 5, how long is the longest run of conditional steps, and how likely is a
#    run of 20 at p = 0.1? The reference flips one coin per step, not per sample: what would a per-sample coin
#    require of the ReferenceNet and its bank?
#
# ## Solutions

# %%
# 1. eps_hat - eps = sqrt(alpha_bar) (v_hat - v), so |eps_hat - eps|^2 = SNR |x0_hat - x0|^2
#    = SNR / (SNR + 1) |v_hat - v|^2: the weight SNR / (SNR + 1) on the v-loss, which is 0 at t = 999.
t = torch.tensor([500])
x0_, eps_, v_err = torch.randn(1, 4, 1, 2, 2), torch.randn(1, 4, 1, 2, 2), torch.randn(1, 4, 1, 2, 2)
x_t_ = scheduler.add_noise(x0_, eps_, t)
v_hat = scheduler.get_velocity(x0_, eps_, t) + v_err
a_ = alphas_cumprod[t]
eps_hat = a_.sqrt() * v_hat + (1 - a_).sqrt() * x_t_  # the epsilon implied by v_hat
ratio = ((eps_hat - eps_) ** 2).sum() / ((v_hat - (a_.sqrt() * eps_ - (1 - a_).sqrt() * x0_)) ** 2).sum()
expected = snr_all[500] / (snr_all[500] + 1)
print(f"1. eps-loss / v-loss at t = 500: {float(ratio):.4f}; SNR / (SNR + 1): {float(expected):.4f}")

# %%
# 2. w = 5 / (SNR + 1) once capped; w = 1 / 2 where SNR = 9
half = int((w_script < 0.5).sum())
print(f"2. w < 1/2 for {half} timesteps (t < {half}); w at t = {half - 1}, {half}:", end=" ")
print([round(float(w_script[t_]), 3) for t_ in (half - 1, half)])

# %%
# 3. Per-sample coins would need a bank read by some rows of the batch and not by others (a mask over the
#    reference tokens, as the CFG batch's uncond rows at inference), and the ReferenceNet would run on every
#    step; one coin per step keeps the bank all-or-nothing and saves the ReferenceNet's forward on 10 % of
#    the steps.
runs_cond = "".join("u" if d else "c" for d in draws).split("u")
# P(some run of >= 20 conditional steps in 2000): p[k] = the chance that the current run has length k
p = np.zeros(20)
p[0], hit = 1.0, 0.0
for _ in range(len(draws)):
    hit += 0.9 * p[-1]  # the 20th conditional step in a row
    p = np.concatenate([[0.1 * p.sum()], 0.9 * p[:-1]])
print(f"3. longest run of conditional steps: {max(map(len, runs_cond))}; P(20 given steps all conditional) =")
print(f"   0.9^20 = {0.9**20:.3f}, but P(a run of 20 or more somewhere in {len(draws)} steps) = {hit:.4f}")

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import torch
from diffusers.training_utils import compute_snr

import anim_lab

lab_train = anim_lab.load_script("train_animator")  # scripts/train_animator.py

# %% [markdown] tags=["core"]
# ### Exercise 1 (2 points): the v-prediction target
# Write `my_v_target(alphas_cumprod, x0, noise, timesteps)`: $v = \sqrt{\bar\alpha_t}\,\varepsilon -
# \sqrt{1-\bar\alpha_t}\,x_0$ for a batch `x0`, `noise` `(B, C, F, h, w)` with one timestep per sample,
# `timesteps` `(B,)`.


# %% nbgrader={"grade": false, "grade_id": "ch10_v_target", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_v_target(alphas_cumprod, x0, noise, timesteps):
    ### BEGIN SOLUTION
    a = alphas_cumprod[timesteps].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B,) -> (B, 1, ...)
    return a.sqrt() * noise - (1 - a).sqrt() * x0
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch10_v_target_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(10)
scheduler = lab_train.training_scheduler()
for batch, shape in [(3, (4, 2, 4, 4)), (1, (4, 1, 8, 8)), (5, (3, 4, 2, 2))]:
    x0, noise = torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape, generator=gen)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen)
    timesteps[0] = 999  # zero terminal SNR: the target is the noise itself
    expected = scheduler.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(my_v_target(scheduler.alphas_cumprod, x0, noise, timesteps), expected)
print("my_v_target matches DDPMScheduler.get_velocity (the training schedule) on 3 batches")

# %% [markdown] tags=["core"]
# ### Exercise 2 (3 points): the min-SNR-weighted loss
# Write `my_diffusion_loss(v_pred, x0, noise, timesteps, alphas_cumprod, snr_gamma=5.0)`: per sample `(B,)`,
# the mean squared error between `v_pred` and the v target, weighted by
# $w(t) = \min(\mathrm{SNR}(t) + 1, \gamma) / (\mathrm{SNR}(t) + 1)$ with
# $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$.


# %% nbgrader={"grade": false, "grade_id": "ch10_diffusion_loss", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_diffusion_loss(v_pred, x0, noise, timesteps, alphas_cumprod, snr_gamma=5.0):
    ### BEGIN SOLUTION
    a = alphas_cumprod[timesteps]  # (B,)
    snr_plus_one = a / (1 - a) + 1
    weights = torch.clamp(snr_plus_one, max=snr_gamma) / snr_plus_one
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))  # (B,) -> (B, 1, ...)
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    return ((v_pred - target) ** 2).mean(dim=tuple(range(1, x0.ndim))) * weights
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch10_diffusion_loss_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
gen = torch.Generator().manual_seed(11)
scheduler = lab_train.training_scheduler()
for batch, gamma in [(4, 5.0), (6, 1.0), (2, 20.0)]:
    x0, noise, v_pred = (torch.randn(batch, 4, 2, 4, 4, generator=gen) for _ in range(3))
    timesteps = torch.tensor([0, 999] + torch.randint(0, 1000, (batch - 2,), generator=gen).tolist())
    expected = lab_train.diffusion_loss(v_pred, x0, noise, timesteps, scheduler, gamma)
    mine = my_diffusion_loss(v_pred, x0, noise, timesteps, scheduler.alphas_cumprod, gamma)
    torch.testing.assert_close(mine, expected)
print("my_diffusion_loss matches the training script's diffusion_loss for gamma = 5, 1 and 20")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# Under the training schedule (`training_scheduler()`) and $\gamma = 5$, on how many of the 1000 training
# timesteps is the min-SNR weight below 1 (those steps count less than the plain loss would)? Store it, an
# int, in `capped_steps`.

# %% nbgrader={"grade": false, "grade_id": "ch10_capped_steps", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
lab_a = lab_train.training_scheduler().alphas_cumprod
lab_snr1 = lab_a / (1 - lab_a) + 1
capped_steps = int((torch.clamp(lab_snr1, max=5.0) / lab_snr1 < 1).sum())
### END SOLUTION
print(f"{capped_steps} of 1000 timesteps have a weight below 1")

# %% nbgrader={"grade": true, "grade_id": "ch10_capped_steps_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(capped_steps, int) and 0 <= capped_steps <= 1000
### BEGIN HIDDEN TESTS
_s = lab_train.training_scheduler()
_snr = compute_snr(_s, torch.arange(1000)) + 1
assert capped_steps == int((torch.clamp(_snr, max=5.0) / _snr < 1).sum())
### END HIDDEN TESTS
print("capped_steps is a count")
