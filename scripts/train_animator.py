"""Train the toy animator (a tiny AnimateAnyone) on the toy portrait world, in the paper's two stages.

    # stage 1: ReferenceNet + denoising UNet (no motion modules) + PoseGuider, on single frames
    .venv/bin/python scripts/train_animator.py --stage 1 --out runs/toy_animator/stage1 --max-steps 3000
    # stage 2: the motion modules only, on 16-frame clips, starting from stage 1's weights
    .venv/bin/python scripts/train_animator.py --stage 2 --out runs/toy_animator/stage2 \\
        --init-from runs/toy_animator/stage1/toy_animator --max-steps 500
    # the same script on several processes / GPUs / nodes: HF accelerate is the engine
    accelerate launch --multi_gpu --num_processes 2 scripts/train_animator.py --stage 1 --out ...
    (on a machine without a GPU this runs 2 CPU processes with gloo; accelerate's ``--cpu`` flag alone starts
    a single process unless an MPI hostfile is given)

Run it again with the same ``--out`` and it resumes from the last checkpoint (``--out/checkpoint``); the
result is the same as an uninterrupted run (every step's data, noise and timesteps are drawn from
``(seed, step)``, and the optimizer state is saved). Background-friendly: ``nohup ... > runs/x.out 2>&1 &``;
the log is also written to ``--out/train.log``, and ``--out/toy_animator/`` always holds the latest weights
in the layout of ``anim_lab/assets/toy_animator`` (config.json + diffusion_pytorch_model.safetensors per
component, ``train_log.json`` written by this script). With ``--ema-decay`` (0.999 for the published
weights) it keeps an exponential moving average of the trained weights (diffusers' ``EMAModel``, its warm-up
included): ``toy_animator/`` then holds the EMA weights, the ones to sample with, and ``checkpoint/`` the raw
ones, in the same layout.

What each step computes (Moore-AnimateAnyone's ``train_stage_1.py`` / ``train_stage_2.py``, implementations.md
§1.10):

    x0 = VAE latents of the target frame(s) (pre-encoded: VAE mean x scaling factor)
    noise = randn + noise_offset * randn(B, C, 1, 1, 1)                    noise offset 0.05
    t ~ U{0, ..., 999};  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise     scaled_linear betas, zero terminal SNR
    condition dropout: one coin per step, p = 0.1: the CLIP *pixels* are zeros (the token is
        image_encoder(0)) and the ReferenceNet does not run (the bank is empty)
    otherwise: ReferenceNet(reference latents, t = 0, CLIP token) fills the bank
    v_pred = denoising_unet(x_t, t, CLIP token, pose_cond_fea = PoseGuider(pose image))
    target v = sqrt(a_t) noise - sqrt(1 - a_t) x0                          (scheduler.get_velocity)
    snr = a_t / (1 - a_t) + 1   (the +1 of v-prediction: the SNR of the v-target)
    loss = mean_b [ min(snr, 5) / snr * mean(|v_pred - v|^2) ]             min-SNR weighting, gamma 5

What differs from the reference, on purpose (a tiny model trained from scratch, not SD1.5 fine-tuned):
- learning rate 1e-3 (the reference fine-tunes at 1e-5), AdamW, gradient clipping at 1, fp32;
- the two UNets start from the same random weights (the reference starts both from one SD checkpoint), the
  PoseGuider's last conv at zero (as the reference), the motion modules' proj_out at zero (AnimateDiff);
- latents are pre-encoded once with the VAE *mean* (the reference samples the posterior every step; the toy
  VAE's posterior std is tiny) and the CLIP token of each reference is pre-computed (the encoder is frozen);
- stage 2 trains on 16-frame clips at 25 fps (the reference: 24 frames, sample rate 4).
The reference UNet's ``up_blocks.3`` is frozen, as the reference does (its output is never read).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from einops import rearrange
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from anim_lab import configs, files, repo_relative
from anim_lab.clip import load_image_encoder
from anim_lab.guidance import DDIM_OFFICIAL, build_scheduler, draw_uncond
from anim_lab.landmarks import draw_pose_image
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.pipelines.pose2video import SAVED_FILES, encode_reference
from anim_lab.pose_guider import PoseGuider
from anim_lab.reference import reference_attention
from anim_lab.toy import ToyPortraitDataset
from anim_lab.unet import MOTION_KEY, ReferenceUNet, VideoUNet
from anim_lab.vae import encode as vae_encode
from anim_lab.vae import images_to_uint8, load_vae
from anim_lab.weights import load_checkpoint, load_into

ROOT = Path(__file__).resolve().parents[1]
TOY_VAE_DIR = ROOT / "anim_lab" / "assets" / "toy_vae"
# the frozen image encoder the committed animator was trained with; it travels with the weights, as the
# official checkpoints ship their image_encoder/ folder
ANIMATOR_ENCODER_DIR = ROOT / "anim_lab" / "assets" / "toy_animator" / "image_encoder"
COMPONENTS = ("reference_unet", "denoising_unet", "pose_guider")
WEIGHTS = "diffusion_pytorch_model.safetensors"
LOG = logging.getLogger("train_animator")

# Moore-AnimateAnyone's training noise scheduler: the config's kwargs + enable_zero_snr, with beta_schedule
# forced to scaled_linear (train_stage_1.py); DDPMScheduler takes the same arguments as the DDIM sampler.
TRAIN_SCHEDULER = dict(
    num_train_timesteps=DDIM_OFFICIAL["num_train_timesteps"],
    beta_start=DDIM_OFFICIAL["beta_start"],
    beta_end=DDIM_OFFICIAL["beta_end"],
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    prediction_type="v_prediction",
)


class TrainError(Exception):
    """A problem the user can fix (bad folder, missing or mismatched weights); printed without a traceback."""


# --- models -------------------------------------------------------------------------------------------------
def model_config(preset: str = "TOY") -> dict:
    """The animator's sizes: diffusers UNet kwargs, PoseGuider kwargs, motion-module kwargs (from configs)."""
    p = configs.get_preset(preset)
    return {"unet": p.get("unet"), "pose_guider": p.get("pose_guider"), "motion": p.get("motion")}


