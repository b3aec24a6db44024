"""Lip sync of Audio2Video on held-out talking toy clips, measured on the pixels by mediapipe (issue 25 §4).

    PYTHONPATH=$PWD .venv/bin/python scripts/eval_lipsync.py --audio2mesh anim_lab/assets/toy_audio2mesh
    PYTHONPATH=$PWD .venv/bin/python scripts/eval_lipsync.py --audio2mesh DIR --cases 2 --steps 4 \\
        --max-seconds 2 --json results/eval_lipsync.json

Each case is a test identity (``toy.identity_split("test")``) speaking a held-out sentence with a held-out
voice (``toy.sample_speech(seed, "heldout")``), rendered by ``toy.make_talking_clip`` (its head moves). The
reference portrait is the identity rendered in the clip's first head pose with a neutral face. Four videos
are measured per case (one row each):

- ``ground truth``: the clip's own render;
- ``ceiling``: Audio2Video driven by the clip's exact 2-D landmarks (``landmarks=``): as good as the animator
  lets any audio model be;
- ``audio2video``: Audio2Video from the clip's audio (Audio2Mesh -> mesh -> pose images -> animator; the head
  holds the reference's pose);
- ``shuffled audio``: the same with another case's audio, cut or stretched to this clip's length: the
  baseline of speech that is not this clip's (a model that ignores the audio scores as well as this).

The measure: the mouth opening found by mediapipe's face mesh on each frame upscaled to 256 px (bicubic), the
inner-lip gap (points 13-14) over the eye-corner distance (33-263). Against the clip's ground-truth opening
(the same ratio of its exact 3-D landmarks):

- ``r``: the Pearson correlation over the frames (mean over cases; frames without a face left out);
- ``pooled_r``: the same over every case's frames together;
- ``lag``: the audio-video offset, the lag in frames (within ±5) where the cross-correlation peaks (median
  over cases); > 0: the video's mouth moves later than the speech;
- ``detect``: the share of frames where mediapipe found a face.

Progress goes to stderr; ``--json`` writes the table with the date, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from anim_lab import toy
from anim_lab.audio2mesh import Audio2Mesh
from anim_lab.errors import InputError
from anim_lab.files import OutputError, check_output_file, write_result
from anim_lab.landmarks import FaceLandmarker, NoFaceError
from anim_lab.pipelines import audio2video as a2v
from anim_lab.toy import TOY_ANIMATOR_DIR, load_animator
from anim_lab.toy.renderer import Expression, render

EVAL_SEED = 2026  # the reported cases; another --case-seed gives a validation set
MAX_LAG = 5  # frames either way
DETECT_SIZE = 256  # frames are upscaled to this before mediapipe
ROWS = ("ground truth", "ceiling", "audio2video", "shuffled audio")


# --- the measures -----------------------------------------------------------------------------------------
def mouth_opening(points: np.ndarray) -> np.ndarray:
    """``(F, 478, 2 or 3)`` landmarks -> ``(F,)`` inner-lip gap (13-14) over the eye-corner distance
    (33-263); NaN rows stay NaN."""
    p = np.asarray(points, np.float64)
    gap = np.linalg.norm(p[:, 13] - p[:, 14], axis=-1)
    return gap / np.linalg.norm(p[:, 33] - p[:, 263], axis=-1)


def pearson(x, y) -> float:
    """Pearson correlation of two ``(F,)`` signals over the frames where both are finite; NaN when either
    does not vary (or fewer than 3 frames are left)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 1e-12 else float("nan")


def lagged_correlations(video, truth, max_lag: int = MAX_LAG) -> dict[int, float]:
    """``{lag: pearson(video[t + lag], truth[t])}`` for lags in ±``max_lag``, over the overlapping frames."""
    video, truth = np.asarray(video, np.float64), np.asarray(truth, np.float64)
    out = {}
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            out[lag] = pearson(video[lag:], truth[: len(truth) - lag])
        else:
            out[lag] = pearson(video[:lag], truth[-lag:])
    return out


def best_lag(video, truth, max_lag: int = MAX_LAG) -> int | None:
    """The audio-video offset: the lag (frames, within ±``max_lag``) of the cross-correlation's peak; > 0
    when the video follows the truth late. None when no lag gives a correlation."""
    scores = {k: v for k, v in lagged_correlations(video, truth, max_lag).items() if np.isfinite(v)}
    return max(scores, key=scores.get) if scores else None


def measured_opening(frames: np.ndarray, landmarker: FaceLandmarker) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 -> ``(F,)`` mouth opening found by mediapipe on each frame upscaled to 256 px
    (bicubic); NaN where no face is found."""
    out = np.full(len(frames), np.nan)
    for i, frame in enumerate(frames):
        big = np.asarray(PIL.Image.fromarray(frame).resize((DETECT_SIZE, DETECT_SIZE), PIL.Image.BICUBIC))
        with contextlib.suppress(NoFaceError):  # no face: the frame stays NaN
            out[i] = mouth_opening(landmarker.detect(big).pixels[None])[0]
    return out


# --- the cases ----------------------------------------------------------------------------------------------
def make_case(index: int, seed: int, size: int, fps: float, max_seconds: float | None):
    """(clip, reference image (H, W, 3) uint8) of held-out case ``index``."""
    identities = toy.identity_split("test")
    identity = toy.identity_from_seed(identities[(seed + index) % len(identities)])
    speech = toy.sample_speech(seed * 1000 + index, "heldout")
    if max_seconds is not None:  # the first seconds of the utterance (the phoneme timeline beyond is unused)
        speech = dataclasses.replace(speech, audio=speech.audio[: int(max_seconds * speech.sample_rate)])
    clip = toy.make_talking_clip(identity, speech, fps, size=size, seed=seed + index)
    reference, _ = render(identity, clip.poses[0], Expression(), size=size, seed=seed + 10_000 + index)
    return clip, reference


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Another clip's audio to ``length`` samples: cut when longer, stretched (linear interpolation in time)
    when shorter."""
    if len(audio) >= length:
        return audio[:length].copy()
    t = np.linspace(0, len(audio) - 1, length)
    return np.interp(t, np.arange(len(audio)), audio).astype(np.float32)


