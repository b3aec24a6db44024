"""mediapipe face mesh through anim_lab.landmarks: real faces, transformed faces, no faces, odd inputs,
topology."""

import os
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
import skimage.color
import skimage.data
from mediapipe.python.solutions import face_mesh_connections as FMC

from anim_lab import landmarks as L
from anim_lab import toy

ROOT = Path(__file__).resolve().parents[1]

# Measured once (mediapipe 0.10.21, static mode, refine_landmarks) on skimage.data.astronaut(); pixel centres.
ASTRONAUT_POINTS = {
    33: (194.7, 100.4),  # right eye, outer corner
    133: (212.8, 103.2),  # right eye, inner corner
    362: (236.5, 104.4),  # left eye, inner corner
    263: (255.3, 103.8),  # left eye, outer corner
    4: (223.1, 125.3),  # nose tip
    61: (201.3, 138.7),  # right mouth corner
    291: (244.5, 140.5),  # left mouth corner
}


@pytest.fixture(scope="module")
def landmarker():
    with L.FaceLandmarker(video=False) as lm:
        yield lm


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(landmarker, astronaut):
    return landmarker.detect(astronaut, "astronaut")


def test_astronaut_landmarks(astronaut_face):
    face = astronaut_face
    assert face.pixels.shape == (478, 2) and face.normalized.shape == (478, 3) and face.xyz.shape == (478, 3)
    assert (face.height, face.width) == (512, 512)
    for index, (x, y) in ASTRONAUT_POINTS.items():
        assert np.linalg.norm(face.pixels[index] - (x, y)) < 3.0, index
    # pixels and normalized agree (pixel centres), and the nose tip is the closest point to the camera (min z)
    np.testing.assert_allclose(face.pixels, face.normalized[:, :2] * 512 - 0.5, atol=1e-4)
    assert face.xyz[L.NOSE_TIP, 2] < np.median(face.xyz[:468, 2])


def _warp(image, matrix, size):
    return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.mark.parametrize("angle", [20, -20])
def test_rotated_astronaut_landmarks_rotate_with_the_image(landmarker, astronaut, astronaut_face, angle):
    centre = tuple(float(c) for c in astronaut_face.pixels[L.NOSE_TIP])
    m = cv2.getRotationMatrix2D(centre, angle, 1.0)  # (2, 3)
    face = landmarker.detect(_warp(astronaut, m, (512, 512)), f"astronaut rotated {angle}")
    expected = astronaut_face.pixels @ m[:, :2].T + m[:, 2]  # the original landmarks moved as the image was
    err = np.linalg.norm(face.pixels - expected, axis=1)
    assert err[:468].mean() < 3.0 and np.median(err) < 2.5


def test_scaled_and_cropped_astronaut(landmarker, astronaut, astronaut_face):
    # crop: an odd-sized window around the face; landmarks shift by the crop offset
    crop = astronaut[31:290, 99:352]  # 259 x 253 px
    face = landmarker.detect(crop, "crop")
    assert (face.height, face.width) == (259, 253)
    err = np.linalg.norm(face.pixels - (astronaut_face.pixels - (99, 31)), axis=1)
    assert err.mean() < 2.0
    # scale: 1.5x larger image; landmarks scale about the pixel-centre convention
    big = cv2.resize(crop, (380, 389), interpolation=cv2.INTER_CUBIC)
    face_big = landmarker.detect(big, "scaled crop")
    expected = (face.pixels + 0.5) * np.array([380 / 253, 389 / 259]) - 0.5
    assert np.linalg.norm(face_big.pixels - expected, axis=1).mean() < 3.0


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_no_face_error_names_the_image(landmarker, name):
    image = getattr(skimage.data, name)()
    with pytest.raises(L.NoFaceError, match=f"no face found in skimage {name}"):
        landmarker.detect(image, f"skimage {name}")
    assert issubclass(L.NoFaceError, ValueError)


