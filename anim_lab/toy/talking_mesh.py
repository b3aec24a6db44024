"""Speech and the face mesh it moves: Audio2Mesh's training data in the toy world, with exact targets.

    item = toy.talking_mesh(toy.identity_from_seed(3), toy.sample_speech(7, "heldout"), fps=25)
    item.audio                 # (N,) float32 16-kHz speech
    item.neutral               # (478, 3) the identity's face at rest (template units, y up, before any pose)
    item.offsets               # (F, 478, 3) what speech does to it, frame by frame: Audio2Mesh's target
    ds = toy.TalkingMeshDataset("heldout", length=40)   # items of held-out voices, sentences and identities

An item is the mesh of :func:`anim_lab.toy.make_talking_clip` without the rendering: the same speech, the
same frame grid (``ceil(seconds · fps)`` frames, frame i at ``t = i / fps``), the same viseme track driving
the same expression, in the face's own frame (no head pose), which is where AniPortrait's Audio2Mesh works
too (its ``lmks3d`` is mediapipe's canonical, pose-free mesh; the offsets are added to the reference's).

``expression="speech"`` (the default) keeps only what speech moves: the jaw and the lip shapes. Blinks and the
slow smile of the clip motion model are not in the audio, so ``"full"`` (every expression parameter of the
talking clip with motion seed ``seed``) adds variation no audio model can predict; with it, posing ``neutral
+ offsets`` gives the clip's ``landmarks_3d`` exactly.

Splits: ``"train"`` draws training sentences and voices (``toy.sample_speech``) and training identities;
``"heldout"`` held-out sentences *and* voices and the test identities. Item ``i`` is a pure function of
``(split, seed, i)``.

Baselines for what an audio model learns: :func:`mean_offsets` (the mean face: the training frames' mean
offset, whatever is said) and :func:`shuffled` (each clip given another clip's audio features, stretched to
its length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from anim_lab.errors import InputError
from anim_lab.toy.clips import sample_motion
from anim_lab.toy.dataset import identity_split
from anim_lab.toy.renderer import Expression, Identity, face_vertices, identity_from_seed
from anim_lab.toy.speech import Speech, sample_speech
from anim_lab.toy.talking import AUDIO_SAMPLE_RATE
from anim_lab.toy.visemes import viseme_track

__all__ = ["TalkingMesh", "talking_mesh", "TalkingMeshDataset", "mean_offsets", "shuffled", "SPEECH_SPLITS"]

# dataset split -> (speech split of toy.sample_speech, identity split of toy.identity_split)
SPEECH_SPLITS = {"train": ("train", "train"), "heldout": ("heldout", "test")}


@dataclass
class TalkingMesh:
    """One utterance and the mesh it moves: ``audio`` (N,) float32 at 16 kHz, ``neutral`` (V, 3) float32,
    ``offsets`` (F, V, 3) float32, ``visemes`` (F, 4), the :class:`~anim_lab.toy.Speech`, ``fps``, and
    ``head_pose`` (F, 6): the talking clip's head motion with the same motion seed (yaw, pitch, roll in
    degrees, tx, ty, scale; ``Clip.pose_array``), which the audio does not drive: Audio2Pose's ground truth.
    """

    audio: np.ndarray
    neutral: np.ndarray
    offsets: np.ndarray
    visemes: np.ndarray
    speech: Speech
    fps: float
    identity: Identity
    head_pose: np.ndarray

    @property
    def num_frames(self) -> int:
        return len(self.offsets)

    @property
    def vertices(self) -> np.ndarray:
        """``(F, V, 3)`` the speaking face: ``neutral + offsets``."""
        return self.neutral[None] + self.offsets


def talking_mesh(
    identity: Identity, speech: Speech, fps: float = 25.0, *, expression: str = "speech", seed: int = 0
) -> TalkingMesh:
    """The face mesh of ``identity`` speaking ``speech`` (see the module docstring); ``seed`` is the clip
    motion seed for ``expression="full"``."""
    if expression not in ("speech", "full"):
        raise InputError(f'expression must be "speech" or "full", got {expression!r}')
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    audio = speech.audio_16k()  # (N,)
    num_frames = math.ceil(len(audio) / AUDIO_SAMPLE_RATE * fps)  # as make_talking_clip
    visemes = viseme_track(speech.phonemes, np.arange(num_frames) / float(fps))  # (F, 4)
    poses, motion = sample_motion(num_frames, fps, seed)  # the talking clip's head motion, blinks, smile
    head_pose = np.stack([p.as_array() for p in poses])  # (F, 6)
    blink_smile = [(e.blink, e.smile) if expression == "full" else (0.0, 0.0) for e in motion]  # speech: none
    neutral = face_vertices(identity, Expression()).astype(np.float32)  # (V, 3)
    meshes = [
        face_vertices(
            identity,
            Expression(
                mouth_open=float(jaw),
                blink=float(b),
                smile=float(s),
                lip_round=float(rnd),
                lip_press=float(close),
                lip_spread=float(spread),
            ),
        )
        for (jaw, rnd, close, spread), (b, s) in zip(visemes, blink_smile, strict=True)
    ]
    offsets = (np.stack(meshes) - neutral[None]).astype(np.float32)  # (F, V, 3)
    return TalkingMesh(audio, neutral, offsets, visemes, speech, float(fps), identity, head_pose)


class TalkingMeshDataset(Dataset):
    """``length`` talking meshes of a split (``"train"`` or ``"heldout"``); item ``i`` uses speech seed
    ``seed · 1_000_003 + i`` and the identity of the split at the same index. Items are made on first use
    and kept. ``__getitem__`` returns :class:`TalkingMesh`."""

    def __init__(self, split: str = "train", length: int = 100, fps: float = 25.0, seed: int = 0, **kwargs):
        if split not in SPEECH_SPLITS:
            raise InputError(f"split must be one of {tuple(SPEECH_SPLITS)}, got {split!r}")
        if int(length) < 1:
            raise InputError(f"length must be ≥ 1, got {length}")
        self.split, self.length, self.fps, self.seed, self.kwargs = (
            split,
            int(length),
            float(fps),
            seed,
            kwargs,
        )
        self._items: dict[int, TalkingMesh] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> TalkingMesh:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index not in self._items:
            speech_split, identity_split_name = SPEECH_SPLITS[self.split]
            key = int(self.seed) * 1_000_003 + int(index)
            identities = identity_split(identity_split_name)
            identity = identity_from_seed(identities[key % len(identities)])
            self._items[index] = talking_mesh(
                identity, sample_speech(key, speech_split), self.fps, seed=key, **self.kwargs
            )
        return self._items[index]


def mean_offsets(items) -> np.ndarray:
    """The mean-face baseline: ``(V, 3)`` the mean offset over every frame of ``items`` (training meshes);
    it predicts the same face for every frame, whatever is said."""
    total = sum(item.offsets.astype(np.float64).sum(0) for item in items)
    return (total / sum(item.num_frames for item in items)).astype(np.float32)


def shuffled(features: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """The shuffled-audio baseline: clip k gets the features ``(F_j, D)`` of another clip j (a random
    derangement), linearly interpolated to its own length ``F_k``. Needs ≥ 2 clips."""
    from anim_lab.audio import interpolate_frames

    if len(features) < 2:
        raise InputError("shuffling audio needs at least two clips")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    partner = np.roll(order, 1)[np.argsort(order)]  # a cycle through a random order: nobody keeps its own
    return [
        interpolate_frames(features[j][None].float(), len(features[k]))[0].to(features[k].dtype)
        for k, j in enumerate(partner)
    ]
