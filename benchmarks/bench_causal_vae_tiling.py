"""What tiling saves and costs, measured side by side in one run (CPU, one thread).

    .venv/bin/python benchmarks/bench_causal_vae_tiling.py [--repeats 3] [--json out.json]

Model: the toy causal VAE (anim_lab/assets/toy_causal_vae if trained, else the same config with random
weights; memory and time do not depend on the weight values). Memory is tensor memory counted by
``anim_lab.tiling.PeakMemory`` (every storage an operator allocates, freed when released); "working" = peak
minus the decoded output.

1. Spatial tiling: decode 17 frames at 1x, 2x, 4x the area of 64x64 px, untiled vs tiled (tiles of 64 px every
   48 px, diffusers' 25% overlap at toy scale; also 48/40 and 32/24). Target: tiled working memory at 4x <=
   1/4 of untiled (tiles smaller than the 1x frame).
2. Temporal tiling: decode 17, 33, 49, 65 frames at 64 px, untiled vs windows of 16 frames every 12
   (diffusers' defaults), and diffusers' own framewise decode. Target: working memory flat (<= 10% growth from
   17 to 65 frames).
3. Speed: anim_lab's tiled decode vs diffusers' on the same weights and settings (65 frames, 128x128, space +
   time tiling), best of ``--repeats``, interleaved. Target: ratio diffusers / anim_lab >= 1. Outputs must
   agree (<= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import AutoencoderKLHunyuanVideo

from anim_lab.causal_vae import CAUSAL_VAE_TOY, TOY_ASSET_DIR, CausalVAE
from anim_lab.tiling import PeakMemory, TileSettings, tiled_decode

MB = 2**20


def working_memory(fn) -> float:
    """Peak tensor memory of fn() minus its output, in MiB."""
    with torch.no_grad(), PeakMemory() as mem:
        out = fn()
    return (mem.peak - out.numel() * out.element_size()) / MB


def load_models():
    if (TOY_ASSET_DIR / "config.json").exists():
        ours = CausalVAE.from_pretrained(TOY_ASSET_DIR)
        source = "trained toy weights"
    else:
        torch.manual_seed(0)
        ours = CausalVAE(**CAUSAL_VAE_TOY).eval()
        source = "random weights (toy config)"
    theirs = AutoencoderKLHunyuanVideo(**{k: v for k, v in ours.config.items()}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs, source


def diffusers_settings(vae: AutoencoderKLHunyuanVideo, tiles: TileSettings) -> AutoencoderKLHunyuanVideo:
    vae.use_tiling, vae.use_framewise_decoding = tiles.spatial, tiles.temporal
    vae.tile_sample_min_height, vae.tile_sample_min_width = (
        tiles.tile_sample_min_height,
        tiles.tile_sample_min_width,
    )
    vae.tile_sample_stride_height = tiles.tile_sample_stride_height
    vae.tile_sample_stride_width = tiles.tile_sample_stride_width
    vae.tile_sample_min_num_frames = tiles.tile_sample_min_num_frames
    vae.tile_sample_stride_num_frames = tiles.tile_sample_stride_num_frames
    return vae


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours, theirs, source = load_models()
    c = ours.config["latent_channels"]
    gen = torch.Generator().manual_seed(0)
    results: dict = {"weights": source}
    print(f"toy causal VAE ({source}); memory = tensor bytes (PeakMemory), working = peak - output\n")

    # 1. spatial tiling
    #    -------------------------------------------------------------------------------------------
    print("1. spatial tiling, 17 frames: working memory (MiB)")
    tile_options = {
        "64/48": TileSettings(64, 64, 48, 48, temporal=False),
        "48/40": TileSettings(48, 48, 40, 40, temporal=False),
        "32/24": TileSettings(32, 32, 24, 24, temporal=False),
    }
    areas = {"1x": (8, 8), "2x": (8, 16), "4x": (16, 16)}
    spatial = {}
    print(
        f"{'area':>5} {'pixels':>9} {'untiled':>8} " + " ".join(f"{'tiles ' + k:>12}" for k in tile_options)
    )
    for name, (h, w) in areas.items():
        z = torch.randn(1, c, 5, h, w, generator=gen)
        row = {"untiled": working_memory(lambda z=z: ours.decode(z))}
        for key, tiles in tile_options.items():
            row[key] = working_memory(lambda z=z, tiles=tiles: tiled_decode(ours, z, tiles))
        spatial[name] = row
        print(
            f"{name:>5} {f'{8 * h}x{8 * w}':>9} {row['untiled']:8.1f} "
            + " ".join(f"{row[k]:12.1f}" for k in tile_options)
        )
    ratios = {k: spatial["4x"][k] / spatial["4x"]["untiled"] for k in tile_options}
    print(
        "tiled / untiled at 4x area: "
        + ", ".join(f"tiles {k}: {v:.3f}" for k, v in ratios.items())
        + "  (target <= 0.25; a 64 px tile is the whole 1x frame, so 64/48 can only reach ~1/4 + strips)\n"
    )
    results["spatial_working_mib"] = spatial
    results["spatial_ratio_4x"] = ratios

    # 2. temporal tiling
    #    ------------------------------------------------------------------------------------------
    print("2. temporal tiling at 64x64 px: working memory (MiB)")
    window = TileSettings(spatial=False)  # 16 frames every 12: diffusers' defaults
    temporal = {}
    print(f"{'frames':>6} {'untiled':>8} {'anim_lab windows':>17} {'diffusers windows':>18}")
    for frames in (17, 33, 49, 65):
        z = torch.randn(1, c, (frames - 1) // 4 + 1, 8, 8, generator=gen)
        d = diffusers_settings(theirs, window)
        row = {
            "untiled": working_memory(lambda z=z: ours.decode(z)),
            "anim_lab": working_memory(lambda z=z: tiled_decode(ours, z, window)),
            "diffusers": working_memory(lambda z=z, d=d: d.decode(z).sample),
        }
        temporal[frames] = row
        print(f"{frames:6d} {row['untiled']:8.1f} {row['anim_lab']:17.1f} {row['diffusers']:18.1f}")
    growth = temporal[65]["anim_lab"] / temporal[17]["anim_lab"] - 1
    growth_d = temporal[65]["diffusers"] / temporal[17]["diffusers"] - 1
    print(
        f"growth 17 -> 65 frames: anim_lab {100 * growth:+.1f}% (target <= +10%), "
        f"diffusers {100 * growth_d:+.1f}%, "
        f"untiled {100 * (temporal[65]['untiled'] / temporal[17]['untiled'] - 1):+.1f}%\n"
    )
    results["temporal_working_mib"] = temporal
    results["temporal_growth_17_to_65"] = growth

    # 3. speed
    #    ----------------------------------------------------------------------------------------------------
    both = TileSettings(64, 64, 48, 48, 16, 12)
    z = torch.randn(1, c, 17, 16, 16, generator=gen)  # 65 frames, 128x128
    d = diffusers_settings(theirs, both)
    with torch.no_grad():
        diff = (tiled_decode(ours, z, both) - d.decode(z).sample).abs().max().item()
    times = {"anim_lab": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("anim_lab", lambda: tiled_decode(ours, z, both)),
            ("diffusers", lambda: d.decode(z).sample),
        ):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times[name].append(time.perf_counter() - t0)
    speed = min(times["diffusers"]) / min(times["anim_lab"])
    print(
        f"3. tiled decode, 65 frames 128x128, tiles 64/48 px + 16/12 frames: "
        f"max |anim_lab - diffusers| = {diff:.1e}"
    )
    print(f"   time ratio diffusers / anim_lab (best of {args.repeats}): {speed:.2f}  (target >= 1)")
    results["speed_ratio_diffusers_over_anim_lab"] = speed
    results["max_abs_diff_vs_diffusers"] = diff
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
