"""Audio for the audio-driven pipelines: files in, wav2vec2 features out, one feature vector per video frame.

    audio = load_audio("speech.wav")                           # (N,) float32, mono, 16 kHz, checked
    model, extractor = load_wav2vec2("facebook/wav2vec2-base-960h")   # or a local folder
    feats = aniportrait_audio_features(audio, model, extractor)      # (F, 768),        F = ceil(N/16000·30)
    feats, length = hallo_audio_features(audio, model, extractor)    # (F, 12, 768),    F = ceil(N/16000·25)
    window = hallo_window(feats)                                     # (F, 5, 12, 768): frames i-2..i+2
    mel = log_mel(audio, num_frames=len(feats))                      # (F, 80): the baseline

How the references align audio to video (AniPortrait's ``Wav2Vec2Model`` and Hallo's ``Wav2VecModel``, both
from FaceFormer): wav2vec2's CNN turns 16-kHz audio into 50 feature vectors a second (a 400-sample window, a
320-sample hop); those CNN features are **linearly interpolated** (``align_corners=True``) to
``ceil(seconds · fps)`` vectors, and only then go through the feature projection and the transformer, which
therefore runs at the video's frame rate. :func:`wav2vec2_features` writes that forward out.

Bad input (:func:`prepare_audio`, used by :func:`load_audio`): an empty or non-finite signal, a silent one,
and one shorter than wav2vec2's 400-sample window are refused with a message that says what to do; stereo is
mixed to mono (the mean of the channels, what ``librosa.load`` does for the references); other sample rates
(8 kHz, 44.1 kHz, eSpeak's 22,050 Hz) are resampled to 16 kHz with soxr.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model
from transformers.modeling_outputs import BaseModelOutput

from anim_lab.errors import InputError
from anim_lab.weights import TRANSFORMERS_WEIGHTS, resolve_pretrained

SAMPLE_RATE = 16000  # what wav2vec2 was trained on
MIN_SAMPLES = 400  # wav2vec2's CNN needs one 25-ms window (400 samples at 16 kHz) for its first feature
SILENCE_PEAK = 1e-4  # a signal whose peak is below this (-80 dBFS) is silent
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
ANIPORTRAIT_FPS, HALLO_FPS = 30, 25
WAV2VEC2_BASE_960H = "facebook/wav2vec2-base-960h"
# the tiny wav2vec2 trained here on the toy world's speech (scripts/train_tiny_wav2vec2.py; its COMMANDS.md)
TOY_WAV2VEC2_DIR = Path(__file__).resolve().parent / "assets" / "toy_wav2vec2"
# facebook/wav2vec2-base-960h's config.json (what differs from Wav2Vec2Config's defaults) and its
# preprocessor_config.json: enough to build it at full size on the meta device
WAV2VEC2_BASE_960H_CONFIG = {
    "vocab_size": 32,
    "architectures": ["Wav2Vec2ForCTC"],
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
    "conv_bias": False,
    "mask_time_prob": 0.05,
}
WAV2VEC2_BASE_960H_PREPROCESSOR = {
    "do_normalize": True,
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": SAMPLE_RATE,
}


# ------------------------------------------------------------------------------------------------------------
# Audio in and out
# ------------------------------------------------------------------------------------------------------------


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``(N,)`` -> ``(round(N · target / orig),)`` float32, with soxr's high-quality resampler."""
    import soxr

    audio = np.asarray(audio, np.float32)
    if int(orig_rate) == int(target_rate):
        return audio.copy()
    return soxr.resample(audio, int(orig_rate), int(target_rate), quality="HQ").astype(np.float32)


