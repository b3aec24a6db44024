"""The toy world's 3D face: a template from one real mediapipe detection, its triangles, and expression bases.

The template (``anim_lab/assets/face_template/face_template.npz``, made by ``scripts/make_face_template.py``
from ``skimage.data.astronaut()``) holds

- ``vertices``: ``(478, 3)`` float32, the 478 face-mesh points of a frontal, symmetric, closed-mouth face.
  Units: forehead (point 10) to chin (point 152) = 2. Axes: x to the image's right, **y up**,
  **z toward the camera**; origin between the eyes' mid-height and the chin, on the midline (x = 0).
- ``triangles``: ``(T, 3)`` int32, the face-mesh triangles (3-cliques of mediapipe's tessellation edges) with
  the eye and mouth openings left open, wound so that every normal points toward the camera (+z) in the
  template.

Expressions move the template with fixed per-vertex bases computed here:

- mouth open: a jaw weight (1 on the lower lip and chin, fading to 0 above the mouth and toward the ears)
  times a downward shift;
- smile: two Gaussian bumps at the mouth corners, up and outward;
- blink: the upper lid contours slide onto the lower lids (the lid ring above follows half way);
- lip round / press / spread (speech's lip shapes): lips gathered to the midline and pushed forward; the outer
  lip contours drawn toward the inner ones; the mouth corners pulled outward.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from anim_lab import landmarks as L

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "assets" / "face_template" / "face_template.npz"


@lru_cache(maxsize=1)
def load_template() -> tuple[np.ndarray, np.ndarray]:
    """``(vertices (478, 3) float32, triangles (T, 3) int32)``; read-only arrays."""
    if not TEMPLATE_PATH.exists():
        raise FileNotFoundError(
            f"face template {TEMPLATE_PATH} is missing; "
            f"recreate it with `python scripts/make_face_template.py`"
        )
    with np.load(TEMPLATE_PATH) as data:
        vertices = data["vertices"].astype(np.float32)
        triangles = data["triangles"].astype(np.int32)
    vertices.setflags(write=False)
    triangles.setflags(write=False)
    return vertices, triangles


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def jaw_weights(vertices: np.ndarray) -> np.ndarray:
    """``(N,)`` in [0, 1]: how much each point follows the jaw when the mouth opens.

    1 on the lower lip and below the mouth, fading out over 0.15 units above the mouth line and toward the
    sides of the face (the jaw hinges near the ears); 0 on the upper lip. The inner lips of a closed mouth
    coincide, so the lip contours are assigned explicitly rather than by height.
    """
    v = np.asarray(vertices, np.float64)
    mouth_y = v[list(L.LIPS_INNER_UPPER), 1].mean()
    half_width = np.abs(v[list(L.FACE_OVAL[:-1]), 0]).max()
    below = _smoothstep(mouth_y + 0.05, mouth_y - 0.10, v[:, 1])  # 0 above the mouth -> 1 below it
    sideways = 1.0 - _smoothstep(
        0.55 * half_width, 1.0 * half_width, np.abs(v[:, 0])
    )  # 1 in the middle -> 0 at ears
    w = below * (0.25 + 0.75 * sideways)
    upper = list(L.LIPS_OUTER_UPPER[1:-1] + L.LIPS_INNER_UPPER[1:-1])
    lower = list(L.LIPS_OUTER_LOWER[1:-1] + L.LIPS_INNER_LOWER[1:-1])
    corners = [L.LIPS_OUTER_UPPER[0], L.LIPS_OUTER_UPPER[-1], L.LIPS_INNER_UPPER[0], L.LIPS_INNER_UPPER[-1]]
    w[upper] = 0.0
    w[lower] = 1.0
    w[corners] = 0.35
    return w.astype(np.float32)


@lru_cache(maxsize=1)
def expression_bases() -> dict[str, np.ndarray]:
    """Per-vertex displacements ``(478, 3)`` float32 for mouth_open, smile, lip_round, lip_press and
    lip_spread = 1 (blink is a lid snap)."""
    v, _ = load_template()
    jaw = np.zeros_like(v)
    jaw[:, 1] = -0.28 * jaw_weights(
        v
    )  # (478,) -> downward shift, 0.28 units (14% of the face height) at full open
    jaw[:, 2] = -0.06 * jaw_weights(v)  # the chin also swings back a little
    # the iris points hang off the eyes: never moved by the jaw
    jaw[L.NUM_MESH_POINTS :] = 0.0

    smile = np.zeros_like(v)
    for corner in (L.LIPS_OUTER_UPPER[0], L.LIPS_OUTER_UPPER[-1]):
        c = v[corner]
        d2 = ((v[:, :2] - c[:2]) ** 2).sum(1)  # (478,)
        bump = np.exp(-d2 / (2 * 0.16**2))  # (478,) Gaussian around the corner
        smile[:, 0] += np.sign(c[0]) * 0.07 * bump  # outward
        smile[:, 1] += 0.09 * bump  # up
    smile[L.NUM_MESH_POINTS :] = 0.0

    # speech's lip shapes (anim_lab.toy.visemes), each a displacement at 1:
    mouth = v[list(L.LIPS_OUTER_UPPER + L.LIPS_OUTER_LOWER)].mean(0)  # (3,) the mouth's centre
    d2 = ((v[:, :2] - mouth[:2]) ** 2).sum(1)  # (478,)
    near = np.exp(-d2 / (2 * 0.3**2))  # (478,) 1 at the mouth, fading over its surroundings
    round_ = np.zeros_like(v)
    round_[:, 0] = -0.5 * (v[:, 0] - mouth[0]) * near  # rounding: the lips gather toward the midline ...
    round_[:, 2] = 0.12 * near  # ... and push forward
    spread = np.zeros_like(v)
    for corner in (L.LIPS_OUTER_UPPER[0], L.LIPS_OUTER_UPPER[-1]):
        bump = np.exp(-((v[:, :2] - v[corner, :2]) ** 2).sum(1) / (2 * 0.14**2))  # (478,)
        spread[:, 0] += np.sign(v[corner, 0]) * 0.09 * bump  # the corners pulled outward, level
    press = np.zeros_like(v)  # pressed lips: each outer lip point moves 60% of the way to its inner point
    for outer, inner in ((L.LIPS_OUTER_UPPER, L.LIPS_INNER_UPPER), (L.LIPS_OUTER_LOWER, L.LIPS_INNER_LOWER)):
        o, i = list(outer[1:-1]), list(inner[1:-1])  # the corners stay
        press[o, 1] = 0.6 * (v[i, 1] - v[o, 1])
        press[o, 2] = -0.02  # rolled in a little
    for basis in (round_, spread, press):
        basis[L.NUM_MESH_POINTS :] = 0.0
    return {
        "mouth_open": jaw.astype(np.float32),
        "smile": smile.astype(np.float32),
        "lip_round": round_.astype(np.float32),
        "lip_press": press.astype(np.float32),
        "lip_spread": spread.astype(np.float32),
    }


# The lid ring just above each upper lid follows a blink half way (indices of mediapipe's second eye ring).
_LID_RINGS = {
    "right": (L.RIGHT_EYE_UPPER, L.RIGHT_EYE_LOWER, (247, 30, 29, 27, 28, 56, 190)),
    "left": (L.LEFT_EYE_UPPER, L.LEFT_EYE_LOWER, (467, 260, 259, 257, 258, 286, 414)),
}


def apply_blink(vertices: np.ndarray, blink: float) -> np.ndarray:
    """Close the eyes by ``blink`` in [0, 1]: each upper-lid point moves toward the lower lid
    (1 = fully closed).

    The upper lid point k goes to the lower-lid contour at the same fraction of the eye's length; the ring
    above the lid follows by half the same displacement so the skin stretches instead of tearing. Returns a
    new array.
    """
    out = np.array(vertices, np.float32, copy=True)
    if blink <= 0:
        return out
    for upper, lower, ring in _LID_RINGS.values():
        up, lo = list(upper[1:-1]), list(lower[1:-1])  # corners stay
        delta = (out[lo] - out[up]) * float(blink)  # (7, 3) upper -> lower
        delta[:, 2] = np.maximum(delta[:, 2], 0.0) + 0.01 * float(blink)  # keep the closed lid just in front
        out[up] += delta
        out[list(ring)] += 0.5 * delta
    return out
