"""The toy portrait world: template, renderer, clips, dataset."""

import numpy as np
import pytest
import torch

from anim_lab import landmarks as L
from anim_lab import toy
from anim_lab.toy import renderer as R
from anim_lab.toy.template import load_template

IDENT = toy.Identity(
    skin="light", hair="black", eyes="blue", lips="red", background="green", shirt="navy", hairstyle="long"
)


def _px(img, point):
    x, y = np.round(point).astype(int)
    return img[y, x].astype(float)


def _close(rgb, ref, tol=60.0):
    return np.linalg.norm(np.asarray(rgb, float) - np.asarray(ref, float)) < tol


# --- template -----------------------------------------------------------------------------------------------


def test_template_is_symmetric_upright_and_closed():
    v, tri = load_template()
    assert v.shape == (478, 3) and tri.shape[1] == 3 and len(tri) > 800
    # forehead to chin is 2 units, both on the midline; eye corners level
    assert np.linalg.norm(v[L.FOREHEAD] - v[L.CHIN]) == pytest.approx(2.0, abs=1e-4)
    assert v[[L.FOREHEAD, L.CHIN, L.NOSE_TIP], 0] == pytest.approx(0.0, abs=1e-6)
    assert v[33, 1] == pytest.approx(v[263, 1], abs=1e-6)
    # mirror symmetry: every point's mirror image is a point of the template
    mirrored = v * np.array([-1, 1, 1])
    nearest = np.linalg.norm(v[:, None] - mirrored[None], axis=-1).min(1)
    assert nearest.max() < 1e-5
    # closed mouth: the inner lips coincide; every triangle faces the camera (+z)
    assert np.abs(v[list(L.LIPS_INNER_UPPER)] - v[list(L.LIPS_INNER_LOWER)]).max() < 1e-6
    e1, e2 = v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]]
    assert (np.cross(e1, e2)[:, 2] > 0).all()


# --- renderer -----------------------------------------------------------------------------------------------


def test_render_is_deterministic_for_a_seed():
    ident = toy.sample_identity(np.random.default_rng(5))
    assert ident == toy.sample_identity(np.random.default_rng(5))
    pose, expr = toy.HeadPose(yaw=12, pitch=-5, roll=4), toy.Expression(mouth_open=0.4, smile=0.3)
    a, la = toy.render(ident, pose, expr, size=64, seed=3, texture=True, grain=3.0)
    b, lb = toy.render(ident, pose, expr, size=64, seed=3, texture=True, grain=3.0)
    c, _ = toy.render(ident, pose, expr, size=64, seed=4, texture=True, grain=3.0)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and la.shape == (478, 2) and la.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)  # the seed drives texture and grain
    # grain and texture are off by default: then the seed changes nothing
    np.testing.assert_array_equal(
        toy.render(ident, pose, expr, 64, seed=1)[0], toy.render(ident, pose, expr, 64, seed=2)[0]
    )


def test_landmarks_are_the_projected_template():
    """Frontal, neutral: landmarks = frame centre + template (x, -y) × pixels per unit
    (an independent formula)."""
    size = 128
    ident = toy.Identity(face_width=1.1, face_height=0.95)
    _, lmk = toy.render(ident, size=size)
    v, _ = load_template()
    unit = R.FACE_FRACTION * size
    expected = np.array([size * 0.5, size * R.HEAD_Y]) - 0.5 + v[:, :2] * np.array([1.1, -0.95]) * unit
    np.testing.assert_allclose(lmk, expected, atol=1e-4)


def test_pose_moves_landmarks_rigidly():
    base = toy.render(IDENT, toy.HeadPose(), size=128)[1]
    # roll: a rotation of the image about the projected pivot, counter-clockwise on screen
    rolled = toy.render(IDENT, toy.HeadPose(roll=30), size=128)[1]
    cam = R._Camera(IDENT, toy.HeadPose(), 128)
    pivot = cam.project(R.PIVOT[None])[0]
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # CCW on screen (y down)
    np.testing.assert_allclose(rolled, (base - pivot) @ rot.T + pivot, atol=1e-3)
    # translation and scale
    moved = toy.render(IDENT, toy.HeadPose(tx=0.1, ty=-0.05, scale=1.2), size=128)[1]
    centre = np.array([64, 128 * R.HEAD_Y]) - 0.5
    np.testing.assert_allclose(moved, (base - centre) * 1.2 + centre + np.array([12.8, -6.4]), atol=1e-3)
    # yaw > 0 turns the face toward the image's right: the nose tip moves right more than the ears
    yawed = toy.render(IDENT, toy.HeadPose(yaw=20), size=128)[1]
    assert yawed[L.NOSE_TIP, 0] - base[L.NOSE_TIP, 0] > 3.0
    # sizes: the same face at 256 px is the 128 px face scaled (pixel centres)
    big = toy.render(IDENT, toy.HeadPose(yaw=20), size=256)[1]
    np.testing.assert_allclose(big, (yawed + 0.5) * 2 - 0.5, atol=1e-3)