def prepare_audio(
    audio,
    sample_rate: int,
    *,
    name: str = "audio",
    allow_silent: bool = False,
) -> np.ndarray:
    """Any audio signal -> ``(N,)`` float32 mono at 16 kHz, checked.

    ``audio``: ``(N,)``, ``(N, C)`` (soundfile's layout) or ``(C, N)`` with C ≤ 8 channels; float in [-1, 1]
    or int16/int32 PCM. Several channels are mixed to mono (their mean); another sample rate is resampled.

    Raises InputError (naming ``name``) for: an empty signal; NaN or inf; a signal shorter than 400 samples
    at 16 kHz (wav2vec2's first window: 25 ms); a silent one (peak below 1e-4), unless ``allow_silent``.
    """
    arr = np.asarray(audio)
    if arr.size == 0:
        raise InputError(f"{name} is empty (no samples); give a recording of speech")
    if arr.dtype.kind == "i":
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max + 1)  # PCM -> [-1, 1)
    elif arr.dtype.kind != "f":
        raise InputError(f"{name} must be float or integer PCM samples, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        channels_last = arr.shape[1] <= 8 and (arr.shape[0] > 8 or arr.shape[1] <= arr.shape[0])
        if not channels_last and arr.shape[0] > 8:
            raise InputError(f"{name} has shape {arr.shape}; expected (N,), (N, C) or (C, N) with C ≤ 8")
        arr = arr.mean(axis=1 if channels_last else 0)  # (N, C) or (C, N) -> (N,): mixed to mono
    elif arr.ndim != 1:
        raise InputError(f"{name} has shape {arr.shape}; expected (N,), (N, C) or (C, N) with C ≤ 8")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf samples")
    if not sample_rate or int(sample_rate) != sample_rate or sample_rate < 1000:
        raise InputError(f"the sample rate of {name} must be an integer ≥ 1000 Hz, got {sample_rate}")
    if int(sample_rate) != SAMPLE_RATE:
        arr = resample(arr, int(sample_rate), SAMPLE_RATE)
    if len(arr) < MIN_SAMPLES:
        raise InputError(
            f"{name} is {1000 * len(arr) / SAMPLE_RATE:.1f} ms long; wav2vec2 needs at least "
            f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms ({MIN_SAMPLES} samples at 16 kHz) for one feature: "
            "give a longer recording"
        )
    peak = float(np.abs(arr).max())
    if peak < SILENCE_PEAK and not allow_silent:
        raise InputError(
            f"{name} is silent (peak amplitude {peak:.1e}, below {SILENCE_PEAK:.0e}); its features would "
            "carry no speech: check the file (a muted recording?), or pass allow_silent=True if silence is "
            "meant"
        )
    return arr


def load_audio(path, *, allow_silent: bool = False) -> np.ndarray:
    """Read an audio file (wav, flac, ogg, mp3 through soundfile) as ``(N,)`` float32 mono at 16 kHz,
    checked and converted by :func:`prepare_audio`."""
    import soundfile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such audio file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an audio file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise InputError(f"{path} is not a readable audio file ({str(err)[:200]})") from err
    return prepare_audio(data, rate, name=str(path), allow_silent=allow_silent)


def write_audio(path, audio, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write ``(N,)`` float audio in [-1, 1] as a 16-bit PCM wav, atomically (a temporary sibling renamed at
    the end), with the permissions a new file gets under the umask."""
    import soundfile

    from anim_lab.files import _write_atomic, check_output_file

    path = check_output_file(path, (".wav",), what="audio path")
    arr = np.asarray(audio, np.float32)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"audio to write must be (N,) with N ≥ 1, got shape {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        path, lambda tmp: soundfile.write(tmp, np.clip(arr, -1, 1), int(sample_rate), "PCM_16", format="WAV")
    )
    return path


def frame_count(num_samples: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """``ceil(seconds · fps)``: how many video frames the references give audio of this length."""
    return math.ceil(num_samples / sample_rate * fps)


# ------------------------------------------------------------------------------------------------------------
# wav2vec2
# ------------------------------------------------------------------------------------------------------------


def feature_extractor(config: dict | None = None) -> Wav2Vec2FeatureExtractor:
    """``Wav2Vec2FeatureExtractor`` as facebook/wav2vec2-base-960h configures it (zero mean, unit variance per
    utterance, 16 kHz)."""
    return Wav2Vec2FeatureExtractor(**(config or WAV2VEC2_BASE_960H_PREPROCESSOR))


def normalize(audio: np.ndarray, extractor: Wav2Vec2FeatureExtractor | None = None) -> np.ndarray:
    """``(N,)`` 16-kHz audio -> ``(N,)`` float32 ``input_values``: ``(x - mean) / sqrt(var + 1e-7)``, what
    ``Wav2Vec2FeatureExtractor`` does with ``do_normalize``."""
    extractor = extractor or feature_extractor()
    values = extractor(np.asarray(audio, np.float32), sampling_rate=SAMPLE_RATE).input_values[0]
    return np.asarray(values, np.float32)


def build_wav2vec2(config: dict | None = None, device: str | torch.device = "meta") -> Wav2Vec2Model:
    """``Wav2Vec2Model`` at full size (facebook/wav2vec2-base-960h's config, or ``config``) without weights:
    ``device="meta"`` builds the shapes only (12 layers, width 768, a 7-layer CNN of 512 channels)."""
    with torch.device(device):
        return Wav2Vec2Model(Wav2Vec2Config(**(config or WAV2VEC2_BASE_960H_CONFIG)))


def load_wav2vec2(
    path_or_id: str | Path = WAV2VEC2_BASE_960H, torch_dtype: torch.dtype = torch.float32
) -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    """wav2vec2 (the encoder, without the CTC head) and its feature extractor from a local folder or a hub id
    (``facebook/wav2vec2-base-960h``; the hub is reached only where the machine allows it). A local folder
    must hold ``config.json`` and the weights; without ``preprocessor_config.json`` the base-960h settings are
    used. A ``Wav2Vec2ForCTC`` checkpoint (as base-960h is) loads its ``wav2vec2.*`` weights."""
    from anim_lab.clip import quiet_transformers

    where, kw = resolve_pretrained(path_or_id, None, "wav2vec2", TRANSFORMERS_WEIGHTS, WAV2VEC2_BASE_960H)
    with quiet_transformers():
        model = Wav2Vec2Model.from_pretrained(where, dtype=torch_dtype, **kw)
        local = isinstance(where, Path)
        if not local or (where / "preprocessor_config.json").is_file():
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(where, **kw)
        else:
            extractor = feature_extractor()
    return model.eval().requires_grad_(False), extractor


def interpolate_frames(features: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(B, T, C)`` -> ``(B, num_frames, C)``: linear interpolation along time with ``align_corners=True``
    (the first and last vectors are kept), the references' ``linear_interpolation``."""
    if num_frames < 1:
        raise InputError(f"num_frames must be ≥ 1, got {num_frames}")
    x = rearrange(features, "b t c -> b c t")
    x = F.interpolate(x, size=int(num_frames), mode="linear", align_corners=True)
    return rearrange(x, "b c f -> b f c")


def wav2vec2_features(model: Wav2Vec2Model, input_values: torch.Tensor, num_frames: int) -> BaseModelOutput:
    """wav2vec2 at the video's frame rate, as AniPortrait and Hallo run it.

    ``input_values``: ``(B, N)`` normalised 16-kHz audio (:func:`normalize`). Returns ``last_hidden_state``
    ``(B, F, 768)`` and ``hidden_states``, a tuple of 13 ``(B, F, 768)``: the transformer's input (after the
    positional convolution and layer norm) and each of the 12 layers' outputs, F = ``num_frames``.
    """
    return wav2vec2_encode(model, wav2vec2_extract(model, input_values, num_frames))


def wav2vec2_extract(model: Wav2Vec2Model, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The first half of :func:`wav2vec2_features`: the CNN's features, interpolated to the frame rate.
    ``(B, N)`` normalised 16-kHz audio -> ``(B, F, 512)``. (AniPortrait freezes this CNN; a training script
    can compute it once per utterance and train what :func:`wav2vec2_encode` runs.)"""
    if model.config.do_stable_layer_norm:
        raise InputError("only wav2vec2 models with do_stable_layer_norm=False (the base ones) are supported")
    if input_values.ndim != 2:
        raise InputError(f"input_values must be (B, N), got shape {tuple(input_values.shape)}")
    if input_values.shape[1] < MIN_SAMPLES:
        raise InputError(f"input_values has {input_values.shape[1]} samples; wav2vec2 needs ≥ {MIN_SAMPLES}")
    extract = model.feature_extractor(input_values)  # (B, N) -> (B, 512, T), T ≈ N / 320 (50 per second)
    extract = rearrange(extract, "b c t -> b t c")
    return interpolate_frames(extract, num_frames)  # (B, T, 512) -> (B, F, 512): now at the frame rate


def wav2vec2_encode(model: Wav2Vec2Model, extract: torch.Tensor) -> BaseModelOutput:
    """The second half of :func:`wav2vec2_features`: ``(B, F, 512)`` CNN features at the frame rate -> the
    feature projection and the transformer (``last_hidden_state`` and the 13 ``hidden_states``)."""
    hidden, _ = model.feature_projection(extract)  # (B, F, 512) -> (B, F, 768)
    encoder = model.encoder
    hidden = hidden + encoder.pos_conv_embed(hidden)
    hidden = encoder.dropout(encoder.layer_norm(hidden))
    states = [hidden]
    for layer in encoder.layers:  # (B, F, 768) -> (B, F, 768), 12 times
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states))


def _input_values(audio, extractor, device, dtype) -> torch.Tensor:
    values = normalize(audio, extractor)  # (N,)
    return torch.from_numpy(values)[None].to(device=device, dtype=dtype)  # (1, N)


@torch.no_grad()
def aniportrait_audio_features(
    audio: np.ndarray, model: Wav2Vec2Model, extractor=None, fps: float = ANIPORTRAIT_FPS
) -> torch.Tensor:
    """AniPortrait's Audio2Mesh input: ``(F, 768)`` the last hidden state at ``F = ceil(seconds · fps)``
    frames (30 fps in AniPortrait). ``audio``: ``(N,)`` 16-kHz mono (:func:`load_audio`)."""
    num_frames = frame_count(len(audio), fps)
    p = next(model.parameters())
    out = wav2vec2_features(model, _input_values(audio, extractor, p.device, p.dtype), num_frames)
    return out.last_hidden_state[0]  # (F, 768)


@torch.no_grad()
def hallo_audio_features(
    audio: np.ndarray,
    model: Wav2Vec2Model,
    extractor=None,
    fps: float = HALLO_FPS,
    clip_length: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Hallo's audio embedding: every transformer layer's output stacked, ``(F, 12, 768)``, and the number of
    frames the audio really covers, ``ceil(seconds · fps)`` (25 fps in Hallo).

    With ``clip_length`` (Hallo: 16) the normalised audio is zero-padded at the end by whole frames
    (``16000 // fps`` samples each) until F is a multiple of it, as Hallo's ``AudioProcessor.preprocess``
    does; the second value is then smaller than F.
    """
    p = next(model.parameters())
    values = _input_values(audio, extractor, p.device, p.dtype)  # (1, N)
    num_frames = audio_length = frame_count(values.shape[1], fps)
    if clip_length and num_frames % clip_length:
        extra = clip_length - num_frames % clip_length
        values = F.pad(values, (0, extra * (SAMPLE_RATE // int(fps))))  # zeros after the normalisation
        num_frames += extra
    out = wav2vec2_features(model, values, num_frames)
    stack = torch.stack(out.hidden_states[1:], dim=1)  # 12 x (1, F, 768) -> (1, 12, F, 768)
    return rearrange(stack, "1 l f c -> f l c"), audio_length  # (F, 12, 768)


def hallo_window(embeddings: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """``(F, ...)`` -> ``(F, 2·radius + 1, ...)``: for frame i, frames i-radius..i+radius, indices clamped to
    [0, F-1] at the edges (the first and last frames repeat), Hallo's ``process_audio_emb``."""
    num = embeddings.shape[0]
    if num < 1:
        raise InputError("embeddings must have at least one frame")
    offsets = torch.arange(-radius, radius + 1, device=embeddings.device)  # (W,)
    index = (torch.arange(num, device=embeddings.device)[:, None] + offsets[None]).clamp(0, num - 1)  # (F, W)
    return embeddings[index]  # (F, W, ...)


# ------------------------------------------------------------------------------------------------------------
# The log-mel baseline
# ------------------------------------------------------------------------------------------------------------

MEL_BINS, MEL_WINDOW, MEL_HOP = 80, 400, 320  # 25-ms windows every 20 ms: wav2vec2's CNN frame grid


def log_mel(audio: np.ndarray, num_frames: int | None = None, fps: float = HALLO_FPS, n_mels: int = MEL_BINS):
    """The baseline features: ``(F, n_mels)`` float32 log-mel spectrogram frames at the video's frame rate.

    librosa's mel spectrogram (power, Slaney mel filters) over 400-sample windows every 320 samples, without
    centring, so its frames fall exactly where wav2vec2's CNN features do (50 a second); then ``log(mel +
    1e-6)`` and the same linear interpolation to ``num_frames`` (default ``ceil(seconds · fps)``) as the
    wav2vec2 features.
    """
    import librosa

    audio = np.asarray(audio, np.float32)
    if len(audio) < MEL_WINDOW:
        raise InputError(f"audio has {len(audio)} samples; the log-mel needs ≥ {MEL_WINDOW}")
    num_frames = frame_count(len(audio), fps) if num_frames is None else int(num_frames)
    mel = librosa.feature.melspectrogram(
        y=audio, sr=SAMPLE_RATE, n_fft=MEL_WINDOW, hop_length=MEL_HOP, n_mels=n_mels, center=False, power=2.0
    )  # (n_mels, T)
    logmel = torch.from_numpy(np.log(mel + 1e-6).T.astype(np.float32))[None]  # (1, T, n_mels)
    return interpolate_frames(logmel, num_frames)[0].numpy()  # (F, n_mels)
