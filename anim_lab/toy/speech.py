"""The toy world speaks: eSpeak NG speech with every phoneme's exact position in the audio.

    speech = toy.synthesize("Bob spoke softly.", toy.Voice("en-us+m3", rate=160, pitch=50))
    speech.audio          # (N,) int16 at 22,050 Hz, what eSpeak NG produced
    speech.phonemes       # [Phoneme("_", 0.0, 13.97), Phoneme("b", 13.97, 45.9), ...] times in ms
    speech.audio_16k()    # (M,) float32 in [-1, 1] at 16 kHz (soxr), what wav2vec2 hears

eSpeak NG comes from the PyPI package ``espeakng-loader`` (``libespeak-ng.so`` and its data; no system
install) and is driven through ctypes: synchronous output, a synth callback that collects the audio and the
phoneme events. Each event carries the sample where its phoneme starts, so the timeline is exact to the
sample: the ground truth a recorded talking-head dataset never has.

Speakers vary by voice (eSpeak's English accents and voice variants), rate (words per minute) and pitch
(0-100). :data:`VOICE_SPLIT` and :data:`SENTENCE_SPLIT` fix which voices and sentences are for training and
which are held out; :func:`sample_speech` draws a (sentence, speaker) pair of a split from a seed, and most of
the training split's sentences are generated from :data:`WORDS` (:func:`compose_sentence`), so that a model
trained on them cannot get by on remembering a few sentences.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from anim_lab.errors import InputError

ESPEAK_SAMPLE_RATE = 22050  # what eSpeak NG synthesises at (checked when the library starts)
PAUSE = "_"  # the phoneme symbol of silence

# eSpeak NG's C API (speak_lib.h): the values used here
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED, _EVENT_END, _EVENT_MSG_TERMINATED, _EVENT_PHONEME = 0, 5, 6, 7
_POS_CHARACTER, _CHARS_UTF8, _ENDPAUSE = 1, 1, 0x1000
_RATE, _PITCH = 1, 3
_ERRORS = {1: "internal error", 2: "buffer full", 3: "not found"}

# English voices: "<language>+<variant>" (the variant sets the speaker: m1-m7 male, f1-f5 female)
VOICE_SPLIT: dict[str, tuple[str, ...]] = {
    "train": (
        "en-us+m1",
        "en-us+m3",
        "en-us+f1",
        "en-us+f3",
        "en+m2",
        "en+f2",
        "en-gb-scotland+m4",
        "en-029+f4",
    ),
    "heldout": ("en-us+m6", "en-us+f5", "en+m7", "en-gb-x-rp+f4"),
}
RATE_RANGE = (130, 190)  # words per minute (eSpeak's default is 175)
PITCH_RANGE = (30, 70)  # eSpeak's 0-100 pitch (default 50)

# Sentences written for this project; they cover the English phonemes and every viseme class (closures
# p b m, f v, rounded w oo, spread ee, open ah, ...).
SENTENCES: tuple[str, ...] = (
    "Bob spoke with a smooth voice.",
    "Please pass me the big blue map.",
    "We will meet at the old mill by five.",
    "She sells fresh fish on the harbour wall.",
    "The cat sat quietly on the warm mat.",
    "Few people knew the way through the woods.",
    "My brother bought a bright red bicycle.",
    "Open the window and let the air in.",
    "Think of three things that make you happy.",
    "A bee buzzed above the purple flowers.",
    "Keep the green cup away from the edge.",
    "Who threw the ball over the fence?",
    "Every morning Paul walks to the market.",
    "The moon rose slowly over the calm sea.",
    "Judge the choice by what it changes.",
    "I found a small mouse under my bed.",
    "Move the boxes before the van arrives.",
    "Sheep graze on the hills above the farm.",
    "Wait for me at the bus stop at noon.",
    "The old clock stopped at half past nine.",
    "Lemons and limes make a sharp drink.",
    "You owe me an apple and a pear.",
    "Birds sing loudly when the sun comes up.",
    "A warm bath helps you sleep well.",
    "Mum made soup with peas and beans.",
    "Zoe wrote a poem about the ocean.",
    "The team played well but lost the match.",
    "Pick up the paper from the porch.",
    "Oh no, the boat is floating away!",
    "Measure twice and cut once.",
    "The baby smiled at her mother.",
    "Why do owls hoot at night?",
    "Bring your umbrella when it rains.",
    "Five wise men went to the village.",
    "A yellow leaf fell from the tree.",
    "Please whisper, the children are asleep.",
    "Where would you go if you could fly?",
    "The boy ate a plum and a peach.",
    "Sam played music on an old piano.",
    "Loose shoes make a funny sound.",
)
SENTENCE_SPLIT: dict[str, tuple[int, ...]] = {
    "train": tuple(range(0, 32)),
    "heldout": tuple(range(32, 40)),
}

# Words for generated training sentences (:func:`compose_sentence`), written for this project: nouns, verbs,
# adjectives and adverbs with every English phoneme. None of them is a word of a held-out sentence (a test
# checks), so a held-out sentence's words are new to a model trained on generated ones, apart from the short
# function words ("the", "a", ...) that the written training sentences share with it.
_WORD_LIST = """
apple arm autumn baker basket beach bell berry blanket blow board bottle bread breeze brick bridge
brush bucket butter button cabbage cake candle cap car card careful carpet castle chair chalk cheese
cherry chest chicken chin chocolate circle city cloud coat coffee coin cold comb cook copper corner
cotton cousin cow cream crowd crown cushion dance daughter desk dinner dish doctor dog dollar door
dragon dream dress drum duck dust eagle early earth egg elbow engine evening eye face feather field
finger fire flag floor flour foot forest fork fox friend frog fruit garden gate giraffe girl glass
glove goat gold grape grass guitar hammer hand happy hat heart honey horse house hungry ice island
jacket jam jelly journey joy juice jump kettle key king kitchen kite knee knife ladder lake lamp
laugh lazy lemon letter light lion lip lock lunch machine magic mango marble milk mirror monkey
month mountain mouth mud nail needle nest net nose number nut orange oven owner paint palace pan
pancake parrot party pencil pepper pillow pink pocket pond potato prince pudding pumpkin puzzle
queen quick rabbit radio rain rainbow river road robot rock roof rope rose round ruler salt sand
school scissors seed shadow shape sheet shell ship shirt shoulder silver sister sky snake snow soap
sock sofa spoon spring square star station stone storm street string sugar summer sweet table tail
teacher thick thin thumb thunder ticket tiger toast toe tomato tongue tooth towel tower town toy
train treasure truck turtle uncle valley vase violin voice wagon water wave weather wheel winter
wolf wood wool worm young zebra zero zipper zoo eat draw push pull carry catch climb cough count
cover cry dig drink drive drop enjoy explain fix fold follow gather grow hide hold hurry join keep
kick kiss knock learn lift listen look mix nod pour pray reach read remember ride roll rub run rush
search shake share shout show sing sit skip sleep slide smell sneeze speak splash squeeze stand
stare start stir swim swing talk taste teach tear thank throw touch trust turn visit walk wash watch
wish wonder write yawn big bright brave broken busy calm cheap clean clever cool curly dark deep dry
easy empty fair fast fat fresh full gentle glad good great green grey heavy hot huge large late
little long loud lovely lucky new noisy odd pale plain pretty proud purple quiet ready rich rough
sad safe sharp shiny short shy silly slow small smooth soft sour strange strong sunny tall thirsty
tidy tiny ugly warm wet white wide wild always almost because before behind below beside between
both during each every maybe never often over quite seldom since soon then there these those through
today tomorrow under until very while with without yesterday
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
GENERATED_SHARE = 0.75  # the share of training-split draws that speak a generated sentence


