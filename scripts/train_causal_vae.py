"""Train the toy causal 3D VAE (anim_lab.causal_vae.CAUSAL_VAE_TOY), second version: 128-px clips, the
latent-diffusion autoencoder recipe (L1 + KL + a patch discriminator), starting from the committed weights.

    # the long run, as run (train_log.json's "commands" holds each part): its first 200 steps are the A/B arm
    # below (--max-steps 200, so steps 160-200 ran at 0.3x the learning rate), copied and resumed
    .venv/bin/python scripts/train_causal_vae.py --out /work/runs/cvae_ab/motion1 --max-steps 200 \
        --minutes 60 --motion-weight 1 --eval-every 100000 --no-progress
    cp -r /work/runs/cvae_ab/motion1 /work/runs/causal_vae_v2
    .venv/bin/python scripts/train_causal_vae.py --out /work/runs/causal_vae_v2 --resume --minutes 300 \
        --eval-every 600 --no-progress                     # again, to continue it (raise --minutes at will)
    .venv/bin/python scripts/train_causal_vae.py --out /work/runs/causal_vae_v2 --export-raw /tmp/cvae_raw
    .venv/bin/python scripts/train_causal_vae.py --out /tmp/cvae_smoke --max-steps 4 --n-train 4 --n-eval 2

The model is unchanged: HunyuanVideo's layout (``anim_lab.causal_vae.CausalVAE``, diffusers'
``AutoencoderKLHunyuanVideo`` keys), latent 16 channels, 8x in space, 4x in time, clips of 4k + 1 frames,
fully convolutional, so the committed 64-px weights (``anim_lab/assets/toy_causal_vae``, ``--init``) run at
128 px from the first step. (The first version, MSE + 0.1 L1 + 1e-6 KL on 64-px clips, was trained by this
script as it stood at commit fc92637; its four commands are in that version's docstring.)

Data: 17-frame, 128-px clips of training identities (``toy.identity_split("train")``, clip seed = identity
seed, the clips ``scripts/train_toy_i2v.py`` renders), rendered once into memory. Each step takes ``--batch``
random ``--window``-frame windows (4k + 1 frames, default 9) of random clips, cropped to ``--crop`` px
(default 64; the model is convolutional, so it is evaluated on full frames) and flipped left-right half of
the time.

Loss (the v2 recipe of ``scripts/train_toy_vae.py``, whose ``PatchDiscriminator``, ``hinge_d_loss``,
``adaptive_weight`` and ``TrainingClock`` are used here, loaded with ``anim_lab.load_script``):
``L1 + kl_weight * KL + motion_weight * L_motion + lambda * L_G``. The discriminator judges frames (time
folded into the batch: (B, 3, T, h, w) -> (B*T, 3, h, w)) with the hinge loss, from step ``--disc-start``;
the decoder gets its adversarial term ``--adv-delay`` steps later, weighted adaptively
(``lambda = disc_weight * ||grad L_rec|| / ||grad L_G||`` at the decoder's last conv). ``L_motion`` is the
temporal term: the L1 distance between the frame-to-frame differences of the reconstruction and of the
clip, which asks for the motion itself (the first version kept 7% of it: a small VAE whose error is larger
than the motion between two frames has little to gain, under L1 alone, from getting that motion right).
Adam 2e-4, betas (0.5, 0.9) for both networks, a 20-step warm-up, x0.3 at 80% of the budget; gradient clip
1; bf16 autocast. An EMA of the weights (``--ema-decay``) is what is evaluated and saved. No perceptual term
(measured useless for the toy image VAE).

Every ``--eval-every`` seconds: PSNR, sharpness ratio (``anim_lab.metrics.sharpness_ratio``), SSIM and the
motion ratio (mean frame-to-frame change of the reconstruction / of the ground truth,
``anim_lab.metrics.frame_changes``) on ``--n-eval`` held-out 17-frame, 128-px clips of test identities, for
the EMA and the raw weights, logged to ``train_log.json``; and a checkpoint in ``--out``: the diffusers folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``, the EMA weights; ``scripts/eval_i2v.py --vae``
measures it), the log, and the training state (``train_state.safetensors`` + ``.json`` by
``anim_lab.files.save_state``: weights, EMA, discriminator, both Adam states, the random states; no pickle),
built beside ``--out`` and moved into place (``anim_lab.files.publish_folder``). ``--resume`` continues
exactly (tested: N + N steps give the weights of 2N); ``--minutes``/``--max-steps`` may be raised then, every
other setting must match. SIGINT/SIGTERM write a checkpoint and stop. At the end of the budget the scaling
factor (1 / std of posterior samples of training-clip latents) is measured and stored in config.json.

``--out`` is replaced only when it holds nothing but this script's files; it may not hold ``--init``.

A/B of the temporal term, measured here (one thread each, both at once on the shared 2-core machine, ~21
min; init from the committed weights, seed 0, batch 4, 9-frame 64-px crops, 200 steps, before the
discriminator starts, so L1 + KL (+ the term) alone; 16 held-out 17-frame 128-px clips; the EMA barely moves
in 200 steps, so the raw weights tell):

| run                       | raw: PSNR dB | sharpness | motion ratio | EMA: PSNR / sharpness / motion |
|---------------------------|--------------|-----------|--------------|--------------------------------|
| start (committed weights) | 25.42        | 0.171     | 0.092        | -                              |
| L1 + KL                   | 25.14        | 0.083     | 0.083        | 25.64 / 0.156 / 0.090          |
| L1 + KL + 1.0 temporal    | 25.31        | 0.084     | 0.075        | 25.64 / 0.155 / 0.089          |
| L1 + KL + 10 temporal     | 25.27        | 0.066     | 0.054        | 25.67 / 0.148 / 0.084          |

(The third arm ran later, beside the long run: 16.8 min.) No weight of the temporal term moves the motion
ratio in 200 steps, and L1 alone blurs further (sharpness 0.17 -> 0.08). The guess then was that the
reconstructions were too blurred for the motion to show, so that the discriminator would bring it back; the
long run (the second arm continued, ``/work/runs/causal_vae_v2``, resumed from its step 200) refutes it:
after 250 adversarial steps (step 752) the raw weights' sharpness is 0.72 and their motion ratio 0.077. The
latents of a clip barely change from one latent frame to the next (mean |z_t - z_(t-1)| 0.003-0.02 against
a mean |z| of 0.44, committed and v2 weights alike). A probe with a clip that cuts to another identity
every 4 frames (5 identities in 17 frames) shows where it is lost: the latent frames do differ (mean |z_t -
z_(t-1)| 0.13-0.36), but the decoder draws nearly the first frame throughout (each decoded frame 12.9-16.7 dB
from its own truth, 20-33 dB from frame 0; committed and v2 weights alike). The decoder has learned to lean
on the first latent frame, as clips whose identity, background and clothes never change reward it to; no
loss on its output has taught it otherwise yet. The next recipe to try is data that changes: cuts between
clips inside a training window, and per-frame shifts. The temporal term is kept (``--motion-weight 1``, the
long run's setting; it costs nothing measurable) until something that does move the motion is found.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

import anim_lab
from anim_lab import files, toy
from anim_lab import metrics as M
from anim_lab.causal_vae import CAUSAL_VAE_TOY, TOY_ASSET_DIR, CausalVAE
from anim_lab.vae import images_from_uint8, scaling_factor_from_latents

_gan = anim_lab.load_script("train_toy_vae")  # the toy image VAE's v2 recipe: one discriminator, one weight
PatchDiscriminator, hinge_d_loss, adaptive_weight = (
    _gan.PatchDiscriminator,
    _gan.hinge_d_loss,
    _gan.adaptive_weight,
)
TrainingClock = _gan.TrainingClock

SIZE, CLIP_FRAMES = 128, 17
STATE_FILE = "train_state.safetensors"  # files.save_state's tensors, with train_state.json beside it
OWN_FILES = frozenset(
    {"config.json", "diffusion_pytorch_model.safetensors", "train_log.json", STATE_FILE, "train_state.json"}
)
STATE_FORMAT = "anim_lab/train_causal_vae/2"
RESUMABLE_CHANGES = frozenset({"minutes", "max_steps", "eval_every_s", "threads"})
_STOP = {"signal": None}  # set by main()'s SIGINT/SIGTERM handler; the loop checkpoints and stops


class TrainError(RuntimeError):
    """A refused argument or destination (raised before any work)."""


# --- data ---------------------------------------------------------------------------------------------------
def render_clips(identities, size: int = SIZE, num_frames: int = CLIP_FRAMES) -> torch.Tensor:
    """(N, F, size, size, 3) uint8: one clip per identity seed (clip seed = identity seed)."""
    clips = [
        toy.make_clip(toy.identity_from_seed(int(s)), num_frames=num_frames, size=size, seed=int(s)).frames
        for s in identities
    ]
    return torch.from_numpy(np.stack(clips))


def to_video(frames_u8: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return rearrange(images_from_uint8(frames_u8), "b f c h w -> b c f h w")


def random_windows(
    clips: torch.Tensor, batch: int, window: int, crop: int, g: torch.Generator
) -> torch.Tensor:
    """``batch`` random ``window``-frame windows of random clips (N, F, H, W, 3) uint8, cropped to ``crop``
    px and flipped left-right half of the time -> (B, 3, window, crop, crop) in [-1, 1]."""
    n, f, h, w, _ = clips.shape
    idx = torch.randint(0, n, (batch,), generator=g)
    t0 = torch.randint(0, f - window + 1, (batch,), generator=g)
    ys = torch.randint(0, h - crop + 1, (batch,), generator=g)
    xs = torch.randint(0, w - crop + 1, (batch,), generator=g)
    flips = torch.rand(batch, generator=g) < 0.5
    out = torch.stack(
        [
            clips[i, t : t + window, y : y + crop, x : x + crop]
            for i, t, y, x in zip(idx, t0, ys, xs, strict=True)
        ]
    )  # (B, window, crop, crop, 3)
    video = to_video(out)
    video[flips] = video[flips].flip(-1)
    return video


# --- the loss terms -----------------------------------------------------------------------------------------
def motion_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the frame-to-frame differences of ``rec`` and ``x`` (B, 3, T, H, W): the temporal term."""
    return ((rec[:, :, 1:] - rec[:, :, :-1]) - (x[:, :, 1:] - x[:, :, :-1])).abs().mean()