def test_grayscale_rgba_and_bad_inputs(landmarker, astronaut, astronaut_face):
    gray = (skimage.color.rgb2gray(astronaut) * 255).round().astype(np.uint8)  # (H, W)
    assert np.abs(landmarker.detect(gray).pixels - astronaut_face.pixels).mean() < 2.0
    rgba = np.concatenate([astronaut, np.full((512, 512, 1), 128, np.uint8)], axis=2)  # (H, W, 4)
    np.testing.assert_allclose(landmarker.detect(rgba).pixels, astronaut_face.pixels, atol=1e-3)
    with pytest.raises(TypeError, match="uint8"):
        landmarker.detect(astronaut / 255.0)
    with pytest.raises(ValueError, match="shape"):
        landmarker.detect(np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(ValueError, match="at least 32"):
        landmarker.detect(np.zeros((16, 64, 3), np.uint8))


def test_pose_image_from_real_landmarks(astronaut_face):
    """Either world: the astronaut's landmarks drawn at another size, via pixels or normalized coordinates."""
    a = L.draw_pose_image(astronaut_face.normalized, 256, normalized=True)
    b = L.draw_pose_image((astronaut_face.pixels + 0.5) / 2 - 0.5, 256)
    np.testing.assert_array_equal(a, b)
    x, y = np.round((astronaut_face.pixels[152] + 0.5) / 2 - 0.5).astype(int)  # the chin is on the oval
    assert tuple(a[y, x]) == (10, 200, 10)


def test_tracking_holds_or_raises_on_a_frame_without_a_face(astronaut):
    face_crop = astronaut[30:286, 100:356]  # 256 x 256
    empty = cv2.resize(skimage.data.coffee(), (256, 256))
    frames = [face_crop, np.roll(face_crop, 3, axis=1), empty, np.roll(face_crop, 6, axis=1)]
    lmk = L.track_landmarks(frames, progress=False)
    assert lmk.shape == (4, 478, 2) and lmk.dtype == np.float32
    np.testing.assert_array_equal(lmk[2], lmk[1])  # held
    shift = (lmk[3] - lmk[0])[:468, 0]
    assert abs(np.median(shift) - 6.0) < 1.5  # the landmarks moved with the image
    with pytest.raises(L.NoFaceError, match="frame 2"):
        L.track_landmarks(frames, on_missing="error", progress=False)
    with pytest.raises(ValueError, match="on_missing"):
        L.track_landmarks(frames, on_missing="skip", progress=False)


def test_mediapipe_without_face_mesh_gives_an_install_hint(monkeypatch):
    fake = types.ModuleType("mediapipe")
    fake.__version__ = "0.10.30"
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    with pytest.raises(ImportError, match=r"pip install --no-deps mediapipe==0\.10\.21"):
        L.FaceLandmarker()


def test_topology_matches_mediapipe():
    edges = L.path_edges
    norm = lambda s: {tuple(sorted(e)) for e in s}  # noqa: E731
    assert edges(L.FACE_OVAL) == norm(FMC.FACEMESH_FACE_OVAL)
    assert edges(L.RIGHT_EYE_UPPER) | edges(L.RIGHT_EYE_LOWER) == norm(FMC.FACEMESH_RIGHT_EYE)
    assert edges(L.LEFT_EYE_UPPER) | edges(L.LEFT_EYE_LOWER) == norm(FMC.FACEMESH_LEFT_EYE)
    assert edges(L.RIGHT_EYEBROW_UPPER) | edges(L.RIGHT_EYEBROW_LOWER) == norm(FMC.FACEMESH_RIGHT_EYEBROW)
    assert edges(L.LEFT_EYEBROW_UPPER) | edges(L.LEFT_EYEBROW_LOWER) == norm(FMC.FACEMESH_LEFT_EYEBROW)
    lips = [L.LIPS_OUTER_UPPER, L.LIPS_OUTER_LOWER, L.LIPS_INNER_UPPER, L.LIPS_INNER_LOWER]
    assert set().union(*map(edges, lips)) == norm(FMC.FACEMESH_LIPS)
    assert edges(L.RIGHT_IRIS) == norm(FMC.FACEMESH_RIGHT_IRIS) and edges(L.LEFT_IRIS) == norm(
        FMC.FACEMESH_LEFT_IRIS
    )
    # AniPortrait's oval: the full oval minus the 10 forehead edges
    custom = edges(L.FACE_OVAL_NO_FOREHEAD)
    assert len(custom) == 26 and custom <= edges(L.FACE_OVAL)
    assert not custom & edges((21, 54, 103, 67, 109, 10, 338, 297, 332, 284, 251))


def test_mediapipe_finds_toy_faces():
    """Both worlds meet: mediapipe on 256-px toy renders agrees with the renderer's ground truth."""
    rng = np.random.default_rng(0)
    errors = []
    with L.FaceLandmarker() as lm:
        for i in range(8):
            ident = toy.sample_identity(rng)
            pose = toy.HeadPose(
                yaw=rng.uniform(-25, 25), pitch=rng.uniform(-12, 12), roll=rng.uniform(-12, 12)
            )
            img, truth = toy.render(ident, pose, toy.Expression(mouth_open=rng.uniform(0, 1)), size=256)
            errors.append(np.linalg.norm(lm.detect(img, f"toy render {i}").pixels - truth, axis=1).mean())
    assert max(errors) < 4.0


# --- mediapipe's native logs stay out of stderr (a Jupyter kernel shows them as red boxes) ----------------
QUIET_SCRIPT = """
import os, skimage.data
from anim_lab import landmarks as L
img = skimage.data.astronaut()
L.detect_landmarks(img)
with L.FaceLandmarker(video=True) as lm:
    for _ in range(3):
        img = skimage.data.astronaut()  # time between frames, for late-logging threads
        lm.detect(img)
os.write(2, b"done\\n")
"""


def test_face_mesh_prints_nothing_on_stderr():
    """Static and tracking landmarkers, created, used and closed: the only line on file descriptor 2 is the
    script's own (without the library's hold, TFLite and absl print 3-5 lines here)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "done\n", result.stderr


def test_held_native_output_that_is_not_chatter_is_passed_on(capfd, caplog):
    with caplog.at_level("WARNING", logger="anim_lab"), L._quiet_native_logs():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"W0000 00:00:1796191511.344288    6765 inference_feedback_manager.cc:114] Feedback\n")
        os.write(2, b"E0000 00:00:1796191511.344288    6765 some_calculator.cc:10] a real error\n")
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == ""  # held back from file descriptor 2 ...
    (record,) = caplog.records  # ... and passed on through the library's logging channel
    assert record.name == "anim_lab.landmarks" and record.levelname == "WARNING"
    assert record.getMessage().splitlines() == [
        "mediapipe: E0000 00:00:1796191511.344288    6765 some_calculator.cc:10] a real error",
        "something else",
    ]


def test_landmark_errors_on_renders_blanks_and_the_scale():
    from anim_lab import toy

    image, points = toy.render(toy.identity_from_seed(11), toy.HeadPose(yaw=8), toy.Expression(), size=128)
    frames = np.stack([image, np.zeros_like(image)])
    errors = L.landmark_errors(frames, np.stack([points, points]))
    assert errors.shape == (2,) and 0 < errors[0] < 4.0 and np.isnan(errors[1])  # a blank frame: no face
    # by hand: the 256-px detection against the true points moved to 256-px pixel centres
    with L.FaceLandmarker(video=False) as lm:
        big = np.asarray(PIL.Image.fromarray(image).resize((256, 256), PIL.Image.BICUBIC))
        found = lm.detect(big).pixels
    expected = np.linalg.norm(found - ((points + 0.5) * 2 - 0.5), axis=1).mean()
    assert errors[0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="landmarks"):
        L.landmark_errors(frames, points)
