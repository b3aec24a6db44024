"""Phonemes -> visemes -> the toy face's mouth, with coarticulation.

A viseme is what a phoneme looks like on the lips. Here it is four numbers in [0, 1]:

    jaw      how far the jaw drops (open vowels high, closures 0)
    round    lip rounding and protrusion ("oo", "w", "sh")
    close    lip closure, lips pressed together (p, b, m fully; f, v half: lower lip to the teeth)
    spread   lips pulled sideways ("ee", "s")

:data:`VISEME_TABLE` gives each viseme class its target and its dominance; :data:`PHONEME_VISEMES` maps
eSpeak NG's English phoneme symbols to the classes.

Coarticulation (Cohen & Massaro's dominance model): a phoneme's target does not switch on at its start and
off at its end; each segment pulls the mouth toward its target with a dominance that is ``alpha`` inside the
segment and decays as ``alpha · exp(-theta · distance)`` outside it, and the mouth at time ``t`` is the
dominance-weighted mean of all targets. Closures have a high, sharp dominance (the lips must meet for a /p/
whatever the vowels around it do); vowels a broad one. Finally the jaw is multiplied by ``1 - close``, so a
full closure shuts the mouth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anim_lab.errors import InputError

VISEME_PARAMS = ("jaw", "round", "close", "spread")

# class -> (target (jaw, round, close, spread), alpha, theta in 1/s)
VISEME_TABLE: dict[str, tuple[tuple[float, float, float, float], float, float]] = {
    "rest": ((0.0, 0.0, 0.0, 0.0), 1.0, 15.0),  # pauses
    "PBM": ((0.0, 0.0, 1.0, 0.0), 10.0, 70.0),  # bilabial closure: strong and sharp, the lips must meet
    "FV": ((0.08, 0.0, 0.55, 0.2), 4.0, 60.0),  # lower lip to the upper teeth
    "TH": ((0.2, 0.0, 0.0, 0.25), 1.0, 30.0),  # tongue between the teeth
    "TDNL": ((0.2, 0.0, 0.0, 0.3), 0.7, 30.0),  # alveolar stops, nasal, lateral
    "SZ": ((0.1, 0.0, 0.0, 0.55), 1.0, 30.0),  # sibilants: teeth together, lips spread
    "SH": ((0.18, 0.7, 0.0, 0.0), 1.5, 30.0),  # postalveolar: lips rounded and pushed out
    "KG": ((0.3, 0.0, 0.0, 0.1), 0.5, 30.0),  # velars, h: the lips follow the neighbours
    "R": ((0.2, 0.5, 0.0, 0.0), 1.0, 30.0),
    "W": ((0.1, 1.0, 0.0, 0.0), 2.0, 30.0),
    "Y": ((0.15, 0.0, 0.0, 0.6), 1.0, 30.0),
    "AA": ((0.8, 0.0, 0.0, 0.15), 1.0, 15.0),  # open vowels
    "EH": ((0.5, 0.0, 0.0, 0.35), 1.0, 15.0),  # mid front vowels
    "AH": ((0.4, 0.0, 0.0, 0.1), 0.8, 15.0),  # central vowels, schwa
    "IY": ((0.22, 0.0, 0.0, 0.9), 1.0, 15.0),  # close front vowels
    "OO": ((0.28, 0.95, 0.0, 0.0), 1.2, 15.0),  # close rounded vowels
    "OH": ((0.6, 0.7, 0.0, 0.0), 1.0, 15.0),  # mid/open rounded vowels
    "weak": ((0.3, 0.0, 0.0, 0.1), 0.05, 40.0),  # marks with no shape of their own: the neighbours decide
}

_CLASSES = {
    "rest": "_ _: _!",
    "PBM": "p b m",
    "FV": "f v",
    "TH": "T D",
    "TDNL": "t d n l t# t2 t[ n- l/ l# d#",
    "SZ": "s z",
    "SH": "S Z tS dZ",
    "KG": "k g N h x ?",
    "R": "r r- R",
    "W": "w w#",
    "Y": "j",
    "AA": "a a# aa A: A@ aI aI2 aI@ aU aU@",
    "EH": "E e e@ eI E2",
    "AH": "V @ @2 @5 @L 3 3: I# VR @-",
    "IY": "i i: I I2 IR i@",
    "OO": "u: U U@ u",
    "OH": "0 O: O@ O2 OI oU o@ O",
    "weak": ";",
}
# eSpeak NG English phoneme symbol (without stress marks) -> viseme class
PHONEME_VISEMES: dict[str, str] = {sym: cls for cls, syms in _CLASSES.items() for sym in syms.split()}


def viseme_class(symbol: str) -> str:
    """The viseme class of an eSpeak phoneme symbol (stress marks ignored); ``"AH"`` (a neutral, half-open
    mouth) for a symbol the table does not know."""
    return PHONEME_VISEMES.get(symbol.lstrip("',="), "AH")


def viseme_track(phonemes: Sequence, times: np.ndarray) -> np.ndarray:
    """``(F, 4)`` float32 jaw, round, close, spread at ``times`` (seconds) from a phoneme timeline.

    ``phonemes``: items with ``symbol``, ``start_ms``, ``end_ms`` (:class:`anim_lab.toy.Phoneme`). Each
    segment's dominance is ``alpha`` inside it and ``alpha · exp(-theta · d)`` at a distance ``d`` seconds
    outside it; the result is the dominance-weighted mean of the targets, then ``jaw *= 1 - close``.
    """
    if len(phonemes) == 0:
        raise InputError("the phoneme timeline is empty")
    t = np.asarray(times, np.float64)[:, None]  # (F, 1)
    classes = [VISEME_TABLE[viseme_class(p.symbol)] for p in phonemes]
    target = np.array([c[0] for c in classes])  # (S, 4)
    alpha = np.array([c[1] for c in classes])[None]  # (1, S)
    theta = np.array([c[2] for c in classes])[None]  # (1, S)
    start = np.array([p.start_ms for p in phonemes])[None] / 1000.0  # (1, S) seconds
    end = np.array([p.end_ms for p in phonemes])[None] / 1000.0
    distance = np.maximum(np.maximum(start - t, t - end), 0.0)  # (F, S) 0 inside the segment
    dominance = alpha * np.exp(-theta * distance)  # (F, S)
    track = dominance @ target / dominance.sum(1, keepdims=True)  # (F, S) @ (S, 4) -> (F, 4)
    track[:, 0] *= 1.0 - track[:, 2]  # a closure shuts the jaw
    return np.clip(track, 0.0, 1.0).astype(np.float32)