def frames(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B*T, 3, H, W): what the discriminator judges."""
    return rearrange(video, "b c t h w -> (b t) c h w")


def generator_terms(vae: CausalVAE, x: torch.Tensor, g: torch.Generator) -> dict:
    """Reconstruction terms of a batch (B, 3, T, H, W): a posterior sample's reconstruction ``rec``, ``l1``,
    ``motion`` (:func:`motion_loss`) and ``kl`` (summed over the latent, mean over the batch)."""
    posterior = vae.encode(x)
    rec = vae.decode(posterior.sample(g)).float()  # (B, 3, T, H, W)
    return dict(rec=rec, l1=(rec - x).abs().mean(), motion=motion_loss(rec, x), kl=posterior.kl().mean())


# --- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(vae: CausalVAE, videos: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Clips (N, 3, F, H, W) in [-1, 1] encoded (posterior mode) and decoded, clamped to [-1, 1]."""
    was_training = vae.training
    vae.eval()
    out = [vae.decode(vae.encode(videos[i : i + batch]).mode()) for i in range(0, len(videos), batch)]
    vae.train(was_training)
    return torch.cat(out).float().clamp(-1, 1)


def motion_ratio(videos: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean frame-to-frame change of ``videos`` over that of ``targets`` (both (N, 3, F, H, W))."""
    return float(M.frame_changes(videos).mean() / M.frame_changes(targets).mean())


@torch.no_grad()
def evaluate(vae: CausalVAE, videos: torch.Tensor) -> dict:
    """PSNR (dB, per frame), sharpness ratio, SSIM and motion ratio of reconstructions of held-out clips."""
    rec = reconstruct(vae, videos)
    return dict(
        psnr=round(float(M.psnr(rec, videos).mean()), 2),
        sharpness=round(M.sharpness_ratio(rec, videos), 3),
        ssim=round(float(M.ssim(rec, videos).mean()), 4),
        motion=round(motion_ratio(rec, videos), 3),
    )


@torch.no_grad()
def measure_scaling_factor(vae: CausalVAE, videos: torch.Tensor, seed: int = 0) -> float:
    """1 / std of posterior samples of the latents of ``videos`` (N, 3, F, H, W) (the latent-diffusion
    recipe)."""
    g = torch.Generator().manual_seed(seed)
    vae.eval()
    zs = [vae.encode(videos[i : i + 4]).sample(g) for i in range(0, len(videos), 4)]
    return scaling_factor_from_latents(torch.cat(zs))


# --- files --------------------------------------------------------------------------------------------------
def check_out_folder(out: Path, init: Path | None = None) -> None:
    try:
        files.check_output_folder(out, OWN_FILES, inputs={"--init": init}, what="--out")
    except files.OutputError as err:
        raise TrainError(str(err)) from None


def write_checkpoint(out: Path, vae: CausalVAE, log: dict, state: dict) -> None:
    """The diffusers folder of ``vae``, the log and the training state, built in a staging folder beside
    ``out`` and moved into place (a reader sees the old checkpoint or the new one, never a mix)."""
    out = Path(out)
    check_out_folder(out)  # a file planted since the start is still never replaced
    tmp = files.staging_folder(out)
    try:
        files.save_state(state, tmp / STATE_FILE)
        vae.save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
        files.publish_folder(tmp, out, OWN_FILES)  # removes tmp, whatever happens
    except files.OutputError as err:
        raise TrainError(str(err)) from None


def read_state(path: Path) -> dict:
    """A state written by :func:`write_checkpoint`; anything else raises a TrainError naming the file (and is
    never unpickled)."""
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


def load_init(init: Path | None, config: dict | None) -> CausalVAE:
    """The starting model: ``init``'s config and weights, or a fresh one of ``config`` (default the toy's)."""
    if init is None:
        return CausalVAE(**(config or CAUSAL_VAE_TOY))
    try:
        return CausalVAE.from_pretrained(init)
    except (OSError, ValueError) as err:
        raise TrainError(f"--init: {err}") from None


def export_raw(out: Path, dest: Path) -> None:
    """Write the raw (not averaged) weights of ``out``'s training state as a diffusers folder ``dest``, for
    measuring them (``scripts/eval_i2v.py --vae dest``) while the EMA still lags."""
    state = read_state(Path(out) / STATE_FILE)
    dest = Path(dest)
    try:
        files.check_output_folder(dest, OWN_FILES, inputs={"--out": out}, what="--export-raw folder")
    except files.OutputError as err:
        raise TrainError(str(err)) from None
    vae = load_init(Path(out), None)  # the run's architecture (and scaling factor, once measured)
    vae.load_state_dict(state["vae"])
    tmp = files.staging_folder(dest)
    vae.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(dict(raw_weights_of=str(out), step=state["step"])) + "\n")
    try:
        files.publish_folder(tmp, dest, OWN_FILES)
    except files.OutputError as err:
        raise TrainError(str(err)) from None


# --- training -----------------------------------------------------------------------------------------------
def train(
    out: Path | None,
    minutes: float = 60.0,
    max_steps: int | None = None,
    seed: int = 0,
    n_train: int = 800,
    n_eval: int = 16,
    batch_size: int = 4,
    window: int = 9,
    crop: int = 64,
    lr: float = 2e-4,
    warmup_steps: int = 20,
    bf16: bool = True,
    eval_every_s: float = 600.0,
    threads: int = 1,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: Path | None = TOY_ASSET_DIR,
    *,
    resume: bool = False,
    restart: bool = False,
    disc_start: int = 200,
    adv_delay: int = 300,
    disc_weight: float = 0.2,
    disc_channels: int = 32,
    disc_layers: int = 2,
    ema_decay: float = 0.999,
    kl_weight: float = 1e-6,
    motion_weight: float = 1.0,
    betas: tuple[float, float] = (0.5, 0.9),
    config: dict | None = None,
    stop_at: int | None = None,
    final: bool = True,
    command: str | None = None,
) -> dict:
    """Train and checkpoint into ``out``; returns the log.

    The budget is ``minutes`` of training time (summed over resumed parts) or ``max_steps``, whichever comes
    first. ``data`` = (train uint8 (N, F, H, W, 3), eval uint8 (M, F', H', W', 3)) skips rendering (tests).
    ``init``: the folder whose config and weights the run starts from (None: a fresh model of ``config``).
    ``stop_at``: checkpoint and return after that step, as if interrupted (tests). ``final=False`` skips the
    final evaluation and scaling factor."""
    checks = {
        "--minutes must be > 0": minutes > 0,
        "--max-steps must be >= 1": max_steps is None or max_steps >= 1,
        "--batch-size must be >= 1": batch_size >= 1,
        "--window must be 4k + 1 frames with k >= 1 (5, 9, 13, 17)": window >= 5 and (window - 1) % 4 == 0,
        "--crop must be a positive multiple of 8": crop > 0 and crop % 8 == 0,
        f"--crop must be at most the clips' {SIZE} px": data is not None or crop <= SIZE,
        "--lr must be > 0": lr > 0,
        "--n-train and --n-eval must be >= 1": n_train >= 1 and n_eval >= 1,
        "--disc-weight, --kl-weight and --motion-weight must be >= 0": min(
            disc_weight, kl_weight, motion_weight
        )
        >= 0,
        "--disc-start and --adv-delay must be >= 0": min(disc_start, adv_delay) >= 0,
        "--ema-decay must be in [0, 1)": 0 <= ema_decay < 1,
        "--eval-every must be > 0": eval_every_s > 0,
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
    resumed = read_state(out / STATE_FILE) if resume else None
    # the architecture: the saved folder's on resume (its weights come from the state), else --init's
    vae = load_init(out if resumed is not None else init, config)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    if data is None:
        train_u8 = render_clips(list(toy.identity_split("train"))[:n_train])
        eval_u8 = render_clips(list(toy.identity_split("test"))[:n_eval])
    else:
        train_u8, eval_u8 = (torch.as_tensor(d) for d in data)
    if train_u8.shape[1] < window or min(train_u8.shape[2:4]) < crop:
        raise TrainError(
            f"training clips {tuple(train_u8.shape[1:])} are shorter than --window {window} or smaller than "
            f"--crop {crop}"
        )
    eval_videos = to_video(eval_u8)

    vae.train()
    disc = PatchDiscriminator(disc_channels, disc_layers)
    ema = copy.deepcopy(vae).requires_grad_(False) if ema_decay > 0 else None
    model = vae if ema is None else ema  # what is evaluated and saved
    use_gan = disc_weight > 0
    opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas)
    settings = dict(
        seed=seed,
        n_params=sum(p.numel() for p in vae.parameters()),
        n_train=len(train_u8),
        n_eval=len(eval_u8),
        clip=list(train_u8.shape[1:4]),
        batch_size=batch_size,
        window=window,
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
        motion_weight=motion_weight,
        disc_start=disc_start,
        adv_delay=adv_delay,
        ema_decay=ema_decay,
        disc_weight=disc_weight,
        disc_channels=disc_channels,
        disc_layers=disc_layers,
    )
    log = dict(settings, curve=[], losses=[], terms=[], commands=[])
    step, elapsed_before = 0, 0.0
    if resumed is not None:
        settings["init"] = resumed["settings"].get("init")  # where the run started, whatever --init says now
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in resumed["settings"].items()}
        now = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        changed = {k for k in now if saved.get(k) != now[k]} - RESUMABLE_CHANGES
        if changed:
            detail = ", ".join(
                f"{k}: {resumed['settings'].get(k)!r} -> {settings[k]!r}" for k in sorted(changed)
            )
            raise TrainError(f"{out / STATE_FILE} was written with other settings ({detail}); use them")
        vae.load_state_dict(resumed["vae"])
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        disc.load_state_dict(resumed["disc"])
        opt.load_state_dict(resumed["opt_g"])
        opt_d.load_state_dict(resumed["opt_d"])
        g.set_state(resumed["rng"]["generator"])
        torch.set_rng_state(resumed["rng"]["torch"])
        step, elapsed_before = resumed["step"], resumed["elapsed_s"]
        log = resumed["log"] | {k: settings[k] for k in RESUMABLE_CHANGES}
        log.setdefault("resumed_at", []).append(step)
        print(f"resuming {out} at step {step} ({elapsed_before / 60:.1f} min)", flush=True)
    if command is not None:
        log["commands"].append(dict(step=step, command=command))
    last_layer = vae.decoder.conv_out.conv.weight
    budget_s = minutes * 60
    clock = TrainingClock(elapsed_before)

    def checkpoint() -> None:
        if out is None:
            return
        state = dict(
            format=STATE_FORMAT,
            step=step,
            elapsed_s=clock(),
            settings=settings,
            log=log,
            vae=vae.state_dict(),
            ema=None if ema is None else ema.state_dict(),
            disc=disc.state_dict(),
            opt_g=opt.state_dict(),
            opt_d=opt_d.state_dict(),
            rng=dict(generator=g.get_state(), torch=torch.get_rng_state()),
        )
        write_checkpoint(out, model, log, state)

    def run_eval() -> None:
        m = evaluate(model, eval_videos)
        entry = dict(step=step, minutes=round(clock() / 60, 2), disc_on=use_gan and step > disc_start)
        if ema is not None:
            entry["raw"] = evaluate(vae, eval_videos)  # the trained weights themselves, for comparison
        log["curve"].append(entry | m)
        bar.write(
            f"step {step}  {entry['minutes']:.1f} min  held-out PSNR {m['psnr']:.2f} dB  sharpness "
            f"{m['sharpness']:.3f}  SSIM {m['ssim']:.4f}  motion {m['motion']:.3f}"
            + (
                f"  (raw: {entry['raw']['psnr']:.2f} dB, sharpness {entry['raw']['sharpness']:.3f}, "
                f"motion {entry['raw']['motion']:.3f})"
                if ema is not None
                else ""
            )
        )
        sys.stdout.flush()  # a log redirected to a file shows each evaluation when it happens

    bar = tqdm(total=max_steps, initial=step, disable=not progress, desc="causal VAE", mininterval=30)
    if step == 0:
        run_eval()  # where training starts from
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
        x = random_windows(train_u8, batch_size, window, crop, g)  # (B, 3, window, crop, crop)
        gan_on = use_gan and step >= disc_start
        adv_on = gan_on and step >= disc_start + adv_delay
        disc.requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t = generator_terms(vae, x, g)
            rec_loss = t["l1"] + motion_weight * t["motion"]
            loss = rec_loss + kl_weight * t["kl"]
            terms = dict(l1=t["l1"].item(), motion=t["motion"].item(), kl=t["kl"].item())
            if adv_on:
                g_loss = -disc(frames(t["rec"])).float().mean()
                weight = adaptive_weight(rec_loss, g_loss, last_layer, disc_weight)
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
                d_loss = hinge_d_loss(disc(frames(x)).float(), disc(frames(t["rec"].detach())).float())
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            terms["d_loss"] = d_loss.item()
        step += 1
        log["losses"].append(round(loss.item(), 5))
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
    log.pop("stopped", None)
    run_eval()
    log["final"] = log["curve"][-1]
    sf = measure_scaling_factor(model, to_video(train_u8[:64]), seed)
    model.scaling_factor = model.config["scaling_factor"] = round(sf, 6)
    log["scaling_factor"] = round(sf, 6)
    checkpoint()
    print(f"done: {step} steps, held-out {log['final']}, scaling factor {sf:.5f}", flush=True)
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder (the EMA model is saved)")
    p.add_argument("--init", type=Path, default=TOY_ASSET_DIR, help="start from this causal-VAE folder")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=800, help="training identities (one 17-frame clip each)")
    p.add_argument("--n-eval", type=int, default=16, help="held-out clips measured during training")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--window", type=int, default=9, help="frames per training window (4k + 1)")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--resume", action="store_true", help=f"continue from --out/{STATE_FILE}")
    p.add_argument("--restart", action="store_true", help=f"start over although --out holds a {STATE_FILE}")
    p.add_argument("--disc-start", type=int, default=200, help="step at which the discriminator switches on")
    p.add_argument("--adv-delay", type=int, default=300, help="steps the discriminator trains alone")
    p.add_argument("--disc-weight", type=float, default=0.2, help="0 turns the GAN off")
    p.add_argument("--ema-decay", type=float, default=0.999, help="0: no EMA (the raw weights are saved)")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--motion-weight", type=float, default=1.0, help="the temporal term; 0 turns it off")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=float, default=600.0, help="seconds between evaluations/checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--export-raw",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="only write the raw (not EMA) weights of --out's training state to FOLDER, and stop",
    )
    args = p.parse_args(argv)
    if args.export_raw is not None:
        try:
            export_raw(args.out, args.export_raw)
        except TrainError as err:
            sys.exit(f"error: {err}")
        return

    def on_signal(signum, frame):  # finish the step, write a checkpoint, stop
        _STOP["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    command = "python scripts/train_causal_vae.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        train(
            args.out,
            args.minutes,
            args.max_steps,
            args.seed,
            args.n_train,
            args.n_eval,
            batch_size=args.batch_size,
            window=args.window,
            crop=args.crop,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            bf16=not args.no_bf16,
            eval_every_s=args.eval_every,
            threads=args.threads,
            progress=not args.no_progress,
            init=args.init,
            resume=args.resume,
            restart=args.restart,
            disc_start=args.disc_start,
            adv_delay=args.adv_delay,
            disc_weight=args.disc_weight,
            ema_decay=args.ema_decay,
            kl_weight=args.kl_weight,
            motion_weight=args.motion_weight,
            command=command,
        )
    except TrainError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
