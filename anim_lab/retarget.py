"""Video2Video: move one face with another face's head pose and expression (AniPortrait's face reenactment).

Drawing the driving face's landmarks as they are would paste the driver's face *shape* onto the portrait.
AniPortrait's vid2vid instead splits every driving frame into a rigid head pose and an expression, and
applies both to the *reference* face. This module does the same with the 478-point face mesh:

1. **Head pose** — a similarity (Umeyama/Procrustes) fit of the 468 mesh points to the project's symmetric
   face template (:func:`anim_lab.toy.template.load_template`), ``Q = s·R·X + t``: rotation (and its yaw,
   pitch, roll), translation and scale per frame. Inverting it gives the face in *canonical* space (pose
   removed, template units).
2. **Neutral frame** — the driving frame with the least expression, measured as mouth opening plus eye
   closure (AniPortrait takes the smallest sum of mediapipe blendshape scores; face mesh has no blendshapes).
3. **Retargeting** — canonical expression offsets ``C_t − C_neutral`` of the driver are added to the
   reference's canonical landmarks; the driver's rotation is used as it is, its translation and scale
   relative to its first frame are applied on top of the reference's; the pose track is smoothed over 3
   frames (a centred moving mean).
4. **Projection** — the scaled orthographic camera that the fit implies (default), or a perspective camera
   with a vertical field of view of 63° as AniPortrait (``camera="perspective"``); then AniPortrait pose
   images (:func:`anim_lab.landmarks.draw_pose_image`).

Which camera, and why. AniPortrait gets its head pose from mediapipe's face-geometry module, which fits a
metric face model under a 63° perspective camera, so it must project back with that camera. Here the pose
comes from the face mesh's own image-space points (pixel x, y and a z in the same units), and the fit is a
similarity in that space: the camera it implies is scaled orthographic, under which retargeting a face onto
itself returns its own landmarks exactly. The toy renderer's camera is orthographic too, so on the toy world
the orthographic camera is also the true one. ``scripts/eval_retarget.py`` measures both.

Where this differs from AniPortrait's ``vid2vid.py`` (each on purpose; the switches give AniPortrait's
choice where one exists):

- pose from a similarity fit of the face mesh's image-space points, not mediapipe's face-geometry transform
  (mediapipe 0.10.21's face mesh has neither it nor blendshapes); hence Euler angles in the toy renderer's
  ``Rz·Rx·Ry`` order rather than scipy's ``"xyz"``, and an explicit scale (relative to the first frame, like
  the translation) where AniPortrait's perspective camera gets size changes from the depth translation;
- neutral frame by mouth opening + eye closure instead of the smallest blendshape sum;
- orthographic camera by default (``camera="perspective", fov=63`` is AniPortrait's);
- the translation is transferred at the head's pivot (:data:`HEAD_PIVOT`), not at the face model's origin
  (``pivot=(0, 0, 0)``: at the template's origin); ``scripts/eval_retarget.py`` measures both.

Coordinates. Detected landmarks come as mediapipe's image-space ``(478, 3)``: pixel x (right), y (down) and
z (smaller = closer, pixels of the width) — :attr:`anim_lab.landmarks.FaceLandmarks.xyz`. The fit works in
the *face frame* of the template: ``(x, −y, −z)``, i.e. x right, y up, z toward the camera, in pixels.
Euler angles follow the toy renderer: ``R = Rz(roll)·Rx(pitch)·Ry(yaw)``
(:func:`anim_lab.toy.rotation_matrix`); yaw > 0 turns the face toward the image's right, pitch > 0 tilts it
down, roll > 0 is counter-clockwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from anim_lab import landmarks as L
from anim_lab.toy.renderer import (
    PIVOT,
    rotation_matrix,
)
from anim_lab.toy.template import load_template

from .errors import InputError

FOV_DEGREES = 63.0  # AniPortrait's perspective camera (vertical field of view)
# The point the head turns about, in template units (x right, y up, z toward the camera): behind the face,
# where the neck is. Translations are transferred at this point, so a turning head does not drift sideways.
# It is the toy renderer's pivot; a real head turns about roughly the same place (about half a face height
# behind the face).
HEAD_PIVOT = np.asarray(PIVOT, np.float64)
SMOOTH_WINDOW = 3  # AniPortrait smooths the vid2vid pose track over 3 frames

_FLIP = np.array([1.0, -1.0, -1.0])  # image space (x right, y down, z away) <-> face frame (y up, z toward)


# ------------------------------------------------------------------------------------------------------------
# 1. Head pose: a similarity fit to the template
# ------------------------------------------------------------------------------------------------------------


def template_landmarks() -> np.ndarray:
    """``(478, 3)`` float64: the symmetric face template (template units, face frame), the canonical face."""
    return load_template()[0].astype(np.float64)


def _check_points(points, what: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] < L.NUM_MESH_POINTS:
        raise InputError(
            f"{what} must be (478, 3) or (468, 3) face-mesh points (x, y, z; e.g. FaceLandmarks.xyz), "
            f"got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise InputError(
            f"{what} contain NaN or inf ({bad} points); detect the face again or hold the last good landmarks"
        )
    return arr


def umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity ``target ≈ s·R·source + t`` with least squared error (Umeyama 1991).

    Args:
        source, target: ``(N, 3)`` corresponding points.

    Returns:
        ``(s, R (3, 3), t (3,))`` with ``det R = +1`` (a rotation, never a reflection).

    Raises:
        ValueError: the points are (nearly) collinear or all equal, so no rotation is determined.
    """
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_src, mu_dst = src.mean(0), dst.mean(0)  # (3,)
    src_c, dst_c = src - mu_src, dst - mu_dst  # (N, 3) centred
    cov = dst_c.T @ src_c / len(src)  # (3, 3) cross-covariance
    u, d, vt = np.linalg.svd(cov)
    for name, pts in (("target", dst_c), ("source", src_c)):
        sv = np.linalg.svd(pts, compute_uv=False)  # (3,)
        if sv[0] <= 1e-12 or sv[1] <= 1e-6 * sv[0]:
            raise InputError(
                f"degenerate fit: the {name} points are collinear (or all equal), so the head rotation is "
                f"undetermined; pass real face-mesh landmarks"
            )
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])  # no reflection
    rot = u @ sign @ vt  # (3, 3)
    scale = float(np.trace(np.diag(d) @ sign) / (src_c**2).sum(1).mean())
    trans = mu_dst - scale * rot @ mu_src  # (3,)
    return scale, rot, trans