def detect_reference(reference: np.ndarray) -> np.ndarray:
    """The reference's landmarks as Audio2Video finds them (mediapipe), on the image upscaled to 256 px and
    scaled back, as the measurement sees the frames."""
    size = reference.shape[0]
    big = np.asarray(PIL.Image.fromarray(reference).resize((DETECT_SIZE, DETECT_SIZE), PIL.Image.BICUBIC))
    return a2v.reference_face(big, size=(size, size)).xyz


def evaluate(args, pipe, mesh_model, log=print) -> dict:
    """Every case's four videos measured; returns the record (rows and per-case values)."""
    size = pipe.denoising_unet.unet_kwargs.get("sample_size", 64) * pipe.vae_scale_factor
    cases = [make_case(k, args.case_seed, size, args.fps, args.max_seconds) for k in range(args.cases)]
    per_case = {row: [] for row in ROWS}
    with FaceLandmarker(video=False) as landmarker:
        for k, (clip, reference) in enumerate(cases):
            log(f"case {k + 1}/{len(cases)}: {clip.num_frames} frames, {clip.speech.text!r}")
            truth = mouth_opening(clip.landmarks_3d)  # (F,)
            partner = cases[(k + 1) % len(cases)][0]
            common = dict(
                num_inference_steps=args.steps,
                guidance_scale=args.cfg,
                context_frames=args.context_frames,
                context_overlap=args.context_overlap,
                fps=args.fps,
            )

            def generate(audio, reference=reference, common=common, **kw):
                return a2v.audio_to_video(
                    pipe,
                    mesh_model,
                    reference,
                    audio,
                    generator=torch.Generator().manual_seed(args.seed),
                    **common,
                    **kw,
                ).frames

            ref_xyz = detect_reference(reference)
            videos = {
                "ground truth": clip.frames,
                "ceiling": generate(clip.audio, landmarks=clip.landmarks, size=(size, size)),
                "audio2video": generate(clip.audio, reference_xyz=ref_xyz, size=(size, size)),
                "shuffled audio": generate(
                    fit_length(partner.audio, len(clip.audio)), reference_xyz=ref_xyz, size=(size, size)
                ),
            }
            for row, frames in videos.items():
                opening = measured_opening(frames, landmarker)
                per_case[row].append(
                    dict(
                        r=pearson(opening, truth),
                        lag=best_lag(opening, truth),
                        detect=float(np.isfinite(opening).mean()),
                        opening=opening.tolist(),
                        truth=truth.tolist(),
                    )
                )
    rows = {}
    for row, values in per_case.items():
        lags = [v["lag"] for v in values if v["lag"] is not None]
        rs = [v["r"] for v in values]
        rows[row] = dict(
            r=float(np.nanmean(rs)) if np.isfinite(rs).any() else float("nan"),
            pooled_r=pearson(
                np.concatenate([v["opening"] for v in values]), np.concatenate([v["truth"] for v in values])
            ),
            lag=float(np.median(lags)) if lags else float("nan"),
            detect=float(np.mean([v["detect"] for v in values])),
        )
    return dict(rows=rows, cases=per_case)


def table(rows: dict) -> str:
    lines = [f"{'':16s} {'r':>7s} {'pooled_r':>9s} {'lag':>5s} {'detect':>7s}"]
    for name, v in rows.items():
        lines.append(f"{name:16s} {v['r']:7.3f} {v['pooled_r']:9.3f} {v['lag']:5.1f} {v['detect']:7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio2mesh", required=True, help="an Audio2Mesh folder (Audio2Mesh.save_pretrained)")
    p.add_argument("--weights", default=str(TOY_ANIMATOR_DIR), help="the toy animator's folder")
    p.add_argument("--cases", type=int, default=4, help="held-out clips (at least 2: the shuffled baseline)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1, the toy animator's)")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=42, help="the generator's seed")
    p.add_argument(
        "--case-seed", type=int, default=EVAL_SEED, help="which held-out cases (another: validation)"
    )
    p.add_argument("--max-seconds", type=float, help="use only the first seconds of each utterance")
    p.add_argument("--context-frames", type=int, default=16)
    p.add_argument("--context-overlap", type=int, default=4)
    p.add_argument("--json", type=Path, help="also write the table to this JSON file")
    args = p.parse_args(argv)
    try:
        if args.cases < 2:
            raise InputError("--cases must be at least 2 (the shuffled-audio baseline needs another clip)")
        if args.steps < 1 or not args.fps > 0 or (args.max_seconds is not None and not args.max_seconds > 0):
            raise InputError("--steps must be ≥ 1, --fps and --max-seconds positive")
        folder = Path(args.audio2mesh)
        if not (folder / "config.json").is_file():
            raise InputError(
                f"--audio2mesh {folder} holds no config.json: give a folder Audio2Mesh.save_pretrained wrote "
                "(scripts/train_audio2mesh.py --out DIR)"
            )
        if args.json is not None:
            check_output_file(args.json, (".json",), what="--json file")
    except (InputError, OutputError) as err:
        print(f"eval_lipsync: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    pipe = load_animator(args.weights)
    mesh_model = Audio2Mesh.from_pretrained(folder).eval()
    record = evaluate(args, pipe, mesh_model, log=lambda m: print(m, file=sys.stderr))
    print(table(record["rows"]))
    if args.json is not None:
        record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_result(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
