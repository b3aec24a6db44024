"""Measure the toy i2v models (anim_lab/assets/toy_i2v/<kind>) and a causal VAE on held-out identities.

    .venv/bin/python scripts/eval_i2v.py                       # both condition types, 64 identities
    .venv/bin/python scripts/eval_i2v.py --kinds token_replace --n 16 --steps 10
    # a causal-VAE checkpoint alone (its reconstructions: the ceiling row), on 128-px clips
    .venv/bin/python scripts/eval_i2v.py --vae /work/runs/causal_vae_v2 --size 128 --kinds \\
        --recon-sizes '' --json /work/runs/causal_vae_v2_eval.json

For each of ``--n`` test identities (``toy.identity_split("test")``, never seen in training): render its
17-frame clip at ``--size`` px (the clips ``scripts/train_toy_i2v.py`` trains on, with their landmarks),
take frame 0 as the condition image, generate a clip (``flow.sample_i2v``: ``--steps`` Euler steps,
``--shift``, text = the identity's caption, CFG scale ``--cfg`` against the empty caption) and decode it with
the causal VAE ``--vae`` (default the committed ``anim_lab/assets/toy_causal_vae``, the one the committed
models were trained on, at 64 px). ``--kinds`` with no name measures the VAE alone.

Rows of the table:

- ``ground truth``: the rendered clips (the metrics that need no reference: identity, faces, motion);
- ``VAE recon``, the **ceiling**: the ground-truth clips encoded (posterior mode) and decoded by ``--vae``,
  as good as any model that decodes with it can be;
- ``copy frame 0``, the **baseline**: the condition image shown for all 17 frames (no motion at all);
- one row per i2v model.

Metrics, every one computed by ``anim_lab.metrics`` / ``anim_lab.landmarks``, each frame against the ground
truth's frame of the same index:

- ``first_frame_psnr``: frame 0 against the condition image (the baseline's is the metric's cap, 206 dB: it
  is the condition image); ``psnr``, ``ssim``: all frames;
- ``sharpness``: the variance of the luminance Laplacian, video / ground truth (PSNR rewards blur; this not);
- ``face_colour``: the mean colour's drift inside the face oval of the ground truth's landmarks (levels);
- ``detection`` / ``pose_px``: mediapipe face mesh on every frame upscaled to 256 px: the share of frames
  with a face (target >= 95%), and the mean landmark distance to the ground truth's (256-px pixels);
- ``identity_top1``: frames 1..16 of each clip query a gallery of the condition images of at least 32
  held-out identities (the ``--n`` evaluated ones first) with the toy image encoder stored with the models
  (``toy_i2v/clip``, cosine); a hit when the nearest is its own identity (target >= 90%). Copying frame 0
  scores about 100% here by construction: the baseline row shows that identity alone is easy, and its
  motion (0) what it lacks;
- ``kid``: kernel inception distance between the video frames and the ground-truth frames on that encoder's
  features;
- ``flicker``: mean frame-to-frame change minus the ground truth's ([0, 1] units);
- ``motion``: mean |frame t+1 - frame t| (0-255 levels) and ``motion_ratio`` against the ground truth
  (target 0.5-1.5 for the i2v models; >= 0.8 for the causal VAE's reconstructions).

``--recon-sizes`` adds the faces found in the VAE's reconstructions of clips rendered at other sizes (the VAE
is convolutional: is a low detection rate the resolution or the VAE?). Results go to ``--json`` (default
``anim_lab/assets/toy_i2v/eval.json``), with the date, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

import anim_lab
from anim_lab import clip as C
from anim_lab import files, flow, toy
from anim_lab import metrics as M
from anim_lab.causal_vae import TOY_ASSET_DIR, CausalVAE
from anim_lab.landmarks import FaceLandmarker, face_mask, landmark_errors
from anim_lab.vae import images_from_uint8, images_to_uint8

_i2v = anim_lab.load_script("train_toy_i2v")  # the clips the models trained on: their length, size, seeds
GALLERY = 32  # identities the identity metric ranks among (at least)
METRICS = (
    "first_frame_psnr",
    "psnr",
    "ssim",
    "sharpness",
    "face_colour",
    "detection",
    "pose_px",
    "identity_top1",
    "kid",
    "flicker",
    "motion",
    "motion_ratio",
)
CEILING, BASELINE = "VAE recon", "copy frame 0"


def render_clips(seeds, size: int = _i2v.SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The training script's clips of ``seeds`` at ``size`` px: frames (N, 17, size, size, 3) uint8 and their
    landmarks (N, 17, 478, 2) in pixels (N may be 0)."""
    frames = [np.zeros((0, _i2v.NUM_FRAMES, size, size, 3), np.uint8)]
    landmarks = [np.zeros((0, _i2v.NUM_FRAMES, 478, 2), np.float32)]
    for s in seeds:
        clip = toy.make_clip(
            toy.identity_from_seed(int(s)), num_frames=_i2v.NUM_FRAMES, size=size, seed=int(s)
        )
        frames.append(clip.frames[None])
        landmarks.append(clip.landmarks[None])
    return np.concatenate(frames), np.concatenate(landmarks)


