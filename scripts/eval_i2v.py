"""Measure the trained toy i2v models (anim_lab/assets/toy_i2v/<kind>) on held-out identities; print a table.

    .venv/bin/python scripts/eval_i2v.py                       # both condition types, 64 identities (~3 min)
    .venv/bin/python scripts/eval_i2v.py --kinds token_replace --n 16 --steps 10

For each of ``--n`` test identities (``toy.identity_split("test")``, never seen in training): render its
17-frame 64 px clip, take frame 0 as the condition image, generate a clip (``flow.sample_i2v``: ``--steps``
Euler steps, ``--shift``, text = the identity's caption, CFG scale ``--cfg`` against the empty caption) and
decode it with the toy causal VAE. Then:

- **first-frame PSNR**: generated frame 0 against the condition image (next to the VAE's own reconstruction
  of that image, its ceiling);
- **identity top-1**: every generated frame 1..16 queries a gallery of the ``n`` condition images with the toy
  image encoder (cosine); a hit when the nearest is its own identity (target >= 90%);
- **face detection**: mediapipe face mesh on every generated frame, upscaled to 256 px (target >= 95%);
- **motion**: mean |frame t+1 - frame t| (0-255 scale) of generated clips against the ground-truth clips
  (target: within 50%, i.e. a ratio in [0.5, 1.5]).

The same ground truth is measured too (its identity top-1 and detection rate), as a reference, and so is its
reconstruction by the causal VAE (the row "VAE recon": the clips encoded and decoded), the ceiling of any
model whose latents this VAE decodes. Results go to
``--json`` (default ``anim_lab/assets/toy_i2v/eval.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from einops import rearrange

import anim_lab
from anim_lab import clip as C
from anim_lab import flow, toy
from anim_lab.causal_vae import CausalVAE
from anim_lab.landmarks import FaceLandmarker, NoFaceError
from anim_lab.metrics import psnr
from anim_lab.vae import images_from_uint8, images_to_uint8

render_clip = anim_lab.load_script("train_toy_i2v").render_clip  # the clips the models trained on


def to_video(frames_u8: np.ndarray) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 -> (N, 3, F, H, W) in [-1, 1]."""
    return rearrange(images_from_uint8(frames_u8), "n f c h w -> n c f h w")


def to_u8(video: torch.Tensor) -> np.ndarray:
    """(N, 3, F, H, W) in [-1, 1] -> (N, F, H, W, 3) uint8."""
    return images_to_uint8(rearrange(video, "n c f h w -> n f c h w"))


@torch.no_grad()
def identity_top1(encoder, preprocess, gallery: torch.Tensor, queries: torch.Tensor) -> float:
    """gallery (N, 3, H, W), queries (N, Q, 3, H, W) in [-1, 1]: fraction of queries whose most similar
    gallery image (toy image encoder, cosine) is their own identity."""
    g = encoder(pixel_values=preprocess(gallery)).image_embeds  # (N, D)
    n, q = queries.shape[:2]
    flat = rearrange(queries, "n q c h w -> (n q) c h w")
    e = torch.cat(
        [encoder(pixel_values=preprocess(flat[i : i + 256])).image_embeds for i in range(0, n * q, 256)]
    )
    nearest = C.cosine_similarity_matrix(e, g).argmax(1)  # (N*Q,)
    return float((nearest == torch.arange(n).repeat_interleave(q)).float().mean())


def detection_rate(frames_u8: np.ndarray, size: int = 256) -> float:
    """Fraction of frames (N, F, H, W, 3) where mediapipe finds a face after upscaling to ``size`` px."""
    hits, total = 0, 0
    with FaceLandmarker(video=False) as lm:
        for frame in frames_u8.reshape(-1, *frames_u8.shape[-3:]):
            big = cv2.resize(frame, (size, size), interpolation=cv2.INTER_CUBIC)
            total += 1
            try:
                lm.detect(big)
                hits += 1
            except NoFaceError:
                pass
    return hits / total


def motion(frames_u8: np.ndarray) -> float:
    """Mean |frame t+1 - frame t| on the 0-255 scale over (N, F, H, W, 3) clips."""
    x = frames_u8.astype(np.float32)
    return float(np.abs(x[:, 1:] - x[:, :-1]).mean())


