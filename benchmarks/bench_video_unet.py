"""Benchmark the video UNet.

1. TINY size on this CPU: frames per second of one denoising step for a 16-frame video, side by side with the
   same UNet without motion modules and with diffusers' UNet2DConditionModel on the (B*F) batch of frames (the
   ratios are what to read; absolute times depend on the machine and its load).
2. SD15 size on the meta device: FLOPs of one step (a multiply-add = 2 FLOPs), split into the 2D part and the
   21 motion modules, for 16 frames at 512x512 (latents 64x64), with and without classifier-free guidance.

    .venv/bin/python benchmarks/bench_video_unet.py [--frames 16] [--size 8] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from einops import rearrange, repeat

from anim_lab.configs import SD15, TINY
from anim_lab.inspect import count_flops, human
from anim_lab.motion import MOTION_SD15, MOTION_TINY
from anim_lab.unet import VideoUNet, build_unet2d


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_tiny(frames: int, size: int, repeats: int) -> None:
    torch.manual_seed(0)
    video = VideoUNet(TINY.unet, MOTION_TINY).eval()
    image = VideoUNet(TINY.unet, None).eval()
    image.load_state_dict({k: v for k, v in video.state_dict().items() if "motion_modules" not in k})
    unet2d = build_unet2d(TINY.unet).eval()
    unet2d.load_state_dict(image.state_dict())
    x = torch.randn(1, 4, frames, size, size)  # (B, C, F, H, W)
    tokens = torch.randn(1, 1, TINY.unet["cross_attention_dim"])
    x_bf = rearrange(x, "b c f h w -> (b f) c h w")
    tokens_bf = repeat(tokens, "b n d -> (b f) n d", f=frames)

    with torch.no_grad():
        runs = {
            "VideoUNet + motion modules": lambda: video(x, 500, tokens),
            "VideoUNet, no motion modules": lambda: image(x, 500, tokens),
            "diffusers UNet2DConditionModel on (B*F)": lambda: unet2d(
                x_bf, 500, encoder_hidden_states=tokens_bf
            ),
        }
        times = {name: best_time(fn, repeats) for name, fn in runs.items()}
    base = times["diffusers UNet2DConditionModel on (B*F)"]
    print(
        f"TINY UNet, {frames} frames of {size}x{size} latents, CPU, {torch.get_num_threads()} threads, "
        f"best of {repeats}:"
    )
    for name, t in times.items():
        print(
            f"  {name:42s} {t * 1e3:8.1f} ms/step  {frames / t:8.1f} frames/s  x{t / base:.2f} vs diffusers"
        )


def flops_sd15(frames: int) -> None:
    with torch.device("meta"):
        video = VideoUNet(SD15.unet, MOTION_SD15).eval()
        image = VideoUNet(SD15.unet, None).eval()
    h = w = 64  # 512x512 pixels / 8
    print(f"SD15 UNet, one step, {frames} frames at 512x512 (latents 64x64), meta device:")
    for batch, label in ((1, "no CFG"), (2, "CFG (uncond + cond rows)")):
        with torch.device("meta"):
            x = torch.empty(batch, 4, frames, h, w)
            tokens = torch.empty(batch, 1, 768)
        total = count_flops(video, x, 500, tokens)
        two_d = count_flops(image, x, 500, tokens)
        print(
            f"  {label:26s} total {human(total, 'FLOP')}, 2D part {human(two_d, 'FLOP')}, "
            f"motion modules {human(total - two_d, 'FLOP')} ({(total - two_d) / total:.1%}); "
            f"{human(total / (batch * frames), 'FLOP')} per frame"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=TINY.height // 8, help="latent height = width (TINY: 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_tiny(args.frames, args.size, args.repeats)
    flops_sd15(args.frames)


if __name__ == "__main__":
    main()