@dataclass(frozen=True)
class Voice:
    """A speaker: an eSpeak NG voice name (``"en-us+m3"``), a rate in words per minute and a pitch (0-100)."""

    name: str = "en-us+m3"
    rate: int = 160
    pitch: int = 50

    def __post_init__(self):
        language, _, variant = self.name.partition("+")
        if language not in _languages():
            raise InputError(
                f"unknown eSpeak NG voice {language!r} in {self.name!r}; English ones are "
                f"{sorted(x for x in _languages() if x.startswith('en'))}"
            )
        if variant and variant not in _variants():
            raise InputError(f"unknown eSpeak NG voice variant {variant!r} in {self.name!r} (m1-m7, f1-f5…)")
        if not 80 <= self.rate <= 450:
            raise InputError(f"Voice.rate must be in [80, 450] words per minute, got {self.rate}")
        if not 0 <= self.pitch <= 100:
            raise InputError(f"Voice.pitch must be in [0, 100], got {self.pitch}")


@dataclass(frozen=True)
class Phoneme:
    """One phoneme of the timeline: eSpeak's symbol (stress marks kept: ``"'oU"``), start and end in ms."""

    symbol: str
    start_ms: float
    end_ms: float

    @property
    def base(self) -> str:
        """The symbol without its stress marks (``"'oU"`` -> ``"oU"``)."""
        return self.symbol.lstrip("',=")


