"""Small helpers the tests share (pytest puts tests/ on sys.path: ``from helpers import tone``).

Random nonzero weights for equivalence tests live in the package, as ``anim_lab.plain.randomize``, because
the benchmarks use them too.
"""

import wave
from pathlib import Path

import numpy as np

# a micro wav2vec2 (transformers Wav2Vec2Config keywords): the audio encoder of the Hallo tests
MICRO_W2V = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    vocab_size=12,
)


def tone(path: str | Path, seconds: float = 2.0, rate: int = 16000, frequency: float = 440.0) -> Path:
    """Write a mono 16-bit WAV of a sine (amplitude 0.3 of full scale) to ``path`` and return ``path``: an
    audio track with known content for the video and CLI tests."""
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2").tobytes())
    return path