def test_landmarks_lie_on_the_drawn_features():
    img, lmk = toy.render(IDENT, toy.HeadPose(yaw=8, pitch=4), toy.Expression(mouth_open=1.0), size=256)
    skin = np.array(IDENT.skin_rgb, float)
    for centre in (L.RIGHT_IRIS_CENTER, L.LEFT_IRIS_CENTER):  # the pupils
        assert _px(img, lmk[centre]).max() < 60
    for outer, inner in ((0, 13), (17, 14)):  # the middle of the upper and lower lip is lip-red
        rgb = _px(img, 0.5 * (lmk[outer] + lmk[inner]))
        assert rgb[0] > 1.6 * rgb[1] and not _close(rgb, skin, 40)
    mouth = _px(img, 0.5 * (lmk[13] + lmk[14]))  # open mouth: dark inside or teeth
    assert _close(mouth, (70, 18, 26), 40) or _close(mouth, (236, 232, 222), 40)
    for up, down in ((159, 145), (386, 374)):  # open eyes: sclera, iris or pupil, not skin
        assert not _close(_px(img, 0.5 * (lmk[up] + lmk[down])), skin, 50)
    for upper, lower in ((105, 52), (334, 282)):  # eyebrows: dark
        assert _px(img, 0.5 * (lmk[upper] + lmk[lower])).max() < 90
    nose = _px(img, lmk[L.NOSE_TIP])
    assert _close(nose / nose.max(), skin / skin.max(), 0.15)  # the nose tip has the skin's hue
    # the face oval lies on the boundary between face and background-ish: inside is skin-like, far outside is
    # not
    chin_in = _px(img, lmk[L.CHIN] + np.array([0, -4]))
    assert _close(chin_in / chin_in.max(), skin / skin.max(), 0.2)


def test_expressions_move_the_right_points():
    _, neutral = toy.render(IDENT, size=128)
    _, opened = toy.render(IDENT, expression=toy.Expression(mouth_open=1.0), size=128)
    _, blinked = toy.render(IDENT, expression=toy.Expression(blink=1.0), size=128)
    _, smiling = toy.render(IDENT, expression=toy.Expression(smile=1.0), size=128)
    eyes = list(L.GROUPS["right_eye"] + L.GROUPS["left_eye"])
    lips = list(L.GROUPS["lips"])
    # mouth open: the inner lips part (from touching), the lower lip and chin drop, the upper lip and eyes
    # stay
    assert np.linalg.norm(neutral[13] - neutral[14]) < 0.01
    assert opened[14, 1] - opened[13, 1] > 5.0
    assert opened[L.CHIN, 1] - neutral[L.CHIN, 1] > 5.0
    assert np.abs(opened[13] - neutral[13]).max() < 0.5
    np.testing.assert_allclose(opened[eyes], neutral[eyes], atol=1e-4)
    # blink: the upper lids come down onto the lower lids; the mouth does not move
    for up, down in ((159, 145), (386, 374)):
        assert np.linalg.norm(neutral[up] - neutral[down]) > 3.0
        assert np.linalg.norm(blinked[up] - blinked[down]) < 0.5
    np.testing.assert_allclose(blinked[lips], neutral[lips], atol=1e-4)
    # smile: mouth corners go up (smaller y) and outward
    for corner, side in ((61, -1), (291, 1)):
        assert neutral[corner, 1] - smiling[corner, 1] > 1.0
        assert side * (smiling[corner, 0] - neutral[corner, 0]) > 0.5


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="mouth_open"):
        toy.Expression(mouth_open=1.5)
    with pytest.raises(ValueError, match="hair"):
        toy.Identity(hair="purple")
    with pytest.raises(ValueError, match="face_width"):
        toy.Identity(face_width=3.0)
    with pytest.raises(ValueError, match="scale"):
        toy.HeadPose(scale=0.0)
    assert toy.Identity(skin="dark").skin_rgb == R.SKIN_TONES["dark"]  # the palette colour unless given
    with pytest.raises(TypeError, match="Generator"):
        toy.sample_identity(0)
    with pytest.raises(ValueError, match="size"):
        toy.render(IDENT, size=16)
    with pytest.raises(TypeError, match="Identity"):
        toy.render({"skin": "light"})


# --- clips --------------------------------------------------------------------------------------------------


