"""Train seed 002's joint model on the toy world: a portrait and its pose image denoised together (skeleton).

    # a real run (not made yet; issue 28 §4's experiment): one shared thread, in the background
    nohup .venv/bin/python scripts/train_joint.py --out runs/joint --steps 3000 --threads 1 \\
        --init toy-animator > runs/joint.out 2>&1 &
    .venv/bin/python scripts/train_joint.py --out runs/joint --steps 3000 --resume     # after an interruption
    # smoke test (tests/test_train_joint.py): TINY UNet, random weights, seconds
    .venv/bin/python scripts/train_joint.py --out /tmp/joint --steps 2 --smoke

Model: diffusers' 2D UNet (``TOY.unet``; ``--smoke``: ``TINY.unet``), random or, with ``--init toy-animator``,
the 2D weights of the toy animator's denoising UNet; then :func:`anim_lab.joint.add_joint_layers` (each attn1
gets a copy of itself as a joint cross-attention and a zero Conv1d). The base is frozen; trained are the
LoRA ``y`` on the UNet's own attention (applied to the pose-image member only: the base keeps making
portraits), the LoRAs ``xy`` / ``yx`` on the joint copies (x rows / y rows), and the joint convs.

Data: single frames of :class:`anim_lab.toy.ToyPortraitDataset` (training identities): the portrait x in
[-1, 1] and its pose image y in [0, 1], mapped to [-1, 1] (2 y - 1) before the VAE (the range table of
tests/test_ranges.py). Both go through the toy VAE (posterior mean x scaling factor). The cross-attention
tokens are zeros: p(portrait, pose image) unconditionally (the reference's CLIP token would condition it).

Objective: the project's DDPM schedule and prediction type (``anim_lab.guidance.build_scheduler``: v with
zero terminal SNR); one timestep per pair, independent noise per member; MSE over both members. AdamW, batch
``--batch`` pairs, fp32. A checkpoint (trainable weights, optimizer, step, log; safetensors + JSON) every
``--ckpt-every`` steps and at the end; ``train_log.json`` beside it.

Sampling: :func:`sample_pairs` (DDIM from noise, both members together), with ``joint=False`` for the
baseline of two models run independently (the joint path off: base for the portrait, base + LoRA ``y`` for
the pose image). What is left of the experiment: train, then detect landmarks in the generated portraits
and compare them with the generated pose images, joint against independent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from anim_lab import files
from anim_lab.configs import TINY, TOY
from anim_lab.errors import InputError
from anim_lab.guidance import build_scheduler, set_timesteps
from anim_lab.joint import add_joint_layers, joint_attention, joint_lora_targets, own_lora_targets
from anim_lab.lora import lora_config
from anim_lab.toy import ToyPortraitDataset
from anim_lab.unet import MOTION_KEY, build_unet2d
from anim_lab.vae import decode, encode, load_toy_vae

ADAPTERS = ("y", "xy", "yx")


def build_joint_unet(smoke: bool, rank: int, init: str = "random", seed: int = 0):
    """The UNet with joint layers and the three adapters; only the adapters and joint convs train."""
    torch.manual_seed(seed)
    unet = build_unet2d(TINY.unet if smoke else TOY.unet)
    if init == "toy-animator":
        from anim_lab.toy import load_animator

        weights = {
            k: v for k, v in load_animator().denoising_unet.state_dict().items() if MOTION_KEY not in k
        }
        missing, unexpected = unet.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise InputError(
                f"toy animator weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
    add_joint_layers(unet)
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(rank, target_modules=own_lora_targets()), adapter_name="y")
    for name in ("xy", "yx"):
        unet.add_adapter(lora_config(rank, target_modules=joint_lora_targets()), adapter_name=name)
    unet.set_adapters(list(ADAPTERS))
    for name, p in unet.named_parameters():  # add_adapter trains only the last adapter added
        p.requires_grad_(".lora_" in name or ".joint_conv." in name)
    return unet


def trainable_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def pair_latents(vae, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset batch -> (portrait latents, pose-image latents), each (B, 4, h, w)."""
    x = batch["frames"][:, :, 0]  # (B, 3, 1, H, W) -> (B, 3, H, W), in [-1, 1]
    y = batch["poses"][:, :, 0] * 2 - 1  # (B, 3, H, W): [0, 1] -> [-1, 1], what the VAE takes
    with torch.no_grad():
        return encode(vae, x), encode(vae, y)  # posterior mean x scaling factor