class Animator(nn.Module):
    """The trainable networks in one module (so one DDP wrapper sees every parameter) and one training step's
    forward: pose features, the ReferenceNet's bank (unless the step is unconditional), the denoiser."""

    def __init__(self, config: dict, stage: int):
        super().__init__()
        self.stage = stage
        self.reference_unet = ReferenceUNet(config["unet"])
        self.denoising_unet = VideoUNet(config["unet"], config["motion"] if stage == 2 else None)
        self.pose_guider = PoseGuider(**config["pose_guider"])

    def set_trainable(self) -> list[nn.Parameter]:
        """Stage 1: all but the reference UNet's up_blocks.3; stage 2: the motion modules only."""
        self.requires_grad_(False)
        if self.stage == 1:
            self.requires_grad_(True)
            self.reference_unet.up_blocks[-1].requires_grad_(False)
        else:
            for _, module in self.denoising_unet.motion_modules():
                module.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, noisy, timesteps, tokens, ref_latents, poses, uncond: bool) -> torch.Tensor:
        """noisy (B, 4, F, h, w), timesteps (B,), tokens (B, 1, D), ref_latents (B, 4, h, w),
        poses (B, 3, F, H, W) in [0, 1] -> v prediction (B, 4, F, h, w)."""
        pose_fea = self.pose_guider(poses)  # (B, 3, F, H, W) -> (B, C0, F, h, w)
        with reference_attention(self.reference_unet, self.denoising_unet) as bank:
            if uncond:
                bank.enabled = False  # no ReferenceNet forward: plain self-attention
            else:
                bank.write(ref_latents, t=torch.zeros_like(timesteps), encoder_hidden_states=tokens)
            return self.denoising_unet(noisy, timesteps, tokens, pose_cond_fea=pose_fea)


def init_stage1(animator: Animator) -> None:
    """Give the ReferenceNet the denoising UNet's (random) 2D weights: the reference starts both UNets from
    one checkpoint. (The ReferenceNet has every 2D key but conv_norm_out / conv_out.)"""
    own = animator.reference_unet.state_dict()
    shared = {k: v for k, v in animator.denoising_unet.state_dict().items() if k in own}
    load_into(animator.reference_unet, shared, what="the denoising UNet's initial 2D weights")


# --- the loss, written out ----------------------------------------------------------------------------------
def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**TRAIN_SCHEDULER)


