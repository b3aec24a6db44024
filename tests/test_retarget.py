"""Video2Video retargeting (anim_lab.retarget), the ``anim-lab video2video`` command, and
scripts/eval_retarget.py's animation experiment on a tiny random animator."""

import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import skimage.data
import torch
from helpers import tone
from scipy.spatial.transform import Rotation
from skimage.metrics import structural_similarity

import anim_lab
from anim_lab import landmarks as L
from anim_lab import retarget as R
from anim_lab import toy
from anim_lab import video as V
from anim_lab.cli import main

HELD_OUT = toy.identity_split("test")
ROOT = Path(__file__).resolve().parents[1]


def _random_rotation(rng):
    q = rng.normal(size=4)
    return Rotation.from_quat(q / np.linalg.norm(q)).as_matrix()


# --- ground truth from the toy world ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pose, expression",
    [
        (toy.HeadPose(), toy.Expression()),
        (
            toy.HeadPose(yaw=25, pitch=-12, roll=9, tx=0.05, ty=-0.03, scale=1.1),
            toy.Expression(0.7, 0.5, 0.4),
        ),
    ],
)
def test_toy_landmarks_3d_are_the_rendered_landmarks(pose, expression):
    identity = toy.identity_from_seed(HELD_OUT[0])
    _, rendered = toy.render(identity, pose, expression, size=96, supersample=1)
    xyz = toy.toy_landmarks_3d(identity, pose, expression, size=96)
    assert xyz.shape == (478, 3)
    np.testing.assert_allclose(xyz[:, :2], rendered, atol=1e-4)
    assert xyz[L.NOSE_TIP, 2] < np.median(xyz[:468, 2])  # mediapipe's sign: the nose is the closest point


# --- head pose ----------------------------------------------------------------------------------------------


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(50, 3))
    rot, scale, trans = _random_rotation(rng), 2.7, np.array([3.0, -1.0, 0.5])
    dst = scale * src @ rot.T + trans  # an independent forward map
    s, r, t = R.umeyama(src, dst)
    assert s == pytest.approx(scale, rel=1e-9)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, trans, atol=1e-9)
    # a mirrored target still gets a rotation (det +1), never a reflection
    _, r_mirror, _ = R.umeyama(src, dst * np.array([-1.0, 1.0, 1.0]))
    assert np.linalg.det(r_mirror) == pytest.approx(1.0)


def test_to_fit_frame_divides_out_the_faces_own_similarity():
    """A face that is the template scaled, turned and moved (with offsets moving in its own frame) comes back
    as the template, its offsets turned back and shrunk by the same similarity, written out here."""
    rng = np.random.default_rng(3)
    template = R.template_landmarks()
    rot, scale, trans = _random_rotation(rng), 1.07, np.array([0.1, -0.2, 0.05])
    neutral = scale * template @ rot.T + trans  # (478, 3) the face in its own frame
    offsets = rng.normal(scale=0.01, size=(4, 478, 3))  # (F, 478, 3)
    canonical, moved = R.to_fit_frame(neutral, offsets)
    np.testing.assert_allclose(canonical, template, atol=1e-9)
    np.testing.assert_allclose(moved, np.einsum("ij,fvi->fvj", rot, offsets) / scale, atol=1e-12)


def test_euler_angles_invert_the_renderers_rotation():
    rng = np.random.default_rng(1)
    for _ in range(20):
        yaw, pitch, roll = rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(-40, 40)
        rot = toy.rotation_matrix(yaw, pitch, roll)
        np.testing.assert_allclose(R.euler_from_rotation(rot), [yaw, pitch, roll], atol=1e-9)
        # the same convention written with scipy: intrinsic z, then x, then y (R = Rz·Rx·Ry)
        r, p, y = Rotation.from_matrix(rot).as_euler("ZXY", degrees=True)
        np.testing.assert_allclose([y, p, r], [yaw, pitch, roll], atol=1e-9)