@dataclass
class Speech:
    """Synthesised speech: eSpeak's int16 audio at 22,050 Hz and the phoneme timeline that covers it."""

    text: str
    voice: Voice
    audio: np.ndarray  # (N,) int16
    sample_rate: int
    phonemes: list[Phoneme] = field(default_factory=list)

    @property
    def duration(self) -> float:
        """Seconds."""
        return len(self.audio) / self.sample_rate

    def audio_16k(self) -> np.ndarray:
        """``(M,)`` float32 in [-1, 1] resampled to 16 kHz (soxr, as ``anim_lab.audio.resample``, without
        importing transformers), M = round(N · 16000 / 22050)."""
        import soxr

        x = self.audio.astype(np.float32) / 32768.0
        return soxr.resample(x, self.sample_rate, 16000, quality="HQ").astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# eSpeak NG through ctypes
# ------------------------------------------------------------------------------------------------------------


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms (truncated)
        ("sample", ctypes.c_int),  # samples since the start of the synthesis: the exact position
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(  # int callback(short *wav, int num_samples, espeak_EVENT *events)
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)
_LOCK = threading.Lock()


def _data_path() -> Path:
    try:
        import espeakng_loader
    except ImportError as err:
        raise ImportError(
            "speech synthesis needs the espeakng-loader package: "
            "pip install -c constraints.txt espeakng-loader"
        ) from err
    return Path(espeakng_loader.get_data_path())


@lru_cache(maxsize=1)
def _languages() -> frozenset[str]:
    return frozenset(p.name.lower() for p in (_data_path() / "lang").rglob("*") if p.is_file())


@lru_cache(maxsize=1)
def _variants() -> frozenset[str]:
    return frozenset(p.name for p in (_data_path() / "voices" / "!v").iterdir())


class _Engine:
    """The library, loaded and initialised, with a callback that appends to the current buffers.

    One engine speaks one utterance (:func:`_speak`). eSpeak NG carries state from one utterance to the next
    (the same text twice in a row differed from the 400th sample on, by a few samples in length), and it seeds
    its random generator with the clock when it starts (two processes differed). So each utterance gets a
    freshly loaded library whose generator is seeded with 1: a (text, voice) pair is always the same audio,
    whatever was spoken before and in whichever process. Loading costs about 15 ms.
    """

    def __init__(self):
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        options = _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT  # never exit() the Python process
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(_data_path()).encode(), options)
        if rate != ESPEAK_SAMPLE_RATE:
            raise RuntimeError(f"eSpeak NG did not start (espeak_Initialize returned {rate})")
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # eSpeak NG ≥ 1.52 seeds its generator with the clock
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed(1)
        self.lib = lib
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, str]] = []  # (sample, phoneme symbol); symbol "" for the end
        self._callback = _CALLBACK(self._collect)  # kept referenced: the C side holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                self.events.append((event.sample, bytes(event.id.string).split(b"\0")[0].decode()))
            elif event.type in (_EVENT_END, _EVENT_MSG_TERMINATED):
                self.events.append((event.sample, ""))
            i += 1
        return 0  # 0 = go on

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, str]]]:
        self.chunks, self.events = [], []
        for call, args in (
            (self.lib.espeak_SetVoiceByName, (voice.name.encode(),)),
            (self.lib.espeak_SetParameter, (_RATE, int(voice.rate), 0)),
            (self.lib.espeak_SetParameter, (_PITCH, int(voice.pitch), 0)),
        ):
            if (err := call(*args)) != 0:
                raise RuntimeError(f"eSpeak NG {call.__name__}{args} failed: {_ERRORS.get(err, err)}")
        data = text.encode()
        flags = _CHARS_UTF8 | _ENDPAUSE
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, flags, None, None)
        if err != 0:
            raise RuntimeError(f"eSpeak NG could not synthesise {text!r}: {_ERRORS.get(err, err)}")
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return audio.astype(np.int16), list(self.events)

    def close(self) -> None:
        """Free eSpeak's memory and unload the library (its static state goes with it)."""
        import _ctypes

        self.lib.espeak_Terminate()
        if hasattr(_ctypes, "dlclose"):  # POSIX
            _ctypes.dlclose(self.lib._handle)


