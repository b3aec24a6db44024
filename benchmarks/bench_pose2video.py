"""Pose2VideoPipeline: overhead, speed against the plain reference loop, memory against video length.

Side by side in one run, on the CPU (one thread), with random weights; each timing is the fastest of a few
interleaved runs (the machine may be shared):

1. overhead: the pipeline's wall time against the sum of its networks' forward times (target <= 5%);
2. speed-up: the plain step-by-step loop of the reference (anim_lab/plain/pose2video.py: ReferenceNet on the
   CFG batch, bank repeated per frame, attention with the reference for every row, one window per UNet call,
   one frame per VAE decode) against the pipeline at the same output (target >= 1.5x), and where each spends
   its time: the denoising UNet's self-attention (where the reference enters), the rest of the UNet (the
   same work in both), everything else;
3. memory: peak RSS of a fresh process per video length (24, 120, 600 frames at TINY), against what the
   latents, poses and output frames themselves take.

    python benchmarks/bench_pose2video.py            # TINY and MID
    python benchmarks/bench_pose2video.py --quick    # TINY only, fewer frames
    python benchmarks/bench_pose2video.py --cuda     # SD15 size, fp16, 512x512, 24 frames, 25 steps (a GPU)
    python benchmarks/bench_pose2video.py --cuda --offload   # the same under enable_model_cpu_offload()
    python benchmarks/bench_pose2video.py --means    # 4. each means alone and together, at every size

4. means (``--means``): channels_last, torch.compile (inductor) of the denoising UNet and the VAE decoder
   (its compile time reported apart, as the first call), both, one frame per VAE decode, and bf16 autocast
   (which changes the numbers: its quality cost on the trained animator is ``scripts/eval_animator.py
   --ablations bf16``), each against the eager pipeline and the plain loop, with the output difference.

benchmarks/gpu_check.sh runs both CUDA calls and the gpu-marked tests on a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from anim_lab.clip import build_image_encoder
from anim_lab.configs import TINY
from anim_lab.files import check_output_file, write_result
from anim_lab.guidance import build_scheduler
from anim_lab.motion import MOTION_TINY
from anim_lab.pipelines import Pose2VideoPipeline
from anim_lab.plain import randomize
from anim_lab.plain.pose2video import plain_pose2video
from anim_lab.pose_guider import PoseGuider
from anim_lab.unet import ReferenceUNet, VideoUNet
from anim_lab.vae import build_vae

ROOT = Path(__file__).resolve().parents[1]

# Two mid sizes, seconds per denoising step on one core: "MID" is TINY's structure with wider blocks and two
# layers per block at 128 px (convolutions dominate); "MID256" is TINY's widths at 256 px, 1024 tokens per
# frame at the first level, closer to SD15 at 512 px where attention takes a larger share.
MID_UNET = dict(TINY.unet, block_out_channels=(64, 128, 128, 128), layers_per_block=2, norm_num_groups=16)
SIZES = {
    "TINY": dict(unet=TINY.unet, motion=MOTION_TINY, size=64),
    "MID": dict(unet=MID_UNET, motion=dict(MOTION_TINY, norm_num_groups=16), size=128),
    "MID256": dict(unet=TINY.unet, motion=MOTION_TINY, size=256),
}


def build(name: str) -> Pose2VideoPipeline:
    torch.manual_seed(0)
    cfg = SIZES[name]
    pipe = Pose2VideoPipeline(
        vae=build_vae(TINY.vae),
        image_encoder=build_image_encoder(TINY.image_encoder),
        reference_unet=ReferenceUNet(cfg["unet"]),
        denoising_unet=VideoUNet(cfg["unet"], cfg["motion"]),
        pose_guider=PoseGuider(
            **dict(TINY.pose_guider, conditioning_embedding_channels=cfg["unet"]["block_out_channels"][0])
        ),
        scheduler=build_scheduler(),
    )
    for i, name in enumerate(("vae", "image_encoder", "reference_unet", "denoising_unet", "pose_guider")):
        randomize(getattr(pipe, name), seed=i)  # no path switched off: every weight random and nonzero
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(frames: int, size: int):
    rng = np.random.default_rng(0)
    ref = PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    poses = [
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(frames)
    ]
    return ref, poses


class ForwardTimer:
    """Wall time spent inside the networks' forwards (outermost calls only)."""

    def __init__(self, modules):
        self.total, self.depth, self.start, self.handles = 0.0, 0, 0.0, []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, *_):
        if self.depth == 0:
            self.start = time.perf_counter()
        self.depth += 1

    def _post(self, *_):
        self.depth -= 1
        if self.depth == 0:
            self.total += time.perf_counter() - self.start

    def remove(self):
        for h in self.handles:
            h.remove()