def to_video(frames_u8: np.ndarray) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 -> (N, 3, F, H, W) in [-1, 1]."""
    return rearrange(images_from_uint8(frames_u8), "n f c h w -> n c f h w")


def to_u8(video: torch.Tensor) -> np.ndarray:
    """(N, 3, F, H, W) in [-1, 1] -> (N, F, H, W, 3) uint8."""
    return images_to_uint8(rearrange(video, "n c f h w -> n f c h w"))


def copy_first_frame(frames_u8: np.ndarray) -> np.ndarray:
    """The baseline: frame 0 of each clip (N, F, H, W, 3) shown for all F frames."""
    return np.repeat(frames_u8[:, :1], frames_u8.shape[1], axis=1)


class IdentityProbe:
    """The identity yardstick: an image encoder's embeddings (default the toy CLIP stored with the i2v models,
    ``toy_i2v/clip``, the encoder the committed eval.json was measured with) and its preprocessing."""

    def __init__(self, folder: Path = flow.TOY_I2V_DIR / "clip"):
        self.encoder = C.vision_tower_of(C.load_clip(folder)[0]).eval()
        self.preprocess = C.ClipPreprocess.from_folder(folder)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) projected embeddings, 256 at a time."""
        parts = [
            self.encoder(pixel_values=self.preprocess(images[i : i + 256])).image_embeds
            for i in range(0, len(images), 256)
        ]
        return torch.cat(parts)


