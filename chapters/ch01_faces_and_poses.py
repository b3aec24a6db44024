# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown] tags=["core"]
# # Chapter 01 — Faces and poses
#
# *Face landmarks on a real photo, the pose images that AniPortrait feeds its PoseGuider, a pose video from a
# video (Video2Pose), and a toy portrait world with ground truth for every pixel, where the later chapters
# train models.*
#
# - **You will build**: 478 mediapipe landmarks on the astronaut and their groups; an AniPortrait pose image;
#   Video2Pose on a clip made from the astronaut photo (with audio carried over); the toy portrait world: a 3D
#   face template, identities × poses × expressions, talking-head clips, a training dataset; mediapipe
#   measured against the toy world's ground truth
# - **Library modules**: `anim_lab.landmarks`, `anim_lab.video`, `anim_lab.toy` (`template`, `renderer`,
#   `clips`, `dataset`), `anim_lab.viz`
# - **Questions answered**: What does a face mesh give, point by point? What exactly is a pose image (which
#   lines, which colours, how thick)? How does a video become a pose video, and what happens to frames without
#   a face? How can a tiny model learn portrait animation on a CPU — what data, with what ground truth? Does a
#   landmark detector trained on real faces see the toy faces, and how accurately?
# - **CPU runtime**: about 10 s of CPU time
#
# Portrait animation is conditioned on *pose*: AnimateAnyone draws body skeletons, AniPortrait draws face
# landmarks as coloured lines. This chapter builds that input end to end, and a synthetic world in which we
# know the true pose of every frame.

# %% tags=["core"]
# NBVAL_IGNORE_OUTPUT
import tempfile
import wave
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import mediapipe
import numpy as np
import skimage.data
import torch

import anim_lab
from anim_lab import landmarks as L
from anim_lab import toy, viz
from anim_lab import video as V
from anim_lab.toy.template import load_template

np.random.seed(0)
torch.manual_seed(0)
np.set_printoptions(precision=3, suppress=True)
torch.set_printoptions(precision=3, sci_mode=False)
print(
    f"anim_lab {anim_lab.__version__}, mediapipe {mediapipe.__version__}, opencv {cv2.__version__}, "
    f"numpy {np.__version__}, torch {torch.__version__}"
)

# %% [markdown] tags=["core"]
# ## 1. 478 points on a real face
#
# - mediapipe's face mesh (0.10.21, the last release with `mp.solutions`) finds **468 surface points** plus,
#   with `refine_landmarks=True`, **10 iris points** (a centre and 4 rim points per eye).
# - It returns x, y in [0, 1] of the image width/height and a relative depth z. `anim_lab.landmarks` keeps all
#   three: `.normalized` (478, 3), `.pixels` (478, 2) and `.xyz` (478, 3).
# - One static image: `FaceLandmarker(video=False)`; the frames of a video: `video=True` (tracking).

# %% tags=["core"]
astronaut = skimage.data.astronaut()  # (512, 512, 3) uint8
with L.FaceLandmarker(video=False) as landmarker:
    face = landmarker.detect(astronaut, name="astronaut")
print("image:", astronaut.shape, astronaut.dtype)
print("normalized:", face.normalized.shape, "pixels:", face.pixels.shape, "xyz:", face.xyz.shape)
print("nose tip is the point nearest the camera:", bool(face.xyz[:468, 2].argmin() in (1, 4, 5, 19)))

# %% [markdown] tags=["core"]
# The points come in named groups: the face oval, eyes, eyebrows, lips and irises (the subject's left and
# right: the subject's right eye is on the image's left). A pose image draws most of them, not all: the eyes,
# eyebrows, lips and the face oval without its forehead arc, as 17 parts in 13 colours; the irises and the
# full oval are left out (`landmarks.POSE_PARTS`).

# %% tags=["core"]
for name, idx in L.GROUPS.items():
    print(f"{name:14s} {len(idx):3d} points, e.g. {idx[:4]}")

# %% tags=["core"]
colours = plt.cm.tab10(np.linspace(0, 1, 10))
fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
axes[0].imshow(astronaut[40:220, 130:320])
axes[0].scatter(*(face.pixels - (130, 40)).T, s=2, c="cyan")
axes[0].set_title("478 landmarks (face crop)")
axes[1].imshow(astronaut[60:200, 150:300])
for (name, idx), colour in zip(L.GROUPS.items(), colours, strict=False):
    pts = face.pixels[list(idx)] - (150, 60)
    axes[1].scatter(*pts.T, s=10, color=colour, label=name)
