"""Audio2Mesh: speech -> per-frame 3D face-mesh offsets, AniPortrait's first audio stage.

    model = Audio2Mesh()                                   # AniPortrait's size: wav2vec2-base, 468 vertices
    offsets = model(input_values, num_frames)              # (B, N) audio -> (B, F, 468, 3)
    mesh = reference_lmks3d + offsets[0]                   # (F, 468, 3): the reference face, speaking

The model (AniPortrait ``src/audio_models/model.py``, ``Audio2MeshModel``)::

    audio (B, N) --wav2vec2 CNN--> (B, T, 512) at 50/s --linear interpolation--> (B, F, 512) at the video fps
          --feature projection + transformer--> last_hidden_state (B, F, 768)
          --in_fn: Linear 768 -> 512--> --out_fn: Linear 512 -> 1404 (zero-initialised)--> (B, F, 468 x 3)

There is no non-linearity between ``in_fn`` and ``out_fn``: the head is one linear map per frame, factored
through 512 channels. All the temporal context comes from wav2vec2's transformer, which runs at the frame
rate (``anim_lab.audio.wav2vec2_features``). ``out_fn`` starts at zero, so an untrained model predicts the
reference face itself. AniPortrait freezes the CNN (``feature_extractor._freeze_parameters()``) and trains
the rest. With ``only_last_features=False`` the mean of the 13 hidden states replaces the last one
(AniPortrait's released config uses the last).

Sizes are configurable for the toy world: ``num_vertices=478`` (its mesh has the 10 iris points), a toy-size
wav2vec2 (``encoder_config=`` a ``Wav2Vec2Config`` dict), or no encoder at all (``feature_dim=80``: the model
takes per-frame features such as :func:`anim_lab.audio.log_mel`, the baseline).

Keys are the reference's (``audio_encoder.*``, ``in_fn.*``, ``out_fn.*``), so AniPortrait's ``audio2mesh.pt``
loads by name: :func:`anim_lab.weights.load_official_audio2mesh`.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from einops import rearrange
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from .audio import WAV2VEC2_BASE_960H_CONFIG, wav2vec2_encode, wav2vec2_extract
from .errors import InputError

__all__ = ["Audio2Mesh", "audio_input", "build_audio_encoder", "encoder_states"]


def build_audio_encoder(config: dict | None) -> Wav2Vec2Model:
    """A ``Wav2Vec2Model`` from a config dict (None: wav2vec2-base-960h's), its CNN frozen as AniPortrait
    freezes it."""
    encoder = Wav2Vec2Model(Wav2Vec2Config(**(WAV2VEC2_BASE_960H_CONFIG if config is None else config)))
    encoder.feature_extractor._freeze_parameters()
    return encoder


def audio_input(encoder_config: dict | None, feature_dim: int | None) -> tuple[Wav2Vec2Model | None, int]:
    """What an audio model reads: its own wav2vec2 (``encoder_config``; None: base-960h's) and its hidden
    size, or no encoder and ``feature_dim`` per-frame features given from outside (log-mel)."""
    if feature_dim is not None and encoder_config is not None:
        raise InputError("give encoder_config (a wav2vec2 config) or feature_dim (no encoder), not both")
    if feature_dim is not None:
        return None, int(feature_dim)
    encoder = build_audio_encoder(encoder_config)
    return encoder, encoder.config.hidden_size


def encoder_states(
    encoder: Wav2Vec2Model,
    only_last_features: bool,
    input_values: torch.Tensor | None = None,
    num_frames: int | None = None,
    extract: torch.Tensor | None = None,
) -> torch.Tensor:
    """wav2vec2 at the frame rate -> ``(B, F, hidden)``: the last hidden state, or the mean of all 13.

    Give ``input_values`` ``(B, N)`` and ``num_frames``, or ``extract`` ``(B, F, C)``: the CNN features
    already interpolated to the frames (:func:`anim_lab.audio.wav2vec2_extract`), to skip the frozen CNN."""
    if extract is None:
        if input_values is None or num_frames is None:
            raise InputError("give input_values and num_frames, or extract (the CNN features at the frames)")
        extract = wav2vec2_extract(encoder, input_values, num_frames)  # (B, N) -> (B, F, C)
    out = wav2vec2_encode(encoder, extract)
    if only_last_features:
        return out.last_hidden_state  # (B, F, hidden)
    return torch.stack(out.hidden_states).mean(0)  # 13 x (B, F, hidden) -> (B, F, hidden)


class Audio2Mesh(ModelMixin, ConfigMixin):
    """AniPortrait's Audio2Mesh (see the module docstring). Returns ``(B, F, num_vertices, 3)`` offsets.

    Args:
        num_vertices: mesh points predicted (468 in AniPortrait; 478 in the toy world).
        latent_dim: ``in_fn``'s width (512).
        encoder_config: the wav2vec2 config dict (None: wav2vec2-base-960h's).
        feature_dim: build *without* an encoder; the model then takes ``features`` ``(B, F, feature_dim)``.
        only_last_features: the last hidden state (True, AniPortrait) or the mean of all of them.
        fps: the frame rate the model was trained at (30 in AniPortrait; kept in the config).
    """

    @register_to_config
    def __init__(
        self,
        num_vertices: int = 468,
        latent_dim: int = 512,
        encoder_config: dict | None = None,
        feature_dim: int | None = None,
        only_last_features: bool = True,
        fps: float = 30.0,
    ):
        super().__init__()
        self.audio_encoder, in_dim = audio_input(encoder_config, feature_dim)
        self.in_fn = nn.Linear(in_dim, latent_dim)  # the audio features' projection
        self.out_fn = nn.Linear(latent_dim, 3 * num_vertices)  # -> xyz offsets of every vertex
        nn.init.zeros_(self.out_fn.weight)  # an untrained model leaves the reference face as it is
        nn.init.zeros_(self.out_fn.bias)

    def audio_states(self, input_values=None, num_frames=None, extract=None, features=None) -> torch.Tensor:
        """The head's input ``(B, F, D)``: wav2vec2's states, or ``features`` for a model without encoder."""
        if self.audio_encoder is None:
            if features is None or features.ndim != 3 or features.shape[-1] != self.in_fn.in_features:
                got = None if features is None else tuple(features.shape)
                raise InputError(
                    f"this Audio2Mesh has no audio encoder: give features (B, F, {self.in_fn.in_features}), "
                    f"got {got}"
                )
            return features
        if features is not None:
            raise InputError(
                "this Audio2Mesh has a wav2vec2 encoder: give input_values or extract, not features"
            )
        return encoder_states(
            self.audio_encoder, self.config.only_last_features, input_values, num_frames, extract
        )

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        num_frames: int | None = None,
        *,
        extract: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Offsets ``(B, F, num_vertices, 3)`` from ``input_values`` ``(B, N)`` (normalised 16-kHz audio,
        :func:`anim_lab.audio.normalize`) and ``num_frames`` = ``ceil(seconds · fps)``; or from ``extract``
        (the interpolated CNN features), or ``features`` for a model without encoder."""
        hidden = self.audio_states(input_values, num_frames, extract, features)  # (B, F, D)
        out = self.out_fn(self.in_fn(hidden))  # (B, F, D) -> (B, F, 512) -> (B, F, 3V)
        return rearrange(out, "b f (v c) -> b f v c", c=3)  # vertex-major xyz, as the reference reshapes
