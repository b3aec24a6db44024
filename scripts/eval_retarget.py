"""Measure Video2Video retargeting (anim_lab.retarget) on the toy world, where the answer is known.

1. Head pose: the similarity fit's yaw/pitch/roll against the renderer's true pose, on random poses of
   held-out identities (yaw ±30°, pitch ±15°, roll ±15°, random expressions): from the renderer's exact 3D
   landmarks and from mediapipe's detections of the renders. Target: mean error <= 3°.
2. Retargeting: held-out identity A driven by held-out identity B's clip, against the ground truth (A rendered
   in B's pose and expression, :class:`anim_lab.toy.ToyCase`), in pixels, mean over frames and the 478
   points; compared with the naive baseline (B's landmarks as they are). Target: retarget <= half the naive
   error. Two framings: the reference stands where B's first frame stands ("same": the naive baseline is off
   only by face shape and expression) or somewhere else ("own"). Ablations on exact landmarks: AniPortrait's
   63° perspective camera, translation transferred at the template origin instead of the head pivot, no
   smoothing.
3. Animation (``--animate``): the toy animator (:func:`anim_lab.toy.load_animator`) animates A's
   reference image from three pose sources: B's raw landmarks (the naive baseline), the retargeted landmarks,
   and, as a ceiling, the ground-truth landmarks of A in B's pose and expression. The frames are compared with
   the ground-truth renders (PSNR and SSIM as ``scripts/eval_animator.py`` computes them; mediapipe on the
   generated frames against the true landmarks), with the same noise for all three sources, on held-out
   pairs at 128 px in both framings; the baseline of showing the reference image in every frame is a row too.

Deterministic (fixed seeds). Run:

    PYTHONPATH=$PWD .venv/bin/python scripts/eval_retarget.py --json results.json   # ~3 minutes on 2 cores
    PYTHONPATH=$PWD .venv/bin/python scripts/eval_retarget.py --animate-only        # ~1-2 minutes, one core
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import numpy as np
import torch

from anim_lab import landmarks as L
from anim_lab import metrics as M
from anim_lab import retarget as R
from anim_lab import toy
from anim_lab.files import check_output_file, write_result

ANIMATE_SOURCES = ("raw B landmarks", "retargeted", "true landmarks")  # where the pose images come from
ANIMATE_METRICS = ("psnr", "ssim", "pose_px", "detect", "face_px")


def random_expression(rng: np.random.Generator) -> toy.Expression:
    blink = float(rng.uniform(0, 1)) if rng.uniform() < 0.25 else 0.0
    return toy.Expression(mouth_open=float(rng.uniform(0, 1)), blink=blink, smile=float(rng.uniform(0, 1)))


def pose_errors(num: int, size: int, seed: int) -> dict:
    """Absolute yaw/pitch/roll errors (degrees) of the fit on exact landmarks and on mediapipe detections."""
    rng = np.random.default_rng([seed, 1])
    identities = toy.identity_split("test")
    exact, detected, missed, truths, estimates = [], [], 0, [], []
    with L.FaceLandmarker(video=False) as lm:
        for i in range(num):
            identity = toy.identity_from_seed(identities[i % len(identities)])
            pose = toy.HeadPose(
                yaw=float(rng.uniform(-30, 30)),
                pitch=float(rng.uniform(-15, 15)),
                roll=float(rng.uniform(-15, 15)),
                tx=float(rng.uniform(-0.04, 0.04)),
                ty=float(rng.uniform(-0.03, 0.03)),
                scale=float(rng.uniform(0.9, 1.1)),
            )
            expression = random_expression(rng)
            truth = np.array([pose.yaw, pose.pitch, pose.roll])
            xyz = toy.toy_landmarks_3d(identity, pose, expression, size)
            exact.append(np.abs(R.fit_head_pose(xyz).euler - truth))
            image, _ = toy.render(identity, pose, expression, size, seed=i)
            try:
                face = lm.detect(image)
            except L.NoFaceError:
                missed += 1
                continue
            estimate = R.fit_head_pose(face.xyz).euler
            detected.append(np.abs(estimate - truth))
            truths.append(truth)
            estimates.append(estimate)
    exact, detected = np.array(exact), np.array(detected)  # (N, 3)
    summary = lambda e: {  # noqa: E731
        "mean_yaw_pitch_roll": [round(float(v), 3) for v in e.mean(0)],
        "mean": round(float(e.mean()), 3),
        "p95": round(float(np.percentile(e, 95)), 3),
        "max": round(float(e.max()), 3),
    }
    truths, estimates = np.array(truths), np.array(estimates)  # (N, 3)
    # a slope below 1: the angles that mediapipe's points give are too small (least-squares line through 0)
    slopes = (truths * estimates).sum(0) / (truths**2).sum(0)  # (3,)
    return {
        "num": num,
        "exact": summary(exact),
        "mediapipe": summary(detected),
        "mediapipe_signed_mean_error": [round(float(v), 3) for v in (estimates - truths).mean(0)],
        "mediapipe_slope_yaw_pitch_roll": [round(float(v), 3) for v in slopes],
        "mediapipe_missed": missed,
    }


def mean_px(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b, axis=-1).mean())


def budget_variants(case: toy.ToyCase) -> dict[str, toy.ToyCase]:
    """The case with one cause of retargeting error removed: both faces with the template's proportions;
    no smile anywhere (the neutral measure ignores smiles, so the driver's resting smile is never removed);
    the reference turned like the driver's first frame (so the pivot's offset cancels)."""
    plain = lambda identity: dataclasses.replace(identity, face_width=1.0, face_height=1.0)  # noqa: E731
    first = case.poses[0]
    turned = dataclasses.replace(case.reference_pose, yaw=first.yaw, pitch=first.pitch, roll=first.roll)
    return {
        "template_proportions": dataclasses.replace(
            case, reference=plain(case.reference), driver=plain(case.driver)
        ),
        "no_smile": dataclasses.replace(
            case, expressions=[dataclasses.replace(e, smile=0.0) for e in case.expressions]
        ),
        "reference_turned_like_first_frame": dataclasses.replace(case, reference_pose=turned),
    }


def retarget_errors(pairs: int, frames: int, size: int, seed: int, framing: str, mediapipe: bool) -> dict:
    identities = toy.identity_split("test")
    rows: dict[str, list[float]] = {}
    ablations = {
        "retarget": {},
        "perspective_63": {"camera": "perspective"},
        "pivot_at_origin": {"pivot": (0.0, 0.0, 0.0)},
        "no_smoothing": {"smooth": 1},
    }
    for k in range(pairs):
        case = toy.toy_case(
            identities[200 + 2 * k], identities[201 + 2 * k], seed=seed + k, num_frames=frames, size=size,
            framing=framing,
        )  # fmt: skip
        target = case.target_landmarks()  # (F, 478, 2)
        ref_xyz, drv_xyz = case.reference_xyz(), case.driving_xyz()
        for name, kwargs in ablations.items():
            result = R.retarget(ref_xyz, drv_xyz, size, **kwargs)
            rows.setdefault(name, []).append(mean_px(result.landmarks, target))
        rows.setdefault("naive", []).append(mean_px(case.naive_landmarks(), target))
        # error budget: the same case with one source of error removed at a time
        for name, variant in budget_variants(case).items():
            result = R.retarget(variant.reference_xyz(), variant.driving_xyz(), size)
            rows.setdefault(f"budget_{name}", []).append(
                mean_px(result.landmarks, variant.target_landmarks())
            )
        if mediapipe:
            ref_det = R.reference_landmarks(case.reference_image(seed=k))
            drv_det = L.track_landmarks(case.driving_frames(seed=k), xyz=True, progress=False)
            result = R.retarget(ref_det, drv_det, size)
            rows.setdefault("mediapipe_retarget", []).append(mean_px(result.landmarks, target))
            rows.setdefault("mediapipe_naive", []).append(mean_px(drv_det[:, :, :2], target))
            # how close mediapipe itself gets to the ground truth on the ground-truth renders (a floor)
            truth_det = L.track_landmarks(case.target_frames(seed=k), xyz=True, progress=False)
            rows.setdefault("mediapipe_on_truth", []).append(mean_px(truth_det[:, :, :2], target))
    return {name: round(float(np.mean(v)), 3) for name, v in rows.items()}


# --- 3. animation: the pose sources through the toy animator ----------------------------------------------
@dataclasses.dataclass
class AnimatedCase:
    """One (A, B) pair through the toy animator.

    Attributes:
        case: the :class:`anim_lab.toy.ToyCase`.
        reference: ``(H, W, 3)`` uint8, A's reference image; truth: ``(F, H, W, 3)`` uint8, A rendered in B's
            pose and expression.
        landmarks / poses / videos: per source (:data:`ANIMATE_SOURCES`): ``(F, 478, 2)`` pixels, the
            ``(F, H, W, 3)`` uint8 pose images drawn from them, the ``(F, H, W, 3)`` uint8 generated frames.
        psnr / ssim: per source, ``(F,)`` each generated frame against its ground-truth render.
        face_px: per source, ``(F,)`` the mean distance (pixels) of mediapipe's 478 landmarks on each
            generated frame to the ground truth's landmarks, NaN where it finds no face (empty without
            ``detect``).
    """

    case: toy.ToyCase
    reference: np.ndarray
    truth: np.ndarray
    landmarks: dict[str, np.ndarray]
    poses: dict[str, np.ndarray]
    videos: dict[str, np.ndarray]
    psnr: dict[str, np.ndarray]
    ssim: dict[str, np.ndarray]
    face_px: dict[str, np.ndarray]


def frame_psnr(video: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 pair -> (F,) dB (``anim_lab.metrics.psnr``)."""
    return M.psnr(M.video_from_uint8(video), M.video_from_uint8(truth)).numpy()


