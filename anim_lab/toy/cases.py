"""Retargeting problems with their answers, from the toy world: identity A (the reference) driven by identity
B's clip, with A's exact landmarks and renders in B's pose and expression as the ground truth.

    case = toy.toy_case(reference_seed=5, driver_seed=9, num_frames=16, size=128)
    truth = case.target_landmarks()  # (F, 478, 2)
    frames = case.target_frames()  # (F, H, W, 3) uint8

:func:`toy_landmarks_3d` gives a render's exact 3D landmarks in mediapipe's convention, so a retargeting
method (``anim_lab.retarget``) can be scored without a detector's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anim_lab.errors import InputError
from anim_lab.toy.clips import sample_motion
from anim_lab.toy.renderer import (
    FACE_FRACTION,
    HEAD_Y,
    PIVOT,
    Expression,
    HeadPose,
    Identity,
    face_vertices,
    identity_from_seed,
    render,
    rotation_matrix,
)

__all__ = ["toy_landmarks_3d", "ToyCase", "toy_case"]

_FLIP = np.array([1.0, -1.0, -1.0])  # face frame (y up, z toward the camera) <-> image space (y down, z away)


def toy_landmarks_3d(
    identity: Identity, pose: HeadPose, expression: Expression, size: int = 128
) -> np.ndarray:
    """``(478, 3)`` float32 image-space 3D landmarks of a toy render, in mediapipe's convention (pixel x, y;
    z in pixels, smaller = closer). x, y are exactly the landmarks :func:`anim_lab.toy.render` returns.

    The renderer turns the face about its pivot and projects orthographically, ``FACE_FRACTION · size ·
    scale`` pixels per template unit, the template origin at ``(0.5 + tx, HEAD_Y + ty)`` of the frame.
    """
    rot = rotation_matrix(pose.yaw, pose.pitch, pose.roll)  # (3, 3)
    verts = (face_vertices(identity, expression) - PIVOT) @ rot.T + PIVOT  # (478, 3) template units, posed
    unit = FACE_FRACTION * size * pose.scale  # pixels per template unit
    origin = np.array([size * (0.5 + pose.tx), size * (HEAD_Y + pose.ty), 0.0]) - np.array([0.5, 0.5, 0.0])
    return (origin + verts * _FLIP * unit).astype(np.float32)  # face frame -> image space (y down, z away)


@dataclass
class ToyCase:
    """A retargeting problem with its answer: toy identity A (the reference) driven by identity B's clip.

    The ground truth is A rendered in B's rotation and expression, with B's translation and scale relative to
    B's first frame applied to the reference's (as :func:`retarget` transfers them). With ``framing="same"``
    the reference stands where B's first frame stands, so the ground truth is A in B's pose exactly.
    """

    reference: Identity
    driver: Identity
    reference_pose: HeadPose
    reference_expression: Expression
    poses: list[HeadPose]
    expressions: list[Expression]
    size: int

    @property
    def target_poses(self) -> list[HeadPose]:
        """The ground-truth pose of every frame: B's rotation, B's relative translation and scale on A's."""
        r, first = self.reference_pose, self.poses[0]
        return [
            HeadPose(
                yaw=p.yaw,
                pitch=p.pitch,
                roll=p.roll,
                tx=r.tx + p.tx - first.tx,
                ty=r.ty + p.ty - first.ty,
                scale=r.scale * p.scale / first.scale,
            )
            for p in self.poses
        ]

    def reference_xyz(self) -> np.ndarray:
        """``(478, 3)`` the reference's exact image-space landmarks."""
        return toy_landmarks_3d(self.reference, self.reference_pose, self.reference_expression, self.size)

    def driving_xyz(self) -> np.ndarray:
        """``(F, 478, 3)`` the driving clip's exact image-space landmarks."""
        return np.stack([toy_landmarks_3d(self.driver, p, e, self.size) for p, e in self._motion()])

    def target_landmarks(self) -> np.ndarray:
        """``(F, 478, 2)`` ground truth: A in B's pose and expression."""
        pairs = zip(self.target_poses, self.expressions, strict=True)
        return np.stack([toy_landmarks_3d(self.reference, p, e, self.size)[:, :2] for p, e in pairs])

    def naive_landmarks(self) -> np.ndarray:
        """``(F, 478, 2)`` the naive baseline: B's landmarks drawn as they are."""
        return self.driving_xyz()[:, :, :2]

    def reference_image(self, **render_kwargs) -> np.ndarray:
        image, _ = render(
            self.reference, self.reference_pose, self.reference_expression, self.size, **render_kwargs
        )
        return image

    def driving_frames(self, **render_kwargs) -> np.ndarray:
        """``(F, H, W, 3)`` B's clip rendered."""
        return np.stack([render(self.driver, p, e, self.size, **render_kwargs)[0] for p, e in self._motion()])

    def target_frames(self, **render_kwargs) -> np.ndarray:
        """``(F, H, W, 3)`` the ground truth rendered: A in B's pose and expression."""
        pairs = zip(self.target_poses, self.expressions, strict=True)
        return np.stack([render(self.reference, p, e, self.size, **render_kwargs)[0] for p, e in pairs])

    def _motion(self):
        return zip(self.poses, self.expressions, strict=True)


def toy_case(
    reference_seed: int,
    driver_seed: int,
    seed: int = 0,
    num_frames: int = 32,
    size: int = 256,
    fps: float = 25.0,
    framing: str = "same",
) -> ToyCase:
    """A :class:`ToyCase`: identities from their seeds (use ``toy.identity_split("test")`` for held-out ones),
    B's motion from ``toy.sample_motion(num_frames, fps, seed)``, the reference in a random rotation (yaw
    ±25°, pitch ±10°, roll ±8°) with a neutral expression, standing where B's first frame stands
    (``framing="same"``) or at its own random place and size (``framing="own"``)."""
    if framing not in ("same", "own"):
        raise InputError(f'framing must be "same" or "own", got {framing!r}')
    poses, expressions = sample_motion(num_frames, fps, seed)
    rng = np.random.default_rng([int(seed), 15])
    rotation = dict(yaw=rng.uniform(-25, 25), pitch=rng.uniform(-10, 10), roll=rng.uniform(-8, 8))
    if framing == "same":
        place = dict(tx=poses[0].tx, ty=poses[0].ty, scale=poses[0].scale)
    else:
        place = dict(tx=rng.uniform(-0.05, 0.05), ty=rng.uniform(-0.04, 0.04), scale=rng.uniform(0.9, 1.1))
    return ToyCase(
        reference=identity_from_seed(reference_seed),
        driver=identity_from_seed(driver_seed),
        reference_pose=HeadPose(**{k: float(v) for k, v in (rotation | place).items()}),
        reference_expression=Expression(),
        poses=poses,
        expressions=expressions,
        size=int(size),
    )
