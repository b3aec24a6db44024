"""Face landmarks: the mediapipe face-mesh topology, AniPortrait-style pose images, detection and Video2Pose.

Three things live here, top to bottom:

1. **Topology** — the 478-point face mesh (468 surface points + 10 iris points with ``refine_landmarks=True``)
   and the groups of points that matter for portraits: face oval, eyes, eyebrows, lips, irises. Written out as
   ordered paths (readable, no mediapipe import needed); ``tests/test_landmarks.py`` checks them against
   mediapipe's own ``FACEMESH_*`` connection sets.
2. **Pose images** — the landmarks drawn as AniPortrait draws them
   (``FaceMeshVisualizer(forehead_edge=False)``): separately coloured line sets on black, lines only, no
   points, no irises. Works for any landmarks in pixels — from mediapipe on a real face or from the toy
   renderer.
3. **Detection** — mediapipe 0.10.21 ``FaceMesh`` (imported lazily: an optional dependency, installed apart,
   that the rest of the package does not need; its C++ side's TFLite/absl start-up chatter on stderr is held
   back, anything else it writes there is passed on), for single images (``static_image_mode=True``) and
   videos (tracking mode), and **Video2Pose**: a video → a pose-image video with the same fps (and the audio
   carried over).

Conventions: images are ``(H, W, 3)`` uint8 RGB arrays; landmarks are ``(478, 2)`` float32 pixel ``(x, y)``
with integer values at pixel centres (``x = 0`` is the centre of the first column).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from . import video as vio
from .errors import InputError
from .files import check_output_file

logger = logging.getLogger(__name__)  # "anim_lab.landmarks": what the library reports goes through logging

NUM_LANDMARKS = 478  # 468 face-mesh points + 2 × 5 iris points (refine_landmarks=True)
NUM_MESH_POINTS = 468

# ------------------------------------------------------------------------------------------------------------
# 1. Topology. "Left"/"right" are the subject's, as in mediapipe: the subject's right eye is on the image's
#    left.
# ------------------------------------------------------------------------------------------------------------

# The full face oval, a closed loop starting at the forehead centre (10) and going clockwise in the image.
# fmt: off
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152,
    148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109, 10,
)
# fmt: on
# AniPortrait's custom oval: the same loop without the 10 forehead edges (21 … 10 … 251): an open 26-edge
# path.
FACE_OVAL_NO_FOREHEAD = FACE_OVAL[5:-5]  # 251 ... 21

# Eyes: the lid contours from the outer corner to the inner corner.
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)

# Eyebrows: upper and lower edge, from the outer end to the inner end.
RIGHT_EYEBROW_UPPER = (70, 63, 105, 66, 107)
RIGHT_EYEBROW_LOWER = (46, 53, 52, 65, 55)
LEFT_EYEBROW_UPPER = (300, 293, 334, 296, 336)
LEFT_EYEBROW_LOWER = (276, 283, 282, 295, 285)

# Lips: four contours from the right mouth corner (image left) to the left one.
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)

# Irises (refine_landmarks=True): a centre and four points on the rim (right, top, left, bottom in the image).
RIGHT_IRIS_CENTER, RIGHT_IRIS = 468, (469, 470, 471, 472, 469)
LEFT_IRIS_CENTER, LEFT_IRIS = 473, (474, 475, 476, 477, 474)

# A few named points used for measurements and tests.
NOSE_TIP = 4
FOREHEAD = 10
CHIN = 152


def path_edges(path: Sequence[int]) -> set[tuple[int, int]]:
    """The edges of a path as unordered pairs: ``(a, b, c) -> {(a, b), (b, c)}`` (each pair sorted)."""
    return {tuple(sorted(pair)) for pair in zip(path[:-1], path[1:], strict=True)}


# Point groups (sets of indices) for colouring the 478 points and measuring errors per region.
GROUPS: dict[str, tuple[int, ...]] = {
    "face_oval": FACE_OVAL[:-1],
    "right_eye": tuple(dict.fromkeys(RIGHT_EYE_UPPER + RIGHT_EYE_LOWER)),
    "left_eye": tuple(dict.fromkeys(LEFT_EYE_UPPER + LEFT_EYE_LOWER)),
    "right_eyebrow": RIGHT_EYEBROW_UPPER + RIGHT_EYEBROW_LOWER,
    "left_eyebrow": LEFT_EYEBROW_UPPER + LEFT_EYEBROW_LOWER,
    "lips": tuple(dict.fromkeys(LIPS_OUTER_UPPER + LIPS_OUTER_LOWER + LIPS_INNER_UPPER + LIPS_INNER_LOWER)),
    "right_iris": (RIGHT_IRIS_CENTER,) + RIGHT_IRIS[:-1],
    "left_iris": (LEFT_IRIS_CENTER,) + LEFT_IRIS[:-1],
}


# ------------------------------------------------------------------------------------------------------------
# 2. Pose images, as AniPortrait draws them (src/utils/draw_util.py, FaceMeshVisualizer(forehead_edge=False)).
# ------------------------------------------------------------------------------------------------------------

# (name, path, colour). Colours are written into the array's channels in this order (channel 0 first), which
# is what AniPortrait's PoseGuider sees in training and inference (its drawer works in "BGR" and the model
# consumes that array unchanged; only the *_kps.mp4 files it saves for people are flipped to RGB). The lips
# are 8 arcs.
POSE_PARTS: tuple[tuple[str, tuple[int, ...], tuple[int, int, int]], ...] = (
    ("face_oval", FACE_OVAL_NO_FOREHEAD, (10, 200, 10)),
    ("left_eye_upper", LEFT_EYE_UPPER, (180, 200, 10)),
    ("left_eye_lower", LEFT_EYE_LOWER, (180, 200, 10)),
    ("left_eyebrow_upper", LEFT_EYEBROW_UPPER, (180, 220, 10)),
    ("left_eyebrow_lower", LEFT_EYEBROW_LOWER, (180, 220, 10)),
    ("right_eye_upper", RIGHT_EYE_UPPER, (10, 200, 180)),
    ("right_eye_lower", RIGHT_EYE_LOWER, (10, 200, 180)),
    ("right_eyebrow_upper", RIGHT_EYEBROW_UPPER, (10, 220, 180)),
    ("right_eyebrow_lower", RIGHT_EYEBROW_LOWER, (10, 220, 180)),
    ("lips_outer_lower_right", LIPS_OUTER_LOWER[:6], (10, 180, 20)),  # 61-146-91-181-84-17
    ("lips_outer_lower_left", LIPS_OUTER_LOWER[5:], (20, 10, 180)),  # 17-314-405-321-375-291
    ("lips_inner_lower_right", LIPS_INNER_LOWER[:6], (100, 100, 30)),  # 78-95-88-178-87-14
    ("lips_inner_lower_left", LIPS_INNER_LOWER[5:], (100, 150, 50)),  # 14-317-402-318-324-308
    ("lips_outer_upper_right", LIPS_OUTER_UPPER[:6], (20, 80, 100)),  # 61-185-40-39-37-0
    ("lips_outer_upper_left", LIPS_OUTER_UPPER[5:], (80, 100, 20)),  # 0-267-269-270-409-291
    ("lips_inner_upper_right", LIPS_INNER_UPPER[:6], (120, 100, 200)),  # 78-191-80-81-82-13
    ("lips_inner_upper_left", LIPS_INNER_UPPER[5:], (150, 120, 100)),  # 13-312-311-310-415-308
)
# AniPortrait draws on a 512-px canvas with thickness 2; we draw at the target size with the thickness scaled.
POSE_REFERENCE_SIZE = 512
POSE_REFERENCE_THICKNESS = 2
_SHIFT = 4  # cv2 fixed-point bits: landmarks are drawn with 1/16-pixel precision


def pose_thickness(height: int, width: int) -> int:
    """Line thickness for a pose image: AniPortrait's 2 px at 512 px, scaled with the image size
    (at least 1)."""
    return max(1, int(round(POSE_REFERENCE_THICKNESS * min(height, width) / POSE_REFERENCE_SIZE)))


def _check_landmarks(landmarks, what: str = "landmarks") -> np.ndarray:
    arr = np.asarray(landmarks, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3) or arr.shape[0] < NUM_MESH_POINTS:
        raise InputError(
            f"{what} must have shape (478, 2) or (468, 2) (x, y per face-mesh point; a third z column is "
            f"ignored), got {arr.shape}"
        )
    if not np.isfinite(arr[:, :2]).all():
        raise InputError(
            f"{what} contain NaN or inf; drop the frame or fill it (e.g. hold the last good landmarks)"
        )
    return arr[:, :2]


def _image_size(value, name: str) -> int:
    """A positive whole number of pixels (an int, or a float with no fractional part)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a whole number of pixels, got {type(value).__name__} {value!r}")
    if not float(value).is_integer():
        raise InputError(
            f"{name} must be a whole number of pixels, got {value}; round it yourself "
            f"(e.g. round({value}) = {round(value)}) so that nothing is truncated silently"
        )
    if value <= 0:
        raise InputError(f"{name} must be positive, got {value}")
    return int(value)


