"""Train the toy world's tiny AutoencoderKL (8x downsampling, 4 latent channels) on 128-px toy portraits.

    # v2 (the Stable-Diffusion-style recipe; the exact long run is in anim_lab/assets/toy_vae/COMMANDS.md)
    .venv/bin/python scripts/train_toy_vae.py --init anim_lab/assets/toy_vae --out /work/runs/toy_vae_v2 \\
        --minutes 150
    .venv/bin/python scripts/train_toy_vae.py --init anim_lab/assets/toy_vae --out /work/runs/toy_vae_v2 \\
        --minutes 150 --resume                              # continue it after an interruption
    .venv/bin/python scripts/train_toy_vae.py --recipe v1 --minutes 25 --out /work/runs/toy_vae_v1  # v1

The model: a small (16, 32, 64, 64) diffusers ``AutoencoderKL`` (latent 4 x 16 x 16 at 128 px), trained on
random 64-px crops of 128-px renders (the conv layers at 128 px dominate the cost; the model is fully
convolutional, so it is evaluated on full frames), bf16 autocast on CPU.

Two recipes (``--recipe``):

- ``v1`` (the committed ``anim_lab/assets/toy_vae``): MSE + 0.1 L1 + 1e-6 KL, Adam 1e-3, 25 minutes. It
  blurs: held-out 29.8 dB PSNR, but the variance of the Laplacian of its reconstructions' luminance is 0.32
  of the ground truth's (teeth, irises and hair edges vanish): the mean of the plausible pictures minimises
  squared error.
- ``v2`` (default; the latent-diffusion autoencoder recipe of Rombach et al. 2022, built here): L1 +
  ``perceptual_weight`` x a perceptual distance + ``kl_weight`` x KL + ``lambda`` x a PatchGAN hinge loss,
  Adam 2e-4 with betas (0.5, 0.9) for both networks. The discriminator (:class:`PatchDiscriminator`, strided
  4x4 convs giving one real/fake logit per 34-px patch) trains from step ``disc_start``; the decoder gets the
  adversarial term ``adv_delay`` steps later (a warm-up: fed to the decoder at once, a random
  discriminator's gradient only draws halos). The adversarial weight is adaptive,
  ``lambda = disc_weight * ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4)`` with ``W`` the decoder's last conv
  (:func:`adaptive_weight`), so the GAN gradient reaching the decoder stays in proportion to the
  reconstruction gradient whatever the two losses' scales. An EMA of the weights (``ema_decay``) is what is
  evaluated and saved. No pretrained perceptual network (LPIPS/VGG) can be downloaded here;
  :class:`ClipPerceptual` compares unit-normalised token features of each layer of the frozen toy image
  encoder (``anim_lab/assets/toy_image_encoder``: a CLIP vision tower, 96 px, patch 12, 4 layers of width
  128, so 8 x 8 tokens of 12-px patches) - off by default, see the A/B.

Every ``--eval-every`` seconds: PSNR, sharpness ratio (:func:`anim_lab.metrics.sharpness_ratio`), SSIM and
colour error on full 128-px frames of 64 held-out identities (for the EMA and the raw weights), logged to
``train_log.json``, and a checkpoint written to ``--out``: the diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, the EMA weights), the log, and the training state
(``train_state.safetensors`` + ``train_state.json`` by ``anim_lab.files.save_state``: the VAE, its EMA, the
discriminator, both Adam states and the random-generator states as tensors, the rest as JSON). No pickle
anywhere. The folder is built beside ``--out`` and moved into place (``anim_lab.files.publish_folder``), so a
checkpoint is never half-written. ``--resume`` continues from it, exactly (tested: 3 + 3 steps give
the weights of 6); the budget ``--minutes``/``--max-steps`` may be raised on resume, every other setting
must match. SIGINT/SIGTERM write a checkpoint and stop. At the end the scaling factor 1 / std(latents) is
measured on training frames and stored in config.json.

``--out`` is replaced only when it holds nothing but files this script writes (:data:`OWN_FILES`); a folder
with anything else in it is refused, naming what is there; so is ``--out`` equal to ``--init``.

A/B, measured here (one torch thread on the shared 2-core machine; init from v1 unless said; seed 0, batch 16,
64-px crops; discriminator and adversarial term from step 100, disc_weight 0.5; held-out 128-px renders;
every number in ``scripts/train_toy_vae_ab.json``):

| run                                   | steps | min  | s/step | PSNR dB | sharpness | SSIM  | colour |
|---------------------------------------|-------|------|--------|---------|-----------|-------|--------|
| v1 (the start)                        | 0     | -    | -      | 29.82   | 0.321     | 0.914 | 2.08   |
| L1 + 1.0 perceptual + GAN, bf16       | 400   | 4.85 | 0.73   | 27.74   | 1.223     | 0.874 | 2.21   |
| L1 + GAN, bf16                        | 400   | 3.69 | 0.55   | 27.89   | 1.139     | 0.884 | 1.81   |
| L1 + GAN, fp32                        | 200   | 2.33 | 0.70   | 28.87   | 0.777     | 0.903 | 2.20   |
| L1 + GAN, bf16, from scratch, lr 1e-3 | 400   | 3.56 | 0.53   | 19.52   | 0.261     | 0.630 | 14.9   |
| L1 + GAN, warm discriminator (below)  | 700   | 6.46 | 0.55   | 29.07   | 0.871     | 0.906 | 1.66   |

- Perceptual term: no gain. With it, sharpness rose sooner (0.88 vs 0.65 at ~2.2 min) but both runs
  overshot to halos (sharpness > 1) at a lower PSNR, and it costs 1.3x per step. Token features of 12-px
  patches from a 4-layer tower trained for identity are too coarse to judge teeth and irises. Off.
- bf16 autocast vs fp32: the same batches give the same loss curve (mean loss over steps 0-100 0.04700 vs
  0.04709, per-step difference 2.4% on average; the first steps agree to 0.3%), at 1.27x the speed. Kept.
- Init from v1: from scratch the model is at 19.5 dB after 400 steps; from v1 it starts at 29.8 dB. Kept.
- With the adversarial term fed to the decoder at once (a random discriminator), the reconstructions got
  halos and odd irises within 300 steps. Letting the discriminator train alone for 200 steps
  (``--adv-delay``) and ``disc_weight`` 0.2: the raw weights reached 29.07 dB / sharpness 0.871 / colour 1.66
  at step 700 (its EMA, decay 0.999, still lags at 29.97 dB / 0.439). The long run uses these settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

import anim_lab
from anim_lab import configs, files
from anim_lab import metrics as M
from anim_lab import vae as V

render_stills = anim_lab.load_script("eval_toy_models").render_stills  # the shared toy-data helper

ROOT = anim_lab.REPO_DIR
DEFAULT_OUT = ROOT / "anim_lab" / "assets" / "toy_vae"
STATE_FILE = "train_state.safetensors"  # files.save_state's tensors, with train_state.json beside it
# everything this script writes into --out; a folder holding anything else is never replaced
OWN_FILES = frozenset(
    {"config.json", "diffusion_pytorch_model.safetensors", "train_log.json", STATE_FILE, "train_state.json"}
)
STATE_FORMAT = "anim_lab/train_toy_vae/3"
# settings that may change when a run is resumed (the budget, how often to evaluate, threads)
RESUMABLE_CHANGES = frozenset({"minutes", "max_steps", "eval_every_s", "threads"})
_STOP = {"signal": None}  # set by the SIGINT/SIGTERM handler of main(); the loop checkpoints and stops


class TrainError(RuntimeError):
    """A refused argument or destination (raised before any work)."""


def vae_config() -> dict:
    cfg = configs.TOY.get("vae")
    cfg.update(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=128)
    return cfg


# --- data ---------------------------------------------------------------------------------------------------
def random_crops(images_u8: torch.Tensor, batch_size: int, crop: int, g: torch.Generator) -> torch.Tensor:
    """A batch of random crops (and random horizontal flips): (N, H, W, 3) uint8 -> (B, 3, crop, crop) in
    [-1, 1]."""
    n, h, w, _ = images_u8.shape
    idx = torch.randint(0, n, (batch_size,), generator=g)
    ys = torch.randint(0, h - crop + 1, (batch_size,), generator=g)
    xs = torch.randint(0, w - crop + 1, (batch_size,), generator=g)
    flips = torch.rand(batch_size, generator=g) < 0.5
    out = torch.stack(
        [images_u8[i, y : y + crop, x : x + crop] for i, y, x in zip(idx, ys, xs, strict=True)]
    )  # (B, c, c, 3)
    out = V.images_from_uint8(out)  # (B, c, c, 3) uint8 -> (B, 3, c, c) in [-1, 1]
    out[flips] = out[flips].flip(-1)
    return out


# --- the loss terms -----------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017): strided 4x4 convs, one real/fake logit per patch.

    (B, 3, H, W) in [-1, 1] -> logits (B, 1, H/2^n - 2, W/2^n - 2) for ``n_layers`` strided convs; each logit
    sees a patch of ``10 * 2^n - 6`` pixels (34 px for n = 2). GroupNorm, not BatchNorm: no running
    statistics, so a step depends only on its own batch (and resuming is exact)."""

    def __init__(self, channels: int = 32, n_layers: int = 2, groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, ch * 2, 4, stride, 1), nn.GroupNorm(groups, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 3, H, W) -> (B, 1, h, w)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """``disc_weight * ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4)``, clamped to [0, 1e4] and detached, with ``W``
    the decoder's last layer: the adversarial gradient is scaled to the reconstruction gradient there."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return disc_weight * weight.clamp(0.0, 1e4).detach()


class ClipPerceptual(nn.Module):
    """A perceptual distance from a frozen CLIP vision tower (no LPIPS/VGG weights can be downloaded here).

    Both images (B, 3, H, W) in [-1, 1] are resized (bilinear) to the tower's input size and normalised with
    its statistics; for each transformer layer the patch tokens (B, N, D) (the class token dropped) are
    normalised to unit length and compared: ``mean over tokens of ||a - b||^2`` (LPIPS's recipe without its
    learned channel weights), averaged over layers. -> scalar."""

    def __init__(self, encoder: nn.Module, mean, std, layers: tuple[int, ...] | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.size = encoder.config.image_size
        n = encoder.config.num_hidden_layers
        self.layers = tuple(range(1, n + 1)) if layers is None else tuple(layers)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_folder(cls, folder: Path) -> ClipPerceptual:
        from anim_lab.clip import load_image_encoder  # noqa: PLC0415  (transformers only when used)

        pre = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        return cls(load_image_encoder(folder), pre["image_mean"], pre["image_std"])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> CLIP-normalised (B, 3, S, S)
        hidden = self.encoder(pixel_values=x, output_hidden_states=True).hidden_states  # L+1 x (B, 1+N, D)
        return [F.normalize(hidden[i][:, 1:].float(), dim=-1, eps=1e-6) for i in self.layers]  # (B, N, D)

    def forward(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.features(target)
        dists = [(a - b).pow(2).sum(-1).mean() for a, b in zip(self.features(rec), ref, strict=True)]
        return torch.stack(dists).mean()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, kl_weight: float = 1e-6):
    """The v1 objective: MSE + 0.1 L1 on a posterior sample's reconstruction + kl_weight * KL to N(0, 1).
    Returns (loss, mse)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)  # (B, 4, h, w), a posterior sample
    rec = vae.decode(z).sample.float()  # (B, 3, H, W)
    mse = F.mse_loss(rec, x)
    loss = mse + 0.1 * F.l1_loss(rec, x) + kl_weight * dist.kl().mean()
    return loss, mse