def speed(name: str, frames: int, steps: int, context: tuple[int, int], batch: int, repeats: int = 3) -> dict:
    pipe = build(name)
    size = SIZES[name]["size"]
    ref, poses = inputs(frames, size)
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5)
    ctx = dict(context_frames=context[0], context_overlap=context[1])

    def ours():
        return pipe(
            ref,
            poses,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            context_batch_size=batch,
            **ctx,
            **kw,
        ).frames

    def plain_loop():
        return plain_pose2video(
            pipe, ref, poses, video_length=frames, generator=torch.Generator().manual_seed(0), **ctx, **kw
        )

    ours()  # warm-up
    nets = [
        pipe.image_encoder,
        pipe.vae.encoder,
        pipe.vae.decoder,
        pipe.vae.quant_conv,
        pipe.vae.post_quant_conv,
        pipe.reference_unet,
        pipe.denoising_unet,
        pipe.pose_guider,
    ]
    # the machine may be shared: interleave the two, and keep each one's fastest run (with its own
    # networks' time for the overhead)
    # where the time goes, in both: the denoising UNet's self-attention (where the reference tokens enter),
    # the rest of the denoising UNet (convolutions, cross- and temporal attention, over the same windows and
    # CFG rows in both), and everything else (ReferenceNet, guider, VAE, image encoder, the loop itself)
    attn1 = [m for n, m in pipe.denoising_unet.named_modules() if n.endswith("attn1")]

    def timed(run):
        timers = ForwardTimer(nets), ForwardTimer([pipe.denoising_unet]), ForwardTimer(attn1)
        t0 = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - t0
        for t in timers:
            t.remove()
        nets_s, unet_s, attn_s = (t.total for t in timers)
        return result, dict(
            total=elapsed, nets=nets_s, attn=attn_s, unet=unet_s - attn_s, rest=elapsed - unet_s
        )

    best = {"pipeline": {"total": float("inf")}, "plain": {"total": float("inf")}}
    outputs = {}
    for _ in range(repeats):
        for key, run in (("pipeline", ours), ("plain", plain_loop)):
            outputs[key], t = timed(run)
            if t["total"] < best[key]["total"]:
                best[key] = t
    t_pipe, t_plain = best["pipeline"]["total"], best["plain"]["total"]
    diff = (outputs["pipeline"] - outputs["plain"].permute(0, 2, 1, 3, 4)).abs().max().item()
    overhead = (t_pipe - best["pipeline"]["nets"]) / t_pipe
    print(
        f"{name:6s} {size}px {frames} frames, {steps} steps, windows {context[0]}/{context[1]}, CFG 3.5: "
        f"pipeline {t_pipe:.2f} s (networks {best['pipeline']['nets']:.2f} s, "
        f"overhead {100 * overhead:.1f}%, "
        "target <= 5%); "
        f"plain reference loop {t_plain:.2f} s -> speed-up {t_plain / t_pipe:.2f}x (target >= 1.5x), "
        f"max |diff| {diff:.1e}"
    )
    for key in ("plain", "pipeline"):
        t = best[key]
        print(
            f"{'':6s} {key:8s}: UNet self-attention {t['attn']:.2f} s, the rest of the UNet "
            f"{t['unet']:.2f} s, everything else {t['rest']:.2f} s"
        )
    return dict(
        size=size,
        frames=frames,
        steps=steps,
        context=list(context),
        overhead=overhead,
        speedup=t_plain / t_pipe,
        max_abs_difference=diff,
        seconds={key: dict(best[key]) for key in ("pipeline", "plain")},
    )


