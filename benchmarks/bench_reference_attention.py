"""Benchmark reference attention: anim_lab's reader against the reference code's way (the plain implementation
in anim_lab/plain/reference.py), side by side in one run, at SD1.5 widths, 32x32 latents, 16 frames, CFG on.

1. The reference-attention part: every spatial self-attention (attn1) of the denoising UNet, 16 blocks at
   the widths and token counts of SD1.5 on a 32x32 latent (320 ch x 1024 tokens ... 1280 ch x 16 tokens),
   2 x 16 rows (uncond + cond frames), one reference image. Time per denoising step (steady state: the
   reference K/V are projected at the first step of a generation; that one-off cost is printed apart), peak
   memory (allocations recorded by torch's profiler; CUDA: max_memory_allocated), FLOPs (meta device) and the
   largest difference of the outputs.
2. One whole denoising-UNet step (SD1.5 + motion modules, random weights), both ways, same output.

The ratios are what to read. On the CPU, times are the process's CPU time (run with --threads 1), so that
other jobs on a shared machine do not distort the comparison; on CUDA, wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_reference_attention.py [--frames 16] [--size 32]
        [--repeats 3] [--threads N] [--skip-unet | --skip-attention] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
from diffusers.models.attention_processor import Attention
from torch.profiler import ProfilerActivity, profile

from anim_lab.configs import SD15
from anim_lab.files import check_output_file, write_result
from anim_lab.inspect import count_flops, human
from anim_lab.motion import MOTION_SD15
from anim_lab.plain import randomize
from anim_lab.plain.reference import PlainReader, PlainReferenceControl  # the reference code's way
from anim_lab.reference import ReferenceBank, ReferenceReaderProcessor, reference_attention
from anim_lab.unet import ReferenceUNet, VideoUNet

# (name, width C, downsampling factor of the latent) of SD1.5's 16 transformer blocks
SD15_BLOCKS = (
    [(f"down_blocks.{i}.attentions.{j}", c, 2**i) for i, c in enumerate((320, 640, 1280)) for j in range(2)]
    + [("mid_block.attentions.0", 1280, 8)]
    + [
        (f"up_blocks.{i}.attentions.{j}", c, 2 ** (3 - i))
        for i, c in ((1, 1280), (2, 640), (3, 320))
        for j in range(3)
    ]
)


def clock(device: torch.device) -> float:
    """CUDA: wall time after a sync. CPU: this process's CPU time, which on a machine shared with other jobs
    measures the work done rather than the share of the cores this process happened to get."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def best_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return min(times)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak of the memory allocated during fn() above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations (and frees) as the profiler records them, in time order -> running total -> its peak
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    total = peak = 0
    for _, delta in events:
        total += delta
        peak = max(peak, total)
    return peak


