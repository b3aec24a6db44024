"""Audio2Pose: speech -> head pose, AniPortrait's autoregressive decoder, and its template fallback.

    model = Audio2Pose()                                           # AniPortrait's size
    poses = audio_pose_sequence(model, input_values, num_frames)   # (F, 6): 3 Euler angles (°), 3 shifts
    poses = tile_pose_template(template, num_frames)               # the fallback: a recorded template

The model (AniPortrait ``src/audio_models/pose_model.py``, ``Audio2PoseModel``)::

    audio --wav2vec2 at the frame rate--> (B, F, 768) --in_fn: Linear 768 -> 512--> memory (B, F, 512)
    poses so far (B, L, 6) --pose_map: Linear 6 -> 512--> + sinusoidal PE (PPE) + id_embed[id] --> tokens
    tokens (B, L, 512) --8-layer nn.TransformerDecoder (d 512, 8 heads, FF 1024, post-norm, ReLU)-->
          --pose_map_r: Linear 512 -> 6--> (B, L, 6)

- **Autoregressive** (:meth:`Audio2Pose.decode`): step 0 feeds ``pose_map(0)``; each step appends
  ``pose_map(last output)`` and runs the whole decoder again over the sequence so far. The result is the
  last pass's output, F poses.
- **Self-attention mask** (:func:`alibi_mask`, FaceFormer's ``init_biased_mask`` with period 1): causal, plus
  a linear penalty ``-m_h · (i - j)`` on looking ``i - j`` frames back, with head slopes ``m_h = 2^(-8h/H)``
  (1/2, 1/4, … 1/256 for 8 heads). Built for 600 frames, so a pass cannot be longer.
- **Cross-attention mask** (:func:`alignment_mask`): pose step i sees audio frame i only.
- **Identity embedding**: 100 learned "speaking styles"; AniPortrait's gradio app (``scripts/app.py``) picks
  ``id_seed`` at random in 0..99 (``audio_pose_sequence`` takes it as an argument, default 42).
- **Chunks** (:func:`pose_chunks`, :func:`audio_pose_sequence`): the audio is cut into 5-s pieces (80,000
  samples, 150 frames at 30 fps), the last two merged (so no piece is longer than 10 s, 300 frames: under the
  mask's 600), each decoded on its own with the same id; then rotations × 0.5 and a centred moving average
  over 7 frames (:func:`smooth_poses`, the window cut at the ends).
- **Template fallback** (:func:`tile_pose_template`): a recorded pose sequence (``pose_temp.npy``, (T, 6)) is
  played forward then backward (without repeating its ends) and tiled to the length needed. AniPortrait's
  ``scripts/audio2vid.py`` always uses the template; its app uses Audio2Pose unless a head-pose video is given
  (whose poses, relative to its first frame, are then mirrored and tiled the same way).

Where the reference breaks, this code does the right thing (``faithful`` is not needed: no reference output
depends on it). Audio of 5 s or less is one chunk (the reference's merge of the last two chunks raises an
IndexError there). The last chunk gets ``F - 150 · (n - 1)`` frames; the reference gives it ``F % 150``, which
is 0 when the audio's last piece covers its 150 frames fully (e.g. exactly 10 s), and its poses then come
out 150 frames short of the mesh (an IndexError in ``project_points``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from einops import repeat
from torch import nn

from .audio import SAMPLE_RATE
from .audio2mesh import audio_input, encoder_states
from .errors import InputError
from .motion import sinusoidal_position_encoding

__all__ = [
    "Audio2Pose",
    "alibi_slopes",
    "alibi_mask",
    "alignment_mask",
    "pose_chunks",
    "audio_pose_sequence",
    "smooth_poses",
    "tile_pose_template",
    "CHUNK_SECONDS",
    "ROTATION_SCALE",
    "SMOOTH_WINDOW",
]

CHUNK_SECONDS = 5  # audio2vid / app.py: "only inference up to a maximum length of 10 seconds"; 5-s chunks
ROTATION_SCALE = 0.5  # the predicted Euler angles are halved
SMOOTH_WINDOW = 7  # the moving average over the predicted poses


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes: ``2^(-8h/n)`` for h = 1..n when n is a power of two (8 heads: 1/2 … 1/256);
    otherwise the slopes of the nearest lower power of two, then every other slope of the next one."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def alibi_mask(num_heads: int, max_len: int) -> torch.Tensor:
    """``(H, L, L)`` float additive mask: ``-slope_h · (i - j)`` for j ≤ i, ``-inf`` for j > i (FaceFormer's
    biased causal mask with period 1)."""
    i = torch.arange(max_len)[:, None]
    j = torch.arange(max_len)[None, :]
    distance = (i - j).float()  # (L, L) how far back j lies from i
    slopes = torch.tensor(alibi_slopes(num_heads))[:, None, None]  # (H, 1, 1)
    bias = -slopes * distance.clamp_min(0)  # (H, L, L)
    return bias.masked_fill((j > i)[None], float("-inf"))


def alignment_mask(num_targets: int, num_sources: int, device=None) -> torch.Tensor:
    """``(T, S)`` bool cross-attention mask, True = not allowed: target step i sees source frame i only."""
    if num_targets > num_sources:
        raise InputError(f"{num_targets} pose steps need as many audio frames, got {num_sources}")
    mask = torch.ones(num_targets, num_sources, dtype=torch.bool, device=device)
    index = torch.arange(num_targets, device=device)
    mask[index, index] = False
    return mask


class _SinusoidalPE(nn.Module):
    """``x + pe[:, :L]``; ``pe`` (1, max_len, dim) is a persistent buffer (the reference's ``PPE.pe`` key)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_position_encoding(max_len, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise InputError(f"{x.shape[1]} pose steps exceed the position encoding's {self.pe.shape[1]}")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)  # (B, L, D) + (1, L, D)


class Audio2Pose(ModelMixin, ConfigMixin):
    """AniPortrait's Audio2Pose (see the module docstring). Keys are the reference's.

    Args:
        pose_dim: 6 (3 Euler angles in degrees, 3 translations).
        latent_dim, num_layers, num_heads, ff_dim: the decoder (512, 8, 8, 1024 = 2 · latent_dim).
        max_len: the ALiBi mask's and the position encoding's length (600).
        num_ids: identity ("speaking style") embeddings (100).
        encoder_config: wav2vec2 config dict (None: base-960h's); ``feature_dim``: no encoder, features in.
        dropout: the decoder layers' dropout (PyTorch's default 0.1, as the reference leaves it).
    """

    @register_to_config
    def __init__(
        self,
        pose_dim: int = 6,
        latent_dim: int = 512,
        num_layers: int = 8,
        num_heads: int = 8,
        ff_dim: int | None = None,
        max_len: int = 600,
        num_ids: int = 100,
        encoder_config: dict | None = None,
        feature_dim: int | None = None,
        only_last_features: bool = True,
        dropout: float = 0.1,
        fps: float = 30.0,
    ):
        super().__init__()
        self.audio_encoder, in_dim = audio_input(encoder_config, feature_dim)
        self.pose_map = nn.Linear(pose_dim, latent_dim)  # a pose -> a decoder token
        self.in_fn = nn.Linear(in_dim, latent_dim)  # audio features -> the decoder's memory
        self.PPE = _SinusoidalPE(latent_dim, max_len)  # noqa: N815 (the reference's key name)
        self.register_buffer("biased_mask", alibi_mask(num_heads, max_len), persistent=False)  # (H, L, L)
        layer = nn.TransformerDecoderLayer(
            d_model=latent_dim,
            nhead=num_heads,
            dim_feedforward=ff_dim or 2 * latent_dim,
            dropout=dropout,
            batch_first=True,
        )
        self.transformer_decoder = nn.TransformerDecoder(layer, num_layers=num_layers)
        self.pose_map_r = nn.Linear(latent_dim, pose_dim)  # a decoder output -> a pose
        self.id_embed = nn.Embedding(num_ids, latent_dim)

    def memory(self, input_values=None, num_frames=None, *, extract=None, features=None) -> torch.Tensor:
        """The decoder's memory ``(B, F, latent_dim)``: ``in_fn`` of wav2vec2's states (or ``features``)."""
        if self.audio_encoder is None:
            if features is None:
                raise InputError("this Audio2Pose has no audio encoder: give features (B, F, feature_dim)")
            return self.in_fn(features)
        states = encoder_states(
            self.audio_encoder, self.config.only_last_features, input_values, num_frames, extract
        )
        return self.in_fn(states)  # (B, F, D) -> (B, F, 512)

    def _step(self, tokens: torch.Tensor, memory: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """One decoder pass over the pose tokens so far ``(B, L, 512)`` -> poses ``(B, L, 6)``."""
        batch, length = tokens.shape[:2]
        if length > self.biased_mask.shape[1]:
            raise InputError(
                f"{length} frames exceed the decoder's mask ({self.biased_mask.shape[1]}); "
                "decode in chunks (audio_pose_sequence)"
            )
        x = self.PPE(tokens) + identity  # (B, L, 512)
        mask = self.biased_mask[:, :length, :length].to(x.dtype)  # (H, L, L)
        mask = repeat(mask, "h l s -> (b h) l s", b=batch)  # torch's layout for a per-head mask
        out = self.transformer_decoder(
            x, memory, tgt_mask=mask, memory_mask=alignment_mask(length, memory.shape[1], x.device)
        )
        return self.pose_map_r(out)  # (B, L, 512) -> (B, L, 6)

    def decode(self, memory: torch.Tensor, id_seed: torch.Tensor, num_frames: int | None = None):
        """Autoregressive decoding, as the reference's ``infer``: ``(B, F, 512)`` memory, ``(B,)`` ids ->
        ``(B, F, 6)`` poses."""
        num_frames = memory.shape[1] if num_frames is None else int(num_frames)
        identity = self.id_embed(id_seed)[:, None]  # (B, 1, 512)
        start = torch.zeros(
            memory.shape[0], 1, self.config.pose_dim, device=memory.device, dtype=memory.dtype
        )
        tokens = self.pose_map(start)  # (B, 1, 512)
        for _ in range(num_frames):
            poses = self._step(tokens, memory, identity)  # (B, L, 6)
            tokens = torch.cat([tokens, self.pose_map(poses[:, -1:])], dim=1)  # (B, L + 1, 512)
        return poses  # the last pass: (B, F, 6)

    def forward(self, memory: torch.Tensor, poses: torch.Tensor, id_seed: torch.Tensor) -> torch.Tensor:
        """Teacher forcing (for training): the true poses shifted right by one step (a zero pose first) go in
        as the tokens, one pass -> ``(B, F, 6)`` predictions. (AniPortrait's training code is not released;
        this is FaceFormer's way, whose masks it uses.)"""
        shifted = torch.cat([torch.zeros_like(poses[:, :1]), poses[:, :-1]], dim=1)  # (B, F, 6)
        return self._step(self.pose_map(shifted), memory, self.id_embed(id_seed)[:, None])


# --- running it on a whole recording ------------------------------------------------------------------------


def pose_chunks(
    num_samples: int,
    num_frames: int,
    fps: float = 30.0,
    chunk_seconds: float = CHUNK_SECONDS,
    sample_rate: int = SAMPLE_RATE,
) -> list[tuple[int, int, int]]:
    """The pieces the audio is decoded in: ``[(first sample, end sample, frames), ...]``.

    ``chunk_seconds`` of audio (80,000 samples, 150 frames at 30 fps) each, the last two merged; one piece
    when the audio is no longer than one chunk. The frames add up to ``num_frames``."""
    size = int(round(chunk_seconds * sample_rate))
    per_chunk = int(round(chunk_seconds * fps))
    count = max(1, math.ceil(num_samples / size))
    starts = [k * size for k in range(count)]
    frames = [per_chunk] * (count - 1) + [num_frames - per_chunk * (count - 1)]
    if count >= 2:  # merge the last two
        starts.pop()
        frames[-2:] = [frames[-2] + frames[-1]]
    ends = starts[1:] + [num_samples]
    if min(frames) < 1:
        raise InputError(f"{num_frames} frames do not fit {num_samples} samples at {fps} fps")
    return list(zip(starts, ends, frames, strict=True))


def smooth_poses(poses: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Centred moving average over ``window`` frames, the window cut at the ends (each frame the mean of the
    frames that exist within ``window // 2`` of it): ``(F, D)`` -> ``(F, D)``."""
    poses = np.asarray(poses, np.float64)
    half = int(window) // 2
    cumsum = np.concatenate([np.zeros((1,) + poses.shape[1:]), np.cumsum(poses, axis=0)])  # (F + 1, D)
    index = np.arange(len(poses))
    lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, len(poses))
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)[:, None]


@torch.no_grad()
def audio_pose_sequence(
    model: Audio2Pose,
    input_values: torch.Tensor,
    num_frames: int,
    id_seed: int = 42,
    *,
    fps: float = 30.0,
    chunk_seconds: float = CHUNK_SECONDS,
    rotation_scale: float = ROTATION_SCALE,
    smooth_window: int = SMOOTH_WINDOW,
) -> np.ndarray:
    """Head poses ``(F, 6)`` for a whole recording, as AniPortrait's app runs Audio2Pose: chunks
    (:func:`pose_chunks`), each encoded and decoded on its own with the same id, rotations scaled, smoothed.
    ``input_values``: ``(1, N)`` normalised 16-kHz audio (normalised as a whole, then cut)."""
    if input_values.ndim != 2 or input_values.shape[0] != 1:
        raise InputError(f"input_values must be (1, N), got shape {tuple(input_values.shape)}")
    if not 0 <= int(id_seed) < model.config.num_ids:
        raise InputError(f"id_seed must be in [0, {model.config.num_ids - 1}], got {id_seed}")
    ids = torch.tensor([int(id_seed)], device=input_values.device)
    pieces = []
    for start, end, frames in pose_chunks(input_values.shape[1], num_frames, fps, chunk_seconds):
        memory = model.memory(input_values[:, start:end], frames)  # (1, frames, 512)
        poses = model.decode(memory, ids)[0].float().cpu().numpy()  # (frames, 6)
        poses[:, :3] *= rotation_scale
        pieces.append(poses)
    return smooth_poses(np.concatenate(pieces), smooth_window)


def tile_pose_template(template: np.ndarray, num_frames: int) -> np.ndarray:
    """AniPortrait's ``pose_temp`` fallback: ``(T, D)`` template -> ``(num_frames, D)``. The template is
    played forward and then backward without its two ends (``t0 … t(T-1), t(T-2) … t1``), and that cycle of
    ``2T - 2`` frames is repeated and cut to ``num_frames``."""
    template = np.asarray(template)
    if template.ndim != 2 or len(template) == 0:
        raise InputError(f"a pose template must be (T, D) with T ≥ 1, got shape {template.shape}")
    if int(num_frames) < 1:
        raise InputError(f"num_frames must be ≥ 1, got {num_frames}")
    cycle = np.concatenate([template, template[-2:0:-1]])  # (2T - 2, D); (T, D) for T ≤ 2
    reps = int(num_frames) // len(cycle) + 1
    return np.tile(cycle, (reps, 1))[: int(num_frames)]
