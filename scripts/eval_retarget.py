"""Measure Video2Video retargeting (anim_lab.retarget) on the toy world, where the answer is known.

1. Head pose: the similarity fit's yaw/pitch/roll against the renderer's true pose, on random poses of
   held-out identities (yaw ±30°, pitch ±15°, roll ±15°, random expressions): from the renderer's exact 3D
   landmarks and from mediapipe's detections of the renders. Target: mean error <= 3°.
2. Retargeting: held-out identity A driven by held-out identity B's clip, against the ground truth (A rendered
   in B's pose and expression, :class:`anim_lab.retarget.ToyCase`), in pixels, mean over frames and the 478
   points; compared with the naive baseline (B's landmarks as they are). Target: retarget <= half the naive
   error. Two framings: the reference stands where B's first frame stands ("same": the naive baseline is off
   only by face shape and expression) or somewhere else ("own"). Ablations on exact landmarks: AniPortrait's
   63° perspective camera, translation transferred at the template origin instead of the head pivot, no
   smoothing.

Deterministic (fixed seeds). Run:

    PYTHONPATH=$PWD .venv/bin/python scripts/eval_retarget.py --json results.json   # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from anim_lab import landmarks as L
from anim_lab import retarget as R
from anim_lab import toy


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
            xyz = R.toy_landmarks_3d(identity, pose, expression, size)
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


def budget_variants(case: R.ToyCase) -> dict[str, R.ToyCase]:
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
        case = R.toy_case(
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
            drv_det = R.track_landmarks_3d(case.driving_frames(seed=k))
            result = R.retarget(ref_det, drv_det, size)
            rows.setdefault("mediapipe_retarget", []).append(mean_px(result.landmarks, target))
            rows.setdefault("mediapipe_naive", []).append(mean_px(drv_det[:, :, :2], target))
            # how close mediapipe itself gets to the ground truth on the ground-truth renders (a floor)
            truth_det = R.track_landmarks_3d(case.target_frames(seed=k))
            rows.setdefault("mediapipe_on_truth", []).append(mean_px(truth_det[:, :, :2], target))
    return {name: round(float(np.mean(v)), 3) for name, v in rows.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="render size in pixels")
    parser.add_argument("--poses", type=int, default=150, help="random poses for the head-pose error")
    parser.add_argument("--pairs", type=int, default=12, help="(A, B) identity pairs for the retarget error")
    parser.add_argument("--frames", type=int, default=32, help="frames per driving clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