# Landmarks may leave the frame a little (a face cut by the border; mediapipe extrapolates), but not by more
# than this fraction of the image size.
POSE_MAX_OUTSIDE = 0.5


def _check_pose_coordinates(xy: np.ndarray, height: int, width: int, normalized: bool) -> np.ndarray:
    """Landmarks (N, 2) as given -> pixel centres of the output image, after checking that they fit it.

    Decided by the values, with the likely mix-up named: normalized coordinates lie in about [0, 1] (a face
    that does not span two pixels is not a face), pixel coordinates lie in about [0, width] x [0, height]."""
    lo, hi = xy.min(0), xy.max(0)  # (2,) x and y ranges as given
    span = f"x {lo[0]:.4g}..{hi[0]:.4g}, y {lo[1]:.4g}..{hi[1]:.4g}"
    looks_normalized = lo.min() >= -POSE_MAX_OUTSIDE and hi.max() <= 1 + POSE_MAX_OUTSIDE
    if normalized and not looks_normalized:
        raise InputError(
            f"normalized=True, but the landmarks span {span}, not [0, 1]: they look like pixel "
            f"coordinates; pass them without normalized=True (in pixels of the {width}x{height} output), or "
            f"divide them by the size of the image they came from"
        )
    if not normalized and looks_normalized and min(height, width) > 2 * (1 + POSE_MAX_OUTSIDE):
        raise InputError(
            f"the landmarks span {span}: that is a face about one pixel wide on a {width}x{height} image; "
            f"they look like normalized [0, 1] coordinates (mediapipe's landmark.x, .y): pass normalized=True"
        )
    size = np.array([width, height], np.float64)
    pixels = xy * size - 0.5 if normalized else xy  # [0, 1] pixel edges -> pixel centres
    margin = POSE_MAX_OUTSIDE * size
    outside = (pixels < -0.5 - margin) | (pixels > size - 0.5 + margin)  # (N, 2)
    if outside.any():
        i, n = int(np.flatnonzero(outside.any(1))[0]), int(outside.any(1).sum())
        raise InputError(
            f"landmark {i} is at ({pixels[i, 0]:.4g}, {pixels[i, 1]:.4g}) px, far outside the "
            f"{width}x{height} image ({n} points more than {POSE_MAX_OUTSIDE:.0%} of the size out): "
            f"are they pixels of an image of another size (scale them by output/input size, as video_to_pose "
            f"does) or normalized coordinates of another frame?"
        )
    return pixels