# --- 4. means that keep the math (or state their cost), each alone and together ----------------------------
CONV_NETS = ("vae", "reference_unet", "denoising_unet", "pose_guider")


def _channels_last(pipe: Pose2VideoPipeline) -> None:
    """The convolutional networks' 4D weights in channels_last (NHWC, oneDNN's preferred layout)."""
    for name in CONV_NETS:
        getattr(pipe, name).to(memory_format=torch.channels_last)


def _compile(pipe: Pose2VideoPipeline) -> None:
    """The pipeline's switch: inductor (the CPU's C++/OpenMP backend) on the denoising UNet and the VAE
    decoder, in place."""
    pipe.enable_compile()


MEANS = {
    # name: (set-up on a fresh pipeline, keyword arguments of the call, autocast dtype)
    "eager (the pipeline as shipped)": (None, {}, None),
    "decode 1 frame per VAE call": (None, {"decode_chunk_size": 1}, None),
    "channels_last": (_channels_last, {}, None),
    "torch.compile (UNet + VAE decoder)": (_compile, {}, None),
    "channels_last + compile": (lambda pipe: (_channels_last(pipe), _compile(pipe)), {}, None),
    "bf16 autocast (changes the numbers)": (None, {}, torch.bfloat16),
}


def means(name: str, frames: int, steps: int, context: tuple[int, int], repeats: int = 2, only=None) -> dict:
    """Each means on a freshly built pipeline (the same random weights), timed against the eager pipeline
    and the plain reference loop in the same run: the fastest of ``repeats`` calls after one warm-up call,
    whose time is reported apart (for compile: the compilation, paid once per process and shape)."""
    size = SIZES[name]["size"]
    ref, poses = inputs(frames, size)
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="pt")
    kw.update(context_frames=context[0], context_overlap=context[1])
    base_pipe = build(name)
    t0 = time.perf_counter()
    plain_pose2video(base_pipe, ref, poses, video_length=frames, generator=torch.Generator().manual_seed(0),
                     **{k: v for k, v in kw.items() if k != "output_type"})  # fmt: skip
    t_plain = time.perf_counter() - t0
    rows, eager = {}, None
    for label, (setup, extra, autocast) in MEANS.items():
        if only and label not in only and eager is not None:
            continue
        # each row compiles afresh: without a reset, dynamo keeps the earlier rows' graphs and guards for the
        # same forward and, past its recompile limit (8), silently runs it eagerly
        torch._dynamo.reset()
        pipe = build(name)
        if setup is not None:
            setup(pipe)

        def run(pipe=pipe, extra=extra, autocast=autocast):
            with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
                return pipe(ref, poses, generator=torch.Generator().manual_seed(0), **kw, **extra).frames

        t0 = time.perf_counter()
        out = run()  # warm-up (and compilation)
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            best = min(best, time.perf_counter() - t0)
        if eager is None:
            eager, t_eager = out, best
        diff = (out.float() - eager).abs().max().item()
        # the one-off cost (the first call's extra time, compilation for compile) over the time saved per
        # call: how many such videos a process must make before the means pays; None when it saves nothing,
        # <= 0 when the first call was no slower than the rest (no one-off cost: it pays at once)
        saving = t_eager - best
        break_even = (first - best) / saving if saving > 0 else None
        rows[label] = dict(
            seconds=best,
            first_call_seconds=first,
            speedup_vs_eager=t_eager / best,
            speedup_vs_plain=t_plain / best,
            max_abs_difference=diff,
            break_even_videos=break_even,
        )
        if break_even is None:
            pays = "never pays"
        else:
            pays = "pays at once" if break_even <= 0 else f"pays after {break_even:6.1f} videos"
        print(
            f"{name:6s} {label:38s} {best:7.2f} s  x{t_eager / best:5.2f} vs eager  "
            f"x{t_plain / best:5.2f} vs plain  first call {first:6.1f} s  max |diff| {diff:.1e}  {pays}",
            flush=True,
        )
    return dict(
        size=size, frames=frames, steps=steps, context=list(context), plain_seconds=t_plain, rows=rows
    )


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """The highest resident memory seen while the block runs (sampled every millisecond by a thread)."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def memory_child(frames: int) -> None:
    """Run in a fresh process: resident memory before and at the peak of one request of ``frames`` frames."""
    torch.set_num_threads(1)
    pipe = build("TINY")
    ref, poses = inputs(frames, 64)
    pipe(ref, inputs(24, 64)[1], num_inference_steps=1, output_type="np")  # warm-up at 24 frames
    with PeakRSS() as rss:
        out = pipe(ref, poses, num_inference_steps=1, output_type="np").frames
    print(json.dumps(dict(frames=frames, base=rss.base, peak=rss.peak, out_bytes=int(out.nbytes))))


def memory(lengths) -> list[dict]:
    rows = []
    for frames in lengths:
        result = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(frames)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for r in rows:
        # what a request of F frames must hold at least, each (F, 3, 64, 64) float32 = out_bytes: the pose
        # images in [0, 1], the decoded video and the "np" output (the latents are 1/48 of one of those)
        frame_data = 3 * r["out_bytes"] / 2**20
        growth = (r["peak"] - r["base"]) / 2**20
        print(
            f"TINY {r['frames']:4d} frames: call peak {growth:6.1f} MB above the idle pipeline; "
            f"its frame data (poses, video, output) {frame_data:6.1f} MB; ratio {growth / frame_data:.2f}"
        )
    return [
        dict(r, peak_above_idle_mb=(r["peak"] - r["base"]) / 2**20, frame_data_mb=3 * r["out_bytes"] / 2**20)
        for r in rows
    ]


# dense bf16 tensor-core peaks (TFLOP/s, without sparsity) of the GPUs this may run on
BF16_PEAK = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def cuda_sd15(frames: int = 24, steps: int = 25, size: int = 512, offload: bool = False) -> dict:
    """SD15-size pipeline, random weights, fp16 on CUDA: s/step, peak memory, the UNet's achieved TFLOP/s;
    ``offload``: under diffusers' ``enable_model_cpu_offload()`` (each network on the GPU only while it
    runs)."""
    from anim_lab.configs import SD15
    from anim_lab.inspect import count_flops
    from anim_lab.motion import MOTION_SD15
    from anim_lab.reference import self_attention_names

    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.float16
    with torch.device(dev):
        pipe = Pose2VideoPipeline(
            vae=build_vae(SD15.vae, device=dev),
            image_encoder=build_image_encoder(SD15.image_encoder, device=dev),
            reference_unet=ReferenceUNet(SD15.unet),
            denoising_unet=VideoUNet(SD15.unet, MOTION_SD15),
            pose_guider=PoseGuider(**SD15.pose_guider),
            scheduler=build_scheduler(),
        )
    pipe.to(dev, dtype)
    if offload:
        pipe.to("cpu")
        pipe.enable_model_cpu_offload()  # accelerate hooks; _execution_device reads them
    ref, poses = inputs(frames, size)
    kw = dict(height=size, width=size, guidance_scale=3.5, output_type="np")
    pipe(ref, poses[:8], num_inference_steps=1, **kw)  # warm-up

    calls, spent = [0], [0.0]
    start = {}

    def pre(*_):
        torch.cuda.synchronize()
        start["t"] = time.perf_counter()

    def post(*_):
        torch.cuda.synchronize()
        spent[0] += time.perf_counter() - start["t"]
        calls[0] += 1

    handles = [
        pipe.denoising_unet.register_forward_pre_hook(pre),
        pipe.denoising_unet.register_forward_hook(post),
    ]
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe(ref, poses, num_inference_steps=steps, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    peak_gb = torch.cuda.max_memory_allocated() / 2**30

    # FLOPs of one denoiser call, counted on meta (CFG batch of one 24-frame window), plus the reference
    # attention's extra keys (not on meta: no bank there): QK^T and AV over HW_ref more keys, cond rows only
    h = w = size // 8
    window = min(frames, 24)
    with torch.device("meta"):
        unet = VideoUNet(SD15.unet, MOTION_SD15)
        flops = count_flops(
            unet,
            torch.empty(2, 4, window, h, w),
            torch.tensor(999),
            torch.empty(2, 1, 768),
            pose_cond_fea=torch.empty(2, 320, window, h, w),
        )
    extra = 0
    for name, width in self_attention_names(unet).items():
        level = int(name.split(".")[1]) if not name.startswith("mid") else 3
        scale = 2 ** (level if name.startswith("down") else (3 - level if name.startswith("up") else 3))
        tokens = (h // scale) * (w // scale)
        extra += 2 * 2 * tokens * tokens * width * window  # cond rows: 1 video x window frames
    flops += extra
    tflops = flops * calls[0] / spent[0] / 1e12
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    share = f"{100 * tflops / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else "peak unknown"
    print(
        f"SD15 fp16 on {name}{' with model CPU offload' if offload else ''}: {size}x{size}, {frames} frames, "
        f"{steps} steps, CFG 3.5: {total / steps:.2f} s/step ({total:.1f} s in all), peak memory "
        f"{peak_gb:.1f} GiB; denoising UNet {flops / 1e12:.1f} TFLOP per call, {calls[0]} calls in "
        f"{spent[0]:.1f} s -> {tflops:.0f} TFLOP/s ({share})"
    )
    return {
        "device": name,
        "offload": offload,
        "size": size,
        "frames": frames,
        "steps": steps,
        "s_per_step": round(total / steps, 3),
        "peak_memory_gib": round(peak_gb, 2),
        "unet_tflop_per_call": round(flops / 1e12, 2),
        "unet_tflops_achieved": round(tflops, 1),
        "bf16_peak_tflops": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="TINY only, short runs")
    parser.add_argument("--cuda", action="store_true", help="only the SD15-size fp16 run on a CUDA GPU")
    parser.add_argument("--offload", action="store_true", help="with --cuda: enable_model_cpu_offload()")
    parser.add_argument(
        "--means",
        action="store_true",
        help="only the table of means (channels_last, compile, decode chunking, bf16) at every size",
    )
    parser.add_argument("--sizes", help="with --means: a comma list of TINY, MID, MID256 (default all)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here (e.g. results/bench_pose2video.json)")
    args = parser.parse_args()
    if args.offload and not args.cuda:
        parser.error("--offload is for the --cuda run")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA GPU, and torch sees none (benchmarks/gpu_check.sh skips it then)")
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")
    torch.set_num_threads(1)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.cuda:
        result = cuda_sd15(offload=args.offload)
        if args.json:
            command = " ".join(["benchmarks/bench_pose2video.py", *sys.argv[1:]])
            write_result(args.json, {"command": command, "cuda": result})
        return
    if args.means:
        plan = {"TINY": (24, 3), "MID": (16, 2), "MID256": (16, 2)}
        sizes = ["TINY"] if args.quick else (args.sizes.split(",") if args.sizes else list(plan))
        if set(sizes) - set(plan):
            parser.error(f"--sizes takes a comma list of {', '.join(plan)}, got {args.sizes!r}")
        result = {"means": {n: means(n, *plan[n], context=(8, 2)) for n in sizes}}
        if args.json:
            command = " ".join(["benchmarks/bench_pose2video.py", *sys.argv[1:]])
            write_result(args.json, {"command": command} | result)
        return
    result = {"speed": {"TINY": speed("TINY", frames=24, steps=3, context=(8, 2), batch=4)}}
    if not args.quick:
        result["speed"]["MID"] = speed("MID", frames=16, steps=2, context=(8, 2), batch=2, repeats=2)
        result["speed"]["MID256"] = speed("MID256", frames=16, steps=2, context=(8, 2), batch=2, repeats=2)
    result["memory"] = memory([24, 120] if args.quick else [24, 120, 600])
    if args.json:
        write_result(
            args.json, {"command": " ".join(["benchmarks/bench_pose2video.py", *sys.argv[1:]])} | result
        )


if __name__ == "__main__":
    main()