@pytest.mark.parametrize("yaw, pitch, roll", [(0, 0, 0), (30, 10, -12), (-28, -14, 15)])
def test_fit_of_the_template_face_is_exact(yaw, pitch, roll):
    pose = toy.HeadPose(yaw=yaw, pitch=pitch, roll=roll, tx=0.03, ty=-0.02, scale=0.95)
    xyz = toy.toy_landmarks_3d(toy.Identity(), pose, toy.Expression(), size=128)
    fit = R.fit_head_pose(xyz)
    np.testing.assert_allclose(fit.euler, [yaw, pitch, roll], atol=1e-3)
    assert fit.scale == pytest.approx(0.2 * 128 * 0.95, rel=1e-5)  # FACE_FRACTION · size · scale
    assert fit.rms < 1e-3
    # canonical space gives the template back, and point() undoes to_canonical()
    np.testing.assert_allclose(fit.to_canonical(xyz), R.template_landmarks(), atol=1e-4)
    np.testing.assert_allclose(fit.point(fit.to_canonical(xyz)) * [1, -1, -1], xyz, atol=1e-3)


def test_fit_on_held_out_toy_faces_is_within_a_degree():
    rng = np.random.default_rng(2)
    errors = []
    for seed in HELD_OUT[:20]:
        pose = toy.HeadPose(yaw=rng.uniform(-30, 30), pitch=rng.uniform(-15, 15), roll=rng.uniform(-15, 15))
        expression = toy.Expression(mouth_open=rng.uniform(0, 1), smile=rng.uniform(0, 1))
        xyz = toy.toy_landmarks_3d(toy.identity_from_seed(seed), pose, expression, size=128)
        errors.append(np.abs(R.fit_head_pose(xyz).euler - [pose.yaw, pose.pitch, pose.roll]))
    assert np.mean(errors) < 0.5 and np.max(errors) < 2.0


def test_bad_landmarks_give_clear_errors():
    xyz = toy.toy_landmarks_3d(toy.Identity(), toy.HeadPose(), toy.Expression(), size=128)
    nan = xyz.copy()
    nan[5, 1] = np.nan
    with pytest.raises(ValueError, match="contain NaN or inf"):
        R.fit_head_pose(nan)
    with pytest.raises(ValueError, match=r"must be \(478, 3\) or \(468, 3\)"):
        R.fit_head_pose(xyz[:, :2])
    line = np.zeros((478, 3))
    line[:, 0] = np.arange(478)  # collinear points
    with pytest.raises(ValueError, match="degenerate fit: the target points are collinear"):
        R.fit_head_pose(line)
    with pytest.raises(ValueError, match="degenerate fit"):
        R.fit_head_pose(np.ones((478, 3)))
    with pytest.raises(ValueError, match="contain NaN or inf"):
        R.retarget(xyz, np.stack([xyz, nan]), 128)
    with pytest.raises(ValueError, match="driving landmarks must be"):
        R.retarget(xyz, xyz, 128)


# --- neutral frame, smoothing, projection -------------------------------------------------------------------


def test_expression_measure_and_neutral_frame():
    identity = toy.identity_from_seed(HELD_OUT[3])
    pose = toy.HeadPose(yaw=15, pitch=5)
    expressions = [
        toy.Expression(mouth_open=0.6),
        toy.Expression(blink=1.0),
        toy.Expression(smile=0.5),  # the measure ignores the smile: this is the neutral frame
        toy.Expression(mouth_open=0.2, blink=0.3),
    ]
    canonical = []
    for e in expressions:
        xyz = toy.toy_landmarks_3d(identity, pose, e, size=128)
        canonical.append(R.fit_head_pose(xyz).to_canonical(xyz))
    measure = R.expression_measure(np.stack(canonical))
    assert R.expression_measure(R.template_landmarks()) == pytest.approx(0.0, abs=1e-6)
    assert measure[0] > 0.2 and measure[1] > 0.8 and measure[2] < 0.02 and measure[3] > 0.05
    assert R.neutral_frame(np.stack(canonical)) == 2