def draw_pose_image(
    landmarks,
    height: int,
    width: int | None = None,
    *,
    normalized: bool = False,
    thickness: int | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Draw face landmarks as an AniPortrait pose image.

    Args:
        landmarks: ``(478, 2)`` (or ``(468, 2)``; a z column is ignored) in pixels of the output image, or in
            [0, 1] with ``normalized=True``.
        height, width: output size in whole pixels (``width`` defaults to ``height``).
        thickness: line thickness in pixels; default :func:`pose_thickness` (2 px at 512, 1 px at 128).
        antialias: draw with ``cv2.LINE_AA`` (soft edges, colours blend into black); default exact colours.

    Returns:
        ``(H, W, 3)`` uint8, black with coloured lines (colours per part: :data:`POSE_PARTS`).

    Raises:
        ValueError: a size that is not a positive whole number; landmarks that do not fit the image, with the
        likely mix-up named: pixel coordinates with ``normalized=True``, normalized ones without it, or
        points more than half the image size outside it (pixels of another image size).
    """
    height = _image_size(height, "height")
    width = height if width is None else _image_size(width, "width")
    xy = _check_pose_coordinates(_check_landmarks(landmarks), height, width, normalized)
    thickness = pose_thickness(height, width) if thickness is None else int(thickness)
    fixed = np.round(xy * (1 << _SHIFT)).astype(np.int32)  # (N, 2) sub-pixel fixed point
    canvas = np.zeros((height, width, 3), np.uint8)
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    for _, path, colour in POSE_PARTS:
        cv2.polylines(canvas, [fixed[list(path)]], False, colour, thickness, line, _SHIFT)
    return canvas


def face_mask(landmarks, height: int, width: int | None = None) -> np.ndarray:
    """``(H, W)`` bool: the pixels inside the face oval (:data:`FACE_OVAL`) of ``landmarks`` ``(478, 2)`` in
    pixels of the image (pixel centres at integers). The region where a face's colour and detail are scored,
    drawn from the ground truth's own landmarks so that it follows the head (not a fixed crop)."""
    height = _image_size(height, "height")
    width = height if width is None else _image_size(width, "width")
    xy = _check_landmarks(landmarks)[list(FACE_OVAL[:-1])]  # (36, 2): the closed loop's points
    fixed = np.round(xy * (1 << _SHIFT)).astype(np.int32)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


# ------------------------------------------------------------------------------------------------------------
# 3. Detection with mediapipe face mesh.
# ------------------------------------------------------------------------------------------------------------

MEDIAPIPE_HINT = (
    "anim_lab needs mediapipe 0.10.21, the last release with the face-mesh models and `mp.solutions`: "
    "`pip install --no-deps mediapipe==0.10.21` (plus protobuf<5, absl-py, attrs, flatbuffers; "
    "`make test` does this)"
)


class NoFaceError(InputError):
    """mediapipe found no face in an image or video frame."""


# What mediapipe's C++ side prints while it starts and runs: TFLite's INFO lines, absl's notice about its own
# set-up, and absl info/warning lines of its calculators (internals a user cannot act on). Errors (E/F lines)
# and anything else are passed on.
_NATIVE_CHATTER = re.compile(
    r"^(INFO: .*"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ \w+\.cc:\d+\] .*)$"
)