def test_clip_is_smooth_deterministic_and_any_length():
    clip = toy.make_clip(IDENT, num_frames=20, size=64, seed=11, fps=25)
    assert clip.frames.shape == (20, 64, 64, 3) and clip.landmarks.shape == (20, 478, 2) and clip.fps == 25
    assert clip.pose_array.shape == (20, 6) and clip.expression_array.shape == (20, 3)
    # frames and landmarks are renders of the recorded parameters
    img, lmk = toy.render(IDENT, clip.poses[7], clip.expressions[7], size=64, seed=11 + 7)
    np.testing.assert_array_equal(clip.frames[7], img)
    np.testing.assert_array_equal(clip.landmarks[7], lmk)
    # smooth: rigid head motion per frame is small (eyes and nose; the mouth and lids may move fast)
    rigid = [33, 263, 133, 362, L.NOSE_TIP, L.FOREHEAD]
    step = np.linalg.norm(np.diff(clip.landmarks[:, rigid], axis=0), axis=-1)  # (19, 6)
    assert step.max() < 1.5
    # any length: a longer clip starts with the shorter one
    poses, exprs = toy.sample_motion(60, 25, seed=11)
    assert poses[:20] == clip.poses and exprs[:20] == clip.expressions
    np.testing.assert_array_equal(toy.make_clip(IDENT, 1, 64, seed=11).frames[0], clip.frames[0])
    with pytest.raises(ValueError, match="num_frames"):
        toy.sample_motion(0)


def test_clip_motion_talks_blinks_and_sways():
    poses, exprs = toy.sample_motion(250, 25, seed=3)  # 10 s
    mouth = np.array([e.mouth_open for e in exprs])
    blink = np.array([e.blink for e in exprs])
    yaw = np.array([p.yaw for p in poses])
    assert mouth.max() > 0.5 and (mouth < 0.05).mean() > 0.1  # opens and closes
    closed = np.flatnonzero(blink > 0.8)
    assert 1 <= len(np.split(closed, np.flatnonzero(np.diff(closed) > 1) + 1)) <= 6  # a few blinks in 10 s
    assert np.ptp(yaw) > 3.0 and np.abs(yaw).max() <= toy.clips.LIMITS["yaw"]


# --- dataset ------------------------------------------------------------------------------------------------


def test_identity_splits_are_fixed_and_disjoint():
    train, test = toy.identity_split("train"), toy.identity_split("test")
    assert len(train) >= 1000 and len(test) >= 100
    assert set(train).isdisjoint(test)
    assert toy.identity_split("train") == train
    with pytest.raises(ValueError, match="split"):
        toy.identity_split("val")


@pytest.fixture(scope="module")
def item():
    return toy.ToyPortraitDataset(split="test", size=64, num_frames=3, length=4, seed=1)[2]


def test_dataset_item_layout(item):
    assert item["reference"].shape == (3, 64, 64) and item["frames"].shape == (3, 3, 64, 64)
    assert item["poses"].shape == (3, 3, 64, 64) and item["reference_pose"].shape == (3, 64, 64)
    assert item["landmarks"].shape == (3, 478, 2) and item["head_pose"].shape == (3, 6)
    assert item["expression"].shape == (3, 3) and item["attributes"].shape == (len(toy.ATTRIBUTES),)
    for key in ("reference", "frames"):
        assert item[key].dtype == torch.float32 and item[key].min() >= -1 and item[key].max() <= 1
    assert item["poses"].min() >= 0 and item["poses"].max() <= 1 and item["poses"].max() > 0.5
    assert item["identity"] in toy.identity_split("test")


def test_dataset_item_is_consistent_and_deterministic(item):
    ds = toy.ToyPortraitDataset(split="test", size=64, num_frames=3, length=4, seed=1)
    again = ds[2]
    for key, value in item.items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(again[key])), key
    ident = toy.identity_from_seed(item["identity"])
    attrs = [ident.attribute_index(k) for k in toy.ATTRIBUTES]
    assert item["attributes"].tolist() == attrs
    # frame 1 = a render of its parameters; its pose image = the landmarks drawn
    hp, ex = item["head_pose"][1].tolist(), item["expression"][1].tolist()
    img, lmk = toy.render(ident, toy.HeadPose(*hp), toy.Expression(*ex), size=64, seed=ds_seed_of(ds, 2) + 1)
    np.testing.assert_allclose(item["frames"][:, 1].permute(1, 2, 0).numpy(), img / 127.5 - 1, atol=1e-6)
    pose = L.draw_pose_image(item["landmarks"][1].numpy(), 64, 64)
    np.testing.assert_allclose(item["poses"][:, 1].permute(1, 2, 0).numpy(), pose / 255.0, atol=1e-6)
    # the reference is the same person at another moment
    assert not torch.equal(item["reference"], item["frames"][:, 0])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="length"):
        toy.ToyPortraitDataset(length=0)


def ds_seed_of(ds, index):
    """The clip seed the dataset draws for an item (re-derived from its documented recipe)."""
    rng = np.random.default_rng([ds.seed, index, 1 if ds.split == "test" else 0])
    rng.integers(len(ds.identities))
    return int(rng.integers(0, 2**31 - 1, 2)[0])