class Blocks:
    """One attn1 per SD1.5 transformer block (random weights), its input rows and its reference entry."""

    def __init__(self, frames: int, size: int, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.frames, self.videos = frames, 2  # CFG: [uncond ; cond] of one video
        self.attn, self.x, self.ref = {}, {}, {}
        for i, (name, c, factor) in enumerate(SD15_BLOCKS):
            hw = (size // factor) ** 2
            attn = randomize(Attention(query_dim=c, heads=8, dim_head=c // 8), seed=i).eval()
            self.attn[name] = attn.to(device)
            self.x[name] = torch.randn(self.videos * frames, hw, c, generator=g).to(device)  # (2F, HW, C)
            self.ref[name] = torch.randn(1, hw, c, generator=g).to(device)  # (B=1, HW, C)
        names = list(self.attn)
        # anim_lab: a bank with these entries and the per-call state a denoising-UNet forward sets
        self.bank = ReferenceBank(None, names, do_classifier_free_guidance=True)
        self.bank.load(self.ref)
        self.bank._call = (self.videos, frames)
        self.ours = {n: ReferenceReaderProcessor(self.bank, n) for n in names}
        # the reference code's way: each reader block holds the bank list of the CFG-doubled ReferenceNet
        # batch (2 rows), repeated over frames and concatenated at every call
        control = SimpleNamespace(video_length=frames, do_classifier_free_guidance=True)
        self.plain = {
            n: PlainReader(SimpleNamespace(bank=[self.ref[n].repeat(2, 1, 1)]), control) for n in names
        }

    def run(self, processors) -> dict[str, torch.Tensor]:
        return {n: processors[n](self.attn[n], self.x[n]) for n in self.attn}


def bench_attention(frames: int, size: int, repeats: int, device: torch.device) -> dict:
    blocks = Blocks(frames, size, device)
    with torch.no_grad():
        blocks.bank._kv = {}
        t_first = best_time(lambda: (blocks.bank._kv.clear(), blocks.run(blocks.ours)), 1, device)
        blocks.run(blocks.ours)  # K/V of the reference projected: the state of every later step
        t_ours = best_time(lambda: blocks.run(blocks.ours), repeats, device)
        t_plain = best_time(lambda: blocks.run(blocks.plain), repeats, device)
        mem_ours = peak_bytes(lambda: blocks.run(blocks.ours), device)
        mem_plain = peak_bytes(lambda: blocks.run(blocks.plain), device)
        ours, plain = blocks.run(blocks.ours), blocks.run(blocks.plain)
        diff = max((ours[n] - plain[n]).abs().max().item() for n in ours)
    flops_ours, flops_plain, flops_kv = count_attention_flops(frames, size)
    print(
        f"Reference attention (attn1 of the 16 SD1.5 blocks), {frames} frames, {size}x{size} latents, CFG "
        f"(2 x {frames} rows), {device.type}, {torch.get_num_threads()} threads, best of {repeats} "
        f"({'CPU' if device.type == 'cpu' else 'wall'} time):"
    )
    print(f"  {'':34s} {'time/step':>10s} {'peak memory':>12s} {'FLOPs/step':>11s}")
    print(
        f"  {'reference code (anim_lab.plain)':34s} {t_plain * 1e3:8.1f}ms {human(mem_plain, 'B'):>12s} "
        f"{human(flops_plain):>11s}"
    )
    print(
        f"  {'anim_lab (ReferenceReaderProcessor)':34s} {t_ours * 1e3:8.1f}ms {human(mem_ours, 'B'):>12s} "
        f"{human(flops_ours):>11s}"
    )
    print(
        f"  ratio reference / anim_lab:         x{t_plain / t_ours:.2f} time, x{mem_plain / mem_ours:.2f} "
        f"memory, x{flops_plain / flops_ours:.2f} FLOPs"
    )
    print(
        f"  once per generation (anim_lab): reference K/V projections, {human(flops_kv)} FLOPs "
        f"(first step {t_first * 1e3:.1f} ms)"
    )
    print(f"  largest difference of the outputs: {diff:.1e}")
    return dict(
        time_s=dict(reference_code=t_plain, anim_lab=t_ours, first_step_anim_lab=t_first),
        peak_bytes=dict(reference_code=mem_plain, anim_lab=mem_ours),
        flops=dict(reference_code=flops_plain, anim_lab=flops_ours, reference_kv_once=flops_kv),
        ratio=dict(time=t_plain / t_ours, memory=mem_plain / mem_ours, flops=flops_plain / flops_ours),
        max_abs_difference=diff,
    )


def count_attention_flops(frames: int, size: int) -> tuple[int, int, int]:
    """FLOPs of one step of the 16 attn1 calls, both ways, and of the one-off K/V projections (meta)."""
    with torch.device("meta"):
        blocks = Blocks.__new__(Blocks)
        blocks.frames, blocks.videos = frames, 2
        blocks.attn = {n: Attention(query_dim=c, heads=8, dim_head=c // 8) for n, c, _ in SD15_BLOCKS}
        blocks.x = {n: torch.empty(2 * frames, (size // f) ** 2, c) for n, c, f in SD15_BLOCKS}
        blocks.ref = {n: torch.empty(1, (size // f) ** 2, c) for n, c, f in SD15_BLOCKS}
    names = list(blocks.attn)
    bank = ReferenceBank(None, names, do_classifier_free_guidance=True)
    bank.load(blocks.ref)
    bank._call = (2, frames)
    ours = {n: ReferenceReaderProcessor(bank, n) for n in names}
    control = SimpleNamespace(video_length=frames, do_classifier_free_guidance=True)
    plain = {n: PlainReader(SimpleNamespace(bank=[blocks.ref[n].repeat(2, 1, 1)]), control) for n in names}
    first = count_flops(lambda: Blocks.run(blocks, ours))  # includes the K/V projections
    steady = count_flops(lambda: Blocks.run(blocks, ours))
    return steady, count_flops(lambda: Blocks.run(blocks, plain)), first - steady


def bench_unet(frames: int, size: int, device: torch.device) -> dict:
    reference = randomize(ReferenceUNet(SD15.unet), seed=0).eval().to(device)
    denoiser = randomize(VideoUNet(SD15.unet, MOTION_SD15), seed=1).eval().to(device)  # motion modules on
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, frames, size, size, generator=g).to(device)
    ref_latents = torch.randn(1, 4, size, size, generator=g).to(device)
    clip = torch.randn(1, 1, 768, generator=g).to(device)
    x = torch.cat([latents] * 2)  # CFG: [uncond ; cond]
    tokens = torch.cat([torch.zeros_like(clip), clip])

    with torch.no_grad():
        control = PlainReferenceControl(reference, denoiser, frames, True)
        reference(torch.cat([ref_latents] * 2), 0, tokens)  # the reference code: ReferenceNet on 2 rows
        control.update()
        t0 = clock(device)
        plain = denoiser(x, 500, tokens)
        t_plain = clock(device) - t0
        control.clear()
        with reference_attention(reference, denoiser, do_classifier_free_guidance=True) as bank:
            bank.write(ref_latents, 0, clip)  # anim_lab: the ReferenceNet on the conditional row only
            t0 = clock(device)
            ours = denoiser(x, 500, tokens)  # the first step: includes the one-off reference K/V projections
            t_ours = clock(device) - t0
    kind = "CPU" if device.type == "cpu" else "wall"
    print(
        f"Whole denoising-UNet step (SD1.5 + 21 motion modules), {frames} frames, {size}x{size}, CFG, "
        f"{device.type}, {torch.get_num_threads()} threads, one run each ({kind} time; anim_lab's run is a "
        "first step, with the one-off K/V projections):"
    )
    print(
        f"  reference code {t_plain:.2f} s, anim_lab {t_ours:.2f} s: x{t_plain / t_ours:.2f}; "
        f"largest difference {(ours - plain).abs().max().item():.1e} (outputs of size "
        f"{plain.abs().mean().item():.2f} on average)"
    )
    return dict(
        time_s=dict(reference_code=t_plain, anim_lab=t_ours),
        ratio=t_plain / t_ours,
        max_abs_difference=(ours - plain).abs().max().item(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (32: 256x256 pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-unet", action="store_true", help="only the reference-attention part")
    parser.add_argument("--skip-attention", action="store_true", help="only the whole-UNet step")
    parser.add_argument(
        "--json", help="also write the results here (e.g. results/bench_reference_attention.json)"
    )
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = dict(frames=args.frames, latent_size=args.size, repeats=args.repeats, device=device.type)
    if not args.skip_attention:
        result["reference_attention"] = bench_attention(args.frames, args.size, args.repeats, device)
    if not args.skip_unet:
        result["unet_step"] = bench_unet(args.frames, args.size, device)
    if args.json:
        write_result(
            args.json,
            {"command": " ".join(["benchmarks/bench_reference_attention.py", *sys.argv[1:]])} | result,
        )


if __name__ == "__main__":
    main()
