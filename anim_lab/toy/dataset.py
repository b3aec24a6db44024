"""Torch datasets over the toy world: reference image + target clip + pose images + landmarks + parameters.

Identities are integers (seeds of :func:`anim_lab.toy.identity_from_seed`) in two fixed, disjoint ranges:
``identity_split("train")`` (10,000 identities) and ``identity_split("test")`` (500 unseen identities). Item
``i`` of a dataset is a pure function of ``(split, seed, i)`` and the sizes, so every epoch, worker and
machine sees the same data.

An item is a dict of tensors, in the project's layout (images in [-1, 1], pose images in [0, 1]):

    "reference"            (3, H, W)      float, [-1, 1]  the same identity, another pose and expression
    "reference_pose"       (3, H, W)      float, [0, 1]   its pose image
    "reference_landmarks"  (478, 2)       float           its landmarks (pixels)
    "frames"               (3, F, H, W)   float, [-1, 1]  the target clip
    "poses"                (3, F, H, W)   float, [0, 1]   the clip's pose images (AniPortrait style)
    "landmarks"            (F, 478, 2)    float           the clip's landmarks (pixels)
    "head_pose"            (F, 6)         float           yaw, pitch, roll (degrees), tx, ty, scale
    "expression"           (F, 3)         float           mouth_open, blink, smile in [0, 1]
    "attributes"           (7,)           long            index per toy.ATTRIBUTES key (skin, hair, eyes, ...)
    "identity"             int                            the identity seed
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from anim_lab.errors import InputError
from anim_lab.landmarks import draw_pose_image
from anim_lab.toy.clips import make_clip, sample_motion
from anim_lab.toy.renderer import ATTRIBUTES, identity_from_seed, render

_SPLITS = {"train": range(0, 10_000), "test": range(1_000_000, 1_000_500)}


def identity_split(split: str) -> range:
    """The fixed identity seeds of a split: ``"train"`` (10,000) or ``"test"`` (500); the two never
    overlap."""
    if split not in _SPLITS:
        raise InputError(f'split must be "train" or "test", got {split!r}')
    return _SPLITS[split]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> ``(3, F, H, W)`` float32 in [-1, 1]."""
    x = np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)  # (F, H, W, 3) in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(rearrange(x, "f h w c -> c f h w")))  # -> (3, F, H, W)


def poses_to_tensor(pose_images: np.ndarray) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 pose images -> ``(3, F, H, W)`` float32 in [0, 1]."""
    x = np.asarray(pose_images, np.float32) / np.float32(255.0)  # (F, H, W, 3) in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(rearrange(x, "f h w c -> c f h w")))  # -> (3, F, H, W)


class ToyPortraitDataset(Dataset):
    """``length`` random toy clips of identities from one split (see the module docstring for an item's keys).

    Args:
        split: ``"train"`` or ``"test"``.
        size: frame height = width in pixels.
        num_frames: frames per clip (1 for single images).
        length: number of items.
        seed: selects the items (identity, motion, reference pose).
        fps: frame rate of the motion.
        texture, grain: passed to :func:`anim_lab.toy.render` (both off by default).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        num_frames: int = 16,
        length: int = 1000,
        seed: int = 0,
        *,
        fps: float = 25.0,
        texture: bool = False,
        grain: float = 0.0,
    ):
        self.identities = identity_split(split)
        if int(length) != length or length < 1:
            raise InputError(f"length must be a positive integer, got {length}")
        if int(num_frames) != num_frames or num_frames < 1:
            raise InputError(f"num_frames must be a positive integer, got {num_frames}")
        self.split, self.size, self.num_frames, self.length = split, int(size), int(num_frames), int(length)
        self.seed, self.fps, self.texture, self.grain = int(seed), float(fps), texture, float(grain)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])
        identity_seed = int(self.identities[int(rng.integers(len(self.identities)))])
        identity = identity_from_seed(identity_seed)
        clip_seed, ref_seed = (int(s) for s in rng.integers(0, 2**31 - 1, 2))
        kw = dict(texture=self.texture, grain=self.grain)
        clip = make_clip(identity, self.num_frames, self.size, seed=clip_seed, fps=self.fps, **kw)
        # the reference: the same person at another moment of another clip (another pose and expression)
        (ref_pose,), (ref_expr,) = sample_motion(1, self.fps, ref_seed, start=float(rng.uniform(0, 10)))
        ref_img, ref_lmk = render(identity, ref_pose, ref_expr, size=self.size, seed=ref_seed, **kw)
        ref_pose_img = draw_pose_image(ref_lmk, self.size, self.size)
        return {
            "reference": images_to_tensor(ref_img[None])[:, 0],  # (3, H, W)
            "reference_pose": poses_to_tensor(ref_pose_img[None])[:, 0],  # (3, H, W)
            "reference_landmarks": torch.from_numpy(ref_lmk),  # (478, 2)
            "frames": images_to_tensor(clip.frames),  # (3, F, H, W)
            "poses": poses_to_tensor(clip.pose_images()),  # (3, F, H, W)
            "landmarks": torch.from_numpy(clip.landmarks),  # (F, 478, 2)
            "head_pose": torch.from_numpy(clip.pose_array),  # (F, 6)
            "expression": torch.from_numpy(clip.expression_array),  # (F, 3)
            "attributes": torch.tensor([identity.attribute_index(k) for k in ATTRIBUTES]),  # (7,)
            "identity": identity_seed,
        }
