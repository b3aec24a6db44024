"""Measure the toy animator against the toy world's ground truth, and the ablations, as one table.

    .venv/bin/python scripts/eval_animator.py                       # the metric table, 4 held-out cases
    .venv/bin/python scripts/eval_animator.py --ablations all       # + every ablation (long on a busy CPU)
    .venv/bin/python scripts/eval_animator.py --weights runs/toy_animator/stage1/toy_animator --cases 2

Each case is a held-out identity (the test split) with a held-out driving clip (motion seeds never used in
training): the reference is a render of the identity in another pose and expression, the driving input is the
clip's pose images, and the ground truth is the identity rendered in the driving poses. Same seeds every run.

Metrics (one row of the table per variant):
- ``psnr`` / ``ssim``: each generated frame against its ground-truth render (mean over frames and cases);
- ``sharpness``: the variance of the luminance Laplacian, generated / ground truth (1 = as much fine detail;
  PSNR rewards blur, this does not);
- ``face_colour``: the mean colour's drift inside the face oval of the ground truth's landmarks (levels);
- ``detect`` / ``pose_px``: mediapipe face mesh on the generated frames upscaled to 256 px (bicubic): the
  share of frames with a face, and the mean distance (256-px pixels) of its 478 landmarks to the driving
  landmarks, over the detected frames;
- ``id_top1``: the toy image encoder's embedding of each generated frame against the ground-truth frames (same
  index) of a gallery of at least 32 held-out identities (the evaluated cases and further ones): the share
  whose nearest (cosine) shows its own identity;
- ``kid``: the kernel inception distance between the generated and the ground-truth frames, on the toy image
  encoder's features (lower is closer; about 0 for the ground truth's own distribution);
- ``flicker``: mean |frame difference| of the generated video minus that of the ground truth ([0, 1] units).
The ``copy reference`` row is the baseline of showing the reference image for every frame; the ``VAE
reconstruction`` row is the ceiling: the ground truth through the animator's own VAE (encode, decode), as
good as any model that decodes with it can be.

Every metric is computed by ``anim_lab.metrics``. The ablations are the pipeline's own switches
(:data:`ABLATIONS`: ``use_reference_attention`` / ``use_pose_guider`` / ``use_motion_modules``, which a user
can pass too), plus :func:`sweep_cfg`, :func:`sweep_steps`, :func:`context_seams` (a 64-frame video in
windows of 16, overlap 0 vs 4: the jump at the window seams beyond the ground truth's motion) and
:func:`bf16_cost` (the same calls under bf16 autocast: the row, and the PSNR / sharpness against fp32; its
speed is measured by ``benchmarks/bench_pose2video.py``). Progress over
the cases goes to stderr; ``--json results/eval_animator.json`` writes the table with the date, the machine
and the library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from anim_lab import metrics as M
from anim_lab.clip import ClipPreprocess, load_image_encoder
from anim_lab.context import context_windows
from anim_lab.files import OutputError, check_output_file, write_result
from anim_lab.landmarks import FaceLandmarker, face_mask, landmark_errors
from anim_lab.toy import TOY_ANIMATOR_DIR, ToyPortraitDataset, load_animator
from anim_lab.vae import decode as vae_decode
from anim_lab.vae import encode as vae_encode
from anim_lab.vae import images_from_uint8, images_to_uint8

EVAL_SEED = 2027  # the held-out cases (test identities, motion seeds of their own)
METRICS = ("psnr", "ssim", "sharpness", "face_colour", "detect", "pose_px", "id_top1", "kid", "flicker")
GALLERY = 32  # identities the identity metric ranks among (at least)


@dataclass
class Case:
    """A held-out identity: reference (H, W, 3), poses / truth (F, H, W, 3) uint8, landmarks (F, 478, 2), and
    the identity's seed."""

    reference: np.ndarray
    poses: np.ndarray
    truth: np.ndarray
    landmarks: np.ndarray
    identity: int = -1


def make_cases(num_cases: int = 4, num_frames: int = 24, seed: int = EVAL_SEED) -> list[Case]:
    data = ToyPortraitDataset("test", 128, num_frames, length=num_cases, seed=seed, fps=25.0)
    cases = []
    for item in data:
        cases.append(
            Case(
                reference=images_to_uint8(item["reference"]),  # (3, H, W) -> (H, W, 3)
                poses=(item["poses"].permute(1, 2, 3, 0) * 255).round().byte().numpy(),  # -> (F, H, W, 3)
                truth=images_to_uint8(rearrange(item["frames"], "c f h w -> f c h w")),  # (F, H, W, 3)
                landmarks=item["landmarks"].numpy(),
                identity=int(item["identity"]),
            )
        )
    return cases