def test_smooth_track_is_a_centred_mean_with_shrinking_ends():
    x = np.random.default_rng(3).normal(size=(7, 4))
    want = np.stack([x[max(0, i - 1) : i + 2].mean(0) for i in range(7)])  # plain loop, window 3
    np.testing.assert_allclose(R.smooth_track(x, 3), want)
    interior = (x[:-2] + x[1:-1] + x[2:]) / 3  # the same, written as a sum of shifts
    np.testing.assert_allclose(R.smooth_track(x, 3)[1:-1], interior)
    np.testing.assert_array_equal(R.smooth_track(x, 1), x)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        R.smooth_track(x, 0)


def test_perspective_projection_by_hand():
    height, width, fov = 200, 300, 63.0
    points = np.array([[150.0, -100.0, 10.0], [180.0, -60.0, 30.0], [100.0, -150.0, -40.0]])  # face frame
    f = 100 / np.tan(np.deg2rad(31.5))  # (H/2) / tan(fov/2)
    centre = np.array([149.5, 99.5])
    depth = points[:, 2] - points[:, 2].mean()  # toward the camera from the mean depth
    want = centre + (points[:, :2] * [1, -1] - centre) * (f / (f - depth))[:, None]
    np.testing.assert_allclose(R.project(points, height, width, "perspective", fov), want)
    np.testing.assert_allclose(R.project(points, height, width), points[:, :2] * [1, -1])
    with pytest.raises(ValueError, match='camera must be "orthographic" or "perspective"'):
        R.project(points, height, width, "fisheye")
    with pytest.raises(ValueError, match="fov must be in"):
        R.project(points, height, width, "perspective", 180)


# --- retargeting --------------------------------------------------------------------------------------------


def test_retargeting_a_clip_onto_its_first_frame_gives_the_clip_back():
    case = toy.toy_case(HELD_OUT[10], HELD_OUT[11], seed=4, num_frames=8, size=128)
    drv = case.driving_xyz()
    out = R.retarget(drv[0], drv, 128, smooth=1, neutral=0)
    np.testing.assert_allclose(out.landmarks, drv[:, :, :2], atol=1e-3)
    np.testing.assert_allclose(out.euler, out.driving_euler, atol=1e-9)


# "same": the reference stands where the driver's first frame stands, so the naive baseline is off only by
# face shape and expression (toy identities differ by at most ~8% in proportions); "own": it stands elsewhere.
@pytest.mark.parametrize("framing, ratio", [("same", 0.8), ("own", 0.2)])
def test_retargeting_beats_the_naive_baseline_against_ground_truth(framing, ratio):
    retargeted, naive = [], []
    for k in range(3):
        case = toy.toy_case(
            HELD_OUT[20 + 2 * k], HELD_OUT[21 + 2 * k], seed=k, num_frames=16, framing=framing
        )
        target = case.target_landmarks()
        out = R.retarget(case.reference_xyz(), case.driving_xyz(), case.size)
        assert out.landmarks.shape == (16, 478, 2)
        retargeted.append(np.linalg.norm(out.landmarks - target, axis=-1).mean())
        naive.append(np.linalg.norm(case.naive_landmarks() - target, axis=-1).mean())
    assert np.mean(retargeted) < 1.5  # pixels at 256 px
    assert np.mean(retargeted) < ratio * np.mean(naive)


def test_pose_images_are_the_retargeted_landmarks_drawn():
    case = toy.toy_case(HELD_OUT[30], HELD_OUT[31], seed=5, num_frames=3, size=128)
    out = R.retarget(case.reference_xyz(), case.driving_xyz(), 128)
    images = R.pose_images(out.landmarks, 128)
    assert images.shape == (3, 128, 128, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[1], L.draw_pose_image(out.landmarks[1], 128, 128))


