"""The toy portrait renderer: identity × head pose × expression -> an RGB portrait and the exact landmarks
drawn.

A face is the 478-point template of :mod:`anim_lab.toy.template` moved by an :class:`Expression`, stretched by
the :class:`Identity`'s face width and height, rotated and placed by a :class:`HeadPose`, and projected
orthographically. Drawing is the painter's algorithm with numpy + cv2, back to front:

    background -> long hair -> shoulders -> neck -> head (an ellipsoid's silhouette) -> hair cap
    -> eyeballs (sclera, iris, pupil, highlight) and mouth interior (dark, teeth)
    -> the face mesh, triangles sorted by depth, flat Lambert shading, lips/brows/hair coloured by region
    -> lash lines

The mesh has openings at the eyes and the mouth, so the eyeballs and the mouth interior drawn before it show
through them only; a blink or a closed mouth closes the opening. Everything is drawn at ``supersample`` × the
size and reduced with area averaging (anti-aliasing).

Pose conventions (degrees; translations are fractions of the frame): ``yaw > 0`` turns the face toward the
image's right, ``pitch > 0`` tilts it down, ``roll > 0`` turns it counter-clockwise in the image; ``tx > 0``
moves it right, ``ty > 0`` moves it down; ``scale`` multiplies the head size (forehead to chin is 40% of the
frame height at 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np
from matplotlib.path import Path as PolygonPath

from anim_lab import landmarks as L
from anim_lab.errors import InputError
from anim_lab.toy.template import apply_blink, expression_bases, load_template

# ------------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------------

SKIN_TONES = {"light": (236, 200, 172), "medium": (196, 140, 100), "dark": (118, 78, 54)}
HAIR_COLORS = {
    "black": (32, 26, 26),
    "brown": (102, 62, 34),
    "blonde": (222, 186, 104),
    "red": (176, 62, 30),
    "grey": (178, 178, 182),
}
EYE_COLORS = {"brown": (96, 56, 28), "blue": (58, 112, 196), "green": (64, 142, 70), "grey": (128, 136, 148)}
LIP_COLORS = {"pink": (214, 112, 124), "red": (176, 42, 54), "brown": (134, 72, 62)}
BACKGROUNDS = {
    "blue": (70, 112, 204),
    "green": (84, 164, 92),
    "pink": (228, 152, 184),
    "white": (236, 236, 236),
    "yellow": (232, 210, 100),
}
SHIRT_COLORS = {
    "navy": (30, 44, 110),
    "red": (170, 36, 40),
    "green": (34, 110, 60),
    "grey": (70, 70, 76),
    "white": (244, 244, 244),
}
HAIRSTYLES = ("short", "long")
# The categorical attributes of an identity and their values (e.g. for captions or classifiers).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin": tuple(SKIN_TONES),
    "hair": tuple(HAIR_COLORS),
    "eyes": tuple(EYE_COLORS),
    "lips": tuple(LIP_COLORS),
    "background": tuple(BACKGROUNDS),
    "shirt": tuple(SHIRT_COLORS),
    "hairstyle": HAIRSTYLES,
}


@dataclass(frozen=True)
class Identity:
    """Who is drawn: colours (category name + the exact RGB used) and proportions."""

    skin: str = "light"
    hair: str = "brown"
    eyes: str = "brown"
    lips: str = "pink"
    background: str = "blue"
    shirt: str = "navy"
    hairstyle: str = "short"
    skin_rgb: tuple[int, int, int] | None = (
        None  # the exact skin colour; default: the palette colour of `skin`
    )
    face_width: float = 1.0  # multiplies template x
    face_height: float = 1.0  # multiplies template y
    hairline: float = 1.05  # template y above which the face is hair (forehead top is at ~1.32)
    seed: int | None = None  # the identity seed it was sampled from, if any

    def __post_init__(self):
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise InputError(f"Identity.{name} must be one of {values}, got {getattr(self, name)!r}")
        if self.skin_rgb is None:
            object.__setattr__(self, "skin_rgb", SKIN_TONES[self.skin])  # frozen dataclass: set once, here
        if not (0.5 <= self.face_width <= 1.5 and 0.5 <= self.face_height <= 1.5):
            raise InputError(
                f"face_width and face_height must be in [0.5, 1.5], got {self.face_width}, {self.face_height}"
            )

    def attribute_index(self, name: str) -> int:
        """Index of this identity's value of a categorical attribute in :data:`ATTRIBUTES`
        (e.g. a class label)."""
        return ATTRIBUTES[name].index(getattr(self, name))


@dataclass(frozen=True)
class HeadPose:
    """Rigid head motion: angles in degrees, translation in fractions of the frame, scale relative to 1."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if not self.scale > 0:
            raise InputError(f"HeadPose.scale must be positive, got {self.scale}")

    def as_array(self) -> np.ndarray:
        return np.array([self.yaw, self.pitch, self.roll, self.tx, self.ty, self.scale], np.float32)