def generate(
    pipe, case: Case, steps: int = 10, cfg: float = 3.5, seed: int = 42, autocast=None, **kwargs
) -> np.ndarray:
    """The pipeline on one case -> (F, H, W, 3) uint8; ``autocast`` (torch.bfloat16): the call under
    ``torch.autocast`` (the pipeline's lossy fast mode on a CPU with AVX-512 BF16)."""
    kwargs = {"context_frames": 16, "context_overlap": 4, **kwargs}
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        frames = pipe(
            case.reference,
            list(case.poses),
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **kwargs,
        ).frames[0]  # (F, H, W, 3) in [0, 1]
    return (frames * 255).round().astype(np.uint8)


# --- metrics ---------------------------------------------------------------------------------------------
def pose_errors(video: np.ndarray, landmarks: np.ndarray, landmarker: FaceLandmarker) -> list[float | None]:
    """Per frame: the mean landmark distance in 256-px pixels, or None where mediapipe finds no face
    (``anim_lab.landmarks.landmark_errors``)."""
    errors = landmark_errors(video, landmarks, landmarker=landmarker)
    return [None if np.isnan(e) else float(e) for e in errors]


class IdentityProbe:
    """An image encoder's embeddings, with the pipeline's preprocessing (squash, CLIP-normalise). By default
    the toy animator's own frozen encoder (``toy_animator/image_encoder``): the yardstick stays the same when
    the package's toy CLIP is retrained."""

    def __init__(self, encoder_dir: str | Path = TOY_ANIMATOR_DIR / "image_encoder"):
        self.encoder = load_image_encoder(encoder_dir)
        size = self.encoder.config.image_size
        self.size, self.preprocess = size, ClipPreprocess(size=size, crop_size=size)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, D) the encoder's projected embeddings (what KID compares)."""
        x = images_from_uint8(images)  # (N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1]
        x = torch.nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False
        )
        return self.encoder(pixel_values=self.preprocess(x.clamp(-1, 1))).image_embeds  # (N, D)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, D) unit vectors."""
        return torch.nn.functional.normalize(self.features(images), dim=-1)


def identity_top1(
    videos: list[np.ndarray], cases: list[Case], probe: IdentityProbe, gallery: list[Case] | None = None
) -> float:
    """Share of generated frames whose nearest ground-truth frame (same index) among the ``gallery`` cases
    (default: the evaluated cases) shows their own identity."""
    gallery = cases if gallery is None else gallery
    own = torch.tensor([c.identity for c in cases])
    ids = torch.tensor([g.identity for g in gallery])
    hits = []
    for f in range(len(cases[0].truth)):
        keys = probe(np.stack([g.truth[f] for g in gallery]))  # (N, D)
        queries = probe(np.stack([v[f] for v in videos]))  # (n, D)
        hits.append(M.identity_top1(queries, keys, own, ids))
    return float(np.mean(hits))


def kid(videos: list[np.ndarray], cases: list[Case], probe: IdentityProbe) -> float:
    """KID between every generated frame and every ground-truth frame (toy image encoder features): the mean
    over 50 subsets of up to 100 frames, a fixed generator. Negative values are the unbiased estimate's noise
    around 0 (no measurable difference)."""
    fake = probe.features(np.concatenate(videos))  # (n*F, D)
    real = probe.features(np.concatenate([c.truth for c in cases]))  # (n*F, D)
    size = min(100, len(fake))
    mean, _ = M.kid(real, fake, subset_size=size, subsets=50, generator=torch.Generator().manual_seed(0))
    return mean


def score(
    videos: list[np.ndarray],
    cases: list[Case],
    probe: IdentityProbe | None = None,
    gallery: list[Case] | None = None,
) -> dict:
    """The table's metrics for one variant (videos[i] generated for cases[i]); ``gallery``: the cases the
    identity metric ranks among (default: ``cases``)."""
    probe = probe or IdentityProbe()
    errors = []
    with FaceLandmarker(video=False) as landmarker:
        for v, c in zip(videos, cases, strict=True):
            errors += pose_errors(v, c.landmarks, landmarker)
    found = [e for e in errors if e is not None]
    pairs = [(M.video_from_uint8(v), M.video_from_uint8(c.truth)) for v, c in zip(videos, cases, strict=True)]
    masks = [
        torch.from_numpy(np.stack([face_mask(p, *c.truth.shape[1:3]) for p in c.landmarks])) for c in cases
    ]
    return {
        "psnr": float(np.mean([M.psnr(v, t).mean() for v, t in pairs])),
        "ssim": float(np.mean([M.ssim(v, t).mean() for v, t in pairs])),
        "sharpness": float(np.mean([M.sharpness_ratio(v, t) for v, t in pairs])),
        "face_colour": float(
            np.mean([M.colour_error(v, t, m).mean() for (v, t), m in zip(pairs, masks, strict=True)])
        ),
        "detect": len(found) / len(errors),
        "pose_px": float(np.mean(found)) if found else float("nan"),
        "id_top1": identity_top1(videos, cases, probe, gallery),
        "kid": kid(videos, cases, probe),
        "flicker": float(np.mean([M.flicker(v, t).item() for v, t in pairs])),
    }