@contextlib.contextmanager
def _quiet_native_logs():
    """Hold back what native code writes to file descriptor 2 inside the block (Python's sys.stderr is
    untouched); afterwards, pass on every line that is not known start-up chatter (:data:`_NATIVE_CHATTER`).
    A Jupyter kernel shows fd-2 output as red stderr boxes, hence this."""
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
    except (AttributeError, OSError, ValueError):  # no real stderr (some embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as held:
        saved = os.dup(fd)
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if line.strip() and not _NATIVE_CHATTER.match(line)]
            if kept:
                logger.warning("mediapipe: %s", "\n".join(kept))


def _import_face_mesh():
    try:
        import mediapipe as mp
    except ImportError as err:  # not installed at all
        raise ImportError(f"mediapipe is not installed. {MEDIAPIPE_HINT}") from err
    solutions = getattr(mp, "solutions", None)
    face_mesh = getattr(solutions, "face_mesh", None) if solutions is not None else None
    if face_mesh is None:
        version = getattr(mp, "__version__", "unknown")
        raise ImportError(
            f"the installed mediapipe {version} has no mp.solutions.face_mesh. {MEDIAPIPE_HINT}"
        )
    return face_mesh


@dataclass
class FaceLandmarks:
    """The 478 landmarks of one face in one image.

    Attributes:
        normalized: ``(478, 3)`` float32 as mediapipe returns them: x, y in [0, 1] of the width/height (pixel
            edges), z relative depth (smaller = closer to the camera) in the same units as x.
        height, width: size of the image they were found in.
    """

    normalized: np.ndarray
    height: int
    width: int

    @property
    def pixels(self) -> np.ndarray:
        """``(478, 2)`` float32 pixel (x, y), integer values at pixel centres."""
        xy = self.normalized[:, :2] * np.array([self.width, self.height], np.float32)  # (478, 2) pixel edges
        return (xy - 0.5).astype(np.float32)  # -> pixel centres

    @property
    def xyz(self) -> np.ndarray:
        """``(478, 3)`` float32: pixel x, y and z in pixels of the width (smaller z = closer to the
        camera)."""
        z = self.normalized[:, 2:3] * self.width  # (478, 1)
        return np.concatenate([self.pixels, z], axis=1).astype(np.float32)


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """Check an image and return it as a contiguous ``(H, W, 3)`` uint8 RGB array.

    Grayscale ``(H, W)`` / ``(H, W, 1)`` is repeated to 3 channels and RGBA loses its alpha; anything that is
    not uint8 is rejected (convert floats with ``(img_01 * 255).round().astype(np.uint8)``).
    """
    if hasattr(image, "detach"):  # a torch tensor
        raise TypeError(
            f"{name} is a torch tensor; pass a (H, W, 3) uint8 numpy array (e.g. from anim_lab.video)"
        )
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"{name} must be uint8 (0-255), got {arr.dtype}; convert a [0, 1] float image with "
            f"(img * 255).round().astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # RGBA -> RGB (alpha dropped)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"{name} must be (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, got shape {arr.shape}")
    if min(arr.shape[:2]) < 32:
        raise InputError(
            f"{name} is {arr.shape[1]}x{arr.shape[0]} px; face mesh needs at least 32 px per side"
        )
    return np.ascontiguousarray(arr)


class FaceLandmarker:
    """mediapipe face mesh (478 points) on images or on the frames of one video.

    ``video=False`` runs detection on every image independently (mediapipe's ``static_image_mode``);
    ``video=True`` tracks the face from frame to frame (faster and steadier; frames must be given in order).
    Use as a context manager, or call :meth:`close`.

    >>> with FaceLandmarker() as lm:
    ...     face = lm.detect(img)          # FaceLandmarks; face.pixels is (478, 2)
    """

    def __init__(
        self,
        video: bool = False,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        max_num_faces: int = 1,
    ):
        face_mesh = _import_face_mesh()
        self.video = video
        with _quiet_native_logs():
            self._mesh = face_mesh.FaceMesh(
                static_image_mode=not video,
                max_num_faces=max_num_faces,
                refine_landmarks=True,  # 478 points: adds the 10 iris points
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
            # The graph opens its calculators on its own threads, which log as they go; one frame (blank: no
            # face, so the tracker keeps no state) waits until every calculator is open, inside the hold.
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))

    def detect(self, image, name: str = "image") -> FaceLandmarks:
        """Landmarks of the (largest-confidence) face in ``image``; :class:`NoFaceError` naming ``name`` if
        none."""
        return self.detect_all(image, name)[0]

    def detect_all(self, image, name: str = "image") -> list[FaceLandmarks]:
        """Landmarks of every face found (up to ``max_num_faces``), mediapipe's first first;
        :class:`NoFaceError` naming ``name`` if none."""
        rgb = as_rgb_uint8(image, name)
        with _quiet_native_logs():  # the first frames start TFLite, which says so
            result = self._mesh.process(rgb)
        if not result.multi_face_landmarks:
            raise NoFaceError(
                f"no face found in {name} ({rgb.shape[1]}x{rgb.shape[0]} px); "
                f"the face should be upright-ish, unoccluded and at least ~60 px tall"
            )
        faces = []
        for face in result.multi_face_landmarks:
            normalized = np.array([(p.x, p.y, p.z) for p in face.landmark], np.float32)  # (478, 3)
            faces.append(FaceLandmarks(normalized=normalized, height=rgb.shape[0], width=rgb.shape[1]))
        return faces

    def close(self) -> None:
        with _quiet_native_logs():  # the graph's threads may still report while it shuts down
            self._mesh.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def detect_landmarks(image, name: str = "image") -> FaceLandmarks:
    """One-shot detection on a single image (creates and closes a :class:`FaceLandmarker`)."""
    with FaceLandmarker(video=False) as lm:
        return lm.detect(image, name)