@torch.no_grad()
def generate(model, vae, image_latents, text, uncond, steps, shift, cfg, seed, batch=16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    videos = []
    for i in range(0, len(image_latents), batch):
        sl = slice(i, i + batch)
        tx = {k: v[sl] for k, v in text.items()}
        un = {k: v.expand(len(image_latents[sl]), *v.shape[1:]) for k, v in uncond.items()}
        lat = flow.sample_i2v(
            model, image_latents[sl], tx, 17, steps, shift, cfg, un, generator=g, faithful=True
        )
        videos.append(flow.decode_latents(vae, lat))  # (B, 3, 17, 64, 64)
    return torch.cat(videos)


@torch.no_grad()
def reconstruct(vae: CausalVAE, video: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Clips (N, 3, F, H, W) in [-1, 1] through the causal VAE and back (posterior mode): what any generator
    that decodes through this VAE can at best produce."""
    parts = [vae.decode(vae.encode(video[i : i + batch]).mode()) for i in range(0, len(video), batch)]
    return torch.cat(parts).clamp(-1, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=list(flow.IMAGE_CONDITION_TYPES))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", type=Path, default=flow.TOY_I2V_DIR, help="folder of <kind>/ models")
    parser.add_argument("--json", type=Path, default=flow.TOY_I2V_DIR / "eval.json")
    parser.add_argument(
        "--recon-sizes",
        default="96,128",
        help="also the faces found in the VAE's reconstructions at these frame sizes (comma list, '' none)",
    )
    parser.add_argument("--recon-n", type=int, default=16, help="identities for --recon-sizes")
    args = parser.parse_args(argv)
    for kind in args.kinds:
        flow.check_image_condition_type(kind)
    flow.check_shift(args.shift)
    try:
        recon_sizes = [int(v) for v in args.recon_sizes.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--recon-sizes must be a comma list of sizes such as 96,128, got {args.recon_sizes!r}")
    torch.set_num_threads(args.threads)
    t0 = time.time()

    seeds = list(toy.identity_split("test"))[: args.n]
    gt_u8 = np.stack([render_clip(s) for s in seeds])  # (N, 17, 64, 64, 3)
    gt = to_video(gt_u8)
    images = gt[:, :, 0]  # (N, 3, 64, 64) condition images
    vae = CausalVAE.from_pretrained()
    image_latents = flow.encode_condition_image(vae, images, size=(64, 64))  # (N, 16, 1, 8, 8)
    own = float(psnr(flow.decode_latents(vae, image_latents)[:, :, 0], images).mean())
    text = flow.toy_text_tokens([flow.toy_caption(toy.identity_from_seed(s)) for s in seeds])
    uncond = flow.toy_text_tokens([""])
    # the identity yardstick: the image tower of the frozen toy CLIP stored with the models (toy_i2v/clip),
    # the encoder eval.json was measured with; the package's toy CLIP may be retrained without moving it
    encoder = C.vision_tower_of(C.load_clip(flow.TOY_I2V_DIR / "clip")[0]).eval()
    preprocess = C.ClipPreprocess.from_folder(flow.TOY_I2V_DIR / "clip")

    def score(video: torch.Tensor) -> dict:
        """A generated (or reconstructed) video (N, 3, 17, H, W) in [-1, 1] -> its row of the table."""
        u8 = to_u8(video)
        return dict(
            first_frame_psnr=float(psnr(video[:, :, 0], images).mean()),
            identity_top1=identity_top1(
                encoder, preprocess, images, rearrange(video[:, :, 1:], "n c f h w -> n f c h w")
            ),
            detection=detection_rate(u8),
            motion=motion(u8),
        )

    rows = {
        "ground truth": dict(
            first_frame_psnr=None,
            identity_top1=identity_top1(
                encoder, preprocess, images, rearrange(gt[:, :, 1:], "n c f h w -> n f c h w")
            ),
            detection=detection_rate(gt_u8),
            motion=motion(gt_u8),
        )
    }
    # the ceiling of any model decoded by this VAE: the ground-truth clips themselves, encoded and decoded
    rows["VAE recon"] = score(reconstruct(vae, gt))
    # ... and at larger frame sizes (the VAE is convolutional): is the ceiling the resolution or the VAE?
    by_size = {}
    for size in recon_sizes:
        clips = np.stack([render_clip(s, size) for s in seeds[: args.recon_n]])
        by_size[size] = dict(detection=detection_rate(to_u8(reconstruct(vae, to_video(clips)))))
    for kind in args.kinds:
        video = generate(
            flow.load_toy_i2v(kind, args.models),
            vae,
            image_latents,
            text,
            uncond,
            args.steps,
            args.shift,
            args.cfg,
            args.seed,
        )
        rows[kind] = score(video)
    gt_motion = rows["ground truth"]["motion"]
    for r in rows.values():
        r["motion_ratio"] = r["motion"] / gt_motion

    print(
        f"held-out identities: {args.n}, {args.steps} Euler steps, shift {args.shift}, CFG {args.cfg}; "
        f"VAE reconstruction of the condition images: {own:.2f} dB"
    )
    head = f"{'':14s} {'frame-0 PSNR':>12s} {'id top-1':>9s} {'faces':>7s} {'motion':>7s} {'ratio':>6s}"
    print(head)
    ceiling = f"(<= {own:.1f})"
    print(f"{'target':14s} {ceiling:>12s} {'>= 90%':>9s} {'>= 95%':>7s} {'':>7s} {'0.5-1.5':>6s}")
    for name, r in rows.items():
        p = "-" if r["first_frame_psnr"] is None else f"{r['first_frame_psnr']:.2f} dB"
        print(
            f"{name:14s} {p:>12s} {r['identity_top1']:>9.1%} {r['detection']:>7.1%} {r['motion']:>7.2f} "
            f"{r['motion_ratio']:>6.2f}"
        )
    for size, r in by_size.items():
        print(f"VAE recon of {args.recon_n} of the clips rendered at {size} px: faces {r['detection']:.1%}")
    result = dict(
        n_identities=args.n,
        steps=args.steps,
        shift=args.shift,
        cfg=args.cfg,
        seed=args.seed,
        vae_reconstruction_psnr=round(own, 2),
        rows={k: {m: (None if v is None else round(v, 4)) for m, v in r.items()} for k, r in rows.items()},
        vae_recon_by_size={str(k): {m: round(v, 4) for m, v in r.items()} for k, r in by_size.items()},
        recon_n=args.recon_n,
        minutes=round((time.time() - t0) / 60, 1),
        command="python scripts/eval_i2v.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"({result['minutes']} min)")


if __name__ == "__main__":
    main()