@dataclass(frozen=True, repr=False)
class Expression:
    """Non-rigid face motion, each in [0, 1].

    ``mouth_open``, ``blink`` and ``smile`` are what the clip motion model moves (:meth:`as_array`); the lip
    shapes ``lip_round`` (rounded, pushed-out lips), ``lip_press`` (lips pressed together, thinner) and
    ``lip_spread`` (lips pulled sideways) are what speech adds (:mod:`anim_lab.toy.visemes`,
    :meth:`lips_array`). At 0 they leave the face exactly as it was.
    """

    mouth_open: float = 0.0
    blink: float = 0.0
    smile: float = 0.0
    lip_round: float = 0.0
    lip_press: float = 0.0
    lip_spread: float = 0.0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise InputError(f"Expression.{name} must be in [0, 1], got {value}")

    def as_array(self) -> np.ndarray:
        """``(3,)`` float32: mouth_open, blink, smile."""
        return np.array([self.mouth_open, self.blink, self.smile], np.float32)

    def lips_array(self) -> np.ndarray:
        """``(3,)`` float32: lip_round, lip_press, lip_spread."""
        return np.array([self.lip_round, self.lip_press, self.lip_spread], np.float32)

    def __repr__(self) -> str:
        # the three motion fields always, a lip shape only when it is used (a face without speech reads as
        # it did before the lip shapes existed)
        shown = ["mouth_open", "blink", "smile"] + [
            n for n in ("lip_round", "lip_press", "lip_spread") if getattr(self, n)
        ]
        return f"Expression({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"


def sample_identity(rng: np.random.Generator, seed: int | None = None) -> Identity:
    """A random identity (uniform categories, skin RGB jittered by up to ±10, proportions within ±8%)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    pick = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
    skin = np.array(SKIN_TONES[pick["skin"]]) + rng.integers(-10, 11, size=3)
    return Identity(
        **pick,
        skin_rgb=tuple(int(c) for c in np.clip(skin, 0, 255)),
        face_width=float(rng.uniform(0.92, 1.08)),
        face_height=float(rng.uniform(0.94, 1.06)),
        hairline=float(rng.uniform(0.95, 1.2)),
        seed=seed,
    )


def identity_from_seed(seed: int) -> Identity:
    """The identity with this seed (what :func:`anim_lab.toy.identity_split` lists)."""
    return sample_identity(np.random.default_rng(int(seed)), seed=int(seed))


# ------------------------------------------------------------------------------------------------------------
# Fixed geometry, computed once
# ------------------------------------------------------------------------------------------------------------

LIGHT = np.array([-0.35, 0.45, 0.82]) / np.linalg.norm([-0.35, 0.45, 0.82])  # from the upper left, in front
PIVOT = np.array([0.0, 0.1, -0.9])  # the head turns about a point behind the face (template units)
HEAD_CENTER, HEAD_RADII = np.array([0.0, 0.32, -0.62]), np.array([0.93, 1.16, 1.15])  # skull ellipsoid
FACE_FRACTION = 0.2  # one template unit in fractions of the frame (forehead-chin = 2 units = 40%)
HEAD_Y = 0.44  # the template origin's height in fractions of the frame


@lru_cache(maxsize=1)
def _geometry() -> dict:
    vertices, triangles = load_template()
    centroids = vertices[triangles].mean(1)  # (T, 3)
    inside = lambda ring: PolygonPath(vertices[list(ring), :2]).contains_points(centroids[:, :2])  # noqa: E731
    lips = inside(L.LIPS_OUTER_UPPER + L.LIPS_OUTER_LOWER[::-1])
    brows = inside(L.RIGHT_EYEBROW_UPPER + L.RIGHT_EYEBROW_LOWER[::-1]) | inside(
        L.LEFT_EYEBROW_UPPER + L.LEFT_EYEBROW_LOWER[::-1]
    )
    # points on the skull ellipsoid (a 14 x 28 latitude/longitude grid) for the head and hair silhouettes
    lat, lon = np.meshgrid(
        np.linspace(-np.pi / 2, np.pi / 2, 14), np.linspace(0, 2 * np.pi, 28, endpoint=False)
    )
    sphere = np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], -1).reshape(-1, 3)
    return {
        "vertices": vertices,
        "triangles": triangles,
        "lips": lips,
        "brows": brows,
        "centroid_y": centroids[:, 1],
        "sphere": sphere,
    }


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``(3, 3)``: R = Rz(roll) · Rx(pitch) · Ry(yaw) in the template frame (x right, y up, z to the
    camera)."""
    y, p, r = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def face_vertices(identity: Identity, expression: Expression) -> np.ndarray:
    """``(478, 3)`` the template with the expression applied and the identity's proportions
    (before the pose)."""
    g = _geometry()
    bases = expression_bases()
    v = g["vertices"] + expression.mouth_open * bases["mouth_open"] + expression.smile * bases["smile"]
    for name in ("lip_round", "lip_press", "lip_spread"):  # speech's lip shapes (skipped at 0: bit-exact)
        if getattr(expression, name):
            v = v + getattr(expression, name) * bases[name]
    v = apply_blink(v, expression.blink)
    return v * np.array([identity.face_width, identity.face_height, 1.0], np.float32)