def frame_ssim(video: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 pair -> (F,) SSIM (``anim_lab.metrics.ssim``)."""
    return M.ssim(M.video_from_uint8(video), M.video_from_uint8(truth)).numpy()


def face_errors(video: np.ndarray, landmarks: np.ndarray, landmarker: L.FaceLandmarker) -> np.ndarray:
    """(F, H, W, 3) uint8 frames, (F, 478, 2) true landmarks -> (F,) mean distance in the frames' pixels of
    mediapipe's landmarks on each frame to the true ones (``anim_lab.landmarks.landmark_errors``: detected on
    the frame upscaled to 256 px, as eval_animator does); NaN where no face is found."""
    return L.landmark_errors(video, landmarks, landmarker=landmarker) * (video.shape[1] / 256)


def animate_poses(pipe, reference: np.ndarray, poses: np.ndarray, *, steps: int, cfg: float, seed: int):
    """The pose2video pipeline as ``scripts/eval_animator.py`` runs it (windows of 16, overlap 4), at the pose
    images' size: (H, W, 3) reference + (F, H, W, 3) pose images, uint8 -> (F, H, W, 3) uint8."""
    frames = pipe(
        reference,
        list(poses),
        height=poses.shape[1],
        width=poses.shape[2],
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        context_frames=16,
        context_overlap=4,
    ).frames[0]  # (F, H, W, 3) in [0, 1]
    return (frames * 255).round().astype(np.uint8)