def diffusion_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Min-SNR-weighted v-prediction loss, per sample (B,): the reference's loss before its batch mean."""
    target = scheduler.get_velocity(latents, noise, timesteps)  # (B, 4, F, h, w)
    snr = compute_snr(scheduler, timesteps) + 1  # v-prediction: the +1 variant
    weights = torch.clamp(snr, max=snr_gamma) / snr  # min(snr, gamma) / snr, (B,)
    mse = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # (B, 4, F, h, w)
    return mse.mean(dim=(1, 2, 3, 4)) * weights  # (B,)


# --- data: pre-encoded latents of the toy world -------------------------------------------------------------
def build_cache(
    path: Path,
    num_items: int,
    num_frames: int,
    fps: float,
    seed: int,
    encoder_dir: Path = ANIMATOR_ENCODER_DIR,
    vae_dir: Path = TOY_VAE_DIR,
) -> dict:
    """Render ``num_items`` toy clips (train identities) and encode them once: reference latents and CLIP
    token (exactly as the pipeline encodes a reference), the frames' latents (VAE mean x scaling),
    landmarks (to draw the pose images at training time) and the CLIP token of zero pixels (the dropped
    condition)."""
    vae = load_vae(vae_dir)
    encoder = load_image_encoder(encoder_dir)
    dataset = ToyPortraitDataset("train", 128, num_frames, num_items, seed, fps=fps)
    ref_latents, tokens, latents, landmarks, identities = [], [], [], [], []
    with torch.no_grad():
        for item in tqdm(dataset, desc=f"pre-encoding {num_items} clips", mininterval=10):
            ref_u8 = images_to_uint8(item["reference"])  # (3, H, W) -> (H, W, 3)
            # the pipeline's own reference encoding: the same preprocessing at training and at inference
            token, ref_lat = encode_reference(vae, encoder, PIL.Image.fromarray(ref_u8), 128, 128)
            # -> (1, 1, D), (1, 4, h, w)
            frames = rearrange(item["frames"], "c f h w -> f c h w")  # (3, F, H, W) -> (F, 3, H, W)
            lat = vae_encode(vae, frames)  # (F, 4, h, w): posterior mean x scaling factor
            ref_latents.append(ref_lat[0])
            tokens.append(token[0])
            latents.append(lat)
            landmarks.append(item["landmarks"].float())
            identities.append(item["identity"])
        size = encoder.config.image_size
        uncond = encoder(pixel_values=torch.zeros(1, 3, size, size)).image_embeds[:, None]  # (1, 1, D)
    cache = {
        "ref_latents": torch.stack(ref_latents),  # (N, 4, h, w)
        "tokens": torch.stack(tokens),  # (N, 1, D)
        "latents": torch.stack(latents),  # (N, F, 4, h, w)
        "landmarks": torch.stack(landmarks),  # (N, F, 478, 2)
        "identities": torch.tensor(identities),  # (N,)
        "uncond_token": uncond[0],  # (1, D)
        "meta": _cache_meta(num_items, num_frames, fps, seed, encoder_dir, vae_dir),
    }
    files.save_state(cache, path)
    return cache


def _cache_meta(
    num_items: int, num_frames: int, fps: float, seed: int, encoder_dir: Path, vae_dir: Path = TOY_VAE_DIR
) -> dict:
    """What a cache was built from: a cache whose meta differs is rebuilt (another VAE: other latents)."""
    sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]  # noqa: E731
    return {
        "num_items": num_items,
        "num_frames": num_frames,
        "fps": fps,
        "seed": seed,
        "size": 128,
        "image_encoder_sha256": sha(Path(encoder_dir) / "model.safetensors"),
        "vae_sha256": sha(Path(vae_dir) / "diffusion_pytorch_model.safetensors"),
    }


def load_cache(
    path: Path,
    num_items: int,
    num_frames: int,
    fps: float,
    seed: int,
    encoder_dir: Path = ANIMATOR_ENCODER_DIR,
    vae_dir: Path = TOY_VAE_DIR,
) -> dict:
    meta = _cache_meta(num_items, num_frames, fps, seed, encoder_dir, vae_dir)
    if path.with_suffix(".safetensors").is_file():
        try:
            cache = files.load_state(path)  # safetensors + JSON: reading it runs no code
        except ValueError as err:
            raise TrainError(f"--cache: {err}") from None
        if cache["meta"] == meta:
            return cache
        LOG.info("the cache %s was built with %s; rebuilding for %s", path, cache["meta"], meta)
    return build_cache(path, num_items, num_frames, fps, seed, encoder_dir, vae_dir)


