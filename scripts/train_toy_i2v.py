"""Train the tiny HunyuanVideo-style i2v transformer (anim_lab.flow.TOY_I2V) on toy-world latents.

    # 1. once: render + encode the clips with the toy causal VAE into runs/toy_i2v_cache/ (~10 min)
    .venv/bin/python scripts/train_toy_i2v.py --cache-only
    # 2. one model per condition type (500 steps each, ~20 min on one shared thread; side by side)
    nohup .venv/bin/python scripts/train_toy_i2v.py --kind latent_concat --steps 500 \\
        > runs/i2v_latent_concat.out 2>&1 &
    nohup .venv/bin/python scripts/train_toy_i2v.py --kind token_replace --steps 500 \\
        > runs/i2v_token_replace.out 2>&1 &
    # resume an interrupted run from its checkpoint (runs/toy_i2v_<kind>/ckpt.safetensors + ckpt.json)
    .venv/bin/python scripts/train_toy_i2v.py --kind latent_concat --resume
    # smoke test
    .venv/bin/python scripts/train_toy_i2v.py --kind token_replace --steps 20 \\
        --train-clips 16 --test-clips 8 --cache /tmp/i2v_cache --ckpt-dir /tmp/i2v_ckpt --out /tmp/i2v_out

Data: 17-frame, 64 px talking clips of training identities (``toy.identity_split("train")``, clip seed =
identity seed), encoded once by the toy causal VAE (``anim_lab/assets/toy_causal_vae``) into 5 latent frames
of 16 x 8 x 8; the posterior mean and std are cached, and each step draws a latent sample from them (scaled by
the VAE's ``scaling_factor``). The condition image latent is the first frame encoded alone as an image
(posterior mode), exactly what sampling uses; it differs slightly from the clip's latent frame 0 because the
encoder's GroupNorms see all frames. Text: the identity's caption
("brown hair , short hair , light skin , blue background , navy shirt") through the toy CLIP's text tower
(hidden states -> ``encoder_hidden_states``, projected embedding -> ``pooled_projections``); 10% of steps use
the empty caption instead, so classifier-free guidance is possible.

Objective: rectified flow. t = shift(u), u ~ U(0, 1), shift 3 (the sampler's); x_t = (1 - t) x0 + t eps;
MSE between the transformer's output (timestep 1000 t) and eps - x0 (token_replace: frames 1.. only, frame 0
is the clean image latent). AdamW lr 5e-4 after min(200, steps / 5) warm-up steps, cosine to 2e-5, weight
decay 0.01, batch 16, grad clip 1, fp32, through ``accelerate`` (CPU here). Every 250 steps: the held-out
velocity MSE at fixed (t, noise) on test clips. Checkpoint every 250 steps; the log goes to
``<ckpt-dir>/train.log`` too.

Output: ``anim_lab/assets/toy_i2v/<kind>/`` (diffusers ``save_pretrained`` layout) and ``train_log.json``
beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from einops import rearrange
from tqdm.auto import tqdm

import anim_lab
from anim_lab import files, flow, toy
from anim_lab.causal_vae import CausalVAE
from anim_lab.vae import images_from_uint8

ROOT = anim_lab.REPO_DIR

SIZE, NUM_FRAMES = 64, 17


def render_clip(ident_seed: int, size: int = SIZE) -> np.ndarray:
    """(17, size, size, 3) uint8 frames of the clip of one identity (clip seed = identity seed)."""
    return toy.make_clip(
        toy.identity_from_seed(int(ident_seed)), num_frames=NUM_FRAMES, size=size, seed=int(ident_seed)
    ).frames


@torch.no_grad()
def build_cache(seeds: list[int], path: Path, batch: int = 8) -> dict:
    """Render and encode the clips of ``seeds``; save mean/std latents (N, 16, 5, 8, 8) and text tokens."""
    vae = CausalVAE.from_pretrained()
    means, stds = [], []
    for i in tqdm(range(0, len(seeds), batch), desc=f"encode {path.name}", mininterval=30):
        frames = np.stack([render_clip(s) for s in seeds[i : i + batch]])  # (B, F, H, W, 3)
        video = rearrange(images_from_uint8(frames), "b f c h w -> b c f h w")  # in [-1, 1]
        dist = vae.encode(video)  # (B, 3, 17, 64, 64) -> posterior over (B, 16, 5, 8, 8)
        means.append(dist.mean)
        stds.append(dist.std)
    captions = [flow.toy_caption(toy.identity_from_seed(s)) for s in seeds]
    cache = dict(
        seeds=list(seeds),
        mean=torch.cat(means),
        std=torch.cat(stds),
        captions=captions,
        text=flow.toy_text_tokens(captions),
        uncond_text={k: v[:1] for k, v in flow.toy_text_tokens([""]).items()},
        scaling_factor=vae.scaling_factor,
    )
    files.save_state(cache, path)  # safetensors + JSON, atomically
    return cache


@torch.no_grad()
def add_image_latents(cache: dict, path: Path, batch: int = 64) -> dict:
    """The condition latents as sampling will see them: each clip's first frame encoded *alone* (a 1-frame
    video; its posterior mode). Not exactly latent frame 0 of the clip: the encoder's GroupNorms take
    statistics over all frames."""
    vae = CausalVAE.from_pretrained()
    latents = []
    for i in range(0, len(cache["seeds"]), batch):
        first = np.stack([render_clip(s)[0] for s in cache["seeds"][i : i + batch]])  # (B, H, W, 3)
        image = images_from_uint8(first)  # (B, 3, H, W) in [-1, 1]
        latents.append(flow.encode_condition_image(vae, image) / vae.scaling_factor)  # (B, 16, 1, 8, 8)
    cache["image_mean"] = torch.cat(latents)
    files.save_state(cache, path)
    return cache


def load_or_build(path: Path, seeds: list[int]) -> dict:
    cache = None
    if path.with_suffix(".safetensors").exists():
        cache = files.load_state(path)  # safetensors + JSON: reading it runs no code
        if cache["seeds"] != list(seeds):
            print(f"{path} holds other clips; re-encoding", flush=True)
            cache = None
    cache = build_cache(seeds, path) if cache is None else cache
    return cache if "image_mean" in cache else add_image_latents(cache, path)


def lr_at(step: int, total: int, base: float = 5e-4, final: float = 2e-5) -> float:
    warmup = min(200, total // 5)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def batch_of(cache: dict, idx: torch.Tensor, g: torch.Generator, p_uncond: float = 0.1):
    """x0 (B, 16, 5, 8, 8) latent samples, image latents (B, 16, 1, 8, 8) (first frame alone), text tokens."""
    sf = cache["scaling_factor"]
    mean, std = cache["mean"][idx], cache["std"][idx]
    x0 = (mean + std * torch.randn(mean.shape, generator=g)) * sf
    image_latents = cache["image_mean"][idx] * sf
    drop = torch.rand(len(idx), generator=g) < p_uncond  # (B,) caption dropped -> the empty caption
    text = {}
    for k, v in cache["text"].items():
        u = cache["uncond_text"][k].expand_as(v[idx])
        text[k] = torch.where(drop.view(-1, *([1] * (v.ndim - 1))), u, v[idx])
    return x0, image_latents, text


@torch.no_grad()
def held_out_loss(model, cache: dict, shift: float) -> float:
    """Velocity MSE on the cached test clips at fixed noise and 4 fixed t per clip (posterior means)."""
    g = torch.Generator().manual_seed(1234)
    sf, losses = cache["scaling_factor"], []
    model.eval()
    for u in torch.linspace(0.1, 0.9, 4):
        n = len(cache["seeds"])
        x0, img = cache["mean"] * sf, cache["image_mean"] * sf
        noise = torch.randn(x0.shape, generator=g)
        t = flow.shift_sigmas(u.expand(n), shift)
        losses.append(float(flow.flow_loss(model, x0, img, cache["text"], t, noise)))
    model.train()
    return float(np.mean(losses))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=flow.IMAGE_CONDITION_TYPES, default="latent_concat")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--train-clips", type=int, default=1024)
    parser.add_argument("--test-clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "toy_i2v_cache")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="default runs/toy_i2v_<kind>")
    parser.add_argument("--out", type=Path, default=flow.TOY_I2V_DIR)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--cache-only", action="store_true")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after the checkpoint of this step")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.train_clips < 1 or args.test_clips < 1:
        parser.error("--steps, --batch, --train-clips and --test-clips must be >= 1")
    flow.check_shift(args.shift)
    ckpt_dir = args.ckpt_dir or ROOT / "runs" / f"toy_i2v_{args.kind}"
    ckpt = ckpt_dir / "ckpt.safetensors"  # + ckpt.json
    state = None
    try:  # the checkpoint and the caches are read (safetensors + JSON: no code runs) before any work
        if args.resume and ckpt.exists():
            state = files.load_state(ckpt)
        torch.set_num_threads(args.threads)
        t_start = time.time()
        train_ids = list(toy.identity_split("train"))[: args.train_clips]
        train = load_or_build(args.cache / "train.safetensors", train_ids)
        test_ids = list(toy.identity_split("test"))[: args.test_clips]
        test = load_or_build(args.cache / "test.safetensors", test_ids)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"latents ready: {tuple(train['mean'].shape)} train, {len(test['seeds'])} test, "
        f"{time.time() - t_start:.0f} s",
        flush=True,
    )
    if args.cache_only:
        return

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(ckpt_dir / "train.log", "a")  # noqa: SIM115 (kept open for the whole run)

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(args.seed)
    model = flow.build_transformer(args.kind)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    step, history, runs = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history, runs = state["step"], state["history"], state["runs"]
        g.set_state(state["gen"])
        log(f"resumed at step {step}")
    runs.append({"from_step": step, "steps": args.steps})
    model, opt = accelerator.prepare(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{args.kind}: {n_params} parameters, {args.steps} steps, batch {args.batch}, shift {args.shift}")

    model.train()
    t0 = time.time()
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, desc=args.kind, mininterval=30)
    n = len(train["seeds"])
    while step < args.steps and (args.stop_at is None or step < args.stop_at):
        idx = torch.randint(n, (args.batch,), generator=g)
        x0, img, text = batch_of(train, idx, g)
        u = torch.rand(args.batch, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        loss = flow.flow_loss(model, x0, img, text, flow.shift_sigmas(u, args.shift), noise)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 250 == 0 or step == args.steps:
            val = held_out_loss(model, test, args.shift)
            minutes = round((time.time() - t0) / 60, 2)
            history.append(
                {
                    "step": step,
                    "minutes": minutes,
                    "train_loss": round(loss.item(), 4),
                    "held_out_loss": round(val, 4),
                }
            )
            log(
                f"step {step}/{args.steps} loss {loss.item():.4f} held-out {val:.4f} "
                f"lr {lr_at(step - 1, args.steps):.2e} {minutes:.1f} min"
            )
            state = dict(
                model=accelerator.unwrap_model(model).state_dict(),
                opt=opt.state_dict(),
                step=step,
                history=history,
                runs=runs,
                gen=g.get_state(),
            )
            files.save_state(state, ckpt)
    bar.close()
    if step < args.steps:
        log(f"stopped at step {step} (--stop-at); checkpoint in {ckpt}")
        return

    out = args.out / args.kind
    accelerator.unwrap_model(model).save_pretrained(out)
    for f in out.glob("*.safetensors"):
        files.apply_umask(f)  # safetensors writes files readable by their owner only
    summary = dict(
        image_condition_type=args.kind,
        parameters=n_params,
        steps=args.steps,
        batch=args.batch,
        shift=args.shift,
        train_clips=n,
        test_clips=len(test["seeds"]),
        clip=f"{NUM_FRAMES} frames, {SIZE} px -> latents {tuple(train['mean'].shape[1:])}",
        caption_attributes=list(flow.TOY_CAPTION_ATTRIBUTES),
        p_uncond=0.1,
        seed=args.seed,
        threads=args.threads,
        minutes_last_run=round((time.time() - t0) / 60, 1),
        runs=runs,
        log=history,
        commands=[
            "python scripts/train_toy_i2v.py --cache-only",
            f"python scripts/train_toy_i2v.py --kind {args.kind} --steps {args.steps}",
        ],
    )
    (out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps({k: v for k, v in summary.items() if k != "log"}))


if __name__ == "__main__":
    main()