def animate_pair(
    pipe,
    case: toy.ToyCase,
    *,
    steps: int = 10,
    cfg: float = 3.5,
    noise_seed: int = 42,
    landmarker: L.FaceLandmarker | None = None,
) -> AnimatedCase:
    """Animate A's reference with each pose source (:data:`ANIMATE_SOURCES`) and score the frames:

    - ``"raw B landmarks"``: B's landmarks as they are (the driving renders' own points);
    - ``"retargeted"``: :func:`anim_lab.retarget.retarget` of A's reference onto B's clip (exact 3D points);
    - ``"true landmarks"``: the ground truth's landmarks, A in B's pose and expression (a ceiling).

    All three get the same initial noise (``noise_seed``), so only the pose images differ. With a
    ``landmarker``, mediapipe also looks at the generated frames (:func:`face_errors`).
    """
    size = case.size
    reference, truth = case.reference_image(), case.target_frames()  # (H, W, 3), (F, H, W, 3)
    target = case.target_landmarks()  # (F, 478, 2)
    retargeted = R.retarget(case.reference_xyz(), case.driving_xyz(), size)
    sources = (case.naive_landmarks(), retargeted.landmarks, target)  # 3 x (F, 478, 2)
    landmarks = dict(zip(ANIMATE_SOURCES, sources, strict=True))
    poses = {name: R.pose_images(points, size) for name, points in landmarks.items()}
    videos = {
        name: animate_poses(pipe, reference, p, steps=steps, cfg=cfg, seed=noise_seed)
        for name, p in poses.items()
    }
    face_px = {}
    if landmarker is not None:
        face_px = {name: face_errors(v, target, landmarker) for name, v in videos.items()}
    return AnimatedCase(
        case=case,
        reference=reference,
        truth=truth,
        landmarks=landmarks,
        poses=poses,
        videos=videos,
        psnr={name: frame_psnr(v, truth) for name, v in videos.items()},
        ssim={name: frame_ssim(v, truth) for name, v in videos.items()},
        face_px=face_px,
    )