@torch.no_grad()
def generate(model, vae, image_latents, text, uncond, steps, shift, cfg, seed, batch=16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    videos = []
    for i in range(0, len(image_latents), batch):
        sl = slice(i, i + batch)
        tx = {k: v[sl] for k, v in text.items()}
        un = {k: v.expand(len(image_latents[sl]), *v.shape[1:]) for k, v in uncond.items()}
        lat = flow.sample_i2v(
            model, image_latents[sl], tx, _i2v.NUM_FRAMES, steps, shift, cfg, un, generator=g, faithful=True
        )
        videos.append(flow.decode_latents(vae, lat))  # (B, 3, 17, H, W)
    return torch.cat(videos)


@torch.no_grad()
def reconstruct(vae: CausalVAE, video: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Clips (N, 3, F, H, W) in [-1, 1] through the causal VAE and back (posterior mode): what any generator
    that decodes through this VAE can at best produce."""
    parts = [vae.decode(vae.encode(video[i : i + batch]).mode()) for i in range(0, len(video), batch)]
    return torch.cat(parts).clamp(-1, 1)


def faces(video_u8: np.ndarray, landmarks: np.ndarray) -> tuple[float, float]:
    """Mediapipe on every frame of (N, F, H, W, 3) uint8 clips, upscaled to 256 px, against the true
    landmarks (N, F, 478, 2): (share of frames with a face, mean landmark distance in 256-px pixels over
    those frames)."""
    with FaceLandmarker(video=False) as lm:
        errors = np.concatenate(
            [landmark_errors(v, t, landmarker=lm) for v, t in zip(video_u8, landmarks, strict=True)]
        )
    found = errors[~np.isnan(errors)]
    return len(found) / len(errors), float(found.mean()) if len(found) else float("nan")


class Scorer:
    """The metrics of one row. Built once from the ground truth (frames (N, F, H, W, 3) uint8, landmarks
    (N, F, 478, 2)), the identity probe and the gallery's condition images (G, 3, H, W), the first N of
    which are the evaluated identities'."""

    def __init__(self, truth_u8, landmarks, probe: IdentityProbe, gallery: torch.Tensor):
        self.truth_u8, self.landmarks, self.probe = truth_u8, landmarks, probe
        self.truth = to_video(truth_u8)  # (N, 3, F, H, W)
        n, f, h, w = truth_u8.shape[:4]
        self.masks = torch.from_numpy(
            np.stack([[face_mask(p, h, w) for p in clip] for clip in landmarks])
        ).flatten(0, 1)  # (N*F, H, W): the face ovals of the ground truth, frame by frame
        self.gallery = probe.features(gallery)  # (G, D)
        self.real = probe.features(M.frames_of(self.truth))  # (N*F, D): what KID compares against
        self.gt_motion = self.motion(self.truth)

    @staticmethod
    def motion(video: torch.Tensor) -> float:
        """Mean |frame t+1 - frame t| in 0-255 levels."""
        return float(M.frame_changes(video).mean() * 255)

    def identity_top1(self, video: torch.Tensor) -> float:
        """Frames 1.. of each clip against the gallery of condition images."""
        n, f = video.shape[0], video.shape[2]
        queries = self.probe.features(M.frames_of(video[:, :, 1:]))  # (N*(F-1), D)
        return M.identity_top1(
            queries, self.gallery, torch.arange(n).repeat_interleave(f - 1), torch.arange(len(self.gallery))
        )

    def __call__(self, video_u8: np.ndarray, truth: bool = False) -> dict:
        """A row: ``video_u8`` (N, F, H, W, 3) uint8 (what a viewer sees). ``truth``: the ground truth itself
        (only the metrics that need no reference)."""
        video = to_video(video_u8)
        detection, pose_px = faces(video_u8, self.landmarks)
        row = dict(
            identity_top1=self.identity_top1(video),
            detection=detection,
            pose_px=pose_px,
            motion=self.motion(video),
        )
        row["motion_ratio"] = row["motion"] / self.gt_motion
        if truth:
            return {m: row.get(m) for m in METRICS}
        x, y = M.frames_of(video), M.frames_of(self.truth)
        fake = self.probe.features(x)
        kid, _ = M.kid(
            self.real, fake, min(100, len(fake)), subsets=50, generator=torch.Generator().manual_seed(0)
        )
        row |= dict(
            first_frame_psnr=float(M.psnr(video[:, :, 0], self.truth[:, :, 0]).mean()),
            psnr=float(M.psnr(x, y).mean()),
            ssim=float(M.ssim(x, y).mean()),
            sharpness=M.sharpness_ratio(x, y),
            face_colour=float(M.colour_error(x, y, self.masks).mean()),
            kid=kid,
            flicker=float(M.flicker(video, self.truth).mean()),
        )
        return {m: row[m] for m in METRICS}


def format_table(rows: dict[str, dict]) -> str:
    cols = [
        ("first_frame_psnr", "fr0 PSNR", ".2f"),
        ("psnr", "PSNR", ".2f"),
        ("ssim", "SSIM", ".3f"),
        ("sharpness", "sharp", ".3f"),
        ("face_colour", "colour", ".2f"),
        ("detection", "faces", ".1%"),
        ("pose_px", "pose px", ".2f"),
        ("identity_top1", "id top-1", ".1%"),
        ("kid", "KID", ".4f"),
        ("flicker", "flicker", ".4f"),
        ("motion", "motion", ".2f"),
        ("motion_ratio", "ratio", ".2f"),
    ]
    head = f"{'':16s}" + "".join(f"{title:>10s}" for _, title, _ in cols)
    lines = [head]
    for name, r in rows.items():
        cells = ["-" if r[k] is None else format(r[k], fmt) for k, _, fmt in cols]
        lines.append(f"{name:16s}" + "".join(f"{c:>10s}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kinds", nargs="*", default=list(flow.IMAGE_CONDITION_TYPES), help="none: the VAE alone"
    )
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--size", type=int, default=_i2v.SIZE, help="frame size of the clips (px)")
    parser.add_argument("--vae", type=Path, default=TOY_ASSET_DIR, help="the causal-VAE folder")
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
    if args.n < 1 or args.recon_n < 1:
        parser.error("--n and --recon-n must be >= 1")
    if any(s < 32 or s % 8 for s in [args.size, *recon_sizes]):
        parser.error(
            f"--size and --recon-sizes must be multiples of 8, at least 32, got {args.size}, {recon_sizes}"
        )
    try:
        files.check_output_file(args.json, (".json",), what="--json file")
        vae = CausalVAE.from_pretrained(args.vae)
    except (files.OutputError, OSError, ValueError) as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    t0 = time.time()

    all_seeds = list(toy.identity_split("test"))[: max(GALLERY, args.n)]
    seeds = all_seeds[: args.n]
    gt_u8, landmarks = render_clips(seeds, args.size)  # (N, 17, S, S, 3), (N, 17, 478, 2)
    gallery_u8 = np.concatenate([gt_u8[:, 0], render_clips(all_seeds[args.n :], args.size)[0][:, 0]])
    gt = to_video(gt_u8)
    images = gt[:, :, 0]  # (N, 3, S, S) condition images
    size = (args.size, args.size)
    image_latents = flow.encode_condition_image(vae, images, size=size)  # (N, 16, 1, S/8, S/8)
    own = float(M.psnr(flow.decode_latents(vae, image_latents)[:, :, 0], images).mean())
    score = Scorer(gt_u8, landmarks, IdentityProbe(), images_from_uint8(gallery_u8))

    rows = {"ground truth": score(gt_u8, truth=True)}
    rows[CEILING] = score(to_u8(reconstruct(vae, gt)))
    rows[BASELINE] = score(copy_first_frame(gt_u8))
    by_size = {}
    for s in recon_sizes:
        clips, marks = render_clips(seeds[: args.recon_n], s)
        detection, pose_px = faces(to_u8(reconstruct(vae, to_video(clips))), marks)
        by_size[s] = dict(detection=detection, pose_px=pose_px)
    if args.kinds:
        text = flow.toy_text_tokens([flow.toy_caption(toy.identity_from_seed(s)) for s in seeds])
        uncond = flow.toy_text_tokens([""])
    for kind in args.kinds:
        model = flow.load_toy_i2v(kind, args.models)
        video = generate(model, vae, image_latents, text, uncond, args.steps, args.shift, args.cfg, args.seed)
        rows[kind] = score(to_u8(video))

    print(
        f"held-out identities: {args.n} (identity among {len(gallery_u8)}), {args.size} px, VAE {args.vae}; "
        + (f"{args.steps} Euler steps, shift {args.shift}, CFG {args.cfg}; " if args.kinds else "")
        + f"VAE reconstruction of the condition images: {own:.2f} dB"
    )
    print(format_table(rows))
    print(
        "targets: identity >= 90%, faces >= 95%, motion ratio 0.5-1.5 (i2v) / >= 0.8 (VAE), sharpness >= 0.7"
    )
    for s, r in by_size.items():
        print(f"VAE recon of {args.recon_n} of the clips rendered at {s} px: faces {r['detection']:.1%}")
    result = dict(
        n_identities=args.n,
        gallery_identities=len(gallery_u8),
        size=args.size,
        vae=str(args.vae),
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
    files.write_result(args.json, result)
    print(f"({result['minutes']} min)")


if __name__ == "__main__":
    main()