def euler_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """``(3,)`` degrees ``(yaw, pitch, roll)`` with ``R = Rz(roll)·Rx(pitch)·Ry(yaw)`` (the toy renderer's).

    The bottom row of that product is ``(−cos p·sin y, sin p, cos p·cos y)`` and its middle column is
    ``(−sin r·cos p, cos r·cos p, sin p)``; pitch is read from ``R[2, 1]``, yaw and roll from ratios.
    """
    r = np.asarray(rotation, np.float64)
    pitch = np.arcsin(np.clip(r[2, 1], -1.0, 1.0))
    yaw = np.arctan2(-r[2, 0], r[2, 2])
    roll = np.arctan2(-r[0, 1], r[1, 1])
    return np.rad2deg([yaw, pitch, roll])


@dataclass(frozen=True)
class PoseFit:
    """One frame's head pose: face-frame points ``Q ≈ scale·rotation·X + translation``.

    Attributes:
        rotation: ``(3, 3)``; translation: ``(3,)`` face-frame pixels (the template origin's image position,
            with y and z flipped); scale: pixels per template unit; rms: fit residual in pixels (468 points).
    """

    rotation: np.ndarray
    translation: np.ndarray
    scale: float
    rms: float

    @property
    def euler(self) -> np.ndarray:
        """``(3,)`` yaw, pitch, roll in degrees."""
        return euler_from_rotation(self.rotation)

    def point(self, canonical: np.ndarray) -> np.ndarray:
        """Where canonical points ``(N, 3)`` land in the face frame: ``s·R·X + t``."""
        return self.scale * np.asarray(canonical) @ self.rotation.T + self.translation  # (N, 3)

    def to_canonical(self, xyz: np.ndarray) -> np.ndarray:
        """Image-space ``(N, 3)`` -> canonical ``(N, 3)``: ``R^T (Q − t) / s`` with ``Q`` the face frame."""
        q = np.asarray(xyz, np.float64) * _FLIP  # (N, 3) image -> face frame
        return (q - self.translation) @ self.rotation / self.scale  # row-wise R^T (q - t) / s