def animate_cases(
    pipe,
    pairs: int = 4,
    frames: int = 16,
    *,
    size: int = 128,
    seed: int = 0,
    framing: str = "same",
    steps: int = 10,
    cfg: float = 3.5,
    noise_seed: int = 42,
    first_pair: int = 200,
    detect: bool = True,
) -> list[AnimatedCase]:
    """:func:`animate_pair` on held-out pairs: pair ``k`` is A = ``identity_split("test")[first_pair + 2k]``
    driven by B = the next identity, B's motion from seed ``seed + k`` (:func:`anim_lab.toy.toy_case`,
    ``framing`` as there), at ``size`` pixels (the toy animator's 128), noise ``noise_seed + k``.
    ``detect``: also run mediapipe on the generated frames."""
    identities = toy.identity_split("test")
    out = []
    with contextlib.ExitStack() as stack:
        landmarker = stack.enter_context(L.FaceLandmarker(video=False)) if detect else None
        for k in range(pairs):
            a, b = identities[first_pair + 2 * k], identities[first_pair + 2 * k + 1]
            case = toy.toy_case(a, b, seed=seed + k, num_frames=frames, size=size, framing=framing)
            out.append(
                animate_pair(
                    pipe, case, steps=steps, cfg=cfg, noise_seed=noise_seed + k, landmarker=landmarker
                )
            )
    return out


def animate_table(cases: list[AnimatedCase]) -> dict[str, dict[str, float | None]]:
    """Per source, and for the baseline ``"copy reference"`` (the reference image in every frame): mean PSNR
    (dB) and SSIM over frames and cases; ``pose_px``, the pose images' landmark error (mean px against the
    ground truth's landmarks); with detection, ``detect`` (share of generated frames where mediapipe finds a
    face) and ``face_px`` (mean :func:`face_errors` over those). None where a value does not apply."""
    rows: dict[str, dict[str, list[float]]] = {}
    for c in cases:
        target = c.case.target_landmarks()  # (F, 478, 2)
        still = np.repeat(c.reference[None], len(c.truth), axis=0)  # (F, H, W, 3) the reference, every frame
        scores = {"copy reference": {"psnr": frame_psnr(still, c.truth), "ssim": frame_ssim(still, c.truth)}}
        for name in ANIMATE_SOURCES:
            scores[name] = {
                "psnr": c.psnr[name],
                "ssim": c.ssim[name],
                "pose_px": mean_px(c.landmarks[name], target),
            }
            if c.face_px:
                found = c.face_px[name][np.isfinite(c.face_px[name])]
                scores[name]["detect"] = len(found) / len(c.face_px[name])
                if len(found):
                    scores[name]["face_px"] = found.mean()
        for name, values in scores.items():
            row = rows.setdefault(name, {m: [] for m in ANIMATE_METRICS})
            for metric, value in values.items():
                row[metric].append(float(np.mean(value)))
    return {name: {m: float(np.mean(v)) if v else None for m, v in row.items()} for name, row in rows.items()}