def pose_batch(landmarks: torch.Tensor, size: int = 128) -> torch.Tensor:
    """(B, F, 478, 2) landmarks -> pose images (B, 3, F, H, W) in [0, 1], as the toy world draws them."""
    images = np.stack(
        [[draw_pose_image(lm.numpy(), size, size) for lm in clip] for clip in landmarks]
    )  # (B, F, H, W, 3) uint8
    return torch.from_numpy(rearrange(images, "b f h w c -> b c f h w")).float() / 255.0


def step_batch(cache: dict, stage: int, step: int, seed: int, batch_size: int, uncond_ratio: float) -> dict:
    """The global batch of one step, a pure function of (seed, step): which items (and frames), the noise,
    noise offset, timesteps, and the condition-dropout coin. Every process draws it whole, then takes its
    slice, so N processes compute exactly what one process does on the whole batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    n_items, n_frames = cache["latents"].shape[:2]
    items = torch.randint(0, n_items, (batch_size,), generator=g)
    if stage == 1:  # one frame of each chosen clip
        frames = torch.randint(0, n_frames, (batch_size,), generator=g)[:, None]  # (B, 1)
    else:  # the whole clip
        frames = torch.arange(n_frames).expand(batch_size, -1)  # (B, F)
    latents = cache["latents"][items[:, None], frames]  # (B, F, 4, h, w)
    latents = rearrange(latents, "b f c h w -> b c f h w")  # -> (B, 4, F, h, w)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.randn(latents.shape[:2], generator=g)[:, :, None, None, None]  # (B, 4, 1, 1, 1)
    timesteps = torch.randint(0, TRAIN_SCHEDULER["num_train_timesteps"], (batch_size,), generator=g)
    uncond = draw_uncond(random.Random(seed * 1_000_003 + step), uncond_ratio)
    return {
        "latents": latents,
        "noise": noise,
        "offset": offset,
        "timesteps": timesteps,
        "ref_latents": cache["ref_latents"][items],  # (B, 4, h, w)
        "tokens": cache["uncond_token"].expand(batch_size, 1, -1) if uncond else cache["tokens"][items],
        "landmarks": cache["landmarks"][items[:, None], frames],  # (B, F, 478, 2)
        "uncond": uncond,
    }


def train_step_loss(model, batch: dict, scheduler: DDPMScheduler, noise_offset: float, snr_gamma: float):
    """The loss of one (local) batch: noise with offset, x_t, the networks, min-SNR v-loss (mean)."""
    noise = batch["noise"] + noise_offset * batch["offset"]  # (B, 4, F, h, w)
    noisy = scheduler.add_noise(batch["latents"], noise, batch["timesteps"])
    poses = pose_batch(batch["landmarks"])  # (B, 3, F, H, W)
    pred = model(noisy, batch["timesteps"], batch["tokens"], batch["ref_latents"], poses, batch["uncond"])
    return diffusion_loss(pred, batch["latents"], noise, batch["timesteps"], scheduler, snr_gamma).mean()


# --- files --------------------------------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    """Fail before any work when ``out`` cannot be created or written."""
    try:
        files.check_writable(out, what="--out")
    except files.OutputError as err:
        raise TrainError(str(err)) from None


def write_weights(
    animator: Animator,
    folder: Path,
    extra_files: dict[str, str] | None = None,
    state: dict | None = None,
    image_encoder: Path = ANIMATOR_ENCODER_DIR,
) -> None:
    """The animator as a Pose2VideoPipeline folder (``model_index.json``; the toy VAE, the frozen
    ``image_encoder`` it was trained with and the DDIM scheduler beside the three trained networks), plus
    text files and a training state (state.safetensors + state.json). Written to a temporary folder and moved
    into place: a reader never sees a half-written folder, and a folder that holds files this script does not
    write is refused, not replaced."""
    tmp = files.staging_folder(folder)
    try:
        pipe = Pose2VideoPipeline(
            vae=load_vae(TOY_VAE_DIR),
            image_encoder=load_image_encoder(image_encoder),
            reference_unet=animator.reference_unet,
            denoising_unet=animator.denoising_unet,
            pose_guider=animator.pose_guider,
            scheduler=build_scheduler("scaled_linear"),  # the betas the training used
        )
        pipe.save_pretrained(tmp, force=True)  # tmp is empty: the pipeline's files are moved into it
        preprocessor = Path(image_encoder) / "preprocessor_config.json"  # the encoder's own preprocessing
        if preprocessor.is_file():
            shutil.copyfile(preprocessor, tmp / "image_encoder" / preprocessor.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if state is not None:
            files.save_state(state, tmp / "state.safetensors")
        own = [*SAVED_FILES, *(extra_files or {}), "state.safetensors", "state.json"]
        files.publish_folder(tmp, folder, own)
    except files.OutputError as err:
        raise TrainError(f"{err}; use a new --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_weights(
    animator: Animator, folder: Path, components=COMPONENTS, ignore_missing=(), ignore_unexpected=()
) -> None:
    """Load components written by :func:`write_weights`; missing files and mismatched keys are named."""
    for name in components:
        path = folder / name / WEIGHTS
        if not path.is_file():
            raise TrainError(
                f"{path} is missing: --init-from must be a folder written by this script (stage 1's "
                f"--out/toy_animator or anim_lab/assets/toy_animator) with {', '.join(COMPONENTS)}"
            )
        try:
            load_into(
                getattr(animator, name),
                load_checkpoint(path),
                ignore_missing=ignore_missing,
                ignore_unexpected=ignore_unexpected,
                what=str(path),
            )
        except ValueError as err:
            raise TrainError(str(err)) from None


def load_motion_modules(animator: Animator, folder: Path) -> None:
    """Stage 2 warm start: the motion modules of an earlier stage-2 run (``folder/denoising_unet``), for
    continuing stage 2 on retrained stage-1 weights."""
    path = folder / "denoising_unet" / WEIGHTS
    if not path.is_file():
        raise TrainError(f"--motion-from {folder}: {path} is missing (give a stage-2 toy_animator folder)")
    state = {k: v for k, v in load_checkpoint(path).items() if MOTION_KEY in k}
    if not state:
        raise TrainError(f"--motion-from {folder}: {path} holds no motion modules (it is stage-1 weights)")
    try:
        load_into(animator.denoising_unet, state, subset=MOTION_KEY, what=str(path))
    except ValueError as err:
        raise TrainError(str(err)) from None


# --- the loop -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoint, logs, toy_animator/")
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from these weights (stage 2: the stage-1 folder, required; stage 1: continue a run)",
    )
    p.add_argument(
        "--start-step",
        type=int,
        default=0,
        help="with --init-from in stage 1: the step the weights were at (the draws and the warm-up continue "
        "from there; the optimizer starts afresh)",
    )
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=1.0,
        help="cosine decay of the lr from --start-step to --max-steps, down to lr x this (1: constant)",
    )
    p.add_argument(
        "--image-encoder",
        type=Path,
        default=ANIMATOR_ENCODER_DIR,
        help="the frozen image encoder (copied into the weights folder as image_encoder/)",
    )
    p.add_argument(
        "--motion-from",
        type=Path,
        help="stage 2: start the motion modules from those of this stage-2 folder (default: zero-init)",
    )
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8, help="the global batch (split over the processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--uncond-ratio", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--noise-offset", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="initial weights and every step's draws")
    p.add_argument("--data-seed", type=int, default=0, help="which toy clips are pre-encoded")
    p.add_argument("--num-items", type=int, help="clips pre-encoded (default 384 in stage 1, 96 in stage 2)")
    p.add_argument("--num-frames", type=int, help="frames per clip (default 6 at 2 fps in stage 1, 16 at 25)")
    p.add_argument("--cache", type=Path, help="pre-encoded data file (default runs/toy_animator/cache_*.pt)")
    p.add_argument("--model-config", type=Path, help="JSON {unet, pose_guider, motion} (default configs.TOY)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per process (default: the cores torch sees, shared by the processes; "
        "benchmarks/bench_train_animator.py measured 1 process x 2 threads 1.19x faster than 1 thread)",
    )
    p.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: autocast the forward passes (benchmarks/bench_train_animator.py measures speed and loss)",
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="keep an EMA of the trained weights (diffusers' EMAModel: decay min(d, (1 + s) / (10 + s)) at "
        "update s); --out/toy_animator then holds the EMA weights and --out/checkpoint the raw ones; 0: none",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--rank-weights",
        type=Path,
        help="also write every process's final weights to DIR/rank<i>.safetensors (to check that they agree)",
    )
    args = p.parse_args(argv)
    if args.stage == 2 and args.init_from is None:
        p.error("--stage 2 needs --init-from (the stage-1 weights folder)")
    if args.motion_from is not None and args.stage != 2:
        p.error("--motion-from is for stage 2 (stage 1 has no motion modules)")
    if args.start_step and (args.init_from is None or args.stage != 1):
        p.error("--start-step continues a stage-1 run: give it with --stage 1 and --init-from")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0 < args.min_lr_ratio <= 1:
        p.error(f"--min-lr-ratio must be in (0, 1], got {args.min_lr_ratio}")
    if not (args.image_encoder / "model.safetensors").is_file():
        p.error(
            f"--image-encoder {args.image_encoder} has no model.safetensors "
            "(it must be a CLIPVisionModelWithProjection folder)"
        )
    args.num_items = args.num_items or (384 if args.stage == 1 else 96)
    args.num_frames = args.num_frames or (6 if args.stage == 1 else 16)
    args.fps = 2.0 if args.stage == 1 else 25.0
    if args.cache is None:
        args.cache = (
            ROOT
            / "runs"
            / "toy_animator"
            / f"cache_{args.num_items}x{args.num_frames}_{args.fps:g}fps.safetensors"
        )
    return args


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over --warmup-steps from --start-step, then a cosine from 1 down to --min-lr-ratio at
    --max-steps (constant when the ratio is 1)."""
    done = step - args.start_step
    warm = min(1.0, (done + 1) / max(1, args.warmup_steps))
    span = max(1, args.max_steps - args.start_step)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done / span)))
    return warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def train(args: argparse.Namespace) -> dict:
    check_writable(args.out)
    # cpu=True without a GPU: then `accelerate launch --multi_gpu --num_processes N` runs N gloo processes
    # (accelerate's --cpu flag starts a single process unless given an MPI hostfile)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,  # "bf16": the forward under autocast (CPU: AVX-512 BF16)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() // world))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise TrainError(
            f"launched as {launched} processes but accelerate set up {world}; check the launcher"
        )
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    local = args.batch_size // world
    config = json.loads(args.model_config.read_text()) if args.model_config else model_config()

    torch.manual_seed(args.seed)
    animator = Animator(config, args.stage)
    if args.init_from is None:
        init_stage1(animator)
    else:
        # stage 2 starts its motion modules afresh (or from --motion-from); stage 1 may continue from a
        # stage-2 folder, whose motion modules it neither holds nor trains
        load_weights(
            animator,
            args.init_from,
            ignore_missing=(MOTION_KEY,) if args.stage == 2 else (),
            ignore_unexpected=(MOTION_KEY,) if args.stage == 1 else (),
        )
    if args.motion_from is not None:
        load_motion_modules(animator, args.motion_from)
    earlier = args.init_from / "train_log.json" if args.init_from else None
    earlier = json.loads(earlier.read_text()) if earlier and earlier.is_file() else None
    params = animator.set_trainable()
    ema = EMAModel(params, decay=args.ema_decay) if args.ema_decay else None

    out = args.out
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOG.addHandler(handler)
        LOG.addHandler(logging.StreamHandler(sys.stderr))
        LOG.setLevel(logging.INFO)
    with accelerator.main_process_first():
        cache = load_cache(
            args.cache, args.num_items, args.num_frames, args.fps, args.data_seed, args.image_encoder
        )

    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s + args.start_step, args)
    )
    log = {"steps": [], "loss": [], "lr": [], "seconds": []}
    start, elapsed = args.start_step, 0.0
    ckpt = out / "checkpoint"
    if (ckpt / "state.safetensors").is_file():  # resume (safetensors + JSON: reading it runs no code)
        try:
            state = files.load_state(ckpt / "state.safetensors")
        except ValueError as err:
            raise TrainError(f"cannot resume from {ckpt}: {err}") from None
        if state["stage"] != args.stage or state["config"] != config or ("ema" in state) != (ema is not None):
            raise TrainError(
                f"{ckpt} holds a stage-{state['stage']} run of another model config or EMA setting; use a "
                "new --out or the same --stage, --model-config and --ema-decay (0 or not)"
            )
        load_weights(animator, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler_lr.load_state_dict(state["lr_scheduler"])
        start, elapsed, log = state["step"], state["seconds"], state["log"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        LOG.info("resumed from %s at step %d", ckpt, start)

    model, optimizer = accelerator.prepare(animator, optimizer)
    noise_scheduler = training_scheduler()
    n_params = sum(p.numel() for p in params)
    LOG.info(
        "stage %d: %d trainable parameters, %d processes x %d samples, steps %d -> %d",
        args.stage,
        n_params,
        world,
        local,
        start,
        args.max_steps,
    )

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        net = accelerator.unwrap_model(model)
        train_log = {
            "stage": args.stage,
            "step": step,
            "batch_size": args.batch_size,
            "processes": world,
            "mixed_precision": args.mixed_precision,
            "ema_decay": args.ema_decay,  # > 0: these are the EMA weights; the raw ones are in checkpoint/
            "trainable_parameters": n_params,
            "seconds": round(elapsed, 1),
            "args": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "command": " ".join(sys.argv),
            "data": cache["meta"],
            "scheduler": TRAIN_SCHEDULER,
            "log": log,
            "earlier": earlier,  # the train_log.json of the --init-from weights (None when from scratch)
        }
        write_weights(
            net,
            ckpt,
            image_encoder=args.image_encoder,
            state={
                "stage": args.stage,
                "config": config,
                "step": step,
                "seconds": elapsed,
                "log": log,
                "optimizer": optimizer.optimizer.state_dict()
                if hasattr(optimizer, "optimizer")
                else optimizer.state_dict(),
                "lr_scheduler": scheduler_lr.state_dict(),
                **({} if ema is None else {"ema": ema.state_dict()}),
            },
        )
        if ema is not None:  # the same networks with the averaged trainable weights
            net = copy.deepcopy(net)
            ema.copy_to([p for p in net.parameters() if p.requires_grad])
        write_weights(
            net,
            out / "toy_animator",
            {"train_log.json": json.dumps(train_log, indent=1)},
            image_encoder=args.image_encoder,
        )

    model.train()
    bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        mininterval=5,
        disable=args.no_progress or not accelerator.is_local_main_process,
        desc=f"stage {args.stage}",
    )
    window, tick = [], time.time()
    session_start = tick
    for step in bar:
        batch = step_batch(cache, args.stage, step, args.seed, args.batch_size, args.uncond_ratio)
        mine = {
            k: v[rank * local : (rank + 1) * local] if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }
        loss = train_step_loss(model, mine, noise_scheduler, args.noise_offset, args.snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler_lr.step()
        if ema is not None:
            ema.step(params)
        window.append(accelerator.gather(loss.detach()[None]).mean().item())
        now = time.time()
        elapsed, tick = elapsed + now - tick, now
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            mean = sum(window) / len(window)
            log["steps"].append(step + 1)
            log["loss"].append(round(mean, 5))
            log["lr"].append(scheduler_lr.get_last_lr()[0])
            log["seconds"].append(round(elapsed, 1))
            rate = (now - session_start) / (step + 1 - start)
            LOG.info("step %d loss %.4f (%.1f s/step)", step + 1, mean, rate)
            bar.set_postfix(loss=f"{mean:.4f}")
            window = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.max_steps:
            save(step + 1)
    if start >= args.max_steps:
        LOG.info("already at step %d", start)
    accelerator.wait_for_everyone()
    if args.rank_weights is not None:
        args.rank_weights.mkdir(parents=True, exist_ok=True)
        state = accelerator.unwrap_model(model).state_dict()
        save_file(
            {k: v.contiguous() for k, v in state.items()}, args.rank_weights / f"rank{rank}.safetensors"
        )
    for handler in list(LOG.handlers):
        LOG.removeHandler(handler)
        handler.close()
    return {"step": args.max_steps, "log": log, "model": accelerator.unwrap_model(model)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except TrainError as err:
        print(f"train_animator: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