def _frames_in(source, fps):
    """(frames iterator, fps, number of frames or None, audio path or None) of a video path or of any
    iterable of frames (list, ``(F, H, W, 3)`` array, generator)."""
    if isinstance(source, (str, os.PathLike)):
        reader = vio.VideoReader(source)
        return iter(reader), (reader.fps if fps is None else fps), reader.num_frames, reader.path
    wrong_array = isinstance(source, np.ndarray) and source.ndim != 4
    if wrong_array or isinstance(source, bytes) or not isinstance(source, Iterable):
        shape = f" of shape {source.shape}" if isinstance(source, np.ndarray) else ""
        raise TypeError(
            f"source must be a video file path, an (F, H, W, 3) uint8 array, or an iterable (list, "
            f"generator) of (H, W, 3) uint8 frames; got {type(source).__name__}{shape}"
        )
    total = len(source) if hasattr(source, "__len__") else None
    if total == 0:
        raise InputError("source has no frames")
    return iter(source), fps, total, None  # checked frame by frame in landmark_stream


def landmark_stream(
    frames: Iterable,
    *,
    on_missing: str = "hold",
    progress: bool = True,
    total: int | None = None,
    missing: list | None = None,
    xyz: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(frame, landmarks (478, 2))`` for every frame of a video, in order, in tracking mode
    (``xyz=True``: the image-space 3D landmarks (478, 3), :attr:`FaceLandmarks.xyz`).

    Frames with no face follow ``on_missing``: ``"hold"`` gives them the last good landmarks (AniPortrait's
    vid2pose policy) — frames before the first detection get the first good ones, so they are yielded once it
    arrives (they are buffered until then); ``"error"`` raises :class:`NoFaceError` naming the frame. If no
    frame has a face: :class:`NoFaceError`. All frames must have the same size. ``missing``: a list that
    receives the index of every frame without a face (so a caller can report how many were held).
    """
    if on_missing not in ("hold", "error"):
        raise InputError(f'on_missing must be "hold" or "error", got {on_missing!r}')
    if progress:
        frames = tqdm(frames, total=total, desc="landmarks", unit="frame")
    pending: list[np.ndarray] = []  # frames before the first face
    last, size, count = None, None, 0
    with FaceLandmarker(video=True) as lm:
        for i, frame in enumerate(frames):
            count += 1
            frame = as_rgb_uint8(frame, f"frame {i}")
            if size is None:
                size = frame.shape[:2]
            elif frame.shape[:2] != size:
                raise InputError(
                    f"frame {i} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is "
                    f"{size[1]}x{size[0]}; all frames must have the same size"
                )
            try:
                face = lm.detect(frame, name=f"frame {i}")
                points = face.xyz if xyz else face.pixels
            except NoFaceError:
                if on_missing == "error":
                    raise
                if missing is not None:
                    missing.append(i)
                if last is None:
                    pending.append(frame)
                    continue
                points = last
            for held in pending:  # the frames before the first face get its landmarks
                yield held, points
            pending = []
            last = points
            yield frame, points
    if count == 0:
        raise InputError("the video has no frames")
    if last is None:
        raise NoFaceError(f"no face found in any of the {count} frames")


def landmark_errors(
    frames, landmarks, *, size: int = 256, landmarker: FaceLandmarker | None = None
) -> np.ndarray:
    """How well mediapipe reads generated (or reconstructed) faces: each ``(H, W, 3)`` uint8 frame, upscaled
    to ``size`` px (bicubic: small faces are found more reliably), against its true ``landmarks`` (F, 478, 2)
    in the frame's pixels -> (F,) the mean distance of the 478 landmarks in ``size``-px pixels, NaN where no
    face is found. Static mode, one frame at a time (``landmarker``: an open static one to reuse)."""
    frames = np.asarray(frames)
    truth = np.asarray(landmarks, dtype=np.float64)
    if frames.ndim != 4 or truth.shape != (len(frames), NUM_LANDMARKS, 2):
        raise InputError(
            f"frames (F, H, W, 3) and landmarks (F, 478, 2), got {frames.shape} and {truth.shape}"
        )
    own = landmarker is None
    landmarker = FaceLandmarker(video=False) if own else landmarker
    out = np.full(len(frames), np.nan)
    try:
        for i, frame in enumerate(frames):
            big = np.asarray(PIL.Image.fromarray(frame).resize((size, size), PIL.Image.BICUBIC))
            try:
                found = landmarker.detect(big, name=f"frame {i}").pixels  # (478, 2) at size px
            except NoFaceError:
                continue
            scale = np.array([size / frame.shape[1], size / frame.shape[0]])
            out[i] = np.linalg.norm(found - ((truth[i] + 0.5) * scale - 0.5), axis=1).mean()
    finally:
        if own:
            landmarker.close()
    return out


def track_landmarks(
    frames: Iterable,
    *,
    on_missing: str = "hold",
    progress: bool = True,
    total: int | None = None,
    xyz: bool = False,
) -> np.ndarray:
    """Landmarks for every frame of a video (tracking mode): ``(F, 478, 2)`` float32 pixels, or with
    ``xyz=True`` ``(F, 478, 3)`` image-space 3D landmarks (what retargeting fits a head pose to).

    ``frames``: ``(H, W, 3)`` uint8 frames in order, all the same size. Frames without a face: see
    :func:`landmark_stream` (``on_missing="hold"`` or ``"error"``). ``progress``: a tqdm bar.
    """
    stream = landmark_stream(frames, on_missing=on_missing, progress=progress, total=total, xyz=xyz)
    return np.stack([p for _, p in stream]).astype(np.float32)  # (F, 478, 2) or (F, 478, 3)


# ------------------------------------------------------------------------------------------------------------
# 4. Video2Pose.
# ------------------------------------------------------------------------------------------------------------


def video_to_pose(
    source,
    output: str | os.PathLike,
    *,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    on_missing: str = "hold",
    progress: bool = True,
    audio: bool = True,
) -> np.ndarray:
    """Video2Pose: a video (file, or any iterable of frames) -> a pose-image video with the same fps.

    Frames stream through (read, detect, draw, write one at a time), so long videos need little memory. On
    any error the reader (an ffmpeg process for a file) is closed and nothing is left at ``output``.

    Args:
        source: a video file path (mp4, gif, anything ffmpeg reads), an ``(F, H, W, 3)`` array, or any
            iterable (list, generator) of ``(H, W, 3)`` uint8 RGB frames.
        output: ``.mp4`` or ``.gif`` path. Nothing appears there unless the whole video succeeds.
        fps: frame rate; read from the file by default; required for frames.
        size: ``(height, width)`` of the pose images; default the source frame size.
        on_missing: frames with no face: ``"hold"`` the last good landmarks (default) or ``"error"``.
        progress: a tqdm progress bar.
        audio: carry the source file's audio track over to an mp4 output (when it has one).

    Returns:
        ``(F, 478, 2)`` float32 landmarks in pixels of the source frames (one row per written frame).
    """
    source_path = source if isinstance(source, (str, os.PathLike)) else None
    output = check_output_file(output, vio.VIDEO_SUFFIXES, inputs={"source": source_path}, what="output")
    frames, fps, total, src_path = _frames_in(source, fps)
    # close the source on every path: a file's frames come from an ffmpeg process that only close() ends
    closing = contextlib.closing(frames) if hasattr(frames, "close") else contextlib.nullcontext()
    with closing:
        if fps is None:
            raise InputError("fps is required when source is frames rather than a file")
        audio_from = (
            src_path if (audio and src_path is not None and output.suffix.lower() == ".mp4") else None
        )
        return _write_pose_video(frames, output, fps, total, size, on_missing, progress, audio_from)


def _write_pose_video(frames, output, fps, total, size, on_missing, progress, audio_from) -> np.ndarray:
    out = []
    stream = landmark_stream(frames, on_missing=on_missing, progress=progress, total=total)
    with vio.VideoWriter(output, fps, audio_from=audio_from) as writer, contextlib.closing(stream):
        for frame, points in stream:
            height, width = frame.shape[:2]
            out_h, out_w = (height, width) if size is None else size
            scale = np.array([out_w / width, out_h / height])
            writer.write(
                draw_pose_image((points + 0.5) * scale - 0.5, out_h, out_w)
            )  # source -> output pixels
            out.append(points)
    return np.stack(out).astype(np.float32)  # (F, 478, 2)