def _speak(text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, str]]]:
    with _LOCK:  # eSpeak NG keeps global state: one utterance at a time per process
        engine = _Engine()
        try:
            return engine.synth(text, voice)
        finally:
            engine.close()


def synthesize(text: str, voice: Voice | None = None) -> Speech:
    """Speak ``text`` with ``voice`` (default ``Voice()``): eSpeak NG's audio (int16, 22,050 Hz) and its
    phoneme timeline.

    The timeline covers the audio from 0 to its end without gaps: each phoneme runs from its event's sample
    to the next one's, and the silence before the first phoneme is a pause (``"_"``).
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text must be a non-empty string, got {text!r}")
    voice = Voice() if voice is None else voice
    if not isinstance(voice, Voice):
        raise TypeError(f"voice must be a toy.Voice, got {type(voice).__name__}")
    audio, events = _speak(text, voice)
    if len(audio) == 0:
        raise InputError(f"eSpeak NG produced no audio for {text!r}")
    ms = 1000.0 / ESPEAK_SAMPLE_RATE
    starts = [(s, sym) for s, sym in events if sym]
    if not starts or starts[0][0] > 0:
        starts.insert(0, (0, PAUSE))
    phonemes = []
    for k, (sample, symbol) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(audio)
        if end > sample:  # eSpeak sometimes sends two events at one sample: the later one holds it
            phonemes.append(Phoneme(symbol, sample * ms, end * ms))
    return Speech(text=text, voice=voice, audio=audio, sample_rate=ESPEAK_SAMPLE_RATE, phonemes=phonemes)


def sample_voice(rng: np.random.Generator, split: str = "train") -> Voice:
    """A random speaker of a split: one of its voices, a rate in :data:`RATE_RANGE`, a pitch in
    :data:`PITCH_RANGE`."""
    if split not in VOICE_SPLIT:
        raise InputError(f"split must be one of {tuple(VOICE_SPLIT)}, got {split!r}")
    names = VOICE_SPLIT[split]
    return Voice(
        name=names[int(rng.integers(len(names)))],
        rate=int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
        pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
    )


def compose_sentence(rng: np.random.Generator, num_words: tuple[int, int] = (4, 9)) -> str:
    """A generated training sentence: ``num_words`` (inclusive range) words drawn from :data:`WORDS`,
    capitalised, with a full stop. Nonsense as English, but spoken as words, so that a model trained on many
    of them hears phonemes rather than remembering 32 sentences."""
    n = int(rng.integers(num_words[0], num_words[1] + 1))
    text = " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=n))
    return text[0].upper() + text[1:] + "."


def choose_speech(seed: int, split: str = "train") -> tuple[str, Voice]:
    """The (sentence, speaker) pair of ``split`` that ``seed`` picks, before it is spoken. The speaker is one
    of the split's voices; the sentence is one of the split's written :data:`SENTENCES`, or, for a share
    :data:`GENERATED_SHARE` of the training split's seeds, a generated one (:func:`compose_sentence`)."""
    if split not in SENTENCE_SPLIT:
        raise InputError(f"split must be one of {tuple(SENTENCE_SPLIT)}, got {split!r}")
    rng = np.random.default_rng([int(seed), 25])
    sentences = SENTENCE_SPLIT[split]
    text = SENTENCES[sentences[int(rng.integers(len(sentences)))]]
    if split == "train" and rng.random() < GENERATED_SHARE:
        text = compose_sentence(rng)
    return text, sample_voice(rng, split)


def sample_speech(seed: int, split: str = "train") -> Speech:
    """The utterance of ``split`` that ``seed`` picks (:func:`choose_speech`), spoken."""
    return synthesize(*choose_speech(seed, split))