# --- detection, Video2Video poses, the command --------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_driving():
    """A 10-frame 256-px toy clip of a held-out identity (mediapipe finds these faces)."""
    return toy.make_clip(toy.identity_from_seed(HELD_OUT[40]), num_frames=10, size=256, seed=6).frames


def test_video_to_video_poses_on_a_real_reference(toy_driving):
    astronaut = skimage.data.astronaut()
    result = R.video_to_video_poses(astronaut, toy_driving)
    assert result.images.shape == (10, 512, 512, 3) and result.landmarks.shape == (10, 478, 2)
    assert result.fps is None
    # the face stays on the astronaut: its centre within 30% of her face height (~105 px) of hers (it moves:
    # the driver's head is pitched ~17° up from hers and the head turns about the neck, behind the face)
    own = L.detect_landmarks(astronaut).pixels
    assert np.linalg.norm(result.landmarks.mean(1) - own.mean(0), axis=-1).max() < 30
    # ... and takes the driver's head pose: fitting the retargeted 3D points gives the applied angles, which
    # are the driver's smoothed over 3 frames
    retarget = result.retarget
    for i in range(10):
        refit = R.fit_head_pose(retarget.landmarks_3d[i] * np.array([1, -1, -1]))  # face frame -> image space
        np.testing.assert_allclose(refit.euler, retarget.euler[i], atol=1.0)
    np.testing.assert_allclose(retarget.euler, R.smooth_track(retarget.driving_euler, 3))


def test_driving_frames_without_a_face_hold_or_fail(toy_driving):
    frames = list(toy_driving[:5])
    frames[2] = np.zeros_like(frames[2])
    track = lambda f, **kw: L.track_landmarks(f, xyz=True, progress=False, **kw)  # noqa: E731
    held = track(frames)
    assert held.shape == (5, 478, 3)
    np.testing.assert_array_equal(held[2], held[1])
    frames[0] = np.zeros_like(frames[0])
    held = track(frames)
    np.testing.assert_array_equal(held[0], held[1])  # before the first face: the first good landmarks
    # the 2D track is the same policy on the same detections: its points are the 3D ones' x, y (pixels)
    np.testing.assert_allclose(L.track_landmarks(frames, progress=False), held[..., :2], atol=1e-4)
    with pytest.raises(L.NoFaceError, match="frame 0"):
        track(frames, on_missing="error")
    with pytest.raises(L.NoFaceError, match="no face found in any of the 3 frames"):
        track([np.zeros((256, 256, 3), np.uint8)] * 3)
    with pytest.raises(ValueError, match="driving video has no frames"):
        R.video_to_video_poses(skimage.data.astronaut(), [])


def test_reference_without_a_face_fails_clearly(toy_driving):
    with pytest.raises(L.NoFaceError, match="no face found in the reference image"):
        R.video_to_video_poses(np.full((256, 256, 3), 128, np.uint8), toy_driving[:2])


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_driving):
    d = tmp_path_factory.mktemp("v2v")
    iio.imwrite(d / "ref.png", skimage.data.astronaut()[:384, 32:416])  # 384 x 384
    iio.imwrite(d / "blank.png", np.full((256, 256, 3), 90, np.uint8))
    wav = tone(d / "tone.wav", seconds=1.0)
    V.write_video(d / "driving.mp4", toy_driving, fps=20, audio_from=wav, quality=9)
    return d