def fit_head_pose(xyz, template: np.ndarray | None = None) -> PoseFit:
    """Head pose of one face: the similarity fit of its 468 mesh points to the template.

    Args:
        xyz: ``(478, 3)`` or ``(468, 3)`` image-space landmarks (pixel x, y, z smaller = closer), e.g.
            :attr:`anim_lab.landmarks.FaceLandmarks.xyz` or :func:`toy_landmarks_3d`.
        template: ``(478, 3)`` canonical face (default :func:`template_landmarks`).

    Raises:
        ValueError: wrong shape, NaN/inf, or a degenerate (collinear) set of points.
    """
    arr = _check_points(xyz, "landmarks")
    canon = template_landmarks() if template is None else np.asarray(template, np.float64)
    mesh = slice(0, L.NUM_MESH_POINTS)  # the 468 surface points (the irises move with the gaze)
    q = arr[mesh] * _FLIP  # (468, 3) image -> face frame
    scale, rot, trans = umeyama(canon[mesh], q)
    residual = q - (scale * canon[mesh] @ rot.T + trans)  # (468, 3)
    rms = float(np.sqrt((residual**2).sum(1).mean()))
    return PoseFit(rotation=rot, translation=trans, scale=scale, rms=rms)


def to_fit_frame(neutral, offsets) -> tuple[np.ndarray, np.ndarray]:
    """A pose-free face mesh and its offsets, ``(V, 3)`` and ``(F, V, 3)`` in that face's own frame, expressed
    in the frame :func:`fit_head_pose` gives a canonical mesh (the template's: the face's own place, size and
    tilt divided out): ``(X - t) @ R / s`` and ``d @ R / s`` with ``(s, R, t) = umeyama(template, neutral)``
    over the 468 mesh points. Audio2Mesh's offsets are added there at inference (to
    :meth:`PoseFit.to_canonical` of the reference), so its training targets are given in it too."""
    nm = _check_points(neutral, "neutral mesh")  # (V, 3)
    scale, rot, trans = umeyama(template_landmarks()[: L.NUM_MESH_POINTS], nm[: L.NUM_MESH_POINTS])
    # row-wise R^T (x - t) / s for points, R^T d / s for offsets
    return (nm - trans) @ rot / scale, np.asarray(offsets, np.float64) @ rot / scale


# ------------------------------------------------------------------------------------------------------------
# 2. The neutral frame
# ------------------------------------------------------------------------------------------------------------


def _eye_opening(c: np.ndarray) -> np.ndarray:
    """``(...,)`` mean lid gap / eye width over both eyes, for canonical points ``(..., 478, 3)``."""
    ratios = []
    for upper, lower in ((L.RIGHT_EYE_UPPER, L.RIGHT_EYE_LOWER), (L.LEFT_EYE_UPPER, L.LEFT_EYE_LOWER)):
        gap = np.linalg.norm(c[..., upper[4], :] - c[..., lower[4], :], axis=-1)  # lid centres
        width = np.linalg.norm(c[..., upper[0], :] - c[..., upper[-1], :], axis=-1)  # corner to corner
        ratios.append(gap / width)
    return (ratios[0] + ratios[1]) / 2


