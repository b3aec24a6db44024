"""anim_lab.audio: checked audio loading, wav2vec2 at the video's frame rate (AniPortrait, Hallo), the log-mel
baseline. Each computation is checked against an independent one written here (numpy interpolation, slow
loops, transformers' own forward)."""

import math

import numpy as np
import pytest
import soundfile
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

from anim_lab import audio as A
from anim_lab.errors import InputError

# a wav2vec2 with the base model's CNN (7 layers, kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: 50 frames a
# second) and a tiny transformer
TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=37,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    vocab_size=12,
)


def tone(seconds=1.0, rate=16000, frequency=440.0, amplitude=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Wav2Vec2Model(Wav2Vec2Config(**TINY)).eval()


# --- loading and bad input ----------------------------------------------------------------------------------


def test_a_16k_mono_file_loads_as_written(tmp_path):
    x = tone(1.0)
    soundfile.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = A.load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (16000,)
    np.testing.assert_array_equal(y, x)


def test_8khz_is_resampled_to_16khz(tmp_path):
    soundfile.write(tmp_path / "low.wav", tone(1.0, rate=8000), 8000, subtype="FLOAT")
    y = A.load_audio(tmp_path / "low.wav")
    assert y.shape == (16000,)
    # the same 440-Hz tone sampled at 16 kHz directly (edges left out: the resampler's filter rings there)
    np.testing.assert_allclose(y[400:-400], tone(1.0)[400:-400], atol=2e-3)


def test_stereo_is_mixed_to_mono_by_the_mean_of_its_channels(tmp_path):
    left, right = tone(1.0, frequency=440), tone(1.0, frequency=660, amplitude=0.3)
    soundfile.write(tmp_path / "st.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")  # (N, 2)
    np.testing.assert_allclose(A.load_audio(tmp_path / "st.wav"), (left + right) / 2, atol=1e-7)
    # arrays: (N, C) as soundfile gives, or (C, N) as torchaudio gives
    np.testing.assert_allclose(A.prepare_audio(np.stack([left, right]), 16000), (left + right) / 2, atol=1e-7)


def test_int16_pcm_is_scaled_to_unit_range():
    x = (tone(0.5) * 32767).astype(np.int16)
    np.testing.assert_allclose(A.prepare_audio(x, 16000), x / 32768.0, atol=1e-7)


def test_empty_audio_is_refused(tmp_path):
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="empty"):
        A.load_audio(tmp_path / "empty.wav")


def test_too_short_audio_is_refused_naming_the_minimum(tmp_path):
    soundfile.write(tmp_path / "short.wav", tone(0.01), 16000)  # 10 ms
    with pytest.raises(InputError, match=r"10\.0 ms long; wav2vec2 needs at least 25 ms"):
        A.load_audio(tmp_path / "short.wav")


def test_silent_audio_is_refused_unless_allowed(tmp_path):
    soundfile.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="is silent.*allow_silent=True"):
        A.load_audio(tmp_path / "silent.wav")
    assert A.load_audio(tmp_path / "silent.wav", allow_silent=True).shape == (16000,)


def test_non_finite_and_badly_shaped_audio_are_refused():
    x = tone(0.5)
    x[10] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        A.prepare_audio(x, 16000)
    with pytest.raises(InputError, match="shape"):
        A.prepare_audio(np.zeros((2, 3, 100), np.float32), 16000)
    with pytest.raises(InputError, match="sample rate"):
        A.prepare_audio(tone(0.5), 0)


def test_a_file_that_is_not_audio_is_named(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(InputError, match="notes.wav is not a readable audio file"):
        A.load_audio(tmp_path / "notes.wav")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        A.load_audio(tmp_path / "missing.wav")


def test_write_audio_round_trips_as_16_bit_pcm(tmp_path):
    x = tone(0.5)
    path = A.write_audio(tmp_path / "out" / "x.wav", x)
    y, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and soundfile.info(path).subtype == "PCM_16"
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-7)
    assert [p.name for p in path.parent.iterdir()] == ["x.wav"]  # no temporary file left


# --- normalisation and frame alignment ----------------------------------------------------------------------


def test_normalize_is_zero_mean_unit_variance_per_utterance():
    x = tone(0.5) + 0.1
    expected = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    np.testing.assert_allclose(A.normalize(x), expected, atol=1e-5)


def test_frame_count_is_the_ceiling_of_seconds_times_fps():
    assert A.frame_count(16000, 25) == 25 and A.frame_count(16001, 25) == 26
    assert A.frame_count(16000, 30) == 30 and A.frame_count(8000 + 1, 30) == 16
    assert A.frame_count(400, 25) == 1


def test_interpolation_matches_numpy_with_the_end_points_kept():
    feats = torch.randn(2, 49, 5)  # (B, T, C)
    out = A.interpolate_frames(feats, 25)
    positions = np.linspace(0, 48, 25)  # align_corners=True: frame 0 -> feature 0, the last -> the last
    for b in range(2):
        for c in range(5):
            expected = np.interp(positions, np.arange(49), feats[b, :, c].numpy())
            np.testing.assert_allclose(out[b, :, c].numpy(), expected, atol=1e-5)


