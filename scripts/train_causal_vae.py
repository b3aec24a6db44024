"""Train the toy causal 3D VAE (anim_lab.causal_vae.CAUSAL_VAE_TOY) on toy-world clips; write its weights.

    .venv/bin/python scripts/train_causal_vae.py                  # ~25 min on one CPU thread
    .venv/bin/python scripts/train_causal_vae.py --steps 20 --full-steps 5 --out /tmp/vae_smoke   # smoke test

Data: 17-frame, 64 px clips of training identities (``toy.identity_split("train")``), rendered once into
memory (no texture, no grain, so PSNR is not capped by noise). Each step takes a random 9-frame (4k+1) window
of a clip, flipped left-right half of the time.

Schedule (fixed step counts, so a seed gives one result):
1. ``--steps`` steps on random 32x32 crops, batch 16 (4x cheaper than full frames; the VAE is convolutional);
2. ``--full-steps`` steps on full 64x64 frames, batch 4, so GroupNorm statistics and the mid attention see
   whole frames.
Adam, lr 1e-3 after a 50-step warm-up, cosine decay to 3e-5 over both phases; bf16 autocast; gradient clip 1.
Loss: MSE + 0.1 L1 + 1e-6 KL (summed per clip, as in SD's VAE training).

The committed weights were made in four runs, each lengthening the previous schedule (about 53 minutes in all
on one thread; held-out PSNR 25.7 dB after the second run, 25.95 dB after the third, 26.07 dB after the
fourth):

    .venv/bin/python scripts/train_causal_vae.py --stop-at 1200
    .venv/bin/python scripts/train_causal_vae.py --resume --steps 2300 --full-steps 500
    .venv/bin/python scripts/train_causal_vae.py --resume --steps 2300 --full-steps 1100
    .venv/bin/python scripts/train_causal_vae.py --resume --steps 2300 --full-steps 1700

At the end: ``scaling_factor`` = 1 / std of the latent means over training clips (as SD and HunyuanVideo chose
theirs), held-out PSNR on 64 clips of unseen identities (17 frames, 64 px), and the weights + config in
``anim_lab/assets/toy_causal_vae/`` (diffusers layout; loads in ``AutoencoderKLHunyuanVideo`` too) with
``train_log.json`` beside them. Checkpoints every 100 steps in ``--ckpt`` (.safetensors + .json, resumable
with ``--resume``; nothing in them can run code when read back).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.nn import functional as F

from anim_lab import files, toy
from anim_lab.causal_vae import CAUSAL_VAE_TOY, TOY_ASSET_DIR, CausalVAE
from anim_lab.metrics import video_psnr  # one MSE per clip, [-1, 1] data
from anim_lab.vae import images_from_uint8

SIZE, CLIP_FRAMES, WINDOW = 64, 17, 9


def render_clips(identities, seed_offset: int) -> torch.Tensor:
    """(N, 17, 64, 64, 3) uint8 clips, one per identity seed (clip seed = identity seed + offset)."""
    clips = []
    for ident_seed in identities:
        clip = toy.make_clip(
            toy.identity_from_seed(int(ident_seed)),
            num_frames=CLIP_FRAMES,
            size=SIZE,
            seed=int(ident_seed) + seed_offset,
        )
        clips.append(torch.from_numpy(clip.frames))  # (F, H, W, 3)
    return torch.stack(clips)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return rearrange(
        images_from_uint8(x_uint8), "b f c h w -> b c f h w"
    )  # (B, F, 3, H, W) -> (B, 3, F, H, W)


def save_checkpoint(path: Path, vae, opt, step: int, log, rng: np.random.Generator, history) -> None:
    """Everything a resumed run needs (the numpy generator by its state) as safetensors + JSON, atomically:
    ``path`` with .safetensors and .json (see :func:`anim_lab.files.save_state`)."""
    state = {
        "model": vae.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "log": log,
        "rng_state": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    files.save_state(state, path)


def load_checkpoint_state(path: Path) -> tuple[dict, np.random.Generator]:
    """Read a checkpoint written by :func:`save_checkpoint` (nothing in it can run code) and rebuild the
    numpy generator. A missing, truncated or foreign file raises ValueError naming it."""
    state = files.load_state(path)
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng_state"]
    return state, rng


@torch.no_grad()
def evaluate(vae: CausalVAE, clips_uint8: torch.Tensor, batch: int = 8) -> float:
    vae.eval()
    scores = []
    for i in range(0, len(clips_uint8), batch):
        x = to_float(clips_uint8[i : i + batch])
        scores.append(video_psnr(vae(x).clamp(-1, 1), x))  # per clip
    vae.train()
    return float(torch.cat(scores).mean())


def batch_of(clips: torch.Tensor, rng: np.random.Generator, batch: int, crop: int | None) -> torch.Tensor:
    """Random 9-frame windows (and crops), flipped half of the time: (B, 3, 9, crop, crop) in [-1, 1]."""
    idx = rng.integers(len(clips), size=batch)
    out = []
    for i in idx:
        t0 = rng.integers(CLIP_FRAMES - WINDOW + 1)
        x = clips[i, t0 : t0 + WINDOW]  # (9, H, W, 3)
        if crop is not None:
            y0, x0 = rng.integers(SIZE - crop + 1, size=2)
            x = x[:, y0 : y0 + crop, x0 : x0 + crop]
        if rng.random() < 0.5:
            x = x.flip(-2)  # left-right
        out.append(x)
    return to_float(torch.stack(out))


def lr_at(step: int, total: int, base: float = 1e-3, final: float = 3e-5, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1300, help="steps on 32 px crops, batch 16")
    parser.add_argument("--full-steps", type=int, default=300, help="steps on full 64 px frames, batch 4")
    parser.add_argument("--train-clips", type=int, default=800)
    parser.add_argument("--test-clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=TOY_ASSET_DIR)
    parser.add_argument("--ckpt", type=Path, default=Path("/tmp/toy_causal_vae_ckpt.safetensors"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after the checkpoint of this step")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.full_steps < 0 or args.train_clips < 1 or args.test_clips < 1:
        parser.error("--steps, --train-clips and --test-clips must be >= 1 and --full-steps >= 0")

    state = None
    if args.resume and args.ckpt.with_suffix(".safetensors").exists():
        try:  # read before the rendering, so a bad checkpoint is named at once
            state, resumed_rng = load_checkpoint_state(args.ckpt)
        except ValueError as err:
            parser.error(f"--resume: {err}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    train_ids = list(toy.identity_split("train"))[: args.train_clips]
    test_ids = list(toy.identity_split("test"))[: args.test_clips]
    train = render_clips(train_ids, seed_offset=0)
    test = render_clips(test_ids, seed_offset=0)
    print(
        f"rendered {len(train)} train / {len(test)} test clips {tuple(train.shape[1:])} in "
        f"{time.time() - t_start:.0f} s",
        flush=True,
    )

    vae = CausalVAE(**CAUSAL_VAE_TOY)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    total = args.steps + args.full_steps
    step, log, history = 0, [], []
    if state is not None:
        rng = resumed_rng
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log, history = state["step"], state["log"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    history.append({"from_step": step, "steps": args.steps, "full_steps": args.full_steps})

    vae.train()
    t0 = time.time()
    while step < total and (args.stop_at is None or step < args.stop_at):
        crop_phase = step < args.steps
        x = batch_of(train, rng, 16 if crop_phase else 4, 32 if crop_phase else None)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x)
            rec = vae.decode(posterior.sample()).float()
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = posterior.kl().float().mean()
        loss = mse + 0.1 * l1 + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(
                f"step {step}/{total} loss {loss.item():.4f} mse {mse.item():.4f} kl {kl.item():.0f} "
                f"lr {lr_at(step - 1, total):.2e} {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
        if step % 250 == 0 or step == total:
            score = evaluate(vae, test[:16])
            log.append(
                {"step": step, "minutes": round((time.time() - t0) / 60, 2), "test_psnr_16": round(score, 2)}
            )
            print(f"  held-out PSNR (16 clips): {score:.2f} dB", flush=True)
        if step % 100 == 0 or step == total:
            save_checkpoint(args.ckpt, vae, opt, step, log, rng, history)

    if step < total:
        print(f"stopped at step {step} (--stop-at); checkpoint in {args.ckpt}", flush=True)
        return
    vae.eval()
    with torch.no_grad():  # scaling factor: 1 / std of latent means over (a fixed subset of) training clips
        means = torch.cat(
            [vae.encode(to_float(train[i : i + 16])).mean for i in range(0, min(len(train), 256), 16)]
        )
    vae.scaling_factor = vae.config["scaling_factor"] = round(float(1.0 / means.std()), 6)
    test_psnr = evaluate(vae, test)
    train_psnr = evaluate(vae, train[:64])
    vae.save_pretrained(args.out)
    summary = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items()},
        "seed": args.seed,
        "steps_crop_32px_batch16": args.steps,
        "steps_full_64px_batch4": args.full_steps,
        "train_clips": len(train),
        "test_clips": len(test),
        "clip": f"{CLIP_FRAMES} frames, {SIZE} px",
        "held_out_psnr_db": round(test_psnr, 2),
        "train_psnr_db_64_clips": round(train_psnr, 2),
        "minutes_last_run": round((time.time() - t0) / 60, 1),
        "threads": args.threads,
        "runs": history,  # each run: the step it started from and its --steps/--full-steps (lr schedule)
        "log": log,
        "parameters": sum(p.numel() for p in vae.parameters()),
    }
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}, indent=2), flush=True)


if __name__ == "__main__":
    main()