def expression_measure(canonical: np.ndarray) -> np.ndarray:
    """How far a face is from neutral: mouth opening plus eye closure, each about 0 (neutral) to 1.

    - mouth opening: the gap between the inner lips' centres (13, 14) over the mouth width (61-291);
    - eye closure: ``1 − lid gap / the template's open-eye lid gap`` (each over the eye's width), at least 0.

    Args:
        canonical: ``(478, 3)`` or ``(F, 478, 3)`` canonical-space landmarks (:meth:`PoseFit.to_canonical`).

    Returns:
        ``()`` or ``(F,)``.
    """
    c = np.asarray(canonical, np.float64)
    lips_upper, lips_lower = L.LIPS_INNER_UPPER[5], L.LIPS_INNER_LOWER[5]  # 13, 14
    left, right = L.LIPS_OUTER_UPPER[0], L.LIPS_OUTER_UPPER[-1]  # 61, 291
    gap = np.linalg.norm(c[..., lips_upper, :] - c[..., lips_lower, :], axis=-1)
    mouth = gap / np.linalg.norm(c[..., left, :] - c[..., right, :], axis=-1)
    closure = np.clip(1.0 - _eye_opening(c) / _eye_opening(template_landmarks()), 0.0, None)
    return mouth + closure


def neutral_frame(canonical: np.ndarray) -> int:
    """Index of the most neutral frame of ``(F, 478, 3)`` canonical landmarks (smallest
    :func:`expression_measure`; the first one on ties)."""
    c = np.asarray(canonical, np.float64)
    if c.ndim != 3 or len(c) == 0:
        raise InputError(f"canonical landmarks must be (F, 478, 3) with F >= 1, got shape {c.shape}")
    return int(np.argmin(expression_measure(c)))


# ------------------------------------------------------------------------------------------------------------
# 3. Retargeting
# ------------------------------------------------------------------------------------------------------------