def generator_terms(
    vae: AutoencoderKL,
    x: torch.Tensor,
    g: torch.Generator,
    perceptual: nn.Module | None,
    perceptual_weight: float,
) -> dict:
    """The v2 reconstruction terms of a batch (B, 3, H, W): the posterior sample's reconstruction ``rec``,
    ``l1``, ``perceptual`` (0 without a network), ``rec_loss`` = l1 + weight * perceptual, ``kl`` (summed
    over the latent, mean over the batch)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)  # (B, 4, h, w)
    rec = vae.decode(z).sample.float()  # (B, 3, H, W)
    l1 = (rec - x).abs().mean()
    perc = perceptual(rec, x) if perceptual is not None and perceptual_weight > 0 else torch.zeros(())
    return dict(rec=rec, l1=l1, perceptual=perc, rec_loss=l1 + perceptual_weight * perc, kl=dist.kl().mean())


# --- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Mean-latent reconstructions of (N, 3, H, W) in [-1, 1], clamped to [-1, 1]."""
    was_training = vae.training
    vae.eval()
    recs = [
        V.decode(vae, V.encode(vae, images[i : i + batch_size])) for i in range(0, len(images), batch_size)
    ]
    vae.train(was_training)
    return torch.cat(recs).clamp(-1, 1)