axes[1].legend(fontsize=7, loc="lower left")
axes[1].set_title("the groups (face crop)")
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown] tags=["core"]
# **Re-derive:** `.pixels` is `.normalized` scaled to pixels with integer values at pixel *centres*
# (mediapipe's 0 and 1 are the image's outer edges, so subtract half a pixel).

# %% tags=["core"]
mine = face.normalized[:, :2] * np.float32(512) - np.float32(0.5)  # [0, 1] edges -> pixel centres
torch.testing.assert_close(torch.from_numpy(mine), torch.from_numpy(face.pixels))
print("pixels = normalized * size - 0.5: matches")

# %% [markdown] tags=["core"]
# Rotate the photo by 20° about the nose tip: the detected landmarks should move exactly as the image did.
# This is how the tests check detection without hand-labelled data.

# %% tags=["core"]
M = cv2.getRotationMatrix2D(tuple(float(c) for c in face.pixels[4]), 20, 1.0)  # (2, 3) affine
rotated = cv2.warpAffine(astronaut, M, (512, 512), borderMode=cv2.BORDER_REFLECT)
with L.FaceLandmarker() as landmarker:
    face_rot = landmarker.detect(rotated, name="rotated astronaut")
expected = face.pixels @ M[:, :2].T + M[:, 2]  # the original landmarks, moved like the pixels
err = np.linalg.norm(face_rot.pixels - expected, axis=1)
print("landmarks moved with the image (mean error < 3 px):", bool(err.mean() < 3))

# %% [markdown] tags=["core"]
# No face, no landmarks: a clear error that names the image.

# %% tags=["core"]
try:
    with L.FaceLandmarker() as landmarker:
        landmarker.detect(skimage.data.chelsea(), name="chelsea the cat")
except L.NoFaceError as e:
    print("NoFaceError:", e)

# %% [markdown] tags=["core"]
# ## 2. The pose image
#
# AniPortrait (`src/utils/draw_util.py`) draws landmarks as **lines only** on black: a face oval without the
# forehead (26 edges), eyes, eyebrows, and the lips as **8 arcs** of 5 edges, each part with its own colour;
# no irises, no points. The PoseGuider learns from these colours which line is which.
#
# - Colours are written into the array's channels in the order listed (what the model sees).
# - AniPortrait always draws on a **512×512 canvas** with lines 2 px thick, then `cv2.resize`s the canvas to
#   the frame size. `anim_lab` draws at the frame size directly, with the thickness scaled
#   (`pose_thickness`: 2 px at 512, at least 1). Both ways are compared below.

# %% tags=["core"]
for name, path, colour in L.POSE_PARTS:
    print(f"{name:24s} {len(path) - 1:2d} edges  colour {colour}")
print("thickness at 128 / 512 / 1024 px:", [L.pose_thickness(s, s) for s in (128, 512, 1024)])

# %% tags=["core"]
pose_img = L.draw_pose_image(face.pixels, 512, 512)  # (512, 512, 3) uint8
print("pose image:", pose_img.shape, pose_img.dtype)
print("distinct colours (incl. black):", len({tuple(c) for c in pose_img.reshape(-1, 3)}))
fig = viz.image_grid(
    [astronaut[40:220, 130:320], pose_img[40:220, 130:320], pose_img[90:160, 180:270]],
    ["face", "pose image", "eyes and brows (zoom)"],
    figsize=(11, 4),
)
plt.show()

# %% [markdown] tags=["core"]
# **Two ways to draw at another size.** AniPortrait's way (512×512 canvas, 2 px, then `cv2.resize` with its
# default bilinear interpolation) against the library's (draw at the target size, thickness scaled), at
# 128×128 and at a non-square 256×384 (H × W) frame, from the same normalized landmarks:


# %% tags=["core"]
def aniportrait_way(normalized, height, width):
    canvas = L.draw_pose_image(normalized, 512, 512, normalized=True, thickness=2)  # always 512 x 512
    return cv2.resize(canvas, (width, height))  # (512, 512, 3) -> (H, W, 3), bilinear