@torch.no_grad()
def reconstruct(pipe, cases: list[Case]) -> list[np.ndarray]:
    """The ceiling: each case's ground truth encoded and decoded by the pipeline's VAE (posterior mean)."""
    out = []
    for c in cases:
        frames = images_from_uint8(c.truth)  # (F, 3, H, W) in [-1, 1]
        latents = vae_encode(pipe.vae, frames)  # (F, 4, h, w), scaled
        out.append(images_to_uint8(vae_decode(pipe.vae, latents)))  # (F, H, W, 3) uint8
    return out


def copy_reference(cases: list[Case]) -> list[np.ndarray]:
    """The baseline: the reference image shown for every frame."""
    return [np.repeat(c.reference[None], len(c.truth), axis=0) for c in cases]


# --- ablations -------------------------------------------------------------------------------------------
# Each one the pipeline's own switch (Pose2VideoPipeline.__call__), so a user gets the same run.
ABLATIONS = {
    "no reference attention": {"use_reference_attention": False},
    "no pose guider": {"use_pose_guider": False},
    "no motion modules": {"use_motion_modules": False},
}


def run_variant(pipe, cases, probe=None, name: str = "toy animator", gallery=None, **gen) -> dict:
    """Generate every case (a progress bar over the cases on stderr) and score the videos."""
    videos = [generate(pipe, c, **gen) for c in tqdm(cases, desc=name, unit="case", leave=False)]
    return score(videos, cases, probe, gallery)


def ablate(pipe, cases, name: str, probe=None, gallery=None, **gen) -> dict:
    """The table row of one of :data:`ABLATIONS`."""
    return run_variant(pipe, cases, probe, name, gallery, **ABLATIONS[name], **gen)


def bf16_cost(pipe, cases, probe=None, gallery=None, **gen) -> tuple[dict, dict]:
    """bf16 autocast against the same call in fp32: its table row (against the ground truth) and how far its
    videos are from the fp32 ones (PSNR, sharpness ratio)."""
    fp32 = [generate(pipe, c, **gen) for c in tqdm(cases, desc="fp32", unit="case", leave=False)]
    bf16 = [generate(pipe, c, autocast=torch.bfloat16, **gen) for c in tqdm(cases, desc="bf16", leave=False)]
    pairs = [(M.video_from_uint8(b), M.video_from_uint8(f)) for b, f in zip(bf16, fp32, strict=True)]
    against_fp32 = {
        "psnr": float(np.mean([M.psnr(b, f).mean() for b, f in pairs])),
        "sharpness": float(np.mean([M.sharpness_ratio(b, f) for b, f in pairs])),
    }
    return score(bf16, cases, probe, gallery), against_fp32


def sweep_cfg(pipe, cases, scales=(1.0, 2.0, 3.5, 5.0, 7.0), probe=None, gallery=None, **gen) -> dict:
    return {s: run_variant(pipe, cases, probe, f"cfg {s:g}", gallery, **{**gen, "cfg": s}) for s in scales}


def sweep_steps(pipe, cases, counts=(5, 10, 25, 50), probe=None, gallery=None, **gen) -> dict[int, dict]:
    """The table for each number of denoising steps in ``counts`` (``gen`` may carry a "steps": replaced)."""
    return {n: run_variant(pipe, cases, probe, f"{n} steps", gallery, **{**gen, "steps": n}) for n in counts}


def context_seams(pipe, overlaps=(0, 4), num_frames: int = 64, context_frames: int = 16, **gen) -> dict:
    """A 64-frame held-out clip in windows of 16: per overlap, the seam error and the PSNR."""
    case = make_cases(1, num_frames)[0]
    out = {}
    for overlap in overlaps:
        video = generate(pipe, case, context_frames=context_frames, context_overlap=overlap, **gen)
        windows = context_windows(num_frames, context_frames, overlap, max_len=None)
        x, truth = M.video_from_uint8(video), M.video_from_uint8(case.truth)
        out[overlap] = {
            "seam_error": M.seam_error(x, truth, windows).item(),
            "psnr": M.psnr(x, truth).mean().item(),
        }
    return out


# --- the table -------------------------------------------------------------------------------------------
DECIMALS = {"psnr": 2, "ssim": 3, "sharpness": 3, "face_colour": 2, "detect": 3, "pose_px": 2, "id_top1": 3}
DECIMALS |= {"kid": 3, "flicker": 4}