class _Camera:
    """Template units (y up) -> output pixels (y down, integer = pixel centre)."""

    def __init__(self, identity: Identity, pose: HeadPose, size: int):
        self.rot = rotation_matrix(pose.yaw, pose.pitch, pose.roll)
        self.unit = FACE_FRACTION * size * pose.scale  # pixels per template unit
        self.center = np.array([size * (0.5 + pose.tx), size * (HEAD_Y + pose.ty)]) - 0.5
        self.stretch = np.array([identity.face_width, identity.face_height, 1.0])

    def rotate(self, points: np.ndarray) -> np.ndarray:
        return (points - PIVOT) @ self.rot.T + PIVOT  # (N, 3) -> (N, 3) turned about the pivot

    def project(self, points: np.ndarray) -> np.ndarray:
        return self.center + points[:, :2] * np.array([1.0, -1.0]) * self.unit  # (N, 3) -> (N, 2) pixels


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------


def _shade(rgb, factor) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(rgb, float) * factor, 0, 255))


def render(
    identity: Identity,
    pose: HeadPose = HeadPose(),
    expression: Expression = Expression(),
    size: int = 128,
    seed: int = 0,
    *,
    texture: bool = False,
    grain: float = 0.0,
    supersample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one portrait.

    Args:
        identity, pose, expression: what to draw (:func:`sample_identity`, :class:`HeadPose`,
            :class:`Expression`).
        size: output height = width in pixels (64, 128 and 256 are the tested sizes; any size ≥ 32 works).
        seed: seeds the optional background texture and grain; the render is a pure function of its arguments.
        texture: add a smooth random (low-frequency) pattern to the background.
        grain: standard deviation of per-pixel Gaussian noise in 0-255 units (0 = off; any grain caps the
            PSNR an autoencoder can reach).
        supersample: draw at this multiple of ``size`` and area-average down (1 = no anti-aliasing, fastest).

    Returns:
        ``image``: ``(size, size, 3)`` uint8 RGB; ``landmarks``: ``(478, 2)`` float32 pixel (x, y) of the
        drawn face-mesh points (integer = pixel centre), occluded points included.
    """
    if not isinstance(identity, Identity):
        raise TypeError(
            f"identity must be a toy.Identity (toy.sample_identity(rng)), got {type(identity).__name__}"
        )
    if not isinstance(pose, HeadPose) or not isinstance(expression, Expression):
        raise TypeError("pose must be a toy.HeadPose and expression a toy.Expression")
    if int(size) != size or size < 32:
        raise InputError(f"size must be an integer ≥ 32, got {size}")
    if int(supersample) != supersample or supersample < 1:
        raise InputError(f"supersample must be a positive integer, got {supersample}")
    size, ss = int(size), int(supersample)
    g = _geometry()
    cam = _Camera(identity, pose, size)
    verts = cam.rotate(face_vertices(identity, expression))  # (478, 3) posed, template units
    landmarks = cam.project(verts).astype(np.float32)  # (478, 2) output pixels

    shift = 4  # cv2 fixed point: 1/16 pixel
    one = 1 << shift

    def fixed(xy: np.ndarray) -> np.ndarray:  # output pixels -> supersampled fixed-point pixels
        return np.round(((xy + 0.5) * ss - 0.5) * one).astype(np.int32)

    canvas = _background(identity, size * ss, seed, texture)
    unit_ss = cam.unit * ss  # pixels per template unit on the canvas

    # --- body: long hair behind, shoulders, neck (these follow translation/scale; the neck top follows the
    # head)
    hair_rgb, skin_rgb = HAIR_COLORS[identity.hair], identity.skin_rgb
    skull = HEAD_CENTER + g["sphere"] * HEAD_RADII * cam.stretch  # (392, 3) ellipsoid points
    if identity.hairstyle == "long":
        sides = np.array(
            [[sx * 1.0 * identity.face_width, y, -0.7] for sx in (-1, 1) for y in (0.2, -0.6, -1.5)]
        )
        hair_back = np.concatenate([skull[skull[:, 1] > 0.2] * 1.04, sides])
        cv2.fillConvexPoly(
            canvas, _hull(fixed(cam.project(cam.rotate(hair_back)))), _shade(hair_rgb, 0.8), cv2.LINE_8, shift
        )
    base = cam.center + np.array([0.0, 2.45]) * cam.unit  # shoulder centre, output pixels
    cv2.ellipse(
        canvas,
        tuple(int(c) for c in fixed(base[None])[0]),
        (int(2.2 * unit_ss * one), int(1.15 * unit_ss * one)),
        0,
        0,
        360,
        SHIRT_COLORS[identity.shirt],
        -1,
        cv2.LINE_8,
        shift,
    )
    neck_top = cam.project(cam.rotate(np.array([[-0.42, -0.2, -0.75], [0.42, -0.2, -0.75]])))  # (2, 2)
    neck_bottom = base + np.array([[0.45, -1.0], [-0.45, -1.0]]) * cam.unit
    cv2.fillConvexPoly(
        canvas, fixed(np.concatenate([neck_top, neck_bottom])), _shade(skin_rgb, 0.72), cv2.LINE_8, shift
    )

    # --- head silhouette and hair cap
    cv2.fillConvexPoly(
        canvas, _hull(fixed(cam.project(cam.rotate(skull)))), _shade(skin_rgb, 0.8), cv2.LINE_8, shift
    )
    cap = HEAD_CENTER + (skull[skull[:, 1] > identity.hairline - 0.35] - HEAD_CENTER) * 1.06
    cv2.fillConvexPoly(
        canvas, _hull(fixed(cam.project(cam.rotate(cap)))), _shade(hair_rgb, 0.9), cv2.LINE_8, shift
    )

    # --- eyeballs and mouth interior, seen through the mesh's openings
    pts = fixed(landmarks)  # (478, 2) fixed-point canvas pixels
    _draw_mouth(canvas, pts, landmarks, shift, ss)
    for upper, lower, center, rim in (
        (L.RIGHT_EYE_UPPER, L.RIGHT_EYE_LOWER, L.RIGHT_IRIS_CENTER, L.RIGHT_IRIS),
        (L.LEFT_EYE_UPPER, L.LEFT_EYE_LOWER, L.LEFT_IRIS_CENTER, L.LEFT_IRIS),
    ):
        _draw_eye(canvas, pts, landmarks, upper, lower, center, rim, EYE_COLORS[identity.eyes], shift, ss)

    # --- the face mesh, back to front
    tri = g["triangles"]
    corners = verts[tri]  # (T, 3, 3)
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (T, 3)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    visible = normals[:, 2] > 0  # back faces culled
    light = 0.48 + 0.55 * np.clip(normals @ LIGHT, 0.0, None)  # (T,) Lambert + ambient
    colours = np.broadcast_to(np.asarray(skin_rgb, np.float64), (len(tri), 3)).copy()  # (T, 3)
    colours[g["lips"]] = LIP_COLORS[identity.lips]
    colours[g["centroid_y"] > identity.hairline] = hair_rgb
    colours[g["brows"]] = np.asarray(hair_rgb, np.float64) * 0.3 + 10
    colours = np.clip(colours * light[:, None], 0, 255).astype(np.int32)  # (T, 3)
    order = np.argsort(corners[:, :, 2].mean(1), kind="stable")  # far -> near
    order = order[visible[order]]
    polys = pts[tri[order]]  # (T', 3, 2)
    for poly, colour in zip(polys, colours[order].tolist(), strict=True):
        cv2.fillConvexPoly(canvas, poly, colour, cv2.LINE_8, shift)

    # --- lash lines on the upper lids (after the mesh, so a closed eye is a dark line)
    lash = max(1, int(round(0.028 * unit_ss)))
    lash_rgb = _shade(hair_rgb, 0.35)
    for upper in (L.RIGHT_EYE_UPPER, L.LEFT_EYE_UPPER):
        cv2.polylines(canvas, [pts[list(upper)]], False, lash_rgb, lash, cv2.LINE_8, shift)

    image = canvas if ss == 1 else cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    if grain > 0:
        noise = np.random.default_rng([int(seed), 1]).normal(0.0, grain, image.shape)
        image = np.clip(image + noise, 0, 255).round().astype(np.uint8)
    return image, landmarks


def _hull(points: np.ndarray) -> np.ndarray:
    return cv2.convexHull(points.astype(np.int32))


def _background(identity: Identity, n: int, seed: int, texture: bool) -> np.ndarray:
    rgb = np.asarray(BACKGROUNDS[identity.background], np.float32)
    ramp = np.linspace(1.06, 0.9, n, dtype=np.float32)[:, None, None]  # (n, 1, 1) lighter at the top
    canvas = np.broadcast_to(rgb * ramp, (n, n, 3))
    if texture:  # a smooth random field: 6x6 Gaussian noise, upsampled bicubically
        field = np.random.default_rng([int(seed), 0]).normal(0.0, 1.0, (6, 6, 1)).astype(np.float32)
        field = cv2.resize(field, (n, n), interpolation=cv2.INTER_CUBIC)[:, :, None]  # (n, n, 1)
        canvas = canvas * (1.0 + 0.12 * field)
    return np.ascontiguousarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _draw_mouth(canvas, pts, landmarks, shift, ss) -> None:
    inner = pts[list(L.LIPS_INNER_UPPER + L.LIPS_INNER_LOWER[-2:0:-1])]  # (20, 2) closed inner contour
    cv2.fillPoly(canvas, [inner], (70, 18, 26), cv2.LINE_8, shift)
    upper = landmarks[list(L.LIPS_INNER_UPPER)]  # (11, 2) output pixels
    width = np.linalg.norm(upper[-1] - upper[0])
    teeth = np.concatenate([upper, upper[::-1] + np.array([0.0, 0.12 * width])])  # a band under the upper lip
    cv2.fillPoly(
        canvas,
        [np.round(((teeth + 0.5) * ss - 0.5) * (1 << shift)).astype(np.int32)],
        (236, 232, 222),
        cv2.LINE_8,
        shift,
    )


def _draw_eye(canvas, pts, landmarks, upper, lower, center, rim, eye_rgb, shift, ss) -> None:
    one = 1 << shift
    contour = landmarks[list(upper + lower[-2:0:-1])]  # (16, 2) closed eye contour, output pixels
    mid = contour.mean(0)
    sclera = mid + (contour - mid) * 1.15  # slightly larger: the mesh covers the rim
    cv2.fillPoly(
        canvas,
        [np.round(((sclera + 0.5) * ss - 0.5) * one).astype(np.int32)],
        (238, 236, 232),
        cv2.LINE_8,
        shift,
    )
    c = pts[center]
    radius = float(np.linalg.norm(landmarks[list(rim[:-1])] - landmarks[center], axis=1).mean()) * ss
    centre = (int(c[0]), int(c[1]))
    cv2.circle(canvas, centre, int(radius * one), eye_rgb, -1, cv2.LINE_8, shift)
    cv2.circle(canvas, centre, int(0.45 * radius * one), (12, 10, 10), -1, cv2.LINE_8, shift)
    hl = (int(c[0] - 0.35 * radius * one), int(c[1] - 0.35 * radius * one))
    cv2.circle(canvas, hl, int(max(0.2 * radius, 0.6) * one), (250, 250, 250), -1, cv2.LINE_8, shift)