@torch.no_grad()
def sample_pairs(
    unet, vae, num_pairs: int, size: int, num_inference_steps: int = 20, joint: bool = True, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``num_pairs`` (portrait, pose image) pairs from noise with DDIM: (B, 3, H, W) in [-1, 1] and
    (B, 3, H, W) in [0, 1]. ``joint=False`` runs the same UNet with the joint path off: the portrait from the
    base model, the pose image from the base + LoRA ``y``, each alone -- the "two models run independently"
    baseline of the consistency measurement."""
    scheduler = build_scheduler()
    timesteps = set_timesteps(scheduler, num_inference_steps)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (2 * num_pairs, vae.config.latent_channels, size // factor, size // factor)
    latents = torch.randn(shape, generator=generator)  # (2B, 4, h, w): [portraits ; pose images]
    tokens = torch.zeros(2 * num_pairs, 1, unet.config.cross_attention_dim)
    is_x = torch.tensor([1] * num_pairs + [0] * num_pairs).bool()
    with joint_attention(unet, is_x, {"y": ~is_x, "xy": is_x, "yx": ~is_x}) as state:
        state.enabled = joint
        for t in timesteps:
            latents = scheduler.step(unet(latents, t, tokens).sample, t, latents).prev_sample
    images = decode(vae, latents)  # (2B, 3, H, W) in [-1, 1]
    return images[:num_pairs], (images[num_pairs:] + 1) / 2  # pose images back to [0, 1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--size", type=int, default=None, help="image size (default 128, --smoke 64)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--init", choices=("random", "toy-animator"), default="random")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="TINY UNet, 64 px: a test that the loop runs")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.ckpt_every < 1:
        raise InputError("--steps, --batch and --ckpt-every must be >= 1")
    torch.set_num_threads(args.threads)
    size = args.size or (64 if args.smoke else 128)
    ckpt = args.out / "ckpt.safetensors"
    if ckpt.exists() and not args.resume:
        raise files.OutputError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")

    unet = build_joint_unet(args.smoke, args.rank, args.init, args.seed)
    vae = load_toy_vae().requires_grad_(False)
    scheduler = build_scheduler()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    step, log = 0, []
    if args.resume and ckpt.exists():
        state = files.load_state(ckpt)
        unexpected = unet.load_state_dict(state["trainable"], strict=False).unexpected_keys
        if unexpected or set(state["trainable"]) != set(trainable_state(unet)):
            raise InputError(
                f"{ckpt} holds other weights than this model trains ({unexpected[:3]}): same --rank?"
            )
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
    data = ToyPortraitDataset("train", size=size, num_frames=1, length=10**6, seed=args.seed)
    tokens = torch.zeros(1, 1, unet.config.cross_attention_dim)  # (1, 1, D): unconditional
    is_x = torch.tensor([1] * args.batch + [0] * args.batch).bool()  # [x_1..x_B ; y_1..y_B]
    masks = {"y": ~is_x, "xy": is_x, "yx": ~is_x}
    g = torch.Generator().manual_seed(args.seed * 1000 + step)  # a resumed run draws new noise
    unet.train()
    with joint_attention(unet, is_x, masks):
        while step < args.steps:
            start = time.time()
            items = [data[step * args.batch + i] for i in range(args.batch)]
            batch = {k: torch.stack([it[k] for it in items]) for k in ("frames", "poses")}
            x0 = torch.cat(pair_latents(vae, batch))  # (2B, 4, h, w): [portraits ; pose images]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g).repeat(2)
            noise = torch.randn(x0.shape, generator=g)
            noisy = scheduler.add_noise(x0, noise, t)
            target = (
                scheduler.get_velocity(x0, noise, t)
                if scheduler.config.prediction_type == "v_prediction"
                else noise
            )
            pred = unet(noisy, t, tokens.expand(len(x0), -1, -1)).sample
            loss = F.mse_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            log.append({"step": step, "loss": loss.item(), "seconds": round(time.time() - start, 3)})
            print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step % args.ckpt_every == 0 or step == args.steps:
                files.save_state(
                    {
                        "trainable": trainable_state(unet),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "log": log,
                    },
                    ckpt,
                )
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "size": size, "log": log}
    files.write_result(args.out / "train_log.json", record)
    return record


if __name__ == "__main__":
    main()
