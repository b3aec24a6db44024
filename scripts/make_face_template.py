"""Make the toy world's 3D face template from one real mediapipe detection.

    .venv/bin/python scripts/make_face_template.py   # writes anim_lab/assets/face_template/face_template.npz

Deterministic (mediapipe face mesh in static mode on ``skimage.data.astronaut()``); no randomness, no
download. Steps:

1. detect the 478 landmarks (pixels; mediapipe's z is in the units of x, smaller = closer);
2. switch to y up, z toward the camera, and rotate so that the eye corners 33 -> 263 lie along +x and the chin
   -> forehead line (152 -> 10) along +y (removes roll, yaw and pitch);
3. scale so that forehead to chin is 2 units (again after step 5); put x = 0 on the midline;
4. symmetrise: match each point to the mirror image of its partner (optimal assignment on mirrored positions)
   and average the two;
5. close the mouth (the astronaut smiles with her mouth open): lift the jaw by the lip gap with the renderer's
   own jaw weights, then snap the lower inner lip exactly onto the upper inner lip;
6. triangles: 3-cliques of ``FACEMESH_TESSELATION`` edges, minus any that would cover the eye or mouth
   openings, wound so that their normals point to +z.
"""

from __future__ import annotations

import itertools

import numpy as np
import skimage.data
from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION
from scipy.optimize import linear_sum_assignment

from anim_lab import landmarks as L
from anim_lab.toy.template import TEMPLATE_PATH, jaw_weights


def detect_astronaut() -> np.ndarray:
    face = L.detect_landmarks(skimage.data.astronaut(), name="skimage.data.astronaut()")
    xyz = face.xyz.astype(np.float64)  # (478, 3): pixel x, pixel y (down), z (smaller = closer)
    return xyz * np.array([1.0, -1.0, -1.0])  # -> y up, z toward the camera


def upright(v: np.ndarray) -> np.ndarray:
    ex = v[263] - v[33]  # right-eye outer corner -> left-eye outer corner
    ex /= np.linalg.norm(ex)
    up = v[L.FOREHEAD] - v[L.CHIN]
    ey = up - (up @ ex) * ex
    ey /= np.linalg.norm(ey)
    ez = np.cross(ex, ey)
    basis = np.stack([ex, ey, ez], axis=1)  # (3, 3) columns = new axes
    v = (v - v.mean(0)) @ basis  # (478, 3) in the face's own frame
    v /= np.linalg.norm(v[L.FOREHEAD] - v[L.CHIN]) / 2.0  # forehead-chin = 2 units (again after step 5)
    midline = [
        10,
        151,
        9,
        8,
        168,
        6,
        197,
        195,
        5,
        4,
        1,
        19,
        94,
        2,
        164,
        0,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        200,
        199,
        175,
        152,
    ]
    v[:, 0] -= v[midline, 0].mean()
    # origin: on the midline, halfway between the eyes' height and the chin; depth 0 at the face oval's mean
    v[:, 1] -= 0.5 * (v[[33, 263], 1].mean() + v[L.CHIN, 1])
    v[:, 2] -= v[list(L.FACE_OVAL[:-1]), 2].mean()
    return v


def symmetrise(v: np.ndarray) -> np.ndarray:
    mirrored = v * np.array([-1.0, 1.0, 1.0])
    cost = ((v[:, None, :] - mirrored[None, :, :]) ** 2).sum(-1)  # (478, 478)
    rows, partner = linear_sum_assignment(cost)
    assert (rows == np.arange(len(v))).all()
    not_involution = np.flatnonzero(partner[partner] != np.arange(len(v)))
    if len(not_involution):
        raise RuntimeError(f"mirror matching is not an involution for points {not_involution[:10]}")
    sym = 0.5 * (v + mirrored[partner])  # (478, 3): exactly symmetric since partner is an involution
    sym[partner == np.arange(len(v)), 0] = 0.0  # points on the midline
    known = {33: 263, 61: 291, 468: 473, 78: 308, 159: 386}  # sanity: left/right pairs mediapipe documents
    for a, b in known.items():
        if partner[a] != b:
            raise RuntimeError(f"mirror matching paired {a} with {partner[a]}, expected {b}")
    return sym


def close_mouth(v: np.ndarray) -> np.ndarray:
    v = v.copy()
    upper, lower = list(L.LIPS_INNER_UPPER[1:-1]), list(L.LIPS_INNER_LOWER[1:-1])
    gap = v[upper, 1].mean() - v[lower, 1].mean()  # > 0: the mouth is open
    w = jaw_weights(v).astype(np.float64)
    v[:, 1] += gap * w  # lift everything that follows the jaw
    v[lower] = v[upper]  # snap the inner lower lip exactly onto the upper one
    return v


def triangles_from_tessellation(v: np.ndarray) -> np.ndarray:
    neighbours: dict[int, set[int]] = {}
    for a, b in FACEMESH_TESSELATION:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    tris = set()
    for a, nbrs in neighbours.items():
        for b, c in itertools.combinations(sorted(nbrs), 2):
            if c in neighbours[b]:
                tris.add(tuple(sorted((a, b, c))))
    openings = [
        set(L.RIGHT_EYE_UPPER + L.RIGHT_EYE_LOWER),
        set(L.LEFT_EYE_UPPER + L.LEFT_EYE_LOWER),
        set(L.LIPS_INNER_UPPER + L.LIPS_INNER_LOWER),
    ]
    tris = [t for t in sorted(tris) if not any(set(t) <= ring for ring in openings)]
    tris = np.array(tris, np.int32)  # (T, 3)
    e1, e2 = v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]]
    nz = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # z of the normal
    flip = nz < 0
    tris[flip] = tris[flip][:, [0, 2, 1]]  # wind every triangle so its normal points to +z
    return tris


def main() -> None:
    v = close_mouth(symmetrise(upright(detect_astronaut())))
    v = v / (
        np.linalg.norm(v[L.FOREHEAD] - v[L.CHIN]) / 2.0
    )  # closing the mouth lifted the chin: rescale to 2
    v[:, 1] -= 0.5 * (v[[33, 263], 1].mean() + v[L.CHIN, 1])  # and re-centre the origin's height
    tris = triangles_from_tessellation(v)
    TEMPLATE_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        TEMPLATE_PATH,
        vertices=v.astype(np.float32),
        triangles=tris,
        source=np.array("mediapipe 0.10.21 face mesh on skimage.data.astronaut()"),
    )
    print(
        f"wrote {TEMPLATE_PATH}: {len(v)} vertices, {len(tris)} triangles, "
        f"{TEMPLATE_PATH.stat().st_size / 1024:.1f} KiB"
    )
    print("face width/height:", np.ptp(v[:468, 0]).round(3), np.ptp(v[:468, 1]).round(3))


if __name__ == "__main__":
    main()
