"""Train the toy world's tiny AutoencoderKL (8x downsampling, 4 latent channels) on 128-px toy portraits.

    .venv/bin/python scripts/train_toy_vae.py  # the committed run: seed 0, 20 minutes on 2 CPU cores
    .venv/bin/python scripts/train_toy_vae.py --minutes 2 --out /tmp/vae

Recipe (measured in the toy-world study, see the chapter): a small (16, 32, 64, 64) model trained on random
64-px crops of 128-px renders (the conv layers at 128 px dominate the cost; the model is fully convolutional,
so it is evaluated on full frames), bf16 autocast on CPU, loss MSE + 0.1 L1 + 1e-6 KL, Adam 1e-3 with a
20-step warm-up and the learning rate x0.3 for the last fifth of the budget. Every ``--eval-every`` seconds:
PSNR on full 128-px frames of held-out identities, and a checkpoint (config.json +
diffusion_pytorch_model.safetensors) written to ``--out``. At the end the scaling factor 1 / std(latents) is
measured on training frames and stored in config.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.nn import functional as F
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_toy_models import render_stills  # noqa: E402  (the shared toy-data helper)

from anim_lab import configs  # noqa: E402
from anim_lab import vae as V  # noqa: E402

DEFAULT_OUT = ROOT / "anim_lab" / "assets" / "toy_vae"


def vae_config() -> dict:
    cfg = configs.TOY.get("vae")
    cfg.update(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=128)
    return cfg


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


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator, kl_weight: float = 1e-6):
    """MSE + 0.1 L1 on a posterior sample's reconstruction + kl_weight * KL to N(0, 1). Returns
    (loss, mse)."""
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)  # (B, 4, h, w), a posterior sample
    rec = vae.decode(z).sample.float()  # (B, 3, H, W)
    mse = F.mse_loss(rec, x)
    loss = mse + 0.1 * F.l1_loss(rec, x) + kl_weight * dist.kl().mean()
    return loss, mse


@torch.no_grad()
def eval_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean PSNR (dB) of mean-latent reconstructions of full frames (N, 3, H, W) in [-1, 1]."""
    vae.eval()
    values = [
        V.psnr(V.decode(vae, V.encode(vae, images[i : i + batch_size])), images[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    vae.train()
    return float(torch.cat(values).mean())


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


def save_atomic(vae: AutoencoderKL, out: Path, log: dict) -> None:
    """Write the folder next to ``out`` and swap it in, so a reader never sees a half-written checkpoint."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train(
    out: Path = DEFAULT_OUT,
    minutes: float = 20.0,
    max_steps: int | None = None,
    seed: int = 0,
    n_train: int = 3000,
    n_eval: int = 64,
    batch_size: int = 16,
    crop: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    bf16: bool = True,
    eval_every_s: float = 60.0,
    threads: int = 1,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: Path | None = None,
) -> dict:
    """Train and save; returns the log (curve of held-out PSNR against minutes, losses, scaling factor).

    The budget is ``minutes`` of wall time or ``max_steps`` steps, whichever comes first; the learning-rate
    drop comes at 80% of that budget. ``data`` = (train uint8 (N, H, W, 3), eval uint8) skips rendering
    (tests).
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    if data is None:
        train_u8 = render_stills("train", n_train, seed=seed)["images"]
        eval_u8 = render_stills("test", n_eval, seed=10_000 + seed)["images"]
    else:
        train_u8, eval_u8 = data
    train_u8, eval_images = torch.as_tensor(train_u8), V.images_from_uint8(eval_u8)

    # a fresh model, or continue from a saved folder (``--init``: e.g. a longer run in two parts)
    vae = AutoencoderKL(**vae_config()) if init is None else AutoencoderKL.from_pretrained(init)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    n_params = sum(p.numel() for p in vae.parameters())
    log = dict(
        seed=seed,
        n_params=n_params,
        n_train=len(train_u8),
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        bf16=bf16,
        minutes=minutes,
        max_steps=max_steps,
        init=None if init is None else str(init),
        curve=[],
        losses=[],
    )
    budget_s = minutes * 60
    t0 = time.time()
    last_eval = t0
    step = 0
    bar = tqdm(total=max_steps, disable=not progress, desc="toy VAE", unit="step", mininterval=10)
    while True:
        elapsed = time.time() - t0
        frac = max(elapsed / budget_s, step / max_steps if max_steps else 0.0)
        if frac >= 1.0:
            break
        warm = min(1.0, (step + 1) / warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.3 if frac > 0.8 else 1.0)
        x = random_crops(train_u8, batch_size, crop, g)  # (B, 3, crop, crop)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, mse = vae_loss(vae, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        log["losses"].append(round(loss.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_eval >= eval_every_s:
            last_eval = time.time()
            p = eval_psnr(vae, eval_images)
            log["curve"].append(dict(step=step, minutes=round((last_eval - t0) / 60, 2), psnr=round(p, 2)))
            bar.write(f"step {step}  {log['curve'][-1]['minutes']:.1f} min  held-out PSNR {p:.2f} dB")
            if out is not None:
                save_atomic(vae, out, log | dict(steps=step))
    bar.close()
    vae.eval()
    log["steps"] = step
    log["final_psnr"] = round(eval_psnr(vae, eval_images), 2)
    log["curve"].append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), psnr=log["final_psnr"]))
    sf = measure_scaling_factor(vae, V.images_from_uint8(train_u8[:256]), seed)
    vae.register_to_config(scaling_factor=round(sf, 5))
    log["scaling_factor"] = round(sf, 5)
    if out is not None:
        save_atomic(vae, out, log)
    print(f"done: {step} steps, held-out PSNR {log['final_psnr']:.2f} dB, scaling factor {sf:.5f}")
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--init", type=Path, default=None, help="continue training from this saved VAE folder")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    p.add_argument(
        "--eval-every", type=float, default=60.0, help="seconds between held-out evaluations/checkpoints"
    )
    args = p.parse_args(argv)
    train(
        args.out,
        args.minutes,
        args.max_steps,
        args.seed,
        args.n_train,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        bf16=not args.no_bf16,
        eval_every_s=args.eval_every,
        threads=args.threads,
        init=args.init,
    )


if __name__ == "__main__":
    main()
