"""AniPortrait-style pose images: lines on the landmarks, colours per part, thickness with size."""

import numpy as np
import pytest

from anim_lab import landmarks as L
from anim_lab import toy

# The colour of each part as AniPortrait's draw_util.py writes it into the array (see reference §2.3), written
# out here independently of anim_lab.landmarks.POSE_PARTS: {first two points of the path: colour}.
SPEC = {
    (251, 389): (10, 200, 10),  # face oval without the forehead
    (263, 466): (180, 200, 10),
    (263, 249): (180, 200, 10),  # left eye
    (300, 293): (180, 220, 10),
    (276, 283): (180, 220, 10),  # left eyebrow
    (33, 246): (10, 200, 180),
    (33, 7): (10, 200, 180),  # right eye
    (70, 63): (10, 220, 180),
    (46, 53): (10, 220, 180),  # right eyebrow
    (61, 146): (10, 180, 20),
    (17, 314): (20, 10, 180),
    (78, 95): (100, 100, 30),
    (14, 317): (100, 150, 50),
    (61, 185): (20, 80, 100),
    (0, 267): (80, 100, 20),
    (78, 191): (120, 100, 200),
    (13, 312): (150, 120, 100),
}


@pytest.fixture(scope="module")
def toy_landmarks():
    ident = toy.identity_from_seed(4)
    _, lmk = toy.render(ident, toy.HeadPose(yaw=10, roll=5), toy.Expression(mouth_open=0.8), size=512)
    return lmk  # (478, 2) pixels of a 512-px image


