"""Train the toy Hallo: Hallo's second stage on top of the toy animator, on speaking toy clips.

    PYTHONPATH=$PWD nohup .venv/bin/python scripts/train_hallo.py --wav2vec2 runs/tiny_wav2vec2 \\
        --out runs/toy_hallo --num-items 96 --max-steps 2000 --ema-decay 0.999 --threads 1 \\
        --no-progress > runs/toy_hallo.out 2>&1 &
    # run it again with the same --out: it resumes from --out/checkpoint
    # measured: about 11 s a step at these sizes (batch 4, 14 + 2 frames, 128 px, the toy animator, a
    # wav2vec2 of train_tiny_wav2vec2's size) on one thread of a machine busy with other jobs

Writes ``--out/hallo/`` (a :class:`~anim_lab.pipelines.HalloPipeline` folder: the animator's VAE, image
encoder, ReferenceNet and denoising UNet with the trained audio modules, the face locator, the image and
audio projections, the wav2vec2 audio encoder, the DDIM scheduler the animator was trained with, and this
script's ``train_log.json``), ``--out/checkpoint/`` (the same with the raw weights and the training state:
state.safetensors + state.json) and ``--out/train.log``. A folder holding anything else is refused; nothing
this script did not write is replaced.

What it starts from (``--animator``, default ``anim_lab/assets/toy_animator``): the toy AnimateAnyone's
ReferenceNet, denoising UNet (2D weights and motion modules) and VAE, all frozen, and its frozen image encoder
(the identity embedding, standing in for ArcFace: ``anim_lab.pipelines.hallo``). New: the denoising UNet's
audio modules (zero-initialised output convs: at step 0 the UNet computes what the animator computed), the
audio projection, the image projection and the face locator.

What it trains, and why (Hallo: stage 1 trains the ReferenceNet, the 2D denoiser, the face locator and the
image projection on single frames; stage 2 the audio modules, the motion modules and the audio projection):

- the audio modules and the audio projection: Hallo's stage 2;
- the image projection and the face locator: Hallo trains them in stage 1, which the toy animator replaces
  (its stage 1 had a pose guider and one CLIP token instead). They are new modules here, so they must be
  trained somewhere; they are trained now, while the 2D UNets stay the animator's. The image projection is
  warm-started so that its K tokens reproduce the animator's CLIP token (``init_image_proj``: the linear map
  copies the embedding into every token, the LayerNorm's scale and shift are the embeddings' mean standard
  deviation and mean; K equal tokens attend like one), the face locator starts at zero (its ``conv_out``);
- the motion modules only with ``--train-motion-modules`` (Hallo's stage 2 trains them; the toy animator's
  already know the toy world's head motion, and they now see 2 motion frames in front of the clip).

Each step (Hallo's ``train_stage2.py``, ``reference/implementations.md`` §3; the loss is the animator's):

    a clip of --clip-frames frames at a random start, the --n-motion-frames ground-truth frames before it as
        motion frames, a random frame of the same clip as the reference
    x0 = VAE latents (pre-encoded, mean x scaling); noise (+ offset 0.05); t ~ U{0..999}; v-prediction
    dropout (one draw per step, exclusive: guidance.draw_hallo_uncond, 0.05 each): drop the image -> no
        ReferenceNet (no reference attention, no motion frames; the identity tokens kept); drop the audio ->
        zero audio tokens after the projection; both
    tokens = image_proj(identity embedding of the reference); audio = audio_proj(5-frame wav2vec2 windows)
    ReferenceNet(t = 0) on [reference, motion frames] -> the bank (the reference) + the motion frames
    v_pred = denoising_unet(x_t, t, tokens, face_locator(face box), audio, masks of the reference's face)
    loss = min-SNR(5)-weighted MSE(v_pred, v)  (train_animator.diffusion_loss)

Decisions where Hallo's description is silent or does not fit the toy: the masks and the face box are the
reference frame's (the pipeline's masks at inference); a dropped image gives no motion frames (Hallo falls
back to zero motion frames, :mod:`anim_lab.hallo`); latents and audio features are pre-encoded once into a
cache (safetensors + JSON; the identity embedding of every frame too: the image encoder is frozen).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

import anim_lab
from anim_lab import audio as A
from anim_lab import files, repo_relative, toy
from anim_lab.guidance import draw_hallo_uncond
from anim_lab.hallo import (
    AudioProjModel,
    ImageProjModel,
    face_region_masks,
    reference_unet_tokens,
    split_motion_bank,
)
from anim_lab.pipelines import HalloPipeline, Pose2VideoPipeline
from anim_lab.pipelines.hallo import SAVED_FILES, face_box_input, identity_embedding
from anim_lab.pose_guider import PoseGuider
from anim_lab.reference import reference_attention
from anim_lab.toy.animator import TOY_ANIMATOR_DIR
from anim_lab.toy.dataset import identity_split
from anim_lab.unet import AUDIO_KEY, MOTION_KEY, VideoUNet
from anim_lab.vae import encode as vae_encode
from anim_lab.weights import load_into

T = anim_lab.load_script("train_animator")  # the loss, the noise scheduler, the lr schedule
TrainError = T.TrainError
ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("train_hallo")
FOLDER_FILES = (*SAVED_FILES, "train_log.json", "state.safetensors", "state.json")
OWN = ("train.log", *(f"{d}/{f}" for d in ("hallo", "checkpoint") for f in FOLDER_FILES))  # under --out
TRAINED = ("audio_modules", "audio_proj", "image_proj", "face_locator")


# --- the networks -------------------------------------------------------------------------------------------
class HalloTrainer(nn.Module):
    """The networks of one training step: the animator's ReferenceNet and denoising UNet (now with audio
    modules), the face locator, the image and audio projections."""

    def __init__(self, reference_unet, denoising_unet, face_locator, image_proj, audio_proj):
        super().__init__()
        self.reference_unet = reference_unet
        self.denoising_unet = denoising_unet
        self.face_locator = face_locator
        self.image_proj = image_proj
        self.audio_proj = audio_proj

    def set_trainable(self, train_motion_modules: bool = False) -> list[nn.Parameter]:
        self.requires_grad_(False)
        for name, module in self.denoising_unet.named_modules():
            if name.endswith(AUDIO_KEY) or (train_motion_modules and name.endswith(MOTION_KEY)):
                module.requires_grad_(True)
        for module in (self.face_locator, self.image_proj, self.audio_proj):
            module.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, noisy, timesteps, batch: dict) -> torch.Tensor:
        """noisy (B, 4, F, h, w), timesteps (B,) -> v prediction (B, 4, F, h, w)."""
        tokens = self.image_proj(batch["embeds"])  # (B, E) -> (B, K, D)
        audio = self.audio_proj(batch["windows"])  # (B, F, 5, L, C) -> (B, F, T, D)
        if batch["drop_audio"]:
            audio = torch.zeros_like(audio)  # Hallo: zeros after the projection
        frames = noisy.shape[2]
        face = self.face_locator(batch["boxes"]).expand(-1, -1, frames, -1, -1)  # (B, C0, F, h, w)
        with reference_attention(self.reference_unet, self.denoising_unet) as bank:
            motion = None
            if batch["drop_image"]:
                bank.enabled = False  # no ReferenceNet: plain self-attention, no motion frames
            else:
                images = torch.cat(
                    [batch["ref_latents"][:, None], batch["motion_latents"]], dim=1
                )  # (B, S, ..)
                per_image = images.shape[1]
                bank.write(
                    rearrange(images, "b s c h w -> (b s) c h w"),
                    t=torch.zeros(images.shape[0] * per_image, dtype=torch.long, device=noisy.device),
                    encoder_hidden_states=reference_unet_tokens(tokens, per_image),
                )
                reference, motion = split_motion_bank(bank.entries, per_image)
                bank.load(reference)
                if per_image == 1:
                    motion = None
            return self.denoising_unet(
                noisy,
                timesteps,
                tokens,
                pose_cond_fea=face,
                audio_tokens=audio,
                audio_masks=batch["masks"],
                motion_frame_features=motion,
            )


def init_image_proj(image_proj: ImageProjModel, embeds: torch.Tensor) -> None:
    """Warm start: every token = the identity embedding, as the animator's one CLIP token was. The linear map
    copies the embedding into each of the K tokens (needs E = D); LayerNorm(x) = (x - mean(x)) / std(x) * w
    + b gives x back for an embedding of the typical mean and spread when w = the mean std, b = the mean."""
    k, d = image_proj.config.clip_extra_context_tokens, image_proj.config.cross_attention_dim
    if image_proj.config.clip_embeddings_dim != d:
        return  # no copy possible: the random initialisation stays
    with torch.no_grad():
        image_proj.proj.weight.copy_(torch.eye(d).repeat(k, 1))  # (K*D, E)
        image_proj.proj.bias.zero_()
        image_proj.norm.weight.fill_(embeds.std(dim=1, unbiased=False).mean().item())
        image_proj.norm.bias.fill_(embeds.mean().item())


def build_networks(animator: Pose2VideoPipeline, wav2vec2_config, args) -> HalloTrainer:
    """The animator's UNets (the denoiser rebuilt with audio modules, its weights loaded strictly), and the
    new modules, initialised from ``args.seed``."""
    torch.manual_seed(args.seed)
    den = animator.denoising_unet
    cross = den.unet_kwargs["cross_attention_dim"]
    audio_dim = args.audio_dim or cross
    unet = VideoUNet(den.unet_kwargs, den.motion_kwargs, audio_kwargs=dict(audio_attention_dim=audio_dim))
    load_into(unet, den.state_dict(), ignore_missing=(AUDIO_KEY,), what="the animator's denoising UNet")
    guider = animator.pose_guider.config
    face_locator = PoseGuider(
        conditioning_channels=3,
        block_out_channels=tuple(guider.block_out_channels),
        conditioning_embedding_channels=den.conv_in.weight.shape[0],
    )
    image_proj = ImageProjModel(
        cross_attention_dim=cross,
        clip_embeddings_dim=animator.image_encoder.config.projection_dim,
        clip_extra_context_tokens=args.image_tokens,
    )
    audio_proj = AudioProjModel(
        seq_len=5,
        blocks=wav2vec2_config.num_hidden_layers,
        channels=wav2vec2_config.hidden_size,
        intermediate_dim=args.audio_hidden,
        output_dim=audio_dim,
        context_tokens=args.audio_tokens,
    )
    return HalloTrainer(animator.reference_unet, unet, face_locator, image_proj, audio_proj)


# --- data: speaking toy clips, pre-encoded ------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_meta(args) -> dict:
    return {
        "num_items": args.num_items,
        "data_seed": args.data_seed,
        "size": args.size,
        "fps": args.fps,
        "min_frames": args.clip_frames + args.n_motion_frames,
        "wav2vec2_sha256": _sha(next(iter(sorted(args.wav2vec2.glob("*.safetensors"))))),
        "vae_sha256": _sha(args.animator / "vae" / "diffusion_pytorch_model.safetensors"),
        "image_encoder_sha256": _sha(args.animator / "image_encoder" / "model.safetensors"),
    }


def clip_spec(data_seed: int, i: int) -> tuple[int, int, int]:
    """(identity seed of the training identities, speech seed of the training speech, motion seed)."""
    ids = identity_split("train")
    rng = np.random.default_rng([data_seed, i])
    return int(ids[int(rng.integers(len(ids)))]), int(rng.integers(2**31)), int(rng.integers(2**31))


@torch.no_grad()
def build_cache(path: Path, args, animator: Pose2VideoPipeline, wav2vec2, extractor) -> dict:
    """Render ``num_items`` speaking clips of training identities with training speech and encode them once:
    every frame's latents (VAE mean x scaling), identity embedding and landmarks, and every frame's wav2vec2
    features (all layers, Hallo's alignment). Clips shorter than clip + motion frames are redrawn."""
    latents, embeds, landmarks, features, lengths = [], [], [], [], []
    i = 0
    bar = tqdm(total=args.num_items, desc="pre-encoding talking clips", disable=args.no_progress)
    while len(lengths) < args.num_items:
        identity, speech, motion = clip_spec(args.data_seed, i)
        i += 1
        clip = toy.make_talking_clip(
            toy.identity_from_seed(identity),
            toy.sample_speech(speech, "train"),
            args.fps,
            size=args.size,
            seed=motion,
        )
        n = clip.num_frames
        if n < args.clip_frames + args.n_motion_frames:
            continue
        feats, count = A.hallo_audio_features(clip.audio, wav2vec2, extractor, args.fps)  # (F, L, C)
        if count != n:
            raise TrainError(f"the clip has {n} frames but its audio gives {count}")
        pixels = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (F, 3, H, W)
        lat = torch.cat(
            [vae_encode(animator.vae, pixels[j : j + 16]) for j in range(0, n, 16)]
        )  # (F, 4, h, w)
        emb = torch.cat(
            [identity_embedding(animator.image_encoder, PIL.Image.fromarray(f)) for f in clip.frames]
        )
        latents.append(lat)
        embeds.append(emb)
        landmarks.append(torch.from_numpy(np.asarray(clip.landmarks, np.float32)))
        features.append(feats.float())
        lengths.append(n)
        bar.update()
    bar.close()
    cache = {
        "latents": torch.cat(latents),  # (N_frames, 4, h, w), the clips one after the other
        "embeds": torch.cat(embeds),  # (N_frames, E)
        "landmarks": torch.cat(landmarks),  # (N_frames, 478, 2)
        "features": torch.cat(features),  # (N_frames, L, C)
        "lengths": torch.tensor(lengths),  # (N,)
        "meta": cache_meta(args),
    }
    files.save_state(cache, path)
    return aligned(files.load_state(path))  # what a later run reads: the same bits and memory layout


def aligned(obj):
    """Fresh copies of every tensor in a loaded state: tensors read at a file's byte offsets can take other
    vectorised code paths on the CPU (sums move by ~1e-7), so a resumed run would drift from an uninterrupted
    one."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: aligned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(aligned(v) for v in obj)
    return obj


def load_cache(path: Path, args, animator, wav2vec2, extractor) -> dict:
    meta = cache_meta(args)
    if path.with_suffix(".safetensors").is_file():
        try:
            cache = aligned(files.load_state(path))
        except ValueError as err:
            raise TrainError(f"--cache: {err}") from None
        if cache["meta"] == meta:
            return cache
        LOG.info("the cache %s was built with %s; rebuilding for %s", path, cache["meta"], meta)
    return build_cache(path, args, animator, wav2vec2, extractor)


def step_batch(cache: dict, step: int, args) -> dict:
    """The batch of one step, a pure function of (seed, step): clips, starts, reference frames, noise,
    timesteps, the dropout draw."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    lengths = cache["lengths"]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    f, m, b = args.clip_frames, args.n_motion_frames, args.batch_size
    items = torch.randint(0, len(lengths), (b,), generator=g)
    spans = lengths[items] - f - m + 1  # (B,) possible starts
    starts = m + (torch.rand(b, generator=g) * spans).long()  # (B,) in [m, len - f]
    refs = (torch.rand(b, generator=g) * lengths[items]).long()  # (B,) any frame of the clip
    frame_ids = offsets[items, None] + starts[:, None] + torch.arange(f)  # (B, F)
    motion_ids = offsets[items, None] + starts[:, None] - m + torch.arange(m)  # (B, m)
    ref_ids = offsets[items] + refs  # (B,)
    windows = []
    for k in range(b):  # each clip's 5-frame windows, clamped at the clip's own ends
        lo, n = int(offsets[items[k]]), int(lengths[items[k]])
        win = A.hallo_window(cache["features"][lo : lo + n])  # (n, 5, L, C)
        windows.append(win[int(starts[k]) : int(starts[k]) + f])
    latents = rearrange(cache["latents"][frame_ids], "b f c h w -> b c f h w")  # (B, 4, F, h, w)
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.randn(latents.shape[:2], generator=g)[:, :, None, None, None]
    timesteps = torch.randint(0, T.TRAIN_SCHEDULER["num_train_timesteps"], (b,), generator=g)
    drop_image, drop_audio = draw_hallo_uncond(
        random.Random(args.seed * 1_000_003 + step), args.uncond_ratio, args.uncond_ratio, args.uncond_ratio
    )
    return {
        "latents": latents,
        "noise": noise,
        "offset": offset,
        "timesteps": timesteps,
        "ref_latents": cache["latents"][ref_ids],  # (B, 4, h, w)
        "motion_latents": cache["latents"][motion_ids],  # (B, m, 4, h, w)
        "embeds": cache["embeds"][ref_ids],  # (B, E)
        "ref_landmarks": cache["landmarks"][ref_ids],  # (B, 478, 2)
        "windows": torch.stack(windows),  # (B, F, 5, L, C)
        "drop_image": drop_image,
        "drop_audio": drop_audio,
    }


def add_masks(batch: dict, size: int, levels: int, latent_factor: int = 8) -> dict:
    """The reference frames' face-region masks (per level, (B, h_l, w_l)) and face boxes (B, 3, 1, H, W)."""
    masks = [face_region_masks(lm.numpy(), size, size, num_levels=levels, latent_factor=latent_factor)
             for lm in batch["ref_landmarks"]]  # fmt: skip
    batch["masks"] = {
        r: [torch.stack([getattr(m, r)[lv] for m in masks]) for lv in range(levels)]
        for r in ("full", "face", "lip")
    }
    batch["boxes"] = torch.cat([face_box_input(m.box, 3) for m in masks])  # (B, 3, 1, H, W)
    return batch


def step_loss(model, batch: dict, scheduler, args) -> torch.Tensor:
    noise = batch["noise"] + args.noise_offset * batch["offset"]
    noisy = scheduler.add_noise(batch["latents"], noise, batch["timesteps"])
    pred = model(noisy, batch["timesteps"], batch)
    return T.diffusion_loss(
        pred, batch["latents"], noise, batch["timesteps"], scheduler, args.snr_gamma
    ).mean()


def to_device(batch: dict, device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return move(batch)


# --- files --------------------------------------------------------------------------------------------------
def write_pipeline(net: HalloTrainer, animator, wav2vec2, folder: Path, source: Path, extra=None, state=None):
    """``net`` as a HalloPipeline folder (+ text files, + a training state), built beside ``folder`` and moved
    into place; a folder holding files this script does not write is refused."""
    tmp = files.staging_folder(folder)
    try:
        pipe = HalloPipeline(
            vae=animator.vae,
            image_encoder=animator.image_encoder,
            reference_unet=net.reference_unet,
            denoising_unet=net.denoising_unet,
            face_locator=net.face_locator,
            image_proj=net.image_proj,
            audio_proj=net.audio_proj,
            audio_encoder=wav2vec2,
            scheduler=animator.scheduler,
        )
        pipe.save_pretrained(tmp, force=True)
        preprocessor = Path(source) / "image_encoder" / "preprocessor_config.json"  # the encoder's own
        if preprocessor.is_file():
            shutil.copyfile(preprocessor, tmp / "image_encoder" / preprocessor.name)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if state is not None:
            files.save_state(state, tmp / "state.safetensors")
        files.publish_folder(tmp, folder, FOLDER_FILES)
    except files.OutputError as err:
        raise TrainError(f"{err}; use a new --out") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def trainable_state(net: HalloTrainer) -> dict:
    return {k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}


def load_trainable(net: HalloTrainer, state: dict, where: Path) -> None:
    """The trained parameters saved by :func:`trainable_state`: exactly the trainable ones, same shapes."""
    own = dict(net.named_parameters())
    wanted = {k for k, v in own.items() if v.requires_grad}
    if set(state) != wanted or any(own[k].shape != v.shape for k, v in state.items()):
        raise TrainError(f"{where}: the saved trained weights do not fit this model; use a new --out")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


# --- the loop -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder: hallo/, checkpoint/, train.log")
    p.add_argument("--wav2vec2", type=Path, required=True, help="a wav2vec2 folder (config.json + weights)")
    p.add_argument(
        "--animator", type=Path, default=TOY_ANIMATOR_DIR, help="the toy animator's pipeline folder"
    )
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4, help="Hallo stage 2: 4")
    p.add_argument("--clip-frames", type=int, default=14, help="frames per clip (Hallo: 14 + 2 motion)")
    p.add_argument("--n-motion-frames", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="as train_animator (Hallo fine-tunes at 1e-5)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--min-lr-ratio", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--uncond-ratio", type=float, default=0.05, help="each of image / audio / both (Hallo)")
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--noise-offset", type=float, default=0.05)
    p.add_argument("--image-tokens", type=int, default=4, help="identity tokens K (Hallo: 4)")
    p.add_argument("--audio-tokens", type=int, default=8, help="audio tokens per frame (Hallo: 32)")
    p.add_argument("--audio-hidden", type=int, default=256, help="audio projection width (Hallo: 512)")
    p.add_argument(
        "--audio-dim", type=int, help="audio token width (default: the UNet's cross_attention_dim)"
    )
    p.add_argument("--train-motion-modules", action="store_true", help="also train the motion modules")
    p.add_argument("--ema-decay", type=float, default=0.0, help="keep an EMA (hallo/ then holds it); 0: none")
    p.add_argument(
        "--seed", type=int, default=0, help="the new modules' initial weights and every step's draws"
    )
    p.add_argument("--data-seed", type=int, default=0, help="which toy clips are rendered")
    p.add_argument("--num-items", type=int, default=64, help="speaking clips pre-encoded")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels (the toy animator's: 128)")
    p.add_argument("--cache", type=Path, help="pre-encoded data (default --out/../cache_hallo_*.safetensors)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.fps, args.start_step = float(A.HALLO_FPS), 0
    for name in ("max_steps", "batch_size", "clip_frames", "image_tokens", "audio_tokens", "audio_hidden"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n_motion_frames < 0:
        p.error("--n-motion-frames must be >= 0")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not (args.wav2vec2 / "config.json").is_file() or not list(args.wav2vec2.glob("*.safetensors")):
        p.error(f"--wav2vec2 {args.wav2vec2} must be a folder with config.json and safetensors weights")
    if not (args.animator / "model_index.json").is_file():
        p.error(f"--animator {args.animator} is not a pipeline folder (no model_index.json)")
    if args.cache is None:
        args.cache = (
            args.out.parent / f"cache_hallo_{args.num_items}x{args.size}_seed{args.data_seed}.safetensors"
        )
    return args


def train(args: argparse.Namespace) -> dict:
    try:
        files.check_output_folder(args.out, OWN, what="--out", force_hint="a new --out")
    except files.OutputError as err:
        raise TrainError(str(err)) from None
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != 1:
        raise TrainError("train_hallo.py runs on one process")
    if args.threads:
        torch.set_num_threads(args.threads)
    animator = Pose2VideoPipeline.from_pretrained(args.animator)
    for module in animator.components.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(False).eval()
    wav2vec2, extractor = A.load_wav2vec2(args.wav2vec2)
    net = build_networks(animator, wav2vec2.config, args)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    LOG.handlers = [handler, logging.StreamHandler(sys.stderr)]
    LOG.setLevel(logging.INFO)
    cache = load_cache(args.cache, args, animator, wav2vec2, extractor)
    init_image_proj(net.image_proj, cache["embeds"])
    params = net.set_trainable(args.train_motion_modules)
    ema = EMAModel(params, decay=args.ema_decay) if args.ema_decay else None
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: T.lr_factor(s, args))
    config = {
        k: getattr(args, k)
        for k in ("image_tokens", "audio_tokens", "audio_hidden", "audio_dim", "train_motion_modules", "seed")
    }
    log = {"steps": [], "loss": [], "lr": [], "seconds": []}
    start, elapsed = 0, 0.0
    ckpt = out / "checkpoint"
    if (ckpt / "state.safetensors").is_file():
        try:
            state = aligned(files.load_state(ckpt / "state.safetensors"))
        except ValueError as err:
            raise TrainError(f"cannot resume from {ckpt}: {err}") from None
        if state["config"] != config or ("ema" in state) != (ema is not None):
            raise TrainError(f"{ckpt} holds a run of other settings ({state['config']}); use a new --out")
        load_trainable(net, state["trainable"], ckpt)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start, elapsed, log = state["step"], state["seconds"], state["log"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
        LOG.info("resumed from %s at step %d", ckpt, start)
    device = accelerator.device
    net.to(device)
    scheduler = T.training_scheduler()
    n_params = sum(p.numel() for p in params)
    levels = len(net.denoising_unet.down_blocks)
    LOG.info("%d trainable parameters, steps %d -> %d", n_params, start, args.max_steps)

    def save(step: int) -> None:
        train_log = {
            "step": step,
            "trained": [*TRAINED, *(["motion_modules"] if args.train_motion_modules else [])],
            "trainable_parameters": n_params,
            "batch_size": args.batch_size,
            "ema_decay": args.ema_decay,
            "seconds": round(elapsed, 1),
            "args": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "command": " ".join(sys.argv),
            "data": cache["meta"],
            "scheduler": T.TRAIN_SCHEDULER,
            "log": log,
        }
        state = {
            "config": config,
            "step": step,
            "seconds": elapsed,
            "log": log,
            "trainable": trainable_state(net),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            **({} if ema is None else {"ema": ema.state_dict()}),
        }
        write_pipeline(net, animator, wav2vec2, ckpt, args.animator, state=state)
        final = net
        if ema is not None:
            final = copy.deepcopy(net)
            ema.copy_to([p for p in final.parameters() if p.requires_grad])
        extra = {"train_log.json": json.dumps(train_log, indent=1)}
        write_pipeline(final, animator, wav2vec2, out / "hallo", args.animator, extra)

    net.train()
    window, tick = [], time.time()
    session = tick
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=args.no_progress)
    for step in bar:
        batch = add_masks(step_batch(cache, step, args), args.size, levels)
        loss = step_loss(net, to_device(batch, device), scheduler, args)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        window.append(loss.item())
        now = time.time()
        elapsed, tick = elapsed + now - tick, now
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            log["steps"].append(step + 1)
            log["loss"].append(round(sum(window) / len(window), 5))
            log["lr"].append(lr_scheduler.get_last_lr()[0])
            log["seconds"].append(round(elapsed, 1))
            LOG.info(
                "step %d loss %.4f (%.2f s/step)",
                step + 1,
                log["loss"][-1],
                (now - session) / (step + 1 - start),
            )
            window = []
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.max_steps:
            save(step + 1)
    if start >= args.max_steps:
        LOG.info("already at step %d", start)
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    return {"step": max(start, args.max_steps), "log": log, "model": net, "cache": cache}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except TrainError as err:
        print(f"train_hallo: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