@torch.no_grad()
def eval_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean PSNR (dB) of mean-latent reconstructions of full frames (N, 3, H, W) in [-1, 1]."""
    return float(M.psnr(reconstruct(vae, images, batch_size), images).mean())


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: torch.Tensor) -> dict:
    """PSNR (dB), sharpness ratio, SSIM and colour error (8-bit levels) on held-out full frames."""
    rec = reconstruct(vae, images)
    return dict(
        psnr=round(float(M.psnr(rec, images).mean()), 2),
        sharpness=round(M.sharpness_ratio(rec, images), 3),
        ssim=round(float(M.ssim(rec, images).mean()), 4),
        colour_error=round(float(M.colour_error(rec, images).mean()), 2),
    )


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0) -> float:
    """1 / std of posterior samples of unscaled latents over ``images`` (the latent-diffusion recipe)."""
    g = torch.Generator().manual_seed(seed)
    vae.eval()
    zs = []
    for i in range(0, len(images), 32):
        dist = V.encode_latent_dist(vae, images[i : i + 32])
        zs.append(dist.sample(generator=g))
    return V.scaling_factor_from_latents(torch.cat(zs))


# --- files --------------------------------------------------------------------------------------------------
def check_out_folder(out: Path, init: Path | None = None) -> None:
    """Refuse an ``out`` that is a file, that is (or holds) the ``init`` folder, that cannot be written, or
    that holds anything this script does not write (:data:`OWN_FILES`): ``files.check_output_folder``."""
    try:
        files.check_output_folder(out, OWN_FILES, inputs={"--init": init}, what="--out")
    except files.OutputError as err:
        raise TrainError(str(err)) from None


def write_checkpoint(out: Path, vae: AutoencoderKL, log: dict, state: dict) -> None:
    """Write the diffusers folder of ``vae`` (the EMA model when there is one), the log and the training
    ``state`` (:func:`training_state`, through ``files.save_state``: safetensors + JSON, no pickle) into
    ``out``, built in a staging folder beside it and moved into place by ``files.publish_folder``: a reader
    (or a resume) sees the old checkpoint or the new one, never a mix."""
    out = Path(out)
    check_out_folder(out)  # a file planted since the start is still never replaced
    tmp = files.staging_folder(out)
    try:
        files.save_state(state, tmp / STATE_FILE)
        vae.save_pretrained(tmp)  # config.json + diffusion_pytorch_model.safetensors
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
        files.publish_folder(tmp, out, OWN_FILES)  # removes tmp, whatever happens
    except files.OutputError as err:
        raise TrainError(str(err)) from None


def training_state(vae, ema, disc, opt_g, opt_d, generator, step, elapsed_s, settings, log) -> dict:
    """Everything a resume needs, as plain data: weights, optimiser states, random states, counters."""
    return dict(
        format=STATE_FORMAT,
        step=step,
        elapsed_s=elapsed_s,
        settings=settings,
        log=log,
        vae=vae.state_dict(),
        ema=None if ema is None else ema.state_dict(),
        disc=disc.state_dict(),
        opt_g=opt_g.state_dict(),
        opt_d=opt_d.state_dict(),
        rng=dict(generator=generator.get_state(), torch=torch.get_rng_state()),
    )


def read_state(path: Path) -> dict:
    """A ``train_state`` written by :func:`write_checkpoint` (``files.load_state``); anything else (a pickle
    under that name, a truncated file, another script's state) raises a TrainError naming the file, and is
    never unpickled."""
    try:
        state = files.load_state(path)
    except ValueError as err:
        raise TrainError(
            f"{path} is not a training state written by this script ({err}); start a new run in another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainError(f"{path} has format {found!r}, expected {STATE_FORMAT!r}")
    return state


# --- training -----------------------------------------------------------------------------------------------
class TrainingClock:
    """Seconds of training: the wall clock, except that a single gap longer than ``max_gap_s`` between two
    readings (the process stopped with SIGSTOP while someone timed something, a suspended machine) counts
    as ``max_gap_s``, so a pause does not eat the budget. Starts at ``start_s`` (a resumed run's time)."""

    def __init__(self, start_s: float = 0.0, max_gap_s: float = 60.0):
        self.elapsed, self.max_gap_s, self.last = start_s, max_gap_s, time.time()

    def __call__(self) -> float:
        now = time.time()
        self.elapsed += min(max(now - self.last, 0.0), self.max_gap_s)
        self.last = now
        return self.elapsed


def train(
    out: Path | None = DEFAULT_OUT,
    minutes: float = 20.0,
    max_steps: int | None = None,
    seed: int = 0,
    n_train: int = 3000,
    n_eval: int = 64,
    batch_size: int = 16,
    crop: int = 64,
    lr: float = 2e-4,
    warmup_steps: int = 20,
    bf16: bool = True,
    eval_every_s: float = 60.0,
    threads: int = 1,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: Path | None = None,
    *,
    recipe: str = "v2",
    resume: bool = False,
    restart: bool = False,
    perceptual_weight: float = 0.0,
    perceptual: nn.Module | Path | None = None,
    disc_start: int = 500,
    adv_delay: int = 0,
    ema_decay: float = 0.0,
    disc_weight: float = 0.5,
    disc_channels: int = 32,
    disc_layers: int = 2,
    kl_weight: float = 1e-6,
    betas: tuple[float, float] = (0.5, 0.9),
    config: dict | None = None,
    stop_at: int | None = None,
    final: bool = True,
) -> dict:
    """Train and save; returns the log (held-out metrics against minutes, losses, scaling factor).

    The budget is ``minutes`` of training time (summed over resumed parts) or ``max_steps`` steps, whichever
    comes first; the learning-rate drop (x0.3) comes at 80% of that budget. ``data`` = (train uint8
    (N, H, W, 3), eval uint8) skips rendering (tests). ``perceptual``: a module ``(rec, x) -> scalar`` or the
    folder of a CLIP vision tower (default: the toy image encoder, used when ``perceptual_weight`` > 0).
    ``config``: AutoencoderKL kwargs (default :func:`vae_config`). ``stop_at``: write a checkpoint and return
    after that step, as if interrupted (tests). ``final=False`` skips the final evaluation and scaling factor.
    The keyword defaults here are plain (no EMA, no warm discriminator); the command line's defaults are the
    chosen v2 recipe (``--disc-start 200 --adv-delay 300 --disc-weight 0.2 --ema-decay 0.999``).
    """
    if recipe not in ("v1", "v2"):
        raise TrainError(f"--recipe must be v1 or v2, got {recipe!r}")
    checks = {
        "--minutes must be > 0": minutes > 0,
        "--max-steps must be >= 1": max_steps is None or max_steps >= 1,
        "--batch-size must be >= 1": batch_size >= 1,
        "--crop must be a positive multiple of 8": crop > 0 and crop % 8 == 0,
        "--lr must be > 0": lr > 0,
        "--perceptual-weight, --disc-weight, --kl-weight must be >= 0": min(
            perceptual_weight, disc_weight, kl_weight
        )
        >= 0,
        "--disc-start and --adv-delay must be >= 0": min(disc_start, adv_delay) >= 0,
        "--ema-decay must be in [0, 1)": 0 <= ema_decay < 1,
    }
    for message, ok in checks.items():
        if not ok:
            raise TrainError(message)
    if out is not None:
        out = Path(out)
        check_out_folder(out, init)
        has_state = (out / STATE_FILE).is_file()
        if resume and not has_state:
            raise TrainError(f"--resume: {out} holds no {STATE_FILE}; start without --resume")
        if has_state and not resume and not restart:
            raise TrainError(
                f"{out} holds a training state; pass --resume to continue it or --restart to start over"
            )
    elif resume:
        raise TrainError("--resume needs --out")
    # on resume, the state holds the weights and the saved folder the architecture (--init is not needed)
    resumed = read_state(out / STATE_FILE) if resume else None
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    if data is None:
        train_u8 = render_stills("train", n_train, seed=seed)["images"]
        eval_u8 = render_stills("test", n_eval, seed=10_000 + seed)["images"]
    else:
        train_u8, eval_u8 = data
    train_u8, eval_images = torch.as_tensor(train_u8), V.images_from_uint8(eval_u8)

    # a fresh model, v1's weights (``--init``), or (resume) the saved architecture, its weights loaded below
    if resumed is not None:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(out))
    elif init is None:
        vae = AutoencoderKL(**(config or vae_config()))
    else:  # v1's config and weights (built from the config, so the saved config names no source folder)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(init))
        vae.load_state_dict(V.load_vae(init).state_dict())  # anim_lab's loader: safetensors only
    vae.train()
    disc = PatchDiscriminator(disc_channels, disc_layers)
    # an exponential moving average of the weights: the model that is evaluated and saved (GAN training
    # makes the raw weights jitter from step to step)
    ema = copy.deepcopy(vae).requires_grad_(False) if ema_decay > 0 else None
    model = vae if ema is None else ema  # the model for sampling
    if isinstance(perceptual, (str, Path)) or (perceptual is None and perceptual_weight > 0):
        perceptual = ClipPerceptual.from_folder(perceptual or ROOT / "anim_lab/assets/toy_image_encoder")
    use_gan = recipe == "v2" and disc_weight > 0
    opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=betas if recipe == "v2" else (0.9, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)
    settings = dict(
        recipe=recipe,
        seed=seed,
        n_params=sum(p.numel() for p in vae.parameters()),
        n_train=len(train_u8),
        n_eval=len(eval_images),
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        warmup_steps=warmup_steps,
        betas=list(betas),
        bf16=bf16,
        minutes=minutes,
        max_steps=max_steps,
        eval_every_s=eval_every_s,
        threads=threads,
        init=None if init is None else str(init),
        kl_weight=kl_weight,
        perceptual_weight=perceptual_weight,
        disc_start=disc_start,
        adv_delay=adv_delay,
        ema_decay=ema_decay,
        disc_weight=disc_weight,
        disc_channels=disc_channels,
        disc_layers=disc_layers,
    )
    log = dict(settings, curve=[], losses=[], d_losses=[], terms=[])
    step, elapsed_before = 0, 0.0
    if resumed is not None:
        meta = resumed
        settings["init"] = meta["settings"].get("init")  # where the run started, whatever --init says now
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()}
        now = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        changed = {k for k in now if saved.get(k) != now[k]} - RESUMABLE_CHANGES
        if changed:
            detail = ", ".join(
                f"{k}: {meta['settings'].get(k)!r} -> {settings[k]!r}" for k in sorted(changed)
            )
            raise TrainError(f"{out / STATE_FILE} was written with other settings ({detail}); use them")
        vae.load_state_dict(meta["vae"])
        if ema is not None:
            ema.load_state_dict(meta["ema"])
        disc.load_state_dict(meta["disc"])
        opt.load_state_dict(meta["opt_g"])
        opt_d.load_state_dict(meta["opt_d"])
        g.set_state(meta["rng"]["generator"])
        torch.set_rng_state(meta["rng"]["torch"])
        step, elapsed_before = meta["step"], meta["elapsed_s"]
        log = meta["log"] | {k: settings[k] for k in RESUMABLE_CHANGES}
        log.setdefault("resumed_at", []).append(step)
        print(f"resuming {out} at step {step} ({elapsed_before / 60:.1f} min)", flush=True)
    last_layer = vae.decoder.conv_out.weight
    budget_s = minutes * 60
    clock = TrainingClock(elapsed_before)

    def checkpoint(final_log: dict | None = None) -> None:
        if out is None:
            return
        log_now = final_log or log
        state = training_state(vae, ema, disc, opt, opt_d, g, step, clock(), settings, log_now)
        write_checkpoint(out, model, log_now, state)

    def run_eval() -> None:
        t_eval = clock()
        m = evaluate(model, eval_images)
        entry = dict(step=step, minutes=round(t_eval / 60, 2), disc_on=use_gan and step >= disc_start)
        if ema is not None:
            entry["raw"] = evaluate(vae, eval_images)  # the trained weights themselves, for comparison
        log["curve"].append(entry | m)
        bar.write(
            f"step {step}  {entry['minutes']:.1f} min  held-out PSNR {m['psnr']:.2f} dB  sharpness "
            f"{m['sharpness']:.3f}  SSIM {m['ssim']:.4f}  colour {m['colour_error']:.2f}"
            + (
                f"  (raw weights: {entry['raw']['psnr']:.2f} dB, {entry['raw']['sharpness']:.3f})"
                if ema is not None
                else ""
            )
        )

    bar = tqdm(
        total=max_steps, initial=step, disable=not progress, desc="toy VAE", unit="step", mininterval=30
    )
    if step == 0 and eval_every_s < 1e8:
        run_eval()  # where training starts from (v1's weights with --init)
    last_eval = clock()
    sums: dict[str, float] = {}
    while True:
        frac = max(clock() / budget_s, step / max_steps if max_steps is not None else 0.0)
        if frac >= 1.0 or _STOP["signal"] is not None or (stop_at is not None and step >= stop_at):
            break
        warm = min(1.0, (step + 1) / warmup_steps)
        for opt_ in (opt, opt_d):
            for group in opt_.param_groups:
                group["lr"] = lr * warm * (0.3 if frac > 0.8 else 1.0)
        x = random_crops(train_u8, batch_size, crop, g)  # (B, 3, crop, crop)
        gan_on = use_gan and step >= disc_start  # the discriminator trains
        adv_on = gan_on and step >= disc_start + adv_delay  # the decoder gets its adversarial gradient
        terms = {}
        disc.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if recipe == "v1":
                loss, mse = vae_loss(vae, x, g, kl_weight)
                terms["mse"] = mse.item()
            else:
                t = generator_terms(vae, x, g, perceptual, perceptual_weight)
                loss = t["rec_loss"] + kl_weight * t["kl"]
                terms |= dict(l1=t["l1"].item(), perceptual=t["perceptual"].item(), kl=t["kl"].item())
                if adv_on:
                    g_loss = -disc(t["rec"]).float().mean()
                    weight = adaptive_weight(t["rec_loss"], g_loss, last_layer, disc_weight)
                    loss = loss + weight * g_loss
                    terms |= dict(g_loss=g_loss.item(), adaptive_weight=weight.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), vae.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - ema_decay)
        if gan_on:
            disc.requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                d_loss = hinge_d_loss(disc(x).float(), disc(t["rec"].detach()).float())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms["d_loss"] = d_loss.item()
        step += 1
        log["losses"].append(round(loss.item(), 5))
        log["d_losses"].append(round(terms["d_loss"], 5) if gan_on else None)  # None: discriminator off
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["n"] = sums.get("n", 0) + 1
        bar.update(1)
        if clock() - last_eval >= eval_every_s:
            log["terms"].append(
                dict(step=step) | {k: round(v / sums["n"], 5) for k, v in sums.items() if k != "n"}
            )
            sums = {}
            run_eval()
            checkpoint()
            last_eval = clock()
    bar.close()
    log["steps"] = step
    log["elapsed_min"] = round(clock() / 60, 2)
    if _STOP["signal"] is not None or (stop_at is not None and step < (max_steps or math.inf)) or not final:
        log["stopped"] = _STOP["signal"] or f"at step {step}"
        checkpoint()
        print(f"stopped at step {step}; continue with --resume", flush=True)
        return log
    model.eval()
    run_eval()
    log["final"] = log["curve"][-1]
    sf = measure_scaling_factor(model, V.images_from_uint8(train_u8[:256]), seed)
    model.register_to_config(scaling_factor=round(sf, 5))
    log["scaling_factor"] = round(sf, 5)
    log["final_psnr"] = log["final"]["psnr"]
    checkpoint()
    print(f"done: {step} steps, held-out {log['final']}, scaling factor {sf:.5f}", flush=True)
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--recipe", choices=("v1", "v2"), default="v2")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (v1) / 2e-4 (v2)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--init", type=Path, default=None, help="start from this saved VAE folder (e.g. v1)")
    p.add_argument("--resume", action="store_true", help=f"continue from --out/{STATE_FILE}")
    p.add_argument("--restart", action="store_true", help=f"start over although --out holds a {STATE_FILE}")
    p.add_argument("--perceptual-weight", type=float, default=0.0)
    p.add_argument("--disc-start", type=int, default=200, help="step at which the discriminator switches on")
    p.add_argument(
        "--adv-delay",
        type=int,
        default=300,
        help="steps the discriminator trains alone before the decoder sees it",
    )
    p.add_argument("--disc-weight", type=float, default=0.2, help="0 turns the GAN off")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="EMA of the weights (saved, evaluated); 0: none; default 0.999 (v2), 0 (v1)",
    )
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    p.add_argument("--eval-every", type=float, default=180.0, help="seconds between evaluations/checkpoints")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    lr = args.lr if args.lr is not None else (1e-3 if args.recipe == "v1" else 2e-4)

    def on_signal(signum, frame):  # finish the step, write a checkpoint, stop
        _STOP["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        train(
            args.out,
            args.minutes,
            args.max_steps,
            args.seed,
            args.n_train,
            n_eval=args.n_eval,
            batch_size=args.batch_size,
            crop=args.crop,
            lr=lr,
            warmup_steps=args.warmup_steps,
            bf16=not args.no_bf16,
            eval_every_s=args.eval_every,
            threads=args.threads,
            progress=not args.no_progress,
            init=args.init,
            recipe=args.recipe,
            resume=args.resume,
            restart=args.restart,
            perceptual_weight=args.perceptual_weight,
            disc_start=args.disc_start,
            adv_delay=args.adv_delay,
            ema_decay=args.ema_decay
            if args.ema_decay is not None
            else (0.999 if args.recipe == "v2" else 0.0),
            disc_weight=args.disc_weight,
            kl_weight=args.kl_weight,
        )
    except TrainError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