def test_command_writes_the_pose_video_with_fps_and_audio(files, capsys):
    out = files / "out" / "poses.mp4"
    out.parent.mkdir()
    args = ["video2video", "--ref", str(files / "ref.png"), "--driving", str(files / "driving.mp4")]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    frames, fps = V.read_video(out)
    assert frames.shape == (10, 384, 384, 3) and fps == 20 and V.has_audio(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["poses.mp4"]  # no temporary files left
    # the frames are the poses video_to_video_poses computes from the same inputs
    want = R.video_to_video_poses(iio.imread(files / "ref.png"), files / "driving.mp4")
    assert want.fps == 20 and want.images.shape == (10, 384, 384, 3)
    assert np.abs(frames.astype(int) - want.images).mean() < 2.0
    gif = files / "out" / "poses.gif"
    assert main([*args, "--out", str(gif), "--no-progress", "--no-audio", "--camera", "perspective"]) == 0
    assert V.read_video(gif)[0].shape == (10, 384, 384, 3)


@pytest.mark.parametrize(
    "ref, driving, out, message",
    [
        ("blank.png", "driving.mp4", "o.mp4", "no face found in the reference image"),
        ("missing.png", "driving.mp4", "o.mp4", "--ref .*missing.png: no such image file"),
        ("tone.wav", "driving.mp4", "o.mp4", "tone.wav is not a readable image"),
        ("ref.png", "tone.wav", "o.mp4", "not a readable video"),
        ("ref.png", "driving.mp4", "o.avi", r"output must end in \.mp4 or \.gif"),
        ("ref.png", "driving.mp4", "driving.mp4", "is the input --driving .* destroy the input"),
        ("ref.png", "driving.mp4", "ref.png", r"must end in \.mp4 or \.gif"),
    ],
)
def test_command_fails_clearly_and_writes_nothing(files, capsys, ref, driving, out, message):
    before = sorted(p.name for p in files.iterdir())
    argv = ["video2video", "--ref", str(files / ref), "--driving", str(files / driving)]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(files / out), "--no-progress"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in files.iterdir()) == before


def test_command_fails_on_a_driving_video_without_a_face(files, capsys):
    V.write_video(files / "empty.mp4", np.zeros((3, 256, 256, 3), np.uint8), fps=10)
    with pytest.raises(SystemExit):
        main(
            ["video2video", "--ref", str(files / "ref.png"), "--driving", str(files / "empty.mp4")]
            + ["--out", str(files / "x.mp4"), "--no-progress"]
        )
    assert "the driving video: no face found in any of the 3 frames" in capsys.readouterr().err
    assert not (files / "x.mp4").exists()
    (files / "empty.mp4").unlink()


# --- scripts/eval_retarget.py: the poses through the toy animator -------------------------------------------