def part_colour_share(img):  # the share of lit pixels whose colour is exactly one of the 13 part colours
    lit = img.reshape(-1, 3)[img.reshape(-1, 3).any(1)]
    exact = np.zeros(len(lit), bool)
    for _, _, colour in L.POSE_PARTS:
        exact |= (lit == colour).all(1)
    return exact.mean()


drawn = {}
for h, w in ((128, 128), (256, 384)):
    drawn[f"AniPortrait {h}x{w}"] = aniportrait_way(face.normalized, h, w)
    drawn[f"anim_lab {h}x{w}"] = L.draw_pose_image(face.normalized, h, w, normalized=True)
for name, img in drawn.items():
    colours = len({tuple(c) for c in img.reshape(-1, 3)}) - 1
    print(
        f"{name:22s} distinct colours {colours:4d}, "
        f"lit pixels with an exact part colour {part_colour_share(img):.0%}"
    )
print(
    "canvas -> 256x384 scales x by",
    384 / 512,
    "and y by",
    256 / 512,
    ": 2-px lines become 1.5 px wide across, 1 px high",
)
crops = [
    img[
        int(0.12 * img.shape[0]) : int(0.42 * img.shape[0]),
        int(0.3 * img.shape[1]) : int(0.62 * img.shape[1]),
    ]
    for img in drawn.values()
]
fig = viz.image_grid(crops, list(drawn), ncols=4, figsize=(13, 3.6))
plt.show()

# %% [markdown] tags=["core"]
# - Resizing the canvas **blends colours**: the bilinear filter mixes each line with black and with its
#   neighbours, so most lit pixels are no longer one of the 13 part colours; a PoseGuider trained on images
#   drawn this way for frames other than 512×512 (at 512 nothing is resized) has learned soft, dimmer lines.
# - On a non-square frame the square canvas is **stretched**: landmarks land in the right place (they are
#   normalized), but line widths differ between the two axes, and lines thinner than a pixel fade.
# - `anim_lab`'s way keeps exact colours and an even width at any size. To reproduce AniPortrait's inputs
#   exactly (e.g. to run its released PoseGuider), draw at 512×512 and resize as above; its frames are also
#   resized to 512×512 before detection (`vid2pose.py`), and mediapipe's drawing rounds points down to whole
#   pixels where we draw with sub-pixel precision.
#
# **Re-derive:** every coloured pixel must lie on a segment between two landmarks of its part, within half the
# line width. We check it for the 8 lip arcs with a point-to-segment distance written here.


# %% tags=["core"]
def distance_to_segments(points, segments):
    """(N, 2) points, list of (a, b) -> (N,) distance to the nearest segment."""
    best = np.full(len(points), np.inf)
    for a, b in segments:
        t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        best = np.minimum(best, np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1))
    return best


worst = []
for name, path, colour in L.POSE_PARTS:
    if name.startswith("lips"):
        ys, xs = np.nonzero((pose_img == colour).all(-1))
        segs = [(face.pixels[a], face.pixels[b]) for a, b in zip(path[:-1], path[1:], strict=True)]
        worst.append(distance_to_segments(np.stack([xs, ys], 1).astype(float), segs).max())
print("every lip pixel within 2 px of its arc:", bool(max(worst) <= 2.0))

# %% [markdown]
# ## 3. Video2Pose
#
# A video → landmarks per frame (tracking mode) → a pose image per frame → a video with the **same fps**, with
# the source's **audio** muxed back in (as AniPortrait's `vid2pose.py` does). A frame with no face gets the
# last good landmarks (`on_missing="hold"`, AniPortrait's policy) or an error naming the frame
# (`on_missing="error"`). Frames stream through one at a time (`video.VideoReader` → detect → draw →
# `video.VideoWriter`), and the output file appears only when the whole video has succeeded.
#
# Our source: 20 frames cut from the astronaut photo, rotating ±12° and drifting sideways, with a 440 Hz tone.


# %%
def astronaut_clip(num_frames=20, size=256, centre=(225.0, 125.0)):
    """Frames cut from the photo: rotating ±12° about the face and drifting ±12 px sideways."""
    frames = []
    for i in range(num_frames):
        phase = 2 * np.pi * i / num_frames
        M = cv2.getRotationMatrix2D(centre, 12 * np.sin(phase), 1.0)  # (2, 3): rotate about the face
        M[:, 2] += (
            np.array([size / 2 + 12 * np.sin(phase), size / 2]) - centre
        )  # face centre -> window centre
        frames.append(cv2.warpAffine(astronaut, M, (size, size), borderMode=cv2.BORDER_REFLECT))
    return np.stack(frames)  # (F, size, size, 3)