def test_wav2vec2_features_equal_transformers_forward_at_the_cnn_rate(tiny):
    x = torch.randn(1, 16000)
    with torch.no_grad():
        ref = tiny(x, output_hidden_states=True)
        num = tiny.feature_extractor(x).shape[-1]  # 49 CNN frames for one second
        ours = A.wav2vec2_features(tiny, x, num)  # interpolation to the same length is the identity
    assert num == 49 and len(ours.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state)


def test_wav2vec2_interpolates_the_cnn_features_before_the_transformer(tiny):
    x = torch.randn(1, 16000)
    with torch.no_grad():
        ours = A.wav2vec2_features(tiny, x, 25).last_hidden_state  # (1, 25, 32)
        cnn = tiny.feature_extractor(x)[0].numpy()  # (16, 49)
        grid = np.linspace(0, 48, 25)
        moved = np.stack([np.interp(grid, np.arange(49), row) for row in cnn], 1)  # (25, 16)
        hidden, _ = tiny.feature_projection(torch.from_numpy(moved)[None].float())
        expected = tiny.encoder(hidden).last_hidden_state  # transformers' own encoder
    assert ours.shape == (1, 25, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_too_short_input_values_are_refused(tiny):
    with pytest.raises(InputError, match="needs ≥ 400"):
        A.wav2vec2_features(tiny, torch.randn(1, 300), 1)
    with pytest.raises(InputError, match="the log-mel needs ≥ 400"):
        A.log_mel(np.ones(300, np.float32))


def test_aniportrait_features_are_the_last_layer_at_30_fps(tiny):
    x = tone(1.3) + 0.01 * np.random.default_rng(0).standard_normal(20800).astype(np.float32)
    feats = A.aniportrait_audio_features(x, tiny)
    assert feats.shape == (math.ceil(1.3 * 30), 32)
    with torch.no_grad():
        expected = A.wav2vec2_features(tiny, torch.from_numpy(A.normalize(x))[None], 39).last_hidden_state[0]
    torch.testing.assert_close(feats, expected)


def test_hallo_features_stack_every_layer_at_25_fps(tiny):
    x = tone(1.3, frequency=300)
    feats, length = A.hallo_audio_features(x, tiny)
    assert length == math.ceil(1.3 * 25) == 33 and feats.shape == (33, TINY["num_hidden_layers"], 32)
    with torch.no_grad():
        out = A.wav2vec2_features(tiny, torch.from_numpy(A.normalize(x))[None], 33)
    for layer in range(TINY["num_hidden_layers"]):  # hidden_states[1:]: each layer's output, not its input
        torch.testing.assert_close(feats[:, layer], out.hidden_states[layer + 1][0])


def test_hallo_pads_to_whole_clips_with_zeros_after_normalising(tiny):
    x = tone(1.3, frequency=300)
    feats, length = A.hallo_audio_features(x, tiny, clip_length=16)
    assert length == 33 and feats.shape[0] == 48  # 33 frames -> 3 clips of 16
    values = np.concatenate([A.normalize(x), np.zeros(15 * 640, np.float32)])  # 15 frames of 640 samples
    with torch.no_grad():
        out = A.wav2vec2_features(tiny, torch.from_numpy(values)[None], 48)
    torch.testing.assert_close(feats[:, -1], out.last_hidden_state[0])


def test_hallo_window_matches_the_reference_loop():
    emb = torch.randn(7, 3, 4)  # (F, layers, C)
    out = A.hallo_window(emb)
    # Hallo's process_audio_emb: for each frame, frames i-2..i+2 with the index clamped to [0, F-1]
    expected = torch.stack(
        [torch.stack([emb[max(min(i + j, emb.shape[0] - 1), 0)] for j in range(-2, 3)]) for i in range(7)]
    )
    assert out.shape == (7, 5, 3, 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(A.hallo_window(emb[:1]), emb[:1][:, None].expand(1, 5, 3, 4))  # one frame


# --- the log-mel baseline -----------------------------------------------------------------------------------


def test_log_mel_frames_fall_on_the_wav2vec2_grid_and_align_the_same_way(tiny):
    import librosa

    x = tone(1.0, frequency=1000) + 0.01 * np.random.default_rng(1).standard_normal(16000).astype(np.float32)
    mel = A.log_mel(x)  # (25, 80)
    assert mel.shape == (25, 80) and mel.dtype == np.float32
    # 400-sample windows every 320 samples without centring: exactly as many frames as wav2vec2's CNN gives
    n_windows = 1 + (16000 - 400) // 320
    assert n_windows == tiny.feature_extractor(torch.from_numpy(x)[None]).shape[-1] == 49
    # independent: numpy's FFT of periodic-Hann windows, librosa's mel filters, log, numpy interpolation
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([x[k * 320 : k * 320 + 400] * window for k in range(n_windows)])  # (49, 400)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (49, 201)
    logmel = np.log(power @ librosa.filters.mel(sr=16000, n_fft=400, n_mels=80).T + 1e-6)  # (49, 80)
    expected = np.stack([np.interp(np.linspace(0, 48, 25), np.arange(49), col) for col in logmel.T], 1)
    np.testing.assert_allclose(mel, expected, atol=2e-3)
    # a 1-kHz tone: the loudest band is the one whose centre is nearest 1 kHz
    centres = librosa.mel_frequencies(n_mels=82, fmax=8000)[1:-1]
    assert abs(int(mel.mean(0).argmax()) - int(np.abs(centres - 1000).argmin())) <= 1


# --- the real model: built on meta, loaded from its layout --------------------------------------------------


def test_wav2vec2_base_960h_at_full_size_on_meta():
    model = A.build_wav2vec2()
    assert sum(p.numel() for p in model.parameters()) == 94_371_712  # the encoder Audio2Mesh and Hallo load
    with torch.device("meta"):  # + the CTC head (768 -> 32 characters): the published checkpoint's 94.4M
        ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**A.WAV2VEC2_BASE_960H_CONFIG))
    assert sum(p.numel() for p in ctc.parameters()) == 94_371_712 + 768 * 32 + 32 == 94_396_320
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.conv_dim[-1]) == (12, 768, 512)
    x = torch.empty(1, 16000, device="meta")  # one second
    assert model.feature_extractor(x).shape == (1, 512, 49)  # 50 CNN frames a second
    out = A.wav2vec2_features(model, x, A.frame_count(16000, A.HALLO_FPS))
    assert out.last_hidden_state.shape == (1, 25, 768) and len(out.hidden_states) == 13  # Hallo: 12 + input
    # Hallo's window of 5 frames over the stacked 12 layers: (F, 5, 12, 768), 46,080 numbers a frame
    stack = torch.stack(out.hidden_states[1:], dim=1)[0].transpose(0, 1)  # (25, 12, 768)
    assert A.hallo_window(stack).shape == (25, 5, 12, 768)