def _segment_distance(p, a, b):
    """Distance from points p (N, 2) to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def test_parts_and_colours_match_aniportrait():
    got = {path[:2]: colour for _, path, colour in L.POSE_PARTS}
    assert got == SPEC
    lips = [path for name, path, _ in L.POSE_PARTS if name.startswith("lips")]
    assert len(lips) == 8 and all(len(p) == 6 for p in lips)  # 8 arcs of 5 edges


@pytest.mark.parametrize("size", [128, 512])
def test_lines_land_on_the_landmarks_in_the_part_colour(toy_landmarks, size):
    lmk = (toy_landmarks + 0.5) * size / 512 - 0.5  # pixel centres of a `size` image
    img = L.draw_pose_image(lmk, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    colours_at = {}
    for _, path, colour in L.POSE_PARTS:
        for i in path:
            colours_at.setdefault(i, set()).add(colour)
    for i, allowed in colours_at.items():
        x, y = np.round(lmk[i]).astype(int)
        # the pixel under a landmark (or one next to it, where a crossing part painted over) has a part colour
        patch = {tuple(c) for c in img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3)}
        assert tuple(img[y, x]) in allowed or patch & allowed, i
    # only the specified colours and black appear (no anti-aliasing by default)
    used = {tuple(c) for c in img.reshape(-1, 3)}
    assert used <= set(SPEC.values()) | {(0, 0, 0)}
    assert set(SPEC.values()) <= used


def test_drawn_pixels_lie_on_the_segments(toy_landmarks):
    """Independent check: every coloured pixel is within half a line width of a segment of its own colour."""
    img = L.draw_pose_image(toy_landmarks, 512)
    half = L.pose_thickness(512, 512) / 2 + 1.0
    for colour in set(SPEC.values()):
        ys, xs = np.nonzero((img == colour).all(-1))
        pts = np.stack([xs, ys], 1).astype(float)
        dist = np.full(len(pts), np.inf)
        for _, path, c in L.POSE_PARTS:
            if c == colour:
                for a, b in zip(path[:-1], path[1:], strict=True):
                    dist = np.minimum(dist, _segment_distance(pts, toy_landmarks[a], toy_landmarks[b]))
        assert len(pts) > 0 and dist.max() <= half, colour


def test_what_is_not_drawn(toy_landmarks):
    img = L.draw_pose_image(toy_landmarks, 512)
    for a, b in ((109, 10), (10, 338)):  # the forehead part of the oval
        x, y = np.round(0.5 * (toy_landmarks[a] + toy_landmarks[b])).astype(int)
        assert img[y - 1 : y + 2, x - 1 : x + 2].max() == 0
    for centre in (L.RIGHT_IRIS_CENTER, L.LEFT_IRIS_CENTER):  # irises
        x, y = np.round(toy_landmarks[centre]).astype(int)
        assert img[y, x].max() == 0


def test_thickness_scales_with_size_and_inputs(toy_landmarks):
    assert [L.pose_thickness(s, s) for s in (64, 128, 256, 512, 1024)] == [1, 1, 1, 2, 4]
    thin = (L.draw_pose_image(toy_landmarks, 512, thickness=1).any(-1)).sum()
    thick = (L.draw_pose_image(toy_landmarks, 512).any(-1)).sum()
    assert 2.0 < thick / thin < 4.0  # cv2 draws thickness 2 about 3 px wide, thickness 1 one px wide
    # normalized input gives the same image; any output size (not square)
    norm = (toy_landmarks + 0.5) / 512
    np.testing.assert_array_equal(
        L.draw_pose_image(norm, 512, normalized=True), L.draw_pose_image(toy_landmarks, 512)
    )
    assert L.draw_pose_image(norm, 96, 160, normalized=True).shape == (96, 160, 3)
    # 468 points and a z column are accepted
    xyz = np.concatenate([toy_landmarks, np.ones((478, 1))], 1)
    np.testing.assert_array_equal(L.draw_pose_image(xyz[:468], 512), L.draw_pose_image(toy_landmarks, 512))


def test_bad_landmarks_are_rejected(toy_landmarks):
    with pytest.raises(ValueError, match=r"\(478, 2\)"):
        L.draw_pose_image(toy_landmarks[:100], 128)
    bad = toy_landmarks.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        L.draw_pose_image(bad, 128)
    with pytest.raises(ValueError, match="positive"):
        L.draw_pose_image(toy_landmarks, 0)


def test_pixel_landmarks_with_normalized_true_name_the_mix_up(toy_landmarks):
    with pytest.raises(ValueError, match="look like pixel coordinates; pass them without normalized=True"):
        L.draw_pose_image(toy_landmarks, 512, normalized=True)


def test_normalized_landmarks_without_the_flag_name_the_mix_up(toy_landmarks):
    norm = (toy_landmarks + 0.5) / 512
    for size in (16, 128, 512):
        with pytest.raises(ValueError, match="look like normalized .* pass normalized=True"):
            L.draw_pose_image(norm, size)
    # with the flag they draw (and a face that leaves the frame a little is still fine)
    assert L.draw_pose_image(norm + 0.2, 128, normalized=True).any()


@pytest.mark.parametrize("value", [1e9, -1e9, 5000.0])
def test_far_out_coordinates_raise(toy_landmarks, value):
    bad = toy_landmarks.copy()
    bad[7] = value
    with pytest.raises(ValueError, match=r"landmark 7 is at .* far outside the 512x512 image.*another size"):
        L.draw_pose_image(bad, 512)
    # landmarks of a 512 image drawn at 128 without rescaling: pixels of another image size
    with pytest.raises(ValueError, match="far outside the 128x128 image"):
        L.draw_pose_image(toy_landmarks + 200, 128)


def test_sizes_must_be_whole_numbers(toy_landmarks):
    small = (toy_landmarks + 0.5) / 2 - 0.5  # pixels of a 256 image
    with pytest.raises(ValueError, match=r"height must be a whole number of pixels, got 257.7"):
        L.draw_pose_image(small, 257.7)
    with pytest.raises(ValueError, match=r"width must be a whole number of pixels, got 256.5"):
        L.draw_pose_image(small, 256, 256.5)
    with pytest.raises(TypeError, match="whole number"):
        L.draw_pose_image(small, "256")
    with pytest.raises(ValueError, match="positive"):
        L.draw_pose_image(small, 256, -4)
    # integral floats and numpy integers are whole numbers
    np.testing.assert_array_equal(
        L.draw_pose_image(small, 256.0, np.int64(256)), L.draw_pose_image(small, 256, 256)
    )