def format_table(rows: dict[str, dict]) -> str:
    head = f"{'variant':<30}" + "".join(f"{m:>12}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<30}" + "".join(f"{r[m]:>12.{DECIMALS[m]}f}" for m in METRICS))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(TOY_ANIMATOR_DIR), help="the toy animator's folder")
    p.add_argument("--cases", type=int, default=4, help="held-out identities / driving clips")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.5)
    p.add_argument(
        "--cfg-scales",
        default="1,2,3.5,5,7",
        help="the guidance scales of the cfg ablation (comma list)",
    )
    p.add_argument(
        "--case-seed",
        type=int,
        default=EVAL_SEED,
        help=f"which held-out cases (default {EVAL_SEED}, the reported ones; another seed gives a validation "
        "set of other test identities and clips, for choosing settings such as the guidance scale)",
    )
    p.add_argument("--scheduler", default="scaled_linear", choices=("scaled_linear", "linear"))
    p.add_argument(
        "--ablations",
        default="",
        help="comma list of reference,pose,motion,cfg,steps,context,bf16 or 'all'",
    )
    p.add_argument("--json", type=Path, help="also write the table (and the seam errors) to this JSON file")
    args = p.parse_args(argv)
    try:
        scales = [float(s) for s in args.cfg_scales.split(",")]
    except ValueError:
        p.error(f"--cfg-scales must be a comma list of numbers such as 1,2,3.5, got {args.cfg_scales!r}")
    try:
        if args.json is not None:
            check_output_file(args.json, (".json",), what="--json file")
    except OutputError as err:
        print(f"eval_animator: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    try:
        pipe = load_animator(args.weights, scheduler=args.scheduler)
    except (OSError, ValueError) as err:
        print(f"eval_animator: error: {err}", file=sys.stderr)
        return 2
    pipe.set_progress_bar_config(disable=True)
    # the evaluated cases are the first of a gallery of at least 32 held-out ones (identity among 32)
    gallery = make_cases(max(GALLERY, args.cases), args.frames, args.case_seed)
    cases, probe = gallery[: args.cases], IdentityProbe(Path(args.weights) / "image_encoder")
    gen = {"steps": args.steps, "cfg": args.cfg}
    rows = {
        "VAE reconstruction (ceiling)": score(reconstruct(pipe, cases), cases, probe, gallery),
        "copy reference (baseline)": score(copy_reference(cases), cases, probe, gallery),
    }
    rows["toy animator"] = run_variant(pipe, cases, probe, "toy animator", gallery, **gen)
    wanted = set(args.ablations.split(",")) if args.ablations else set()
    if "all" in wanted:
        wanted = {"reference", "pose", "motion", "cfg", "steps", "context", "bf16"}
    for key, name in (("reference", "no reference attention"), ("pose", "no pose guider")):
        if key in wanted:
            rows[name] = ablate(pipe, cases, name, probe, gallery, **gen)
    if "motion" in wanted and pipe.denoising_unet.motion_kwargs:
        rows["no motion modules"] = ablate(pipe, cases, "no motion modules", probe, gallery, **gen)
    bf16 = None
    if "bf16" in wanted:
        rows["bf16 autocast"], bf16 = bf16_cost(pipe, cases, probe, gallery, **gen)
    if "cfg" in wanted:
        sweep = sweep_cfg(pipe, cases, scales, probe=probe, gallery=gallery, **gen)
        rows.update({f"cfg {s:g}": r for s, r in sweep.items()})
    if "steps" in wanted:
        sweep = sweep_steps(pipe, cases, probe=probe, gallery=gallery, **gen)
        rows.update({f"{n} steps": r for n, r in sweep.items()})
    print(
        f"{args.cases} held-out cases (case seed {args.case_seed}) x {args.frames} frames at 128 px, "
        f"{args.steps} steps, cfg {args.cfg}"
    )
    print(format_table(rows))
    if bf16 is not None:
        psnr, sharp = bf16["psnr"], bf16["sharpness"]
        print(f"bf16 autocast against fp32: PSNR {psnr:.2f} dB, sharpness ratio {sharp:.3f}")
    seams = {}
    if "context" in wanted:
        seams = context_seams(pipe, **gen)
        for overlap, r in seams.items():
            seam, quality = r["seam_error"], r["psnr"]
            print(f"64 frames, windows of 16, overlap {overlap}: seam error {seam:.4f}, PSNR {quality:.2f}")
    if args.json is not None:
        record = {
            "command": " ".join(["scripts/eval_animator.py", *(argv if argv is not None else sys.argv[1:])]),
            "cases": args.cases,
            "case_seed": args.case_seed,
            "frames": args.frames,
            "steps": args.steps,
            "cfg": args.cfg,
            "rows": {name: {m: float(r[m]) for m in METRICS} for name, r in rows.items()},
            "context_seams": {str(k): {m: float(v) for m, v in r.items()} for k, r in seams.items()},
            **({} if bf16 is None else {"bf16_against_fp32": bf16}),
        }
        write_result(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