def _write_base960h_layout(folder, config):
    """What facebook/wav2vec2-base-960h holds: a Wav2Vec2ForCTC (config.json + weights) and its
    preprocessor_config.json; tiny and random here."""
    torch.manual_seed(3)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**config)).eval()
    ctc.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(**A.WAV2VEC2_BASE_960H_PREPROCESSOR).save_pretrained(folder)
    return ctc


def test_load_wav2vec2_from_a_local_folder_in_the_base_960h_layout(tmp_path):
    ctc = _write_base960h_layout(tmp_path / "w2v", TINY)
    model, extractor = A.load_wav2vec2(tmp_path / "w2v")
    assert isinstance(model, Wav2Vec2Model) and not model.training
    assert extractor.do_normalize and extractor.sampling_rate == 16000
    expected = ctc.wav2vec2.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    x = tone(0.8)
    feats, _ = A.hallo_audio_features(x, model, extractor)
    assert feats.shape == (20, TINY["num_hidden_layers"], 32)


def test_load_wav2vec2_without_a_preprocessor_config_uses_base_960h_settings(tmp_path):
    _write_base960h_layout(tmp_path / "w2v", TINY)
    (tmp_path / "w2v" / "preprocessor_config.json").unlink()
    _, extractor = A.load_wav2vec2(tmp_path / "w2v")
    assert extractor.to_dict()["do_normalize"] and extractor.sampling_rate == 16000


def test_load_wav2vec2_names_a_missing_or_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        A.load_wav2vec2(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        A.load_wav2vec2(tmp_path / "half")


def test_load_wav2vec2_from_the_original_pytorch_model_bin_layout(tmp_path):
    """base-960h as first published: pytorch_model.bin (a torch pickle, written here by the test), no
    safetensors; read by transformers with weights_only loading."""
    ctc = _write_base960h_layout(tmp_path / "w2v", TINY)
    (tmp_path / "w2v" / "model.safetensors").unlink()
    torch.save(ctc.state_dict(), tmp_path / "w2v" / "pytorch_model.bin")
    model, _ = A.load_wav2vec2(tmp_path / "w2v")
    expected = ctc.wav2vec2.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_a_hub_id_goes_to_from_pretrained_as_it_is(monkeypatch):
    seen = []

    def fake(cls, where, **kwargs):
        seen.append(where)
        raise OSError("offline")

    monkeypatch.setattr(Wav2Vec2Model, "from_pretrained", classmethod(fake))
    with pytest.raises(OSError, match="offline"):
        A.load_wav2vec2("facebook/wav2vec2-base-960h")
    assert seen == ["facebook/wav2vec2-base-960h"]


def test_load_wav2vec2_refuses_a_planted_pickle_without_running_it(tmp_path):
    """A pytorch_model.bin whose pickle would run code is refused (named) before transformers opens it."""
    from anim_lab.weights import UnsafeWeightsError

    class Payload:  # unpickling it would create the marker file (it stands for an attacker's code)
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _write_base960h_layout(tmp_path / "w2v", TINY)
    (tmp_path / "w2v" / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"lm_head.bias": torch.ones(1), "payload": Payload()}, tmp_path / "w2v" / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pytorch_model.bin"):
        A.load_wav2vec2(tmp_path / "w2v")
    assert not marker.exists()