def smooth_track(track: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Centred moving mean along axis 0 (the window shrinks at both ends), as AniPortrait smooths poses."""
    x = np.asarray(track, np.float64)
    if int(window) != window or window < 1:
        raise InputError(f"window must be a positive integer, got {window}")
    half = int(window) // 2
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = x[max(0, i - half) : i + half + 1].mean(0)
    return out


def project(points: np.ndarray, height: int, width: int, camera: str = "orthographic", fov=FOV_DEGREES):
    """Face-frame points (pixels; x right, y up, z toward the camera) -> ``(N, 2)`` image pixels.

    - ``"orthographic"``: the camera the similarity fit implies: ``(x, y, z) -> (x, −y)``.
    - ``"perspective"``: a pinhole camera on the image centre's axis with vertical field of view ``fov``
      degrees (focal length ``f = (H/2) / tan(fov/2)`` pixels), placed so that the points' mean depth is at
      distance ``f`` (where one face-frame pixel is one image pixel, the size the fit measured): a point
      ``d`` pixels nearer than that is magnified by ``f / (f − d)`` about the image centre.
    """
    p = np.asarray(points, np.float64)
    xy = p[:, :2] * np.array([1.0, -1.0])  # (N, 3) -> (N, 2) image pixels, y down
    if camera == "orthographic":
        return xy
    if camera != "perspective":
        raise InputError(f'camera must be "orthographic" or "perspective", got {camera!r}')
    if not 0.0 < fov < 180.0:
        raise InputError(f"fov must be in (0, 180) degrees, got {fov}")
    focal = 0.5 * height / np.tan(np.deg2rad(fov) / 2)  # pixels
    centre = np.array([(width - 1) / 2, (height - 1) / 2])  # pixel centres
    nearer = p[:, 2] - p[:, 2].mean()  # (N,) pixels toward the camera from the mean depth
    if (nearer >= focal).any():
        raise InputError(f"points reach the camera (field of view {fov}° is too wide for this face size)")
    return centre + (xy - centre) * (focal / (focal - nearer))[:, None]  # (N, 2)


@dataclass
class Retarget:
    """The result of :func:`retarget`.

    Attributes:
        landmarks: ``(F, 478, 2)`` float32 image pixels of the retargeted reference face (draw these).
        landmarks_3d: ``(F, 478, 3)`` face-frame points before projection.
        euler: ``(F, 3)`` yaw, pitch, roll (degrees) applied per frame (after smoothing).
        driving_euler: ``(F, 3)`` the driver's fitted angles (before smoothing).
        neutral: index of the driver's neutral frame.
        reference_fit: the reference's :class:`PoseFit`.
    """

    landmarks: np.ndarray
    landmarks_3d: np.ndarray
    euler: np.ndarray
    driving_euler: np.ndarray
    neutral: int
    reference_fit: PoseFit


def retarget(
    reference_xyz,
    driving_xyz,
    height: int,
    width: int | None = None,
    *,
    smooth: int = SMOOTH_WINDOW,
    camera: str = "orthographic",
    fov: float = FOV_DEGREES,
    pivot=HEAD_PIVOT,
    neutral: int | None = None,
) -> Retarget:
    """Drive the reference face with the driving frames' head pose and expression (AniPortrait's vid2vid).

    For driving frame ``t`` with fit ``(s_t, R_t, t_t)`` and canonical points ``C_t``, reference fit
    ``(s_r, R_r, t_r)`` and canonical points ``C_r``, neutral frame ``n``:

    - expression: ``X_t = C_r + (C_t − C_n)``;
    - pose: rotation ``R_t``; the pivot's image position ``q = s·R·pivot + t`` moves as
      ``q_r + (q_t − q_0)``; the scale as ``s_r · s_t / s_0``; the track (yaw, pitch, roll, q, log s) is
      smoothed over ``smooth`` frames;
    - ``Q_t = s·R·(X_t − pivot) + q``, projected with ``camera``.

    Args:
        reference_xyz: ``(478, 3)`` image-space landmarks of the reference face.
        driving_xyz: ``(F, 478, 3)`` image-space landmarks of the driving frames (in the driving video's
            pixels; only relative motion and expression are taken from them, so its size does not matter).
        height, width: the reference image's size (the output pose images' size).
        smooth: smoothing window in frames (1 = off).
        camera, fov: see :func:`project`.
        pivot: ``(3,)`` the point the head turns about, template units (``(0, 0, 0)``: the template origin).
        neutral: force the neutral frame (default: :func:`neutral_frame`).
    """
    width = height if width is None else width
    ref = _check_points(reference_xyz, "reference landmarks")
    drv = np.asarray(driving_xyz, np.float64)
    if drv.ndim != 3 or len(drv) == 0:
        raise InputError(f"driving landmarks must be (F, 478, 3) with F >= 1, got shape {drv.shape}")
    if drv.shape[1] != len(ref):
        raise InputError(
            f"the reference has {len(ref)} landmarks but the driving frames have {drv.shape[1]}; give both "
            "with the irises (478, refine_landmarks) or both without (468)"
        )
    pivot = np.asarray(pivot, np.float64)
    ref_fit = fit_head_pose(ref)
    fits = [fit_head_pose(_check_points(f, f"driving landmarks of frame {i}")) for i, f in enumerate(drv)]
    canon_ref = ref_fit.to_canonical(ref)  # (478, 3)
    canon = np.stack([fit.to_canonical(f) for fit, f in zip(fits, drv, strict=True)])  # (F, 478, 3)
    n = neutral_frame(canon) if neutral is None else int(neutral)
    if not 0 <= n < len(drv):
        raise InputError(f"neutral must index one of the {len(drv)} driving frames, got {neutral}")
    expressive = canon_ref + (canon - canon[n])  # (F, 478, 3) the reference face with the driver's expression

    driving_euler = np.stack([fit.euler for fit in fits])  # (F, 3)
    q = np.stack([fit.point(pivot[None])[0] for fit in fits])  # (F, 3) the pivot's face-frame position
    log_s = np.log([fit.scale for fit in fits])  # (F,)
    q_out = ref_fit.point(pivot[None])[0] + (q - q[0])  # (F, 3)
    log_s_out = np.log(ref_fit.scale) + (log_s - log_s[0])  # (F,)
    track = np.concatenate([driving_euler, q_out, log_s_out[:, None]], axis=1)  # (F, 7)
    track = smooth_track(track, smooth)

    points_3d, points_2d = [], []
    for x, row in zip(expressive, track, strict=True):
        rot = rotation_matrix(*row[:3])  # (3, 3) from yaw, pitch, roll
        posed = np.exp(row[6]) * (x - pivot) @ rot.T + row[3:6]  # (478, 3) face frame
        points_3d.append(posed)
        points_2d.append(project(posed, height, width, camera, fov))
    return Retarget(
        landmarks=np.stack(points_2d).astype(np.float32),  # (F, 478, 2)
        landmarks_3d=np.stack(points_3d).astype(np.float32),  # (F, 478, 3)
        euler=track[:, :3],
        driving_euler=driving_euler,
        neutral=n,
        reference_fit=ref_fit,
    )


def pose_images(landmarks: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """``(F, 478, 2)`` pixels -> ``(F, H, W, 3)`` uint8 AniPortrait pose images."""
    width = height if width is None else width
    return np.stack([L.draw_pose_image(p, height, width) for p in landmarks])


# ------------------------------------------------------------------------------------------------------------
# 4. Detection and the end-to-end Video2Video poses
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Video2VideoPoses:
    """Video2Video's result: ``landmarks`` ``(F, 478, 2)`` of the reference face in the driving poses, at the
    reference image's ``size`` (height, width); the driving ``fps`` (None for frames given as arrays); the
    :class:`Retarget` details. ``images`` draws the pose frames, ``(F, H, W, 3)`` uint8 (all at once; a
    long video is better drawn one frame at a time with :func:`anim_lab.landmarks.draw_pose_image`)."""

    landmarks: np.ndarray
    size: tuple[int, int]
    fps: float | None
    retarget: Retarget

    @property
    def images(self) -> np.ndarray:
        return pose_images(self.landmarks, *self.size)


def _driving_frames(driving):
    """(frames iterable, fps or None, number of frames or None) of a video path or a frame sequence."""
    from anim_lab import video as vio

    if isinstance(driving, (str, os.PathLike)):
        reader = vio.VideoReader(driving)
        return reader, reader.fps, reader.num_frames
    if len(driving) == 0:
        raise InputError("the driving video has no frames")
    return driving, None, len(driving)


def reference_landmarks(ref_image) -> np.ndarray:
    """``(478, 3)`` image-space landmarks of the face in the reference image (mediapipe, static mode);
    :class:`~anim_lab.landmarks.NoFaceError` that names the reference when there is none."""
    return L.detect_landmarks(ref_image, name="the reference image").xyz


def video_to_video_poses(
    ref_image,
    driving_video,
    *,
    on_missing: str = "hold",
    smooth: int = SMOOTH_WINDOW,
    camera: str = "orthographic",
    fov: float = FOV_DEGREES,
    progress: bool = False,
) -> Video2VideoPoses:
    """Video2Video's pose frames: the reference face moved by the driving video's head pose and expression.

    Args:
        ref_image: ``(H, W, 3)`` uint8 RGB portrait.
        driving_video: a video path, or a sequence / ``(F, h, w, 3)`` array of uint8 RGB frames.
        on_missing: driving frames with no face: ``"hold"`` the last pose (default) or ``"error"``.
        smooth, camera, fov: see :func:`retarget`.
        progress: a tqdm bar over the driving frames.

    Returns:
        :class:`Video2VideoPoses` (pose images at the reference image's size).
    """
    ref = L.as_rgb_uint8(ref_image, "the reference image")
    ref_xyz = reference_landmarks(ref)
    frames, fps, total = _driving_frames(driving_video)
    try:
        drv_xyz = L.track_landmarks(frames, on_missing=on_missing, progress=progress, total=total, xyz=True)
    except L.NoFaceError as err:
        raise L.NoFaceError(f"the driving video: {err}") from None
    h, w = ref.shape[:2]
    result = retarget(ref_xyz, drv_xyz, h, w, smooth=smooth, camera=camera, fov=fov)
    return Video2VideoPoses(landmarks=result.landmarks, size=(h, w), fps=fps, retarget=result)
