"""The toy world that speaks: eSpeak NG speech with its phoneme timeline, visemes with coarticulation, the lip
shapes on the toy face, and talking clips with their audio."""

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile

from anim_lab import toy
from anim_lab.errors import InputError
from anim_lab.toy import speech as S
from anim_lab.toy import visemes as V

SENTENCE = "Bob, please move the map."


@pytest.fixture(scope="module")
def spoken():
    return toy.synthesize(SENTENCE, toy.Voice("en-us+m3", rate=160, pitch=50))


@pytest.fixture(scope="module")
def clip():
    return toy.make_talking_clip(toy.identity_from_seed(4), SENTENCE, fps=25, size=64, seed=2, supersample=1)


# --- speech -------------------------------------------------------------------------------------------------


def test_speech_is_22050_hz_int16_with_a_timeline_that_covers_it(spoken):
    assert spoken.sample_rate == 22050 and spoken.audio.dtype == np.int16 and spoken.duration > 1.0
    ph = spoken.phonemes
    assert ph[0].start_ms == 0.0 and ph[-1].end_ms == pytest.approx(1000 * spoken.duration)
    for a, b in zip(ph[:-1], ph[1:], strict=True):
        assert a.end_ms == b.start_ms and a.end_ms > a.start_ms  # contiguous, no empty segment
    assert [p.base for p in ph if p.base in ("b", "p", "m")] == ["b", "b", "p", "m", "m", "p"]


def test_phoneme_times_fall_where_the_sound_is(spoken):
    """Exact timing, checked on the audio itself: the pauses eSpeak reports are silent, the vowels loud."""
    x = spoken.audio.astype(np.float64) / 32768

    def rms(p):
        a, b = int(p.start_ms * 22.05), int(p.end_ms * 22.05)
        return float(np.sqrt(np.mean(x[a:b] ** 2)))

    pauses = [rms(p) for p in spoken.phonemes if p.base.startswith("_")]
    vowels = [rms(p) for p in spoken.phonemes if V.viseme_class(p.symbol) in ("AA", "EH", "IY", "OO", "OH")]
    assert len(pauses) >= 2 and len(vowels) >= 4
    assert max(pauses) < 0.05 * min(vowels)


def test_16k_audio_is_the_same_speech_resampled(spoken):
    y = spoken.audio_16k()
    assert y.dtype == np.float32 and len(y) == round(len(spoken.audio) * 16000 / 22050)
    # the envelope (20-ms RMS) is the same at both rates
    env22 = np.sqrt(np.mean((spoken.audio[: 441 * 50].astype(np.float64) / 32768).reshape(50, 441) ** 2, 1))
    env16 = np.sqrt(np.mean(y[: 320 * 50].astype(np.float64).reshape(50, 320) ** 2, 1))
    np.testing.assert_allclose(env16, env22, atol=0.01)


def test_rate_and_pitch_change_the_speaker():
    slow = toy.synthesize(SENTENCE, toy.Voice("en-us+f2", rate=130, pitch=50))
    fast = toy.synthesize(SENTENCE, toy.Voice("en-us+f2", rate=190, pitch=50))
    high = toy.synthesize(SENTENCE, toy.Voice("en-us+f2", rate=130, pitch=80))
    assert slow.duration > 1.2 * fast.duration
    assert [p.base for p in slow.phonemes if not p.base.startswith("_")] == [
        p.base for p in fast.phonemes if not p.base.startswith("_")
    ]

    def zero_crossings(s):  # a rough pitch measure: more sign changes a second at a higher pitch
        x = s.audio.astype(np.float64)
        return np.mean(np.abs(np.diff(np.sign(x[np.abs(x) > 300])))) / 2

    assert zero_crossings(high) > zero_crossings(slow)