def format_animate_table(table: dict[str, dict[str, float | None]]) -> str:
    head = f"{'pose source':<18}" + "".join(f"{m:>10}" for m in ANIMATE_METRICS)
    lines = [head, "-" * len(head)]
    for name, r in table.items():
        cells = ["-" if r[m] is None else f"{r[m]:.3f}" for m in ANIMATE_METRICS]
        lines.append(f"{name:<18}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def animate_results(weights, pairs: int, frames: int, steps: int, seed: int) -> dict:
    """The animation experiment in both framings, each table printed as it comes: {"motion_modules": bool,
    "same": table, "own": table}."""
    from anim_lab.toy import TOY_ANIMATOR_DIR, load_animator

    torch.set_num_threads(1)
    pipe = load_animator(weights or TOY_ANIMATOR_DIR)
    pipe.set_progress_bar_config(disable=True)
    motion = bool(pipe.denoising_unet.motion_kwargs)
    print(
        f"toy animator ({'with' if motion else 'without'} motion modules): {pairs} held-out pairs x {frames} "
        f"frames at 128 px, {steps} steps, cfg 3.5; psnr, ssim against the ground-truth renders"
    )
    results = {"motion_modules": motion}
    for framing in ("same", "own"):
        table = animate_table(animate_cases(pipe, pairs, frames, seed=seed, framing=framing, steps=steps))
        print(f"\n{framing} framing:\n{format_animate_table(table)}")
        results[framing] = table
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="render size in pixels")
    parser.add_argument("--poses", type=int, default=150, help="random poses for the head-pose error")
    parser.add_argument("--pairs", type=int, default=12, help="(A, B) identity pairs for the retarget error")
    parser.add_argument("--frames", type=int, default=32, help="frames per driving clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--animate", action="store_true", help="also animate the poses with the toy animator")
    parser.add_argument("--animate-only", action="store_true", help="only the toy animator experiment")
    parser.add_argument("--weights", help="the toy animator's folder (default: the committed one)")
    parser.add_argument("--animate-pairs", type=int, default=4, help="(A, B) pairs animated per framing")
    parser.add_argument("--animate-frames", type=int, default=16, help="frames per animated clip")
    parser.add_argument("--steps", type=int, default=10, help="the toy animator's denoising steps")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, (".json",), what="--json file")  # before minutes of work

    animate = lambda: animate_results(  # noqa: E731
        args.weights, args.animate_pairs, args.animate_frames, args.steps, args.seed
    )
    if args.animate_only:
        results = {"animate": animate()}
        _write_json(results, args.json)
        return results

    results = {"size": args.size, "pose": pose_errors(args.poses, args.size, args.seed)}
    for framing in ("same", "own"):
        results[f"retarget_{framing}_framing"] = retarget_errors(
            args.pairs, args.frames, args.size, args.seed, framing, mediapipe=True
        )
    print(json.dumps(results, indent=2))

    pose = results["pose"]
    print("\ntargets:")
    for source in ("exact", "mediapipe"):
        mean = pose[source]["mean"]
        print(f"  mean pose error ({source} landmarks) {mean:.2f} deg <= 3: {mean <= 3}")
    for framing in ("same", "own"):
        r = results[f"retarget_{framing}_framing"]
        ratio = r["retarget"] / r["naive"]
        print(f"  retarget / naive ({framing} framing, exact) {ratio:.2f} <= 0.5: {ratio <= 0.5}")
    for framing in ("same", "own"):
        r = results[f"retarget_{framing}_framing"]
        ratio = r["mediapipe_retarget"] / r["mediapipe_naive"]
        print(f"  retarget / naive ({framing} framing, mediapipe) {ratio:.2f} <= 0.5: {ratio <= 0.5}")
    if args.animate:
        print()
        results["animate"] = animate()
    _write_json(results, args.json)
    return results


def _write_json(results: dict, path: str | None) -> None:
    if path:
        write_result(path, {"command": " ".join(["scripts/eval_retarget.py", *sys.argv[1:]]), **results})


if __name__ == "__main__":
    main()