src_frames = astronaut_clip()
print("source frames:", src_frames.shape)

# %%
tmp = tempfile.TemporaryDirectory(prefix="ch01_")  # removed at the end of this section
workdir = Path(tmp.name)
t = np.arange(16000) / 16000  # 1 s of a 440 Hz tone, 16 kHz mono
with wave.open(str(workdir / "tone.wav"), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(16000)
    w.writeframes((0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2").tobytes())
V.write_video(workdir / "astronaut.mp4", src_frames, fps=20, audio_from=workdir / "tone.wav")
lmk_video = L.video_to_pose(workdir / "astronaut.mp4", workdir / "astronaut_pose.mp4", progress=False)
poses, fps = V.read_video(workdir / "astronaut_pose.mp4")
print("landmarks:", lmk_video.shape, " pose video:", poses.shape, "fps:", fps)
print("audio carried over:", V.has_audio(workdir / "astronaut_pose.mp4"))

# %%
show = [0, 5, 10, 15]
fig = viz.image_grid(
    [src_frames[i] for i in show] + [poses[i] for i in show],
    [f"frame {i}" for i in show] + [f"pose {i}" for i in show],
    ncols=4,
    figsize=(10, 5.2),
)
plt.show()
tmp.cleanup()

# %% [markdown]
# ## 4. The toy portrait world
#
# Without pretrained weights, a CPU-trained model needs a world small enough to learn and rich enough to be a
# face. The toy world is made from the same face mesh:
#
# - **template**: the astronaut's 478 landmarks in 3D, made upright and symmetric, mouth closed
#   (`scripts/make_face_template.py`), plus the mesh's 854 triangles;
# - **identity**: skin, hair, eye, lip, background and shirt colours, hairstyle, face width/height, hairline;
# - **head pose**: yaw, pitch, roll, translation, scale; **expression**: mouth open, blink, smile;
# - **renderer** (numpy + cv2; `benchmarks/bench_toy_render.py` times it): painter's algorithm with flat
#   shading, and it returns the **exact landmarks of what it drew** — ground truth for every frame.

# %%
vertices, triangles = load_template()
print("template:", vertices.shape, "triangles:", triangles.shape)
print(
    "forehead-chin:",
    round(float(np.linalg.norm(vertices[10] - vertices[152])), 3),
    "units; symmetric:",
    bool(np.abs(np.sort(vertices[:, 0]) + np.sort(vertices[:, 0])[::-1]).max() < 1e-5),
)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
for ax, (i, j, title) in zip(axes, [(0, 1, "front (x, y)"), (2, 1, "side (z, y)")], strict=True):
    ax.triplot(vertices[:, i], vertices[:, j], triangles, lw=0.3, color="k")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# **Re-derive:** with no rotation and a neutral face, the landmarks are the template's (x, −y), stretched by
# the identity's proportions, times the pixels per unit (0.2 × size at scale 1) plus the head's position in
# the frame.

# %%
ident = toy.Identity(
    skin="medium",
    hair="black",
    eyes="green",
    lips="red",
    background="yellow",
    hairstyle="long",
    face_width=1.05,
    face_height=0.97,
)
img, lmk = toy.render(ident, toy.HeadPose(), toy.Expression(), size=128)
unit = 0.2 * 128
mine = np.array([64, 0.44 * 128]) - 0.5 + vertices[:, :2] * np.array([1.05, -0.97]) * unit
torch.testing.assert_close(
    torch.from_numpy(mine.astype(np.float32)), torch.from_numpy(lmk), atol=1e-4, rtol=0
)
print("render:", img.shape, img.dtype, "landmarks:", lmk.shape, "-> matches the projected template")

# %% [markdown]
# Identities × poses × expressions, each with the pose image of its own landmarks (no detector involved).
# `toy.sample_identity(rng)` draws a random identity; `toy.identity_from_seed(s)` the one a dataset calls `s`.

# %%
people = [toy.identity_from_seed(s) for s in (21, 1, 29, 12)]  # four training identities
settings = [
    (toy.HeadPose(), toy.Expression()),
    (toy.HeadPose(yaw=25), toy.Expression(mouth_open=1.0)),
    (toy.HeadPose(pitch=12, roll=-12), toy.Expression(blink=1.0, smile=0.8)),
    (toy.HeadPose(yaw=-30, pitch=-8, scale=1.1), toy.Expression(mouth_open=0.5, smile=1.0)),
]
tiles, titles = [], []
for person in people:
    for pose, expr in settings:
        im, lm = toy.render(person, pose, expr, size=128)
        tiles += [im, L.draw_pose_image(lm, 128)]
    titles += [f"{person.hair} hair, {person.skin}", "pose"] + [""] * 6
fig = viz.image_grid(tiles, titles, ncols=8, figsize=(15, 8.2))
viz.save(fig, "ch01_toy_world")
plt.show()
print([(p.skin, p.hair, p.eyes, p.background, p.hairstyle) for p in people])

# %% [markdown]
# Expressions move the right points: mouth open parts the inner lips (13 upper, 14 lower), blink brings the
# upper lid (159) onto the lower lid (145), smile lifts the mouth corners (61, 291).


# %%
def gap(lm, a, b):
    return round(float(np.linalg.norm(lm[a] - lm[b])), 1)


_, neutral = toy.render(ident, size=256)
for expr in [
    toy.Expression(),
    toy.Expression(mouth_open=1.0),
    toy.Expression(blink=1.0),
    toy.Expression(smile=1.0),
]:
    _, lm = toy.render(ident, expression=expr, size=256)
    print(
        f"{str(expr):55s} lips 13-14: {gap(lm, 13, 14):5.1f} px  lids 159-145: {gap(lm, 159, 145):4.1f} px  "
        f"corners up: {round(float((neutral[[61, 291], 1] - lm[[61, 291], 1]).mean()), 1):4.1f} px"
    )

# %% [markdown]
# ### Clips
#
# `make_clip` samples a talking head as a function of time: head sway (two slow sinusoids per axis), syllables
# at 3–5 Hz switched by a slow "speaking" envelope, blinks every 2–5 s, a drifting smile. Any length, any fps;
# a longer clip starts with the shorter one.

# %%
clip = toy.make_clip(people[1], num_frames=50, size=128, seed=3, fps=25)
print("frames:", clip.frames.shape, "landmarks:", clip.landmarks.shape, "fps:", clip.fps)
print("head pose (F, 6):", clip.pose_array.shape, " expression (F, 3):", clip.expression_array.shape)
fig = viz.image_grid(list(clip.frames[:40:5]) + list(clip.pose_images()[:40:5]), ncols=8, figsize=(14, 3.8))
plt.show()

# %%
poses10, exprs10 = toy.sample_motion(250, fps=25, seed=3)
t = np.arange(250) / 25
fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True)
for key in ("yaw", "pitch", "roll"):
    axes[0].plot(t, [getattr(p, key) for p in poses10], label=key)
axes[0].set_ylabel("degrees")
axes[0].legend(fontsize=8)
for key in ("mouth_open", "blink", "smile"):
    axes[1].plot(t, [getattr(e, key) for e in exprs10], label=key, lw=1)
axes[1].set_xlabel("seconds")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The dataset
#
# `ToyPortraitDataset` yields what AnimateAnyone-style training needs: a **reference** image (same person,
# another moment), target **frames**, their **pose images**, landmarks and all parameters. Identities come
# from two fixed, disjoint seed ranges, so the test split holds people no model has seen.

# %%
print(
    "train identities:",
    len(toy.identity_split("train")),
    " test identities:",
    len(toy.identity_split("test")),
)
ds = toy.ToyPortraitDataset(split="train", size=128, num_frames=16, length=1000, seed=0)
item = ds[0]
for key, value in item.items():
    if torch.is_tensor(value):
        print(
            f"{key:20s} {tuple(value.shape)!s:20s} {str(value.dtype):14s} "
            f"range [{value.min().item():.1f}, {value.max().item():.1f}]"
        )
    else:
        print(f"{key:20s} {value}")

# %% [markdown]
# ## 5. Both worlds meet: mediapipe on toy faces
#
# Is the toy world face-like enough for a detector trained on real faces? Render 24 random people at 256 px
# (yaw ±30°, pitch and roll ±15°, random mouth and smile), run mediapipe, and compare with the renderer's
# truth.

# %%
rng = np.random.default_rng(0)
errors, found, shown = [], 0, None
with L.FaceLandmarker() as landmarker:
    for i in range(24):
        person = toy.sample_identity(rng)
        pose = toy.HeadPose(yaw=rng.uniform(-30, 30), pitch=rng.uniform(-15, 15), roll=rng.uniform(-15, 15))
        img, truth = toy.render(
            person, pose, toy.Expression(mouth_open=rng.uniform(0, 1), smile=rng.uniform(0, 1)), size=256
        )
        try:
            detected = landmarker.detect(img, f"toy render {i}").pixels
        except L.NoFaceError:
            continue
        found += 1
        errors.append(np.linalg.norm(detected - truth, axis=1))  # (478,) pixel error per point
        shown = shown or (img, truth, detected)
errors = np.stack(errors)
iod = np.linalg.norm(truth[33] - truth[263])
print(f"detected: {found}/24, mean landmark error {errors.mean():.1f} px at 256 px")
print(
    "mean error below 3 px:",
    bool(errors.mean() < 3),
    "| below 6% of the eye distance:",
    bool(errors.mean() / iod < 0.06),
)

# %%
img, truth, detected = shown
fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
contour = [i for name, idx in L.GROUPS.items() if "iris" not in name for i in idx]  # oval, eyes, brows, lips
axes[0].imshow(img)
axes[0].scatter(*truth[contour].T, s=9, c="lime", label="renderer (truth)")
axes[0].scatter(*detected[contour].T, s=9, c="red", marker="x", label="mediapipe")
(x0, y0), (x1, y1) = truth.min(0) - 12, truth.max(0) + 12
axes[0].set_xlim(x0, x1), axes[0].set_ylim(y1, y0)
axes[0].legend(fontsize=8, loc="lower left")
axes[0].axis("off")
region = {name: errors[:, list(idx)].mean() for name, idx in L.GROUPS.items()}
axes[1].barh(list(region), list(region.values()), color="gray")
axes[1].set_xlabel("mean error (px at 256 px)")
axes[1].set_title("error by region")
fig.tight_layout()
viz.save(fig, "ch01_mediapipe_on_toy")
plt.show()
print("largest error is on the face oval:", max(region, key=region.get) == "face_oval")

# %% [markdown]
# Eyes, brows and irises agree to about a pixel; the lips to about two; the **face oval** is the worst
# (~5 px): the toy face has no real jaw edge (the neck and hair meet it with colour changes, not geometry), so
# the detector's idea of where a jaw should be wins. How far does detection go as the head turns? Solution 5
# below measures it from 0° to 75° of yaw.

# %% [markdown] tags=["core"]
# ## Summary
#
# - mediapipe's face mesh gives 478 points (468 + 10 iris) as normalized x, y and relative z;
#   `anim_lab.landmarks` converts them to pixels (pixel centres), handles grayscale/RGBA, and raises a named
#   error when there is no face.
# - AniPortrait's pose image is lines only, 17 coloured paths (oval without forehead, eyes, brows, 8 lip
#   arcs), 2 px on a 512×512 canvas that is then resized; `draw_pose_image` draws it at any size with the
#   thickness scaled instead (exact colours; AniPortrait's resize blends them), from landmarks of either
#   world.
# - Video2Pose = tracking landmarks + pose images + a video with the same fps and the source's audio; frames
#   with no face hold the last good landmarks (or raise, by choice).
# - The toy world renders faces from the same mesh with exact landmarks, smooth talking-head clips and a
#   dataset with fixed identity splits — and mediapipe sees its faces (100% here) with eye/brow errors around
#   a pixel.
#
# ## Exercises
#
# 1. Draw the pose image with `antialias=True` and at 128 px: which colours appear now, and why might that
#    matter to a PoseGuider trained on exact colours?
# 2. Run landmark tracking with `on_missing="error"` on a clip where some frames are replaced by
#    `skimage.data.coffee()`. Then with `"hold"`. Which policy would you want for training data, and which for
#    inference?
# 3. Re-derive a yawed face: rotate the template about `toy.renderer.PIVOT` by
#    `toy.rotation_matrix(yaw, 0, 0)` and project it yourself; compare with `toy.render(...)[1]`.
# 4. Render with `supersample=1` (no anti-aliasing in the renderer) and measure how mediapipe's detection
#    rate and error change.
# 5. Measure how mediapipe's detection rate and landmark error change with |yaw| from 0° to 75°.
#
# ## Solutions
#
# **1.** Anti-aliased lines fade into black at their edges: hundreds of new colours, darker versions of each
# part's colour (and mixtures where parts meet). A PoseGuider that learned "this exact green is the face oval"
# sees colours it never saw; keep training and inference drawings the same.

# %%
for aa in (False, True):
    img = L.draw_pose_image(face.normalized, 128, normalized=True, antialias=aa)
    print(f"antialias={aa!s:5s}: distinct colours {len({tuple(c) for c in img.reshape(-1, 3)})}")

# %% [markdown]
# **2.** With `"error"` the first frame without a face stops the run and is named; with `"hold"` it gets the
# last good landmarks. For training data a silent hold teaches the model a wrong pose, so prefer to find and
# drop such frames (`"error"`, then clean); at inference a held pose keeps the video going.

# %%
faulty = list(src_frames[:6])
coffee = cv2.resize(skimage.data.coffee(), faulty[0].shape[1::-1])  # same size as the clip
faulty[3] = coffee  # frame 3: no face
try:
    L.track_landmarks(faulty, on_missing="error", progress=False)
except L.NoFaceError as e:
    print("error policy:", str(e).split(";")[0])
held = L.track_landmarks(faulty, on_missing="hold", progress=False)
print("hold policy: frame 3 repeats frame 2:", bool(np.array_equal(held[3], held[2])), held.shape)

# %% [markdown]
# **3.** Stretch by the identity, rotate about the pivot, drop z and flip y, scale by the pixels per unit:
# $$p = c + \big[(R\,(s \odot v - q) + q)_{x}, -(R\,(s \odot v - q) + q)_{y}\big]\; u$$
# with $s$ the face stretch, $q$ the pivot, $u = 0.2 \cdot \text{size}$ and $c$ the head position minus half a
# pixel.

# %%
R = toy.rotation_matrix(30, 0, 0)
v = vertices * np.array([1.05, 0.97, 1.0])  # the identity's proportions (ident above)
turned = (v - toy.renderer.PIVOT) @ R.T + toy.renderer.PIVOT  # (478, 3) about the pivot
mine = np.array([64, 0.44 * 128]) - 0.5 + turned[:, :2] * np.array([1.0, -1.0]) * (0.2 * 128)
_, lm30 = toy.render(ident, toy.HeadPose(yaw=30), toy.Expression(), size=128)
torch.testing.assert_close(
    torch.from_numpy(mine.astype(np.float32)), torch.from_numpy(lm30), atol=1e-3, rtol=0
)
print("yaw 30 re-derived: matches toy.render")

# %% [markdown]
# **4.** The renderer draws supersampled (smooth edges); without it the edges are jagged:

# %%
rng4 = np.random.default_rng(4)
people4 = [(toy.sample_identity(rng4), toy.HeadPose(yaw=rng4.uniform(-30, 30))) for _ in range(8)]
with L.FaceLandmarker() as landmarker:
    for ss in (None, 1):
        errs, hits = [], 0
        for i, (person, pose) in enumerate(people4):
            kwargs = {} if ss is None else {"supersample": ss}
            img, truth = toy.render(person, pose, toy.Expression(), size=256, **kwargs)
            try:
                det = landmarker.detect(img, f"render {i}").pixels
            except L.NoFaceError:
                continue
            hits += 1
            errs.append(np.linalg.norm(det - truth, axis=1).mean())
        label = "default" if ss is None else f"supersample={ss}"
        print(f"{label:14s}: detected {hits}/8, mean error {np.mean(errs):.1f} px")

# %% [markdown]
# **5.** Six random people per yaw (pitch and roll 0, mouth closed), at 256 px:

# %%
rng5 = np.random.default_rng(5)
people5 = [toy.sample_identity(rng5) for _ in range(6)]
with L.FaceLandmarker() as landmarker:
    for yaw in (0, 15, 30, 45, 60, 75):
        errs = []
        for person in people5:
            img, truth = toy.render(person, toy.HeadPose(yaw=yaw), toy.Expression(), size=256)
            try:
                detected = landmarker.detect(img, f"yaw {yaw}").pixels
            except L.NoFaceError:
                continue
            errs.append(np.linalg.norm(detected - truth, axis=1).mean())
        mean_err = f"{np.mean(errs):.1f} px" if errs else "-"
        print(f"yaw {yaw:2d}: detected {len(errs)}/6, mean error {mean_err}")

# %% [markdown] tags=["core"]
# ## Lab (graded)
#
# Three exercises, graded by nbgrader (`chapters/LABS.md`). Each builds its own inputs, so this section runs
# on its own after the cell below; the checks compare *your* function with the library's on random inputs
# and shapes. Write your code where it says `YOUR CODE HERE`, then run the check under it.

# %% tags=["core"]
import numpy as np

from anim_lab import landmarks as lab_landmarks
from anim_lab import toy as lab_toy

# %% [markdown] tags=["core"]
# ### Exercise 1 (3 points): the toy world's head rotation
# Write `my_rotation_matrix(yaw, pitch, roll)`, angles in degrees: the `(3, 3)` rotation
# $R = R_z(\text{roll})\,R_x(\text{pitch})\,R_y(\text{yaw})$ in the template frame (x right, y up, z towards
# the camera), each factor the usual right-handed rotation about its axis.


# %% nbgrader={"grade": false, "grade_id": "ch01_rotation_matrix", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_rotation_matrix(yaw, pitch, roll):
    ### BEGIN SOLUTION
    y, p, r = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch01_rotation_matrix_check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_rotation_matrix is not lab_toy.rotation_matrix
rng = np.random.default_rng(1)
for yaw, pitch, roll in [(30, 0, 0), (0, -20, 0), (0, 0, 15), *rng.uniform(-60, 60, (5, 3))]:
    np.testing.assert_allclose(
        my_rotation_matrix(yaw, pitch, roll), lab_toy.rotation_matrix(yaw, pitch, roll), atol=1e-12
    )
print("my_rotation_matrix matches toy.rotation_matrix on 3 single-axis and 5 random poses")

# %% [markdown] tags=["core"]
# ### Exercise 2 (2 points): the edges of a landmark path
# A pose image draws each landmark group as a path through its points. Write `my_path_edges(path)`: the set of
# the path's edges, each an unordered pair written as a sorted tuple: `(5, 2, 9) -> {(2, 5), (2, 9)}`.


# %% nbgrader={"grade": false, "grade_id": "ch01_path_edges", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core", "implement"]
def my_path_edges(path):
    ### BEGIN SOLUTION
    return {tuple(sorted(pair)) for pair in zip(path[:-1], path[1:], strict=True)}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch01_path_edges_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert my_path_edges is not lab_landmarks.path_edges
rng = np.random.default_rng(2)
paths = [(5, 2, 9), (1,), tuple(range(10)), *(tuple(rng.integers(0, 478, n).tolist()) for n in (2, 7, 40))]
for path in paths:
    assert set(my_path_edges(path)) == lab_landmarks.path_edges(path), path
print(f"my_path_edges matches landmarks.path_edges on {len(paths)} paths")

# %% [markdown] tags=["core"]
# ### Exercise 3 (2 points): a measured question
# Render `toy.identity_from_seed(5)` in the neutral pose at 128 px (`toy.render`). What fraction of the image
# lies inside the face oval of the landmarks the renderer returns (`landmarks.face_mask`)? Store it, a float,
# in `oval_fraction`.

# %% nbgrader={"grade": false, "grade_id": "ch01_oval_fraction", "locked": false, "schema_version": 3, "solution": true, "task": false} tags=["core"]
### BEGIN SOLUTION
image, landmarks_128 = lab_toy.render(lab_toy.identity_from_seed(5), size=128)
oval_fraction = float(lab_landmarks.face_mask(landmarks_128, 128).mean())
### END SOLUTION
print(f"the face oval covers {oval_fraction:.1%} of the frame")

# %% nbgrader={"grade": true, "grade_id": "ch01_oval_fraction_check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false} tags=["core"]
assert isinstance(oval_fraction, float) and 0 < oval_fraction < 1
### BEGIN HIDDEN TESTS
_, _lmk = lab_toy.render(lab_toy.identity_from_seed(5), size=128)
assert abs(oval_fraction - lab_landmarks.face_mask(_lmk, 128).mean()) < 0.01
### END HIDDEN TESTS
print("oval_fraction is a fraction")