def test_an_utterance_is_the_same_audio_whatever_came_before_and_in_any_process(spoken):
    """eSpeak NG keeps state between utterances and seeds its generator with the clock; the synthesiser
    reloads and reseeds it, so a (text, voice) pair is one waveform."""
    voice = toy.Voice("en-us+m3", rate=160, pitch=50)
    toy.synthesize("Something else first.", toy.Voice("en+f2", rate=130, pitch=30))
    np.testing.assert_array_equal(toy.synthesize(SENTENCE, voice).audio, spoken.audio)
    code = (
        "import hashlib; from anim_lab import toy; "
        f"print(hashlib.md5(toy.synthesize({SENTENCE!r}, toy.Voice('en-us+m3', 160, 50)).audio.tobytes())"
        ".hexdigest())"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hashlib.md5(spoken.audio.tobytes()).hexdigest()


def test_voice_and_sentence_splits_are_disjoint_and_fixed():
    assert not set(S.VOICE_SPLIT["train"]) & set(S.VOICE_SPLIT["heldout"])
    assert not set(S.SENTENCE_SPLIT["train"]) & set(S.SENTENCE_SPLIT["heldout"])
    assert sorted(S.SENTENCE_SPLIT["train"] + S.SENTENCE_SPLIT["heldout"]) == list(range(len(S.SENTENCES)))
    a, b = toy.sample_speech(5, "heldout"), toy.sample_speech(5, "heldout")
    np.testing.assert_array_equal(a.audio, b.audio)  # a seed is one utterance
    assert a.voice.name in S.VOICE_SPLIT["heldout"]
    assert S.SENTENCES.index(a.text) in S.SENTENCE_SPLIT["heldout"]
    train = {toy.sample_speech(s).voice.name for s in range(12)}
    assert train <= set(S.VOICE_SPLIT["train"]) and len(train) > 2


def test_generated_training_sentences_avoid_the_held_out_words():
    heldout_words = {
        w.lower() for i in S.SENTENCE_SPLIT["heldout"] for w in re.findall(r"[A-Za-z]+", S.SENTENCES[i])
    }
    assert len(set(S.WORDS)) == len(S.WORDS) > 400 and not set(S.WORDS) & heldout_words
    texts = [S.compose_sentence(np.random.default_rng(s)) for s in range(200)]
    for text in texts:
        words = text[:-1].lower().split()
        assert (
            text.endswith(".") and text[0].isupper() and 4 <= len(words) <= 9 and set(words) <= set(S.WORDS)
        )
    assert len(set(texts)) == 200  # no two alike
    # the training split: mostly generated sentences, the rest written ones; the held-out split never changes
    train = [S.choose_speech(s)[0] for s in range(400)]
    written = sum(t in S.SENTENCES for t in train) / len(train)
    assert abs(written - (1 - S.GENERATED_SHARE)) < 0.07
    assert {S.SENTENCES.index(t) for t in train if t in S.SENTENCES} <= set(S.SENTENCE_SPLIT["train"])


def test_bad_voices_and_texts_are_refused():
    with pytest.raises(InputError, match="unknown eSpeak NG voice 'xx'"):
        toy.Voice("xx")
    with pytest.raises(InputError, match="variant 'zz'"):
        toy.Voice("en-us+zz")
    with pytest.raises(InputError, match="rate"):
        toy.Voice(rate=20)
    with pytest.raises(InputError, match="non-empty"):
        toy.synthesize("   ")
    with pytest.raises(InputError, match="split"):
        toy.sample_speech(0, "test")


# --- visemes ------------------------------------------------------------------------------------------------


def test_every_phoneme_espeak_says_has_a_viseme():
    """Every sentence in every accent of the splits: no phoneme falls through to the default."""
    symbols = set()
    accents = {name.split("+")[0] for names in S.VOICE_SPLIT.values() for name in names}
    for accent in sorted(accents):
        for text in S.SENTENCES:
            symbols |= {p.base for p in toy.synthesize(text, toy.Voice(accent)).phonemes}
    assert symbols - set(V.PHONEME_VISEMES) == set()
    assert set(V.PHONEME_VISEMES.values()) == set(V.VISEME_TABLE)


def test_viseme_track_matches_a_slow_loop():
    ph = [
        toy.Phoneme("_", 0, 100),
        toy.Phoneme("m", 100, 180),
        toy.Phoneme("'a", 180, 400),
        toy.Phoneme("p", 400, 430),
        toy.Phoneme("u:", 430, 600),
        toy.Phoneme("_:", 600, 800),
    ]
    times = np.arange(20) / 25
    out = toy.viseme_track(ph, times)
    for i, t in enumerate(times):
        num, den = np.zeros(4), 0.0
        for p in ph:
            target, alpha, theta = V.VISEME_TABLE[V.viseme_class(p.symbol)]
            d = max(p.start_ms / 1000 - t, t - p.end_ms / 1000, 0.0)
            w = alpha * math.exp(-theta * d)
            num, den = num + w * np.array(target), den + w
        jaw, rnd, close, spread = num / den
        np.testing.assert_allclose(out[i], [jaw * (1 - close), rnd, close, spread], atol=1e-6)


def test_coarticulation_closes_the_lips_for_m_and_opens_them_for_a():
    ph = [toy.Phoneme("'a", 0, 300), toy.Phoneme("m", 300, 420), toy.Phoneme("'a", 420, 720)]
    track = toy.viseme_track(ph, np.array([0.15, 0.36, 0.57]))  # the middle of each segment
    jaw, close = track[:, 0], track[:, 2]
    assert close[1] > 0.9 and jaw[1] < 0.05  # shut inside the /m/
    assert jaw[0] > 0.6 and jaw[2] > 0.6 and close[0] < 0.1  # open in the vowels
    # coarticulation: 60 ms before the /m/ the jaw is already closing, and the lips begin to press
    before = toy.viseme_track(ph, np.array([0.24]))[0]
    assert 0.1 < before[0] < jaw[0] - 0.05 and before[2] > 0.05


# --- lip shapes on the face ---------------------------------------------------------------------------------


def _lips(expression):
    return toy.toy_landmarks_3d(toy.Identity(), toy.HeadPose(), expression, size=256)


def test_lip_shapes_move_the_lips_as_named():
    rest = _lips(toy.Expression())
    width = lambda p: np.linalg.norm(p[61, :2] - p[291, :2])  # noqa: E731  mouth corners
    upper_lip = lambda p: abs(p[0, 1] - p[13, 1])  # noqa: E731  outer to inner upper lip
    rounded, spread, pressed = (
        _lips(toy.Expression(lip_round=1)),
        _lips(toy.Expression(lip_spread=1)),
        _lips(toy.Expression(lip_press=1)),
    )
    assert width(rounded) < 0.85 * width(rest) and rounded[13, 2] < rest[13, 2] - 1  # narrower, forward
    assert width(spread) > 1.1 * width(rest)
    assert upper_lip(pressed) < 0.6 * upper_lip(rest)
    # zero leaves the face exactly as it was, and reads as it did
    assert repr(toy.Expression(mouth_open=1.0)) == "Expression(mouth_open=1.0, blink=0.0, smile=0.0)"
    assert repr(toy.Expression(lip_press=0.5)).endswith("smile=0.0, lip_press=0.5)")
    np.testing.assert_array_equal(_lips(toy.Expression(lip_round=0, lip_press=0, lip_spread=0)), rest)


# --- talking clips ------------------------------------------------------------------------------------------


def test_talking_clip_has_exact_ground_truth_for_every_frame(clip):
    n = math.ceil(len(clip.audio) / 16000 * 25)
    assert clip.num_frames == n and clip.frames.shape == (n, 64, 64, 3)
    assert clip.sample_rate == 16000 and len(clip.audio) == round(len(clip.speech.audio) * 16000 / 22050)
    assert clip.landmarks.shape == (n, 478, 2) and clip.landmarks_3d.shape == (n, 478, 3)
    np.testing.assert_allclose(clip.landmarks_3d[..., :2], clip.landmarks, atol=1e-4)
    assert clip.visemes.shape == (n, 4) and clip.pose_array.shape == (n, 6)
    # head motion and blinks from the motion model, the mouth from the speech
    poses, expressions = toy.sample_motion(n, 25, seed=2)
    np.testing.assert_allclose(clip.pose_array, np.stack([p.as_array() for p in poses]))
    assert [e.blink for e in clip.expressions] == [e.blink for e in expressions]
    np.testing.assert_allclose(clip.expression_array[:, 0], clip.visemes[:, 0], atol=1e-6)


def test_the_mouth_follows_the_visemes(clip):
    opening = clip.mouth_opening()
    assert np.corrcoef(opening, clip.visemes[:, 0])[0, 1] > 0.99
    assert opening.max() > 0.03
    for p in clip.phonemes:  # at the middle of a bilabial the lips are (nearly) shut
        if p.base in ("b", "p", "m") and p.end_ms - p.start_ms > 60:
            frame = int(round((p.start_ms + p.end_ms) / 2000 * 25))
            assert opening[frame] < 0.25 * opening.max(), p


def test_talking_clip_from_a_seed_uses_the_split():
    c = toy.make_talking_clip(toy.identity_from_seed(1), 3, split="heldout", size=32, supersample=1)
    assert c.speech.voice.name in S.VOICE_SPLIT["heldout"]
    with pytest.raises(InputError, match="a seed picks the speaker"):
        toy.make_talking_clip(toy.identity_from_seed(1), 3, voice=toy.Voice())
    with pytest.raises(TypeError, match="sentence, a seed or a toy.Speech"):
        toy.make_talking_clip(toy.identity_from_seed(1), 2.5)


def test_talking_clip_writes_an_mp4_with_its_audio(clip, tmp_path):
    from anim_lab.video import ffmpeg_exe, has_audio, read_video

    path = clip.write(tmp_path / "talk.mp4")
    frames, fps = read_video(path)
    assert has_audio(path) and fps == 25 and len(frames) == clip.num_frames
    # the audio track, decoded again, is the clip's audio, in sync (AAC's encoder delay is compensated)
    decoded = tmp_path / "decoded" / "x.wav"
    decoded.parent.mkdir()
    cmd = [ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", "16000", str(decoded)]
    subprocess.run(cmd, check=True)
    y = soundfile.read(decoded, dtype="float32")[0]
    n = min(len(y), len(clip.audio))
    assert abs(len(y) - len(clip.audio)) <= 160  # within 10 ms
    lag = int(scipy.signal.correlate(y[:n], clip.audio[:n], method="fft").argmax()) - (n - 1)
    assert lag == 0
    shutil.rmtree(decoded.parent)
    wav = clip.write_wav(tmp_path / "talk.wav")
    info = soundfile.info(wav)
    assert info.samplerate == 16000 and info.frames == len(clip.audio)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4", "talk.wav"]
    with pytest.raises(InputError, match=r"\.mp4"):
        clip.write(tmp_path / "talk.gif")
