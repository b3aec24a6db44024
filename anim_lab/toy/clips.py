"""Toy talking-head clips: smooth head sway, speech-like mouth motion, blinks and slow smiles, of any length.

The motion is a continuous function of time ``t = frame / fps`` drawn once per clip from a seed, so a clip of
any length (and any fps) is just that function sampled:

- head: a random base pose plus two slow sinusoids per axis (0.1-0.6 Hz); yaw ±35°, pitch and roll ±20° at
  most;
- mouth: syllables at 3-5 Hz (each opens and closes the mouth once, with its own random loudness), switched on
  and off by a slow "speaking" envelope;
- blinks: every ~2-5 s, 0.24 s long (cos² profile, eyes fully shut at the middle);
- smile: a slow drift around a per-clip level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anim_lab.errors import InputError
from anim_lab.landmarks import draw_pose_image
from anim_lab.toy.renderer import Expression, HeadPose, Identity, render

LIMITS = {"yaw": 35.0, "pitch": 20.0, "roll": 20.0}


@dataclass
class Clip:
    """A rendered clip. ``frames``: ``(F, H, W, 3)`` uint8 RGB; ``landmarks``: ``(F, 478, 2)`` float32
    pixels."""

    frames: np.ndarray
    landmarks: np.ndarray
    poses: list[HeadPose]
    expressions: list[Expression]
    fps: float
    identity: Identity

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def pose_array(self) -> np.ndarray:
        """``(F, 6)`` float32: yaw, pitch, roll, tx, ty, scale per frame."""
        return np.stack([p.as_array() for p in self.poses])

    @property
    def expression_array(self) -> np.ndarray:
        """``(F, 3)`` float32: mouth_open, blink, smile per frame."""
        return np.stack([e.as_array() for e in self.expressions])

    def pose_images(self) -> np.ndarray:
        """``(F, H, W, 3)`` uint8 AniPortrait pose images of the clip's landmarks."""
        h, w = self.frames.shape[1:3]
        return np.stack([draw_pose_image(lmk, h, w) for lmk in self.landmarks])


def _sway(rng: np.random.Generator, t: np.ndarray, amplitude: float, low: float = 0.1, high: float = 0.6):
    """Sum of two sinusoids with random frequencies in [low, high] Hz and phases; peak ≤ ``amplitude``."""
    f = rng.uniform(low, high, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    w = rng.uniform(0.3, 1.0, 2)
    w = w / w.sum()
    return amplitude * (w[:, None] * np.sin(2 * np.pi * f[:, None] * t[None] + phase[:, None])).sum(0)  # (F,)


def sample_motion(
    num_frames: int, fps: float = 25.0, seed: int = 0, *, start: float = 0.0, motion: float = 1.0
) -> tuple[list[HeadPose], list[Expression]]:
    """Head poses and expressions for ``num_frames`` frames at ``fps`` (from time ``start`` seconds).

    ``motion`` scales every movement amplitude (0 = a still head with a closed mouth, open eyes and a fixed
    smile).
    """
    if int(num_frames) != num_frames or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames}")
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    rng = np.random.default_rng([int(seed), 7])
    t = start + np.arange(int(num_frames)) / float(fps)  # (F,) seconds

    base = {
        "yaw": rng.uniform(-15, 15),
        "pitch": rng.uniform(-8, 8),
        "roll": rng.uniform(-6, 6),
        "tx": rng.uniform(-0.04, 0.04),
        "ty": rng.uniform(-0.03, 0.03),
        "scale": rng.uniform(0.92, 1.08),
    }
    amp = {
        "yaw": rng.uniform(4, 14),
        "pitch": rng.uniform(2, 7),
        "roll": rng.uniform(1, 5),
        "tx": rng.uniform(0.005, 0.02),
        "ty": rng.uniform(0.003, 0.012),
        "scale": rng.uniform(0.005, 0.03),
    }
    head = {k: base[k] + motion * _sway(rng, t, amp[k]) for k in base}  # name -> (F,)
    for k, limit in LIMITS.items():
        head[k] = np.clip(head[k], -limit, limit)

    # speech: syllables at rate r; syllable k = floor(r t + phi) has loudness a_k; sin^2 opens and closes it
    rate = rng.uniform(3.0, 5.0)
    cycles = rate * t + rng.uniform(0, 1)  # (F,) syllable clock
    k = np.floor(cycles).astype(np.int64)
    loudness = np.random.default_rng([int(seed), 8]).uniform(0.3, 1.0, int(k.max()) + 1)  # one per syllable
    speaking = np.clip(
        (_sway(rng, t, 1.0, 0.08, 0.3) + rng.uniform(0.5, 1.0)) / 0.3, 0.0, 1.0
    )  # (F,) mostly on
    mouth = 0.85 * motion * speaking * loudness[k] * np.sin(np.pi * (cycles - k)) ** 2  # (F,)

    # blinks: a renewal process with 2-5 s gaps, each 0.24 s long
    blink = np.zeros_like(t)
    tb = start + rng.uniform(0.2, 3.0)
    blink_rng = np.random.default_rng([int(seed), 9])
    while tb < t[-1] + 0.2:
        x = (t - tb) / 0.12
        blink = np.maximum(blink, np.where(np.abs(x) < 1, np.cos(0.5 * np.pi * x) ** 2, 0.0))
        tb += blink_rng.uniform(2.0, 5.0)
    blink = motion * blink

    smile = np.clip(rng.uniform(0.0, 0.6) + motion * _sway(rng, t, 0.25, 0.05, 0.2), 0.0, 1.0)

    poses = [HeadPose(**{key: float(head[key][i]) for key in head}) for i in range(len(t))]
    expressions = [
        Expression(
            mouth_open=float(np.clip(mouth[i], 0, 1)),
            blink=float(np.clip(blink[i], 0, 1)),
            smile=float(smile[i]),
        )
        for i in range(len(t))
    ]
    return poses, expressions


def make_clip(
    identity: Identity,
    num_frames: int = 17,
    size: int = 128,
    seed: int = 0,
    fps: float = 25.0,
    *,
    start: float = 0.0,
    motion: float = 1.0,
    **render_kwargs,
) -> Clip:
    """Render a talking-head clip of ``identity`` (motion from :func:`sample_motion`; ``render_kwargs`` such
    as ``texture``/``grain``/``supersample`` go to :func:`anim_lab.toy.render`, each frame seeded
    ``seed + i``)."""
    poses, expressions = sample_motion(num_frames, fps, seed, start=start, motion=motion)
    rendered = [
        render(identity, p, e, size=size, seed=int(seed) + i, **render_kwargs)
        for i, (p, e) in enumerate(zip(poses, expressions, strict=True))
    ]
    frames = np.stack([img for img, _ in rendered])  # (F, H, W, 3)
    landmarks = np.stack([lmk for _, lmk in rendered])  # (F, 478, 2)
    return Clip(
        frames=frames,
        landmarks=landmarks,
        poses=poses,
        expressions=expressions,
        fps=float(fps),
        identity=identity,
    )
