"""Audio2Video: a portrait speaks a recording, AniPortrait's ``audio2vid`` (audio -> mesh -> pose images ->
Pose2Video).

    from anim_lab.audio2mesh import Audio2Mesh
    from anim_lab.pipelines import audio2video
    mesh_model = Audio2Mesh.from_pretrained("anim_lab/assets/toy_audio2mesh")
    out = audio2video.audio_to_video(pipe, mesh_model, ref_image, "speech.wav", fps=25)
    out.frames, out.pose_images, out.landmarks   # (F, H, W, 3) uint8, (F, H, W, 3) uint8, (F, 478, 2)

The steps, each a small function below (AniPortrait ``scripts/audio2vid.py``, ``reference/implementations.md``
§2.4):

(a) :func:`reference_face` — the reference's face-mesh landmarks (mediapipe, ``(478, 3)`` image space) ->
    its head pose and its canonical, pose-free mesh (:func:`anim_lab.retarget.fit_head_pose`): AniPortrait's
    ``trans_mat`` and ``lmks3d``.
(b) :func:`mesh_offsets` — Audio2Mesh: 16-kHz audio -> per-frame vertex offsets ``(F, V, 3)``, F =
    ``ceil(seconds · fps)`` (:func:`anim_lab.audio.frame_count`); :func:`offsets_to_canonical` brings them
    into the canonical frame and :func:`speaking_meshes` adds them to the reference's canonical mesh.
(c) :func:`head_pose_track` — the head pose of every frame: ``"reference"`` (hold the reference's pose),
    ``"template"`` (a recorded ``(T, 6)`` pose sequence mirrored and tiled, AniPortrait's ``pose_temp``) or
    ``"audio2pose"`` (an :class:`~anim_lab.audio2pose.Audio2Pose` model).
(d) :func:`pose_and_project` — each mesh posed and projected with the reference's camera (as
    :func:`anim_lab.retarget.retarget` does), then drawn as the project's Video2Pose draws
    (:func:`anim_lab.retarget.pose_images`, i.e. :func:`anim_lab.landmarks.draw_pose_image`).
(e) :func:`audio_to_video` — the pose images into a :class:`~anim_lab.pipelines.Pose2VideoPipeline` (the toy
    animator or real weights) in context windows; returns the frames, the pose images and the landmarks.

Frames and coordinates. The pose vector of a frame is the toy world's: ``(yaw, pitch, roll, tx, ty, scale)``,
angles in degrees (``R = Rz(roll)·Rx(pitch)·Ry(yaw)``, :func:`anim_lab.toy.rotation_matrix`), ``tx, ty`` in
fractions of the image width and height, ``scale`` a factor (``Clip.pose_array``; what the toy world's
``TalkingMesh.head_pose`` gives Audio2Pose to learn). A template's or Audio2Pose's poses are used *relative
to their first frame*, added to the reference's pose (angles added, the head pivot moved by the shift, the
size multiplied), so the video starts in the reference's pose.

Mesh frames (the check :func:`offsets_to_canonical` makes). The toy Audio2Mesh is trained on
``TalkingMesh.offsets``: template units, x right, y up, z toward the camera, in the identity's own face (the
template stretched by its proportions). :func:`anim_lab.retarget.fit_head_pose`'s canonical mesh has the same
axes and units, but it is the face *normalised by the similarity fit* to the template: for a face whose
neutral mesh is ``N``, canonical = ``B⁻¹(N)`` with ``B = umeyama(template, N)``. So an offset ``d`` of that
face is ``B⁻¹``'s linear part applied to ``d``: ``d @ R_B / s_B``. With the identity's neutral mesh known
(the toy world's ground truth, ``neutral=``) the conversion is exact; without it (real use) ``s_B`` and
``R_B`` cannot be told from one image and are taken as 1 and I — as AniPortrait adds its offsets to
``lmks3d`` as they are. On the toy identities ``s_B`` is within about ±6% of 1 (face proportions ±8%), so
the mouth moves up to about 6% too much or too little.
AniPortrait's own Audio2Mesh (468 vertices) predicts offsets of mediapipe's *metric* canonical face
(centimetres): give ``offset_scale`` (template units per offset unit) for such a model.

Where this differs from AniPortrait's ``audio2vid.py``: the camera is the scaled orthographic one the
similarity fit implies (``camera="perspective"``: the 63° pinhole camera), as in
:mod:`anim_lab.retarget`; no FILM frame interpolation (``-acc``); the reference's pose (not the template's
absolute pose) is where the head starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from anim_lab import audio as A
from anim_lab import landmarks as L
from anim_lab import retarget as RT
from anim_lab.audio2pose import Audio2Pose, audio_pose_sequence, tile_pose_template
from anim_lab.errors import InputError
from anim_lab.toy.renderer import rotation_matrix

__all__ = [
    "DEFAULT_FPS",
    "POSE_MODES",
    "ReferenceFace",
    "HeadTrack",
    "Audio2VideoPoses",
    "Audio2VideoOutput",
    "as_audio",
    "reference_face",
    "mesh_offsets",
    "offsets_to_canonical",
    "speaking_meshes",
    "head_pose_track",
    "pose_and_project",
    "audio_to_poses",
    "audio_to_video",
]

DEFAULT_FPS = 25.0  # the toy world's frame rate (AniPortrait: 30)
POSE_MODES = ("reference", "template", "audio2pose")
MAX_OFFSET = 1.0  # template units (half a face height): larger offsets are not template units


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def as_audio(audio, sample_rate: int = A.SAMPLE_RATE) -> np.ndarray:
    """A path (wav, flac, ogg, mp3) or an array -> ``(N,)`` float32 mono 16 kHz, checked
    (:func:`anim_lab.audio.prepare_audio`: empty, silent, NaN and too short refused; several channels mixed to
    mono; other rates resampled)."""
    if isinstance(audio, (str, os.PathLike)):
        return A.load_audio(Path(audio))
    return A.prepare_audio(audio, sample_rate)


def _check_fps(fps) -> float:
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number of frames per second, got {fps}")
    return float(fps)


# ------------------------------------------------------------------------------------------------------------
# (a) the reference: head pose and canonical mesh
# ------------------------------------------------------------------------------------------------------------


@dataclass
class ReferenceFace:
    """The reference portrait's face: ``xyz`` ``(478, 3)`` image-space landmarks (pixels of an image of
    ``size`` = (height, width)), ``fit`` its head pose (:class:`anim_lab.retarget.PoseFit`), ``canonical``
    ``(478, 3)`` its pose-free mesh (template units, x right, y up, z toward the camera)."""

    xyz: np.ndarray
    fit: RT.PoseFit
    canonical: np.ndarray
    size: tuple[int, int]


def reference_face(ref_image=None, *, xyz=None, size: tuple[int, int] | None = None) -> ReferenceFace:
    """Step (a): ``(H, W, 3)`` uint8 RGB portrait (mediapipe finds its landmarks), or ``xyz`` ``(478, 3)``
    image-space landmarks given (the toy world's exact ones) -> :class:`ReferenceFace`.

    ``size``: (height, width) of the pose images to draw, default the image's size; the landmarks are
    detected at the image's own resolution and scaled (pixel centres kept; z with the width)."""
    if xyz is None:
        if ref_image is None:
            raise InputError("give the reference image (or its landmarks, xyz=)")
        image = L.as_rgb_uint8(ref_image, "the reference image")
        xyz = RT.reference_landmarks(image)  # (478, 3) mediapipe, pixels of the image
        native = image.shape[:2]
    else:
        xyz = np.asarray(xyz, np.float64)
        if size is None and ref_image is None:
            raise InputError("with xyz= give size=(height, width) of the image the landmarks belong to")
        native = size if ref_image is None else np.asarray(ref_image).shape[:2]
    xyz = RT._check_points(xyz, "reference landmarks")
    size = tuple(int(s) for s in (native if size is None else size))
    if tuple(native) != size:  # pixels of the image -> pixels of the pose images
        sx, sy = size[1] / native[1], size[0] / native[0]
        xyz = np.concatenate(
            [(xyz[:, :2] + 0.5) * np.array([sx, sy]) - 0.5, xyz[:, 2:] * sx], axis=1
        )  # (478, 3)
    fit = RT.fit_head_pose(xyz)
    return ReferenceFace(xyz=xyz, fit=fit, canonical=fit.to_canonical(xyz), size=size)  # (478, 3)


# ------------------------------------------------------------------------------------------------------------
# (b) Audio2Mesh: offsets, into the canonical frame, added to the reference
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def mesh_offsets(model, audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Step (b): ``(N,)`` 16-kHz audio -> ``(F, V, 3)`` float64 offsets from Audio2Mesh (its own wav2vec2, or
    log-mel features for a model without encoder, built as ``scripts/train_audio2mesh.py`` builds them)."""
    p = next(model.parameters())
    if model.audio_encoder is None:
        dim = model.in_fn.in_features
        if dim != A.MEL_BINS:
            raise InputError(
                f"this Audio2Mesh has no audio encoder and reads {dim} features a frame; anim_lab feeds "
                f"log-mel features ({A.MEL_BINS} bands): give a model with a wav2vec2 encoder or log-mel "
                "input"
            )
        feats = torch.from_numpy(A.log_mel(audio, num_frames=num_frames))  # (F, 80)
        out = model(features=feats[None].to(p.device, p.dtype))  # (1, F, V, 3)
    else:
        values = torch.from_numpy(A.normalize(audio))[None].to(p.device, p.dtype)  # (1, N)
        out = model(values, num_frames)  # (1, N) -> (1, F, V, 3)
    return out[0].double().cpu().numpy()  # (F, V, 3)


def _check_canonical_frame(canonical: np.ndarray) -> None:
    """The canonical reference mesh must be in the template's frame (unit scale, no rotation against the
    template): what fit_head_pose guarantees; a mesh in pixels or image axes fails here."""
    template = RT.template_landmarks()[: L.NUM_MESH_POINTS]
    scale, rot, _ = RT.umeyama(template, canonical[: L.NUM_MESH_POINTS])
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
    if not (0.8 < scale < 1.25 and angle < 10):
        raise InputError(
            f"the canonical mesh is not in the template's frame (scale {scale:.3g}, turned {angle:.0f}° "
            "against it): pass fit_head_pose's to_canonical points (template units, x right, y up, z toward "
            "the camera)"
        )


def offsets_to_canonical(
    offsets,
    canonical: np.ndarray,
    *,
    neutral: np.ndarray | None = None,
    offset_scale: float = 1.0,
) -> np.ndarray:
    """Audio2Mesh's offsets in the reference's canonical frame: ``(F, V, 3)`` -> ``(F, 478, 3)``.

    - the canonical mesh is checked to be in the template's frame (x right, y up, z toward the camera,
      template units): both are, so the axes need no change;
    - offsets larger than :data:`MAX_OFFSET` template units (pixels, centimetres) are refused unless
      ``offset_scale`` (template units per offset unit) brings them there;
    - ``neutral`` ``(V, 3)``: the face's own neutral mesh in the offsets' frame (toy ground truth,
      ``TalkingMesh.neutral``): the exact conversion ``d @ R_B / s_B`` with ``(s_B, R_B) = umeyama(template,
      neutral)``, the similarity fit_head_pose divides out of that face (module docstring);
    - a 468-vertex model (AniPortrait's) leaves the 10 iris points where they are (offset 0).
    """
    d = np.asarray(offsets, np.float64) * float(offset_scale)  # (F, V, 3)
    if d.ndim != 3 or d.shape[2] != 3 or d.shape[1] not in (L.NUM_MESH_POINTS, 478):
        raise InputError(f"offsets must be (F, 468 or 478, 3), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise InputError("Audio2Mesh gave NaN or inf offsets")
    _check_canonical_frame(canonical)
    largest = float(np.abs(d).max(initial=0.0))
    if largest > MAX_OFFSET:
        raise InputError(
            f"Audio2Mesh's offsets reach {largest:.3g}, more than {MAX_OFFSET} template unit (half a face "
            "height): they are not template units (AniPortrait's model predicts centimetres of mediapipe's "
            "metric face); give offset_scale, template units per offset unit"
        )
    if neutral is not None:
        d = RT.to_fit_frame(neutral, d)[1]  # the face's own size and tilt divided out
    if d.shape[1] == L.NUM_MESH_POINTS:  # (F, 468, 3) -> (F, 478, 3): the irises keep their place
        d = np.concatenate([d, np.zeros((len(d), 478 - L.NUM_MESH_POINTS, 3))], axis=1)
    return d


def speaking_meshes(canonical: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(478, 3)`` canonical reference + ``(F, 478, 3)`` canonical offsets -> ``(F, 478, 3)``: the reference
    face speaking, pose-free (AniPortrait's ``pred = lmks3d + offsets``)."""
    return np.asarray(canonical, np.float64)[None] + offsets  # (1, 478, 3) + (F, 478, 3)


# ------------------------------------------------------------------------------------------------------------
# (c) head pose per frame
# ------------------------------------------------------------------------------------------------------------


@dataclass
class HeadTrack:
    """The head pose of every frame, as :func:`anim_lab.retarget.retarget` applies it: ``euler`` ``(F, 3)``
    yaw, pitch, roll (degrees), ``pivot`` ``(F, 3)`` the head pivot's face-frame position (pixels), ``scale``
    ``(F,)`` pixels per template unit."""

    euler: np.ndarray
    pivot: np.ndarray
    scale: np.ndarray


def _relative_track(ref: ReferenceFace, poses: np.ndarray, pivot) -> HeadTrack:
    """``(F, 6)`` toy poses (yaw, pitch, roll, tx, ty, scale), relative to the first, added to the
    reference's pose."""
    poses = np.asarray(poses, np.float64)
    if poses.ndim != 2 or poses.shape[1] != 6 or not np.isfinite(poses).all():
        raise InputError(
            f"poses must be a finite (F, 6) array (yaw, pitch, roll, tx, ty, scale), got {poses.shape}"
        )
    if (poses[:, 5] <= 0).any():
        raise InputError("the poses' scale column (the 6th) must be positive")
    h, w = ref.size
    delta = poses - poses[:1]  # (F, 6) relative to the first frame
    euler = ref.fit.euler[None] + delta[:, :3]  # (F, 3) angles added
    shift = np.stack([delta[:, 3] * w, -delta[:, 4] * h, np.zeros(len(poses))], axis=1)  # image -> face frame
    q0 = ref.fit.point(np.asarray(pivot, np.float64)[None])[0]  # (3,) the reference's pivot
    return HeadTrack(euler=euler, pivot=q0[None] + shift, scale=ref.fit.scale * poses[:, 5] / poses[0, 5])


def head_pose_track(
    mode: str,
    ref: ReferenceFace,
    num_frames: int,
    *,
    template=None,
    audio2pose: Audio2Pose | None = None,
    audio: np.ndarray | None = None,
    fps: float = DEFAULT_FPS,
    id_seed: int = 42,
    pivot=RT.HEAD_PIVOT,
) -> HeadTrack:
    """Step (c): the head pose of each of ``num_frames`` frames.

    - ``"reference"``: the reference's own pose held (the toy world's default: its head motion carries no
      information the audio has);
    - ``"template"``: ``template`` ``(T, 6)`` toy poses, mirrored and tiled
      (:func:`anim_lab.audio2pose.tile_pose_template`), relative to its first pose, added to the reference's;
    - ``"audio2pose"``: ``audio2pose`` run on ``audio`` (:func:`anim_lab.audio2pose.audio_pose_sequence`:
      chunks, rotations halved, smoothed), used the same way.
    """
    if mode not in POSE_MODES:
        raise InputError(f"pose mode must be one of {POSE_MODES}, got {mode!r}")
    if mode == "reference":
        q0 = ref.fit.point(np.asarray(pivot, np.float64)[None])[0]  # (3,)
        return HeadTrack(
            euler=np.repeat(ref.fit.euler[None], num_frames, 0),  # (F, 3)
            pivot=np.repeat(q0[None], num_frames, 0),  # (F, 3)
            scale=np.full(num_frames, ref.fit.scale),  # (F,)
        )
    if mode == "template":
        if template is None:
            raise InputError('pose mode "template" needs template=, a (T, 6) pose array')
        return _relative_track(ref, tile_pose_template(template, num_frames), pivot)  # (T, 6) -> (F, 6)
    if audio2pose is None or audio is None:
        raise InputError('pose mode "audio2pose" needs audio2pose= (an Audio2Pose model) and the audio')
    if audio2pose.audio_encoder is None:
        raise InputError("this Audio2Pose has no audio encoder; audio2video runs Audio2Pose models with one")
    p = next(audio2pose.parameters())
    values = torch.from_numpy(A.normalize(audio))[None].to(p.device, p.dtype)  # (1, N)
    poses = audio_pose_sequence(audio2pose, values, num_frames, id_seed, fps=fps)  # (F, 6)
    return _relative_track(ref, poses, pivot)


# ------------------------------------------------------------------------------------------------------------
# (d) pose, project, draw
# ------------------------------------------------------------------------------------------------------------


def pose_and_project(
    meshes: np.ndarray,
    track: HeadTrack,
    size: tuple[int, int],
    *,
    camera: str = "orthographic",
    fov: float = RT.FOV_DEGREES,
    pivot=RT.HEAD_PIVOT,
) -> tuple[np.ndarray, np.ndarray]:
    """Step (d): ``(F, 478, 3)`` canonical meshes -> ``(F, 478, 3)`` face-frame points and ``(F, 478, 2)``
    image pixels: ``Q = s·R·(X − pivot) + q`` per frame (as :func:`anim_lab.retarget.retarget`), projected
    with ``camera`` (:func:`anim_lab.retarget.project`)."""
    pivot = np.asarray(pivot, np.float64)
    posed, flat = [], []
    for x, euler, q, s in zip(meshes, track.euler, track.pivot, track.scale, strict=True):
        rot = rotation_matrix(*euler)  # (3, 3)
        points = s * (x - pivot) @ rot.T + q  # (478, 3) face frame, pixels
        posed.append(points)
        flat.append(RT.project(points, size[0], size[1], camera, fov))  # (478, 2)
    return np.stack(posed), np.stack(flat).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# (a)-(d) together, and (e) the video
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Audio2VideoPoses:
    """What drives the animator: ``landmarks`` ``(F, 478, 2)`` float32 pixels, ``pose_images`` ``(F, H, W,
    3)`` uint8, ``fps``, ``audio`` ``(N,)`` 16 kHz; and, when computed from the audio, the canonical
    ``offsets`` ``(F, 478, 3)``, the :class:`HeadTrack` and the :class:`ReferenceFace`."""

    landmarks: np.ndarray
    pose_images: np.ndarray
    fps: float
    audio: np.ndarray
    offsets: np.ndarray | None = None
    track: HeadTrack | None = None
    reference: ReferenceFace | None = None


def audio_to_poses(
    audio2mesh,
    audio,
    ref_image=None,
    *,
    sample_rate: int = A.SAMPLE_RATE,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    reference_xyz=None,
    pose: str = "reference",
    template=None,
    audio2pose: Audio2Pose | None = None,
    id_seed: int = 42,
    neutral: np.ndarray | None = None,
    offset_scale: float = 1.0,
    offsets: np.ndarray | None = None,
    landmarks: np.ndarray | None = None,
    camera: str = "orthographic",
    fov: float = RT.FOV_DEGREES,
    progress: bool = False,
) -> Audio2VideoPoses:
    """Steps (a)-(d): audio (a path or 16-kHz samples) + the reference -> landmarks and pose images of
    ``ceil(seconds · fps)`` frames.

    Args:
        audio2mesh: an :class:`~anim_lab.audio2mesh.Audio2Mesh` (None only with ``offsets`` or ``landmarks``).
        audio: a path, or samples ``(N,)`` / ``(N, C)`` at ``sample_rate`` (:func:`as_audio`: mixed to mono,
            resampled to 16 kHz, checked).
        ref_image: ``(H, W, 3)`` uint8 RGB portrait; or ``reference_xyz`` ``(478, 3)`` with ``size``.
        fps: frame rate; default the Audio2Mesh's ``config.fps`` (or :data:`DEFAULT_FPS`).
        size: (height, width) of the pose images; default the reference image's size.
        pose, template, audio2pose, id_seed: step (c), :func:`head_pose_track`.
        neutral, offset_scale: step (b)'s conversion, :func:`offsets_to_canonical`.
        offsets: ``(F, V, 3)`` offsets given instead of Audio2Mesh's (the toy world's ground truth).
        landmarks: ``(F, 478, 2)`` 2-D landmarks given (pixels of ``size``): steps (a)-(d) skipped, they are
            drawn as they are (§4's ceiling run, driven by the ground truth).
        camera, fov: :func:`anim_lab.retarget.project`.
        progress: a tqdm bar over the stages.
    """
    if fps is None:
        fps = float(getattr(getattr(audio2mesh, "config", None), "fps", DEFAULT_FPS) or DEFAULT_FPS)
    fps = _check_fps(fps)
    samples = as_audio(audio, sample_rate)  # (N,) 16 kHz, checked
    num_frames = A.frame_count(len(samples), fps)
    if len(samples) < A.SAMPLE_RATE / fps:
        raise InputError(
            f"the audio is {1000 * len(samples) / A.SAMPLE_RATE:.0f} ms long, shorter than one frame "
            f"({1000 / fps:.0f} ms at {fps:g} fps): give a longer recording"
        )
    if pose not in POSE_MODES:
        raise InputError(f"pose must be one of {POSE_MODES}, got {pose!r}")

    if landmarks is not None:  # the ceiling: ground-truth 2-D landmarks, drawn as they are
        pts = np.asarray(landmarks, np.float32)
        if pts.ndim != 3 or pts.shape[2] < 2 or pts.shape[0] != num_frames:
            raise InputError(
                f"landmarks must be (F, 478, 2) with F = {num_frames} (the audio's frames at {fps:g} fps), "
                f"got shape {pts.shape}"
            )
        if size is None:
            if ref_image is None:
                raise InputError("with landmarks= give size=(height, width) or the reference image")
            size = np.asarray(ref_image).shape[:2]
        size = (int(size[0]), int(size[1]))
        bar = tqdm(pts, desc="pose images", unit="frame", disable=not progress)
        images = np.stack([L.draw_pose_image(p[:, :2], *size) for p in bar])  # (F, H, W, 3)
        return Audio2VideoPoses(landmarks=pts[..., :2], pose_images=images, fps=fps, audio=samples)

    stages = tqdm(total=4, desc="audio2video poses", unit="stage", disable=not progress)
    with stages:
        stages.set_postfix_str("reference")
        ref = reference_face(ref_image, xyz=reference_xyz, size=size)  # (a)
        stages.update()
        stages.set_postfix_str("audio2mesh")
        if offsets is None:
            if audio2mesh is None:
                raise InputError("give an Audio2Mesh model (or offsets= / landmarks=)")
            offsets = mesh_offsets(audio2mesh, samples, num_frames)  # (b) (F, V, 3)
        elif len(offsets) != num_frames:
            raise InputError(f"offsets have {len(offsets)} frames; the audio has {num_frames} at {fps:g} fps")
        canon = offsets_to_canonical(offsets, ref.canonical, neutral=neutral, offset_scale=offset_scale)
        meshes = speaking_meshes(ref.canonical, canon)  # (F, 478, 3)
        stages.update()
        stages.set_postfix_str("head pose")
        track = head_pose_track(
            pose,
            ref,
            num_frames,
            template=template,
            audio2pose=audio2pose,
            audio=samples,
            fps=fps,
            id_seed=id_seed,
        )  # (c)
        stages.update()
        stages.set_postfix_str("pose images")
        _, points = pose_and_project(meshes, track, ref.size, camera=camera, fov=fov)  # (d) (F, 478, 2)
        images = RT.pose_images(points, *ref.size)  # (F, H, W, 3)
        stages.update()
    return Audio2VideoPoses(
        landmarks=points,
        pose_images=images,
        fps=fps,
        audio=samples,
        offsets=canon,
        track=track,
        reference=ref,
    )


@dataclass
class Audio2VideoOutput(Audio2VideoPoses):
    """:class:`Audio2VideoPoses` plus ``frames`` ``(F, H, W, 3)`` uint8, the generated video."""

    frames: np.ndarray | None = None


def audio_to_video(
    pipe,
    audio2mesh,
    ref_image,
    audio,
    *,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.5,
    generator: torch.Generator | None = None,
    context_frames: int | None = None,
    context_overlap: int | None = None,
    progress: bool = False,
    **pose_kwargs,
) -> Audio2VideoOutput:
    """Steps (a)-(e): the portrait ``ref_image`` ``(H, W, 3)`` uint8 speaking ``audio``, generated by ``pipe``
    (a :class:`~anim_lab.pipelines.Pose2VideoPipeline`: the toy animator or real weights) at the reference's
    size (or ``size=``), ``ceil(seconds · fps)`` frames.

    ``context_frames`` / ``context_overlap``: the pipeline's context windows (default: the pipeline's own
    defaults). ``pose_kwargs``: :func:`audio_to_poses`'s (``fps``, ``pose``, ``template``, ``landmarks``, …).
    """
    ref = L.as_rgb_uint8(ref_image, "the reference image")
    poses = audio_to_poses(audio2mesh, audio, ref, progress=progress, **pose_kwargs)
    height, width = poses.pose_images.shape[1:3]
    if ref.shape[:2] != (height, width):
        import PIL.Image

        ref = np.asarray(PIL.Image.fromarray(ref).resize((width, height), PIL.Image.LANCZOS))
    windows = {}
    if context_frames is not None:
        windows["context_frames"] = int(context_frames)
    if context_overlap is not None:
        windows["context_overlap"] = int(context_overlap)
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")
    video = pipe(
        ref,
        list(poses.pose_images),
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="np",
        **windows,
    ).frames[0]  # (F, H, W, 3) float in [0, 1]
    frames = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    return Audio2VideoOutput(**vars(poses), frames=frames)