@pytest.fixture(scope="module")
def ER():
    return anim_lab.load_script("eval_retarget")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_animator_weights):
    """A tiny animator with motion modules and random nonzero weights (tests/conftest.py), loaded as the toy
    animator is."""
    from anim_lab.toy import load_animator

    pipe = load_animator(tiny_animator_weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_animation_feeds_the_three_pose_sources_and_scores_them(ER, tiny_pipe):
    size, frames = 64, 3
    (out,) = ER.animate_cases(
        tiny_pipe, 1, frames, size=size, seed=3, framing="own", steps=2, cfg=2.0, noise_seed=5, first_pair=40
    )
    # the case, built independently: A = HELD_OUT[40] driven by B = HELD_OUT[41], B's motion from seed 3
    case = toy.toy_case(HELD_OUT[40], HELD_OUT[41], seed=3, num_frames=frames, size=size, framing="own")
    assert (out.case.reference, out.case.driver) == (case.reference, case.driver)
    reference, _ = toy.render(case.reference, case.reference_pose, toy.Expression(), size)
    np.testing.assert_array_equal(out.reference, reference)
    truth = [
        toy.render(case.reference, p, e, size)
        for p, e in zip(case.target_poses, case.expressions, strict=True)
    ]
    np.testing.assert_array_equal(out.truth, np.stack([image for image, _ in truth]))

    # the three sources: B's rendered landmarks, the retargeted reference, the ground truth's landmarks
    raw_b = np.stack(
        [toy.render(case.driver, p, e, size)[1] for p, e in zip(case.poses, case.expressions, strict=True)]
    )
    retargeted = R.retarget(case.reference_xyz(), case.driving_xyz(), size).landmarks
    true_points = np.stack([points for _, points in truth])  # (F, 478, 2)
    for name, points in zip(ER.ANIMATE_SOURCES, (raw_b, retargeted, true_points), strict=True):
        np.testing.assert_allclose(out.landmarks[name], points, atol=1e-3)
        drawn = np.stack([L.draw_pose_image(p, size, size) for p in out.landmarks[name]])
        np.testing.assert_array_equal(out.poses[name], drawn)
    assert not np.array_equal(out.poses["raw B landmarks"], out.poses["true landmarks"])

    # the ceiling is a plain pipeline call on the ground truth's pose images with the same noise
    direct = tiny_pipe(
        reference,
        [L.draw_pose_image(p, size, size) for p in true_points],
        height=size,
        width=size,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).frames[0]  # (F, H, W, 3) in [0, 1]
    np.testing.assert_array_equal(out.videos["true landmarks"], (direct * 255).round().astype(np.uint8))
    assert not np.array_equal(out.videos["raw B landmarks"], out.videos["true landmarks"])

    # PSNR by hand (uint8: 10 log10(255^2 / MSE)) and SSIM per frame
    for name, video in out.videos.items():
        assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
        mse = ((video.astype(np.float64) - out.truth) ** 2).reshape(frames, -1).mean(1)
        np.testing.assert_allclose(out.psnr[name], 10 * np.log10(255.0**2 / mse), rtol=1e-5)
        ssim = [  # Wang et al.'s SSIM as anim_lab.metrics computes it: Gaussian window, sigma 1.5
            structural_similarity(
                v,
                t,
                channel_axis=2,
                data_range=255,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for v, t in zip(video, out.truth, strict=True)
        ]
        np.testing.assert_allclose(out.ssim[name], ssim, rtol=1e-5)
        assert out.face_px[name].shape == (frames,)  # NaN where mediapipe finds no face (random weights)

    table = ER.animate_table([out])
    assert list(table) == ["copy reference", *ER.ANIMATE_SOURCES]
    for name in ER.ANIMATE_SOURCES:
        assert table[name]["psnr"] == pytest.approx(out.psnr[name].mean(), rel=1e-6)
        error = np.linalg.norm(out.landmarks[name] - case.target_landmarks(), axis=-1).mean()
        assert table[name]["pose_px"] == pytest.approx(error, rel=1e-6)
        assert table[name]["detect"] == pytest.approx(np.isfinite(out.face_px[name]).mean())
    assert table["true landmarks"]["pose_px"] < 1e-3
    assert table["raw B landmarks"]["pose_px"] > 1.0  # "own" framing: B stands elsewhere
    still = np.repeat(reference[None].astype(np.float64), frames, axis=0)
    mse = ((still - out.truth) ** 2).reshape(frames, -1).mean(1)
    assert table["copy reference"]["psnr"] == pytest.approx(np.mean(10 * np.log10(255.0**2 / mse)), rel=1e-6)
    assert table["copy reference"]["pose_px"] is None
    assert "copy reference" in ER.format_animate_table(table)


def test_face_errors_of_the_ground_truth_renders_are_small(ER):
    case = toy.toy_case(HELD_OUT[42], HELD_OUT[43], seed=1, num_frames=3, size=128)
    with L.FaceLandmarker(video=False) as landmarker:
        errors = ER.face_errors(case.target_frames(), case.target_landmarks(), landmarker)
        blank = ER.face_errors(np.zeros((1, 128, 128, 3), np.uint8), case.target_landmarks()[:1], landmarker)
    assert errors.shape == (3,) and np.all(errors < 3.0)  # mediapipe on renders, 128-px pixels
    assert np.isnan(blank).all()
