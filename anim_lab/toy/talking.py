"""Talking toy clips: a toy face that speaks a sentence, with exact ground truth for the lips.

    clip = toy.make_talking_clip(toy.identity_from_seed(3), "Bob spoke softly.", fps=25)
    clip = toy.make_talking_clip(toy.identity_from_seed(3), 7)           # sentence and speaker from seed 7
    clip.frames, clip.landmarks, clip.landmarks_3d   # (F, H, W, 3) uint8, (F, 478, 2), (F, 478, 3)
    clip.audio, clip.sample_rate                     # (N,) float32 at 16 kHz
    clip.speech.phonemes                             # the phoneme timeline (ms)
    clip.write("talking.mp4")                        # H.264 with the speech as an AAC track

The speech is eSpeak NG's (:mod:`anim_lab.toy.speech`); the mouth follows its phoneme timeline through the
viseme table with coarticulation (:mod:`anim_lab.toy.visemes`); head motion, blinks and the slow smile come
from the clip motion model (:func:`anim_lab.toy.sample_motion`), whose own syllable mouth is dropped.

The clip has ``ceil(seconds · fps)`` frames, the frame count the references give audio of that length
(AniPortrait, Hallo); frame ``i`` shows the face at ``t = i / fps``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anim_lab.errors import InputError
from anim_lab.toy.cases import toy_landmarks_3d
from anim_lab.toy.clips import Clip, sample_motion
from anim_lab.toy.renderer import Expression, Identity, render
from anim_lab.toy.speech import Speech, Voice, sample_speech, synthesize
from anim_lab.toy.visemes import viseme_track

AUDIO_SAMPLE_RATE = 16000  # what the clip's audio is resampled to (wav2vec2's rate)


@dataclass
class TalkingClip(Clip):
    """A :class:`anim_lab.toy.Clip` that speaks. Adds ``landmarks_3d`` ``(F, 478, 3)`` float32 (image space,
    mediapipe's convention, :func:`anim_lab.toy.toy_landmarks_3d`), ``audio`` ``(N,)`` float32 at
    ``sample_rate`` (16 kHz), the :class:`~anim_lab.toy.Speech` it came from (text, voice, 22,050-Hz audio,
    phoneme timeline) and ``visemes`` ``(F, 4)`` float32 (jaw, round, close, spread) that drove the mouth."""

    landmarks_3d: np.ndarray
    audio: np.ndarray
    sample_rate: int
    speech: Speech
    visemes: np.ndarray

    @property
    def phonemes(self):
        return self.speech.phonemes

    @property
    def times(self) -> np.ndarray:
        """``(F,)`` seconds: the time each frame shows."""
        return np.arange(self.num_frames) / self.fps

    def mouth_opening(self) -> np.ndarray:
        """``(F,)`` float32: the inner-lip gap (points 13-14) over the face height (points 10-152), from the
        exact 3D landmarks."""
        lmk = self.landmarks_3d
        gap = np.linalg.norm(lmk[:, 13] - lmk[:, 14], axis=-1)
        return (gap / np.linalg.norm(lmk[:, 10] - lmk[:, 152], axis=-1)).astype(np.float32)

    def write_wav(self, path) -> Path:
        """The 16-kHz audio as a 16-bit PCM wav (written atomically)."""
        from anim_lab.audio import write_audio

        return write_audio(path, self.audio, self.sample_rate)

    def write(self, path, *, quality: float = 8.0) -> Path:
        """An mp4 of the frames with the speech muxed in as AAC (written atomically)."""
        from anim_lab.video import write_video

        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise InputError(f"a talking clip is written as .mp4 (with its audio), got {path.name!r}")
        with tempfile.TemporaryDirectory(prefix=".talking-") as tmp:
            wav = self.write_wav(os.path.join(tmp, "speech.wav"))
            return write_video(path, self.frames, self.fps, audio_from=wav, quality=quality)


def make_talking_clip(
    identity: Identity,
    speech: str | int | Speech,
    fps: float = 25.0,
    *,
    size: int = 128,
    voice: Voice | None = None,
    split: str = "train",
    seed: int = 0,
    motion: float = 1.0,
    **render_kwargs,
) -> TalkingClip:
    """Render ``identity`` speaking.

    Args:
        identity: who speaks (:func:`anim_lab.toy.identity_from_seed`).
        speech: a sentence (spoken with ``voice``), a seed (a sentence and speaker of ``split`` from
            :func:`anim_lab.toy.sample_speech`), or a :class:`~anim_lab.toy.Speech` already synthesised.
        fps: frames per second (25 as Hallo, 30 as AniPortrait).
        size: frame height = width in pixels.
        voice: the speaker for a sentence (default ``Voice()``); not allowed with a seed or a Speech.
        split: ``"train"`` or ``"heldout"``, for a seed.
        seed: seeds the head motion, blinks and smile (and each frame's render, ``seed + i``).
        motion: scales head motion, blinks and smile (0 = a still head; the mouth still speaks).
        render_kwargs: ``texture``, ``grain``, ``supersample`` for :func:`anim_lab.toy.render`.
    """
    if not isinstance(identity, Identity):
        raise TypeError(f"identity must be a toy.Identity, got {type(identity).__name__}")
    if not fps > 0:
        raise InputError(f"fps must be positive, got {fps}")
    if isinstance(speech, Speech):
        if voice is not None:
            raise InputError("voice= is for a sentence; this Speech already has its voice")
    elif isinstance(speech, str):
        speech = synthesize(speech, voice or Voice())
    elif isinstance(speech, (int, np.integer)) and not isinstance(speech, bool):
        if voice is not None:
            raise InputError("voice= is for a sentence; a seed picks the speaker from the split")
        speech = sample_speech(int(speech), split)
    else:
        raise TypeError(f"speech must be a sentence, a seed or a toy.Speech, got {type(speech).__name__}")

    audio = speech.audio_16k()  # (N,) float32 at 16 kHz
    num_frames = math.ceil(len(audio) / AUDIO_SAMPLE_RATE * fps)
    times = np.arange(num_frames) / float(fps)  # (F,) seconds
    visemes = viseme_track(speech.phonemes, times)  # (F, 4) jaw, round, close, spread
    poses, motion_expr = sample_motion(num_frames, fps, seed, motion=motion)  # head, blinks, smile
    expressions = [
        Expression(
            mouth_open=float(jaw),
            blink=e.blink,
            smile=e.smile,
            lip_round=float(rnd),
            lip_press=float(close),
            lip_spread=float(spread),
        )
        for e, (jaw, rnd, close, spread) in zip(motion_expr, visemes, strict=True)
    ]
    rendered = [
        render(identity, p, e, size=size, seed=int(seed) + i, **render_kwargs)
        for i, (p, e) in enumerate(zip(poses, expressions, strict=True))
    ]
    return TalkingClip(
        frames=np.stack([img for img, _ in rendered]),  # (F, H, W, 3)
        landmarks=np.stack([lmk for _, lmk in rendered]),  # (F, 478, 2)
        poses=poses,
        expressions=expressions,
        fps=float(fps),
        identity=identity,
        landmarks_3d=np.stack(
            [toy_landmarks_3d(identity, p, e, size) for p, e in zip(poses, expressions, strict=True)]
        ),
        audio=audio,
        sample_rate=AUDIO_SAMPLE_RATE,
        speech=speech,
        visemes=visemes,
    )
